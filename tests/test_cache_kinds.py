"""Cache kinds (position-indexed KV, ring, recurrent state) through the executor, sessions and state files.

The ``*-v1.tws`` fixtures were written once by the state-file code before cache kinds existed (format version 1,
no kinds in the metadata; see tests/fixtures/states/README.md); they must keep loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensorweave as tw
from tensorweave.core import ops
from tensorweave.core.executor import Executor
from tensorweave.core.graph import CacheSpec, Graph, Tensor
from tensorweave.core.model import Checkpoint, ModelFamily
from tensorweave.core.sharding import REPLICATED, Role, Split, State
from tensorweave.errors import ShapeError, StateError
from tensorweave.models.synthetic import random_weights
from tensorweave.runtime import session, state

FIXTURES = Path(__file__).parent / "fixtures"
V1_PARAMS = {"temperature": 1.3, "top_k": 40, "seed": 11}  # what the v1 fixtures' sessions sampled with
V1_PROMPTS = {"mistral": list(range(3, 15)), "qwen3": [5, 9, 13, 17, 21, 25]}


@pytest.mark.parametrize("family", sorted(V1_PROMPTS))
def test_version_1_state_files_still_restore(family: str) -> None:
    """mistral: both layers' rings wrapped (16 tokens, window 8); qwen3: plain KV caches. Saved at TP 2 (3:1),
    restored at TP 3 (2:1:1): the next logits match an uninterrupted run, and the sampler continues its stream."""
    path = FIXTURES / "states" / f"{family}-v1.tws"
    model = tw.load(FIXTURES / "models" / family / "hf", devices="cpu-sim:3", tensor_split=[2, 1, 1])
    ids = V1_PROMPTS[family]
    straight = model.generate(ids, 7, **V1_PARAMS)
    assert isinstance(straight, tw.runtime.session.Generation)
    resumed = model.restore(path)
    assert resumed.context == ids + straight.tokens[:4]
    rest = resumed.generate(None, 3)
    assert isinstance(rest, tw.runtime.session.Generation) and rest.tokens == straight.tokens[4:]
    after = [5, 6]
    whole = model.logits(ids + straight.tokens[:4] + after)[-2:]
    again = model.restore(path)  # (logits took the caches over)
    np.testing.assert_allclose(again.eval(after), whole, rtol=0, atol=1e-4)


# --- a recurrent state, proven with a test-only op -----------------------------------------------------------
# No family in the repo has a recurrent layer yet, so a small one is made here: "decay_scan" keeps a state
# s [K, H] (split along axis 1, the heads) that every token rewrites, s = decay * s + x_t^T, and outputs s^T.

SCAN = "test_decay_scan"  # registered per test: the op registry is process-wide


def _infer_scan(metas: list[Any], attrs: dict[str, Any]) -> Any:
    (xs, xd), (ss, _) = metas
    if len(xs) != 3 or ss != (xs[2], xs[1]):
        raise ShapeError(f"{SCAN}: x [T, H, K] and state [K, H], got {xs} and {ss}")
    return xs, xd


def _k_scan(xp: Any, out: Any, x: Any, s: Any, *, decay: float) -> None:
    for t in range(x.shape[0]):
        s[...] = decay * s + x[t].T
        out[t] = s.T


def _rule_scan(ins: list[State], shapes: list[Any], out: Any, attrs: dict[str, Any]) -> tuple[list[State], State]:
    s = ins[1]
    if isinstance(s, Split) and s.axis == 1:  # heads travel together: x along its axis 1, the output too
        return [Split(1, s.sizes), s], Split(1, s.sizes)
    return [REPLICATED, REPLICATED], REPLICATED


def scan_reference(x: np.ndarray, s: np.ndarray, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, final state) in float64 by the definition, one token at a time."""
    s, ys = s.astype(np.float64).copy(), []
    for xt in x.astype(np.float64):
        s = decay * s + xt.T
        ys.append(s.T.copy())
    return np.stack(ys), s


@pytest.fixture
def scan_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        ops.OPS, SCAN, ops.OpDef(SCAN, _infer_scan, _k_scan, _rule_scan, arity=(2, 2), attrs={"decay": ops.REQUIRED})
    )


@pytest.mark.usefixtures("scan_op")
def test_executor_cache_io_along_any_split_axis() -> None:
    """A state cache split along axis 1 over 3 uneven devices: runs equal the float64 definition, read_cache
    gathers it whole, write_cache scatters a whole value back; the same for a state split along axis 0 and a kv
    cache's rows (split along its KV-head axis 1)."""
    T, H, K = 3, 5, 2
    g = Graph("float64")
    x = g.input("x", (T, H, K), "float64")
    s = g.cache("s", (K, H), "state", axis=1, groups=H, layer=1)
    g.output("y", g.op(SCAN, x, s, decay=0.5))
    g.cache("s0", (H, K), "state", axis=0, groups=H)
    g.cache("kv", (6, H, K), "kv", axis=1, groups=H)
    ex = Executor("cpu-sim:3", "local", [2, 1, 1])
    assert [a.shape for a in ex.caches.get("s", [])] == []
    ex.ensure_caches(g)
    assert sum(a.shape[1] for a in ex.caches["s"]) == H and len({a.shape[1] for a in ex.caches["s"]}) > 1  # uneven
    rng = np.random.default_rng(0)
    state = np.zeros((K, H))
    for _ in range(2):
        xs = rng.standard_normal((T, H, K))
        want, state = scan_reference(xs, state, 0.5)
        np.testing.assert_allclose(ex.run(g, {"x": xs})["y"], want, rtol=1e-12)
        np.testing.assert_allclose(ex.read_cache("s"), state, rtol=1e-12)
    state = rng.standard_normal((K, H))
    ex.write_cache("s", state)
    xs = rng.standard_normal((T, H, K))
    np.testing.assert_allclose(ex.run(g, {"x": xs})["y"], scan_reference(xs, state, 0.5)[0], rtol=1e-12)
    whole = rng.standard_normal((H, K))
    ex.write_cache("s0", whole)
    assert sum(a.shape[0] for a in ex.caches["s0"]) == H and np.array_equal(ex.read_cache("s0"), whole)
    with pytest.raises(ShapeError, match="split along axis 0"):
        ex.read_cache("s0", np.arange(2))
    rows = rng.standard_normal((2, H, K))
    ex.write_cache("kv", rows, np.array([4, 1]))
    np.testing.assert_array_equal(ex.read_cache("kv", np.array([1, 4])), rows[::-1])
    np.testing.assert_array_equal(ex.read_cache("kv", np.array([0])), np.zeros((1, H, K)))
    with pytest.raises(ShapeError, match="values of shape"):
        ex.write_cache("kv", rows, np.array([0]))


def test_cache_declarations_are_checked() -> None:
    g = Graph()
    with pytest.raises(ShapeError, match="kind 'lstm'"):
        g.cache("c", (4, 2), "lstm", axis=None)
    with pytest.raises(ShapeError, match="axis 0"):
        g.cache("c", (4, 2, 3), "kv", axis=0)
    with pytest.raises(ShapeError, match="window"):
        g.cache("c", (4, 2, 3), "ring", axis=1, window=5)
    ring = g.cache("r", (4, 2, 3), "ring", axis=1, window=4)
    q = g.input("q", (1, 2, 3), "float32")
    pos = g.input("pos", (1,))
    with pytest.raises(ShapeError, match="ring cache"):
        g.attention(q, q, q, pos, scale=1.0, cache=(ring, ring), window=3)
    state = g.cache("s", (2, 3), "state", axis=None)
    with pytest.raises(ShapeError, match="state cache"):
        g.attention(q, q, q, pos, scale=1.0, cache=(state, state))
    assert ring.cache == CacheSpec("ring", 1, 4) and state.split_axis is None


def test_what_each_kind_holds_and_can_rewind() -> None:
    kv, ring, state = CacheSpec("kv", 1), CacheSpec("ring", 1, 4), CacheSpec("state", None)
    assert kv.positions(16, 10) == range(10) and ring.positions(4, 10) == range(6, 10)
    assert ring.positions(4, 3) == range(3) and state.positions(4, 10) is None
    assert kv.can_rewind(16, 10, 2) and ring.can_rewind(4, 4, 1) and not ring.can_rewind(4, 5, 4)
    assert not state.can_rewind(4, 10, 9) and state.can_rewind(4, 10, 10)
    assert CacheSpec("ring", 1, 2).can_rewind(4, 6, 4)  # needs positions 2, 3: the 4 slots still hold 2..5


@dataclass(frozen=True)
class ScanConfig:
    vocab: int = 30
    hidden: int = 12
    heads: int = 5
    k: int = 2
    window: int | None = None  # attention layer: a ring of this many slots (None: a kv cache of ctx rows)
    ctx: int = 40
    dtype: str = "float64"


class ScanFamily(ModelFamily):
    """Layer 0 attention (kv cache or ring), layer 1 the recurrent decay_scan, tied head."""

    name = "test-scan"

    def build(self, cfg: ScanConfig, tokens: int, n_logits: int | None = None) -> Graph:
        g = Graph(cfg.dtype, name=f"scan-{tokens}")
        ids, pos = g.input("tokens", (tokens,)), g.input("positions", (tokens,))
        embd = g.weight("token_embd", (cfg.vocab, cfg.hidden), Role.VOCAB)
        x = g.embedding(ids, embd)
        H, K = cfg.heads, cfg.k

        def heads(name: str, x: Tensor, layer: int) -> Tensor:
            w = g.weight(name, (H * K, cfg.hidden), Role.COLUMN, groups=H, layer=layer)
            return g.reshape(g.linear(g.rms_norm(x, eps=1e-5), w), shape=(tokens, H, K))

        def out(name: str, y: Tensor, layer: int) -> Tensor:
            w = g.weight(name, (cfg.hidden, H * K), Role.ROW, groups=H, layer=layer)
            return g.linear(g.reshape(y, shape=(tokens, H * K)), w)

        kind, rows = ("ring", cfg.window) if cfg.window else ("kv", cfg.ctx)
        kc, vc = (g.cache(f"blk.0.{n}", (rows, H, K), kind, axis=1, groups=H, window=cfg.window) for n in "kv")
        q, k, v = (heads(f"blk.0.attn_{n}", x, 0) for n in "qkv")
        x = x + out("blk.0.attn_output", g.attention(q, k, v, pos, scale=0.7, cache=(kc, vc), window=cfg.window), 0)
        state = g.cache("blk.1.state", (K, H), "state", axis=1, groups=H, layer=1)
        x = x + out("blk.1.out", g.op(SCAN, heads("blk.1.in", x, 1), state, decay=0.8), 1)
        if n_logits is not None:
            x = g.slice(x, axis=0, start=tokens - n_logits, stop=tokens)
        g.output("logits", g.linear(g.rms_norm(x, eps=1e-5), embd))
        return g


class MemoryCheckpoint(Checkpoint):
    """Random weights in memory: a model with a recurrent layer without writing a file format for it."""

    def __init__(self, config: ScanConfig) -> None:
        self.path, self.family, self.config = Path("memory/test-scan"), ScanFamily(), config
        self.dtype = np.dtype(config.dtype)
        self.weights = random_weights(self.family.build(config, 1), seed=5)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.weights[name].shape if name in self.weights else None

    def names(self) -> list[str]:
        return list(self.weights)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.weights[name][index]

    def fingerprint(self) -> str:
        return f"test-scan-{self.config.window}"


def scan_model(devices: str = "cpu-sim:1", split: list[float] | None = None, window: int | None = None) -> tw.Model:
    return tw.Model(MemoryCheckpoint(ScanConfig(window=window)), devices, split)


IDS = [int(t) for t in np.random.default_rng(3).integers(0, 30, 14)]


@pytest.mark.usefixtures("scan_op")
def test_recurrent_model_runs_the_same_on_any_split_and_in_steps() -> None:
    whole = scan_model().logits(IDS)
    model = scan_model("cpu-sim:3", [2, 1, 1])
    np.testing.assert_allclose(model.logits(IDS), whole, rtol=0, atol=1e-10)
    sess = model.session()
    parts = [sess.eval(IDS[:5]), sess.eval(IDS[5:6]), sess.eval(IDS[6:], last_only=True)]
    np.testing.assert_allclose(np.concatenate(parts[:2]), whole[:6], rtol=0, atol=1e-10)
    np.testing.assert_allclose(parts[2], whole[-1:], rtol=0, atol=1e-10)  # only the last row came back


@pytest.mark.usefixtures("scan_op")
@pytest.mark.parametrize("window", [None, 4])
def test_recurrent_state_saved_at_tp3_uneven_restores_at_tp1(window: int | None, tmp_path: Path) -> None:
    saver = scan_model("cpu-sim:3", [2, 1, 1], window)
    sess = saver.session()
    sess.eval(IDS[:10])
    path = sess.save(tmp_path / "scan.tws")
    after = IDS[10:]
    whole = scan_model(window=window).logits(IDS)[10:]
    for devices, split in (("cpu-sim:1", None), ("cpu-sim:2", [1, 3])):
        resumed = scan_model(devices, split, window).restore(path)
        assert resumed.context == IDS[:10]
        np.testing.assert_allclose(resumed.eval(after), whole, rtol=0, atol=1e-10)
    data = state.read(path)
    assert data.caches["blk.1.state"].kind == "state" and data.caches["blk.1.state"].values.shape == (2, 5)
    assert data.caches["blk.0.k"].kind == ("ring" if window else "kv")
    assert data.caches["blk.0.k"].first == (10 - window if window else 0)


@pytest.mark.usefixtures("scan_op")
def test_restore_refuses_a_state_that_does_not_fit_the_cache_kinds(tmp_path: Path) -> None:
    model = scan_model("cpu-sim:2")
    sess = model.session()
    sess.eval(IDS[:6])
    path = sess.save(tmp_path / "scan.tws")
    data = state.read(path)
    data.caches["blk.1.state"] = state.CacheState(None, np.zeros((6, 2, 5)))  # as a version-1 file would hold
    with pytest.raises(StateError, match=r"'blk.1.state' is a kv cache \(6, 2, 5\); this model's is a state"):
        model.session().load_state(data)
    data = state.read(path)
    data.caches["blk.0.k"] = state.CacheState("state", np.zeros((6, 5, 2)))
    with pytest.raises(StateError, match=r"'blk\.0\.k' holds"):
        model.session().load_state(data)
    assert model.active is sess and sess.eval([1]).shape == (1, 30)  # a refused restore changed nothing


@pytest.mark.usefixtures("scan_op")
@pytest.mark.parametrize("window", [None, 4])
def test_rewind_of_a_recurrent_state_refuses_or_comes_back_from_a_snapshot(window: int | None) -> None:
    model = scan_model("cpu-sim:3", [1, 2, 1], window)
    fresh = scan_model(window=window)
    sess = model.session()
    sess.eval(IDS[:6])
    with pytest.raises(StateError, match="recurrent state holds only the newest position"):
        sess.rewind(4)
    assert sess.n_past == 6  # refused: nothing changed
    sess.snapshot()
    sess.eval(IDS[6:12])
    with pytest.raises(StateError, match="no snapshot"):
        sess.rewind(5)
    sess.rewind(9)  # from the snapshot at 6, evaluating tokens 6..8 again
    assert sess.context == IDS[:9]
    other = [7, 3, 11]
    np.testing.assert_allclose(sess.eval(other), fresh.logits(IDS[:9] + other)[9:], rtol=0, atol=1e-10)
    sess.rewind(6)  # exactly at the snapshot
    np.testing.assert_allclose(sess.eval(other), fresh.logits(IDS[:6] + other)[6:], rtol=0, atol=1e-10)
    sess.rewind(0)
    assert sess.n_past == 0


def test_chat_through_wrapped_rings_comes_back_from_its_snapshot() -> None:
    """mistral (window 8): the first turn wraps the rings, so the second turn cannot rewind them in place; chat's
    snapshot before the first prompt's last token saves evaluating the first prompt again."""
    model = tw.load(FIXTURES / "models" / "mistral" / "hf")
    sess = model.session()
    messages = [{"role": "user", "content": "hello there, how are you"}]
    first = sess.chat(messages, 6)
    assert isinstance(first, tw.runtime.session.Generation) and first.prompt_tokens > 8
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    evaluated: list[int] = []
    orig = sess.eval
    sess.eval = lambda ids, **kw: (evaluated.append(len(ids)), orig(ids, **kw))[1]  # type: ignore[method-assign]
    second = sess.chat(messages, 6)
    assert isinstance(second, tw.runtime.session.Generation)
    tok = model.tokenizer
    assert tok is not None
    whole = tok.encode(tok.apply_chat_template(messages), add_special=False)
    assert sum(evaluated[:3]) < len(whole) - first.prompt_tokens + 2  # the first prompt was not evaluated again
    fresh = model.chat(messages, 6)
    assert isinstance(fresh, tw.runtime.session.Generation) and fresh.tokens == second.tokens


def test_prompt_evaluation_computes_the_head_for_the_last_row_only() -> None:
    """generate's prompt runs the graph whose head sees one row: its logits allgather moves [1, vocab]."""
    model = tw.load(FIXTURES / "models" / "qwen3" / "hf", devices="cpu-sim:3", tensor_split=[2, 1, 1])
    ids = V1_PROMPTS["qwen3"] * 2
    model.generate(ids, 2)
    shapes = {dict(key).get("n_logits"): g for key, g in model.graphs._graphs.items() if dict(key)["tokens"] > 1}
    assert set(shapes) == {1} and shapes[1].outputs["logits"].shape == (1, model.vocab)
    gathers = [c.shape for c in model.executor.plan(shapes[1]).collectives if c.kind == "allgather"]
    assert gathers == [(1, model.vocab)]
    sess = model.session()
    np.testing.assert_allclose(sess.eval(ids, last_only=True), model.logits(ids)[-1:], rtol=0, atol=1e-5)


def test_last_only_across_prefill_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "UBATCH", 4)
    model = tw.load(FIXTURES / "models" / "mistral" / "hf", devices="cpu-sim:2", tensor_split=[1, 2])
    ids = list(range(3, 14))
    whole = model.logits(ids)
    sess = model.session()
    np.testing.assert_allclose(sess.eval(ids, last_only=True), whole[-1:], rtol=0, atol=1e-5)
    assert sess.context == ids and sess.eval([], last_only=True).shape == (0, model.vocab)


def test_a_taken_over_session_refuses_to_rewind_and_chat_starts_over() -> None:
    model = tw.load(FIXTURES / "models" / "qwen3" / "hf")
    sess = model.session()
    messages = [{"role": "user", "content": "hi there"}]
    sess.chat(messages, 3)
    model.logits([1, 2, 3])  # takes the caches over
    with pytest.raises(StateError, match="taken over"):
        sess.rewind(2)
    with pytest.raises(StateError, match="taken over"):
        sess.save("unused.tws")
    again = sess.chat(messages, 3)  # cannot reuse its prefix: evaluates the conversation again, from the start
    fresh = model.chat(messages, 3)
    assert isinstance(again, tw.runtime.session.Generation) and isinstance(fresh, tw.runtime.session.Generation)
    assert again.tokens == fresh.tokens and again.prompt_tokens == fresh.prompt_tokens

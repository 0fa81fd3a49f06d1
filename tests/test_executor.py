"""Sharded runs equal the unsharded reference: random transformer-like graphs (attention with random head, KV-head
and head-dim counts, dense and MoE blocks) under random tensor_split ratios and world sizes 1..8, prefill then
decode through the KV cache. NMSE <= 1e-12 in float64 and <= 1e-6 in float32."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensorweave as tw
from tensorweave.core.executor import Executor
from tensorweave.core.graph import Graph, GraphCache
from tensorweave.core.planner import plan
from tensorweave.core.sharding import Role
from tensorweave.errors import PlanError, ShapeError, UnsupportedError
from tensorweave.models import blocks
from tensorweave.models.synthetic import Config, build, random_weights

NMSE_MAX = {"float64": 1e-12, "float32": 1e-6}


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(((a - b) ** 2).sum() / (b**2).sum())


@st.composite
def configs(draw: st.DrawFn) -> Config:
    n_kv = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    n_expert = draw(st.sampled_from([0, 0, 2, 3, 5]))
    return Config(
        vocab=draw(st.integers(8, 40)),
        hidden=draw(st.sampled_from([8, 12, 16])),
        n_layer=draw(st.integers(1, 3)),
        n_head=n_kv * draw(st.integers(1, 3)),
        n_kv=n_kv,
        head_dim=head_dim,
        ffn=draw(st.integers(1, 20)),
        n_expert=n_expert,
        top_k=draw(st.integers(1, max(n_expert, 1))),
        norm_topk=draw(st.booleans()),
        shared_ffn=draw(st.sampled_from([0, 5])),
        dense_layers=(0,) if draw(st.booleans()) else (),
        qk_norm=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()),
        window=draw(st.sampled_from([None, None, 1, 3])),
        softcap=draw(st.sampled_from([None, 3.0])),
        sinks=draw(st.booleans()),
        neox=draw(st.booleans()),
        n_rot=draw(st.sampled_from([None, 2])),
        tied=draw(st.booleans()),
        ctx=16,
        dtype=draw(st.sampled_from(["float64", "float32"])),
    )


def run_both(cfg: Config, devices: Any, tensor_split: Any, steps: list[int], seed: int, **kw: Any) -> Executor:
    """Prefill steps[0] tokens, then decode the rest one step each; compare every step's logits."""
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    weights = random_weights(graphs(tokens=steps[0]), seed)
    ex = Executor(devices, tensor_split=tensor_split, **kw)
    ex.load_weights(graphs(tokens=steps[0]), weights)
    rng = np.random.default_rng(seed)
    caches: dict[str, np.ndarray] = {}
    start = 0
    for n in steps:
        g = graphs(tokens=n)
        feeds = {"tokens": rng.integers(0, cfg.vocab, n), "positions": np.arange(start, start + n)}
        start += n
        want = g.evaluate(feeds, weights, caches)["logits"]
        got = ex.run(g, feeds)["logits"]
        assert got.shape == want.shape and got.dtype == want.dtype
        assert nmse(got, want) <= NMSE_MAX[cfg.dtype], (n, nmse(got, want))
    return ex


@given(
    cfg=configs(),
    world=st.integers(1, 8),
    data=st.data(),
    prompt=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_sharded_runs_equal_the_unsharded_reference(
    cfg: Config, world: int, data: st.DataObject, prompt: int, seed: int
) -> None:
    ratios = data.draw(st.lists(st.integers(0, 4), min_size=world, max_size=world), label="tensor_split")
    run_both(cfg, f"cpu-sim:{world}", ratios, [prompt, 1, 1], seed)


@pytest.mark.parametrize("world", range(1, 9))
def test_every_world_size_including_more_devices_than_kv_heads(world: int) -> None:
    cfg = Config(n_layer=2, n_head=6, n_kv=2, head_dim=4, n_expert=3, dense_layers=(0,), dtype="float64")
    run_both(cfg, f"cpu-sim:{world}", None, [4, 1, 1], seed=world)


@pytest.mark.parametrize("communicator", ["local", "peer"])
def test_decode_steps_allocate_no_device_memory(communicator: str) -> None:
    cfg = Config(n_layer=2, n_expert=3, dense_layers=(0,), sinks=True, o_bias=True)
    devs = tw.devices("cpu-sim:3,peer=ring")
    graphs = GraphCache(lambda tokens: build(cfg, tokens))
    ex = Executor(devs, communicator, tensor_split=[2, 1, 1])
    ex.load_weights(graphs(tokens=4), random_weights(graphs(tokens=4), 0))
    ex.run(graphs(tokens=4), {"tokens": np.arange(4), "positions": np.arange(4)})

    def decode(pos: int) -> None:
        ex.run(graphs(tokens=1), {"tokens": np.array([pos % cfg.vocab]), "positions": np.array([pos])})

    decode(4)  # the first decode step plans its graph and places its buffers
    before = [d.stats.allocations for d in devs]
    used = [d.memory_info().used for d in devs]
    for pos in range(5, 12):
        decode(pos)
    assert [d.stats.allocations for d in devs] == before
    assert [d.memory_info().used for d in devs] == used
    assert len(graphs) == 2  # one prefill graph, one decode graph shared by every step


def test_kv_cache_memory_is_split_by_kv_head() -> None:
    cfg = Config(n_layer=1, n_head=4, n_kv=4, head_dim=8, ctx=32)
    devs = tw.devices("cpu-sim:2")
    g = build(cfg, 1)
    ex = Executor(devs, tensor_split=[3, 1])
    ex.load_weights(g, random_weights(g, 0))
    ex.run(g, {"tokens": np.array([1]), "positions": np.array([0])})
    assert [ex.caches["blk.0.k_cache"][i].shape for i in range(2)] == [(32, 3, 8), (32, 1, 8)]


def test_reset_caches_starts_a_fresh_context() -> None:
    cfg = Config(n_layer=1, dtype="float64")
    g = build(cfg, 3)
    w = random_weights(g, 1)
    ex = Executor("cpu-sim:2")
    ex.load_weights(g, w)
    feeds = {"tokens": np.array([1, 2, 3]), "positions": np.arange(3)}
    first = ex.run(g, feeds)["logits"]
    ex.run(g, {"tokens": np.array([4, 5, 6]), "positions": np.arange(3, 6)})
    ex.reset_caches()
    np.testing.assert_array_equal(ex.run(g, feeds)["logits"], first)


def test_weights_come_as_slices_from_a_callable_source() -> None:
    cfg = Config(n_layer=1, dtype="float64")
    g = build(cfg, 2)
    w = random_weights(g, 2)
    asked: list[tuple[str, tuple[slice, ...]]] = []

    def source(name: str, index: tuple[slice, ...]) -> np.ndarray:
        asked.append((name, index))
        return w[name][index]

    ex = Executor("cpu-sim:2", tensor_split=[1, 1])
    ex.load_weights(g, source)
    assert ("blk.0.ffn_down", (slice(None), slice(12, 24))) in asked  # rank 1's input features only
    feeds = {"tokens": np.array([1, 2]), "positions": np.arange(2)}
    assert nmse(ex.run(g, feeds)["logits"], g.evaluate(feeds, w)["logits"]) < 1e-24


def test_reloading_weights_takes_effect() -> None:
    cfg = Config(n_layer=1, dtype="float64")
    g = build(cfg, 2)
    w1, w2 = random_weights(g, 1), random_weights(g, 2)
    feeds = {"tokens": np.array([1, 2]), "positions": np.arange(2)}
    ex = Executor("cpu-sim:2")
    ex.load_weights(g, w1)
    ex.run(g, feeds)
    ex.load_weights(g, w2)
    ex.reset_caches()
    assert nmse(ex.run(g, feeds)["logits"], g.evaluate(feeds, w2)["logits"]) < 1e-24


def test_token_ids_out_of_range_are_one_clear_error_on_every_split() -> None:
    for cfg, spec in ((Config(n_layer=1), "cpu-sim:1"), (Config(n_layer=1, tied=True), "cpu-sim:3")):
        g = build(cfg, 2)
        ex = Executor(spec)
        ex.load_weights(g, random_weights(g, 0))
        with pytest.raises(ShapeError, match=f"token ids must be in 0..{cfg.vocab - 1}, got 1..{cfg.vocab}"):
            ex.run(g, {"tokens": np.array([1, cfg.vocab]), "positions": np.arange(2)})


def test_clear_errors_for_missing_weights_and_bad_feeds() -> None:
    g = build(Config(n_layer=1), 2)
    ex = Executor("cpu-sim:2")
    with pytest.raises(PlanError, match="not loaded"):
        ex.run(g, {"tokens": np.array([1, 2]), "positions": np.arange(2)})
    w = random_weights(g, 0)
    with pytest.raises(ShapeError, match="has shape"):
        ex.load_weights(g, {**w, "blk.0.ffn_up": w["blk.0.ffn_up"][:3]})
    ex.load_weights(g, w)
    with pytest.raises(ShapeError, match="missing input 'positions'"):
        ex.run(g, {"tokens": np.array([1, 2])})
    with pytest.raises(ShapeError, match="input 'tokens' has shape"):
        ex.run(g, {"tokens": np.array([1, 2, 3]), "positions": np.arange(2)})


def test_graph_cache_reuses_graphs_by_signature() -> None:
    built: list[int] = []

    def make(tokens: int) -> Graph:
        built.append(tokens)
        return build(Config(n_layer=1), tokens)

    cache = GraphCache(make, maxsize=2)
    assert cache(tokens=1) is cache(tokens=1)
    cache(tokens=2)
    cache(tokens=3)  # evicts tokens=1
    cache(tokens=1)
    assert built == [1, 2, 3, 1] and len(cache) == 2


def test_backend_kernels_and_capabilities_are_honoured() -> None:
    from tensorweave.backends.cpu_sim import CpuSimBackend
    from tensorweave.core.device import Capabilities, DeviceSpec
    from tensorweave.core.ops import OPS

    calls: list[tuple[int, ...]] = []

    def counting_matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
        calls.append(w.shape)
        OPS["matmul"].kernel(xp, out, x, w)

    class Fast(CpuSimBackend):
        kernels = MappingProxyType({"matmul": counting_matmul})

    class Limited(CpuSimBackend):
        capabilities = Capabilities(dtypes=frozenset({"float32", "int32"}), ops=frozenset({"add", "embedding", "copy"}))

    cfg = Config(n_layer=1)
    g = build(cfg, 2)
    w = random_weights(g, 0)
    feeds = {"tokens": np.array([1, 2]), "positions": np.arange(2)}
    ex = Executor(Fast().devices(DeviceSpec.parse("cpu-sim:2")))
    ex.load_weights(g, w)
    assert nmse(ex.run(g, feeds)["logits"], g.evaluate(feeds, w)["logits"]) < 1e-10
    assert len(calls) == 2 * 8  # 8 matmuls per device: q k v o gate up down head
    ex = Executor(Limited().devices(DeviceSpec.parse("cpu-sim:2")))
    ex.load_weights(g, w)
    with pytest.raises(UnsupportedError, match=r"cpu-sim:0 .* does not support op 'rms_norm' in float32"):
        ex.run(g, feeds)


def test_partners_with_different_boundaries_are_regathered_not_wrong() -> None:
    """A column layer split in 2 groups feeding a row layer split per feature: the boundaries differ, so the
    planner gathers the activation and re-slices it for the row layer (correct, at the price of an allgather)."""
    g = Graph("float64")
    x = g.input("x", (3, 8), "float64")
    h = g.silu(g.linear(x, g.weight("up", (12, 8), Role.COLUMN, groups=2)))
    g.output("y", g.linear(h, g.weight("down", (8, 12), Role.ROW)))
    p = plan(g, 3, [2, 1, 1])
    assert [c.kind for c in p.collectives] == ["allgather", "allreduce"]
    rng = np.random.default_rng(0)
    w = {"up": rng.standard_normal((12, 8)), "down": rng.standard_normal((8, 12))}
    feeds = {"x": rng.standard_normal((3, 8))}
    ex = Executor("cpu-sim:3", tensor_split=[2, 1, 1])
    ex.load_weights(g, w)
    assert nmse(ex.run(g, feeds)["y"], g.evaluate(feeds, w)["y"]) < 1e-24


def test_a_strided_reshape_is_copied_through_the_backends_reshape_kernel() -> None:
    """A reshape of a transposed value cannot be a view: the executor copies the backend's reshape into a buffer,
    and checks the backend's capabilities for "reshape" (there is no separate op to declare)."""
    from tensorweave.backends.cpu_sim import CpuSimBackend
    from tensorweave.core.device import Capabilities, DeviceSpec
    from tensorweave.core.ops import OPS

    reshapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def counting_reshape(xp: Any, x: Any, *, shape: tuple[int, ...]) -> Any:
        reshapes.append((x.shape, shape))
        return OPS["reshape"].kernel(xp, x, shape=shape)

    class Counting(CpuSimBackend):
        kernels = MappingProxyType({"reshape": counting_reshape})

    class NoReshape(CpuSimBackend):
        capabilities = Capabilities(dtypes=frozenset({"float32"}), ops=frozenset({"transpose", "mul"}))

    g = Graph("float32")
    y = g.reshape(g.transpose(g.input("x", (4, 6), "float32"), perm=(1, 0)), shape=(24,))
    g.output("y", g.mul(y, y))
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    out = Executor(Counting().devices(DeviceSpec.parse("cpu-sim:1"))).run(g, {"x": x})["y"]
    np.testing.assert_array_equal(out, x.T.reshape(-1) ** 2)
    assert ((6, 4), (24,)) in reshapes  # the transposed value, reshaped by the backend's kernel
    with pytest.raises(UnsupportedError, match="does not support op 'reshape' in float32"):
        Executor(NoReshape().devices(DeviceSpec.parse("cpu-sim:1"))).run(g, {"x": x})


def test_shared_expert_block_is_a_sigmoid_gated_ffn() -> None:
    """blocks.shared_expert against numpy float64: down(silu(gate h) * up h) * sigmoid(h . gate_inp); the sharded
    runs above hold it to this reference on every split."""
    cfg = Config(hidden=8, n_expert=2, shared_ffn=6, dtype="float64")
    g = Graph("float64", name="shexp")
    h = g.input("h", (5, 8), "float64")
    g.output("y", blocks.shared_expert(g, cfg, cfg.layer(0), h))
    w = random_weights(g, seed=4)
    x = np.random.default_rng(5).standard_normal((5, 8))
    gate, up, down, router = (w[f"blk.0.ffn_{n}_shexp"] for n in ("gate", "up", "down", "gate_inp"))
    a = x @ gate.T
    want = (a / (1 + np.exp(-a)) * (x @ up.T)) @ down.T / (1 + np.exp(-(x @ router.T)))
    np.testing.assert_allclose(g.evaluate({"h": x}, w)["y"], want, rtol=1e-12, atol=1e-12)

"""A 16-bit KV cache (``tw.load(cache_dtype=...)``, ``-ctk``/``-ctv``): keys and values are stored rounded to
float16 or bfloat16 and read back into float32 attention. Held against independent references: a float64 numpy
attention over the rounded keys and values, and transformers' float32 logits of the fixture models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import tensorweave as tw
from tensorweave.cli import build_parser, main
from tensorweave.core import dtypes
from tensorweave.core.device import Capabilities
from tensorweave.core.graph import Graph
from tensorweave.errors import StateError, UnsupportedError
from tensorweave.runtime import kvcache

FIXTURES = Path(__file__).parent / "fixtures" / "models"
# llama: GQA 8/2 (kv caches); mistral: every layer a window of 8 (rings, which wrap after 8 tokens); qwen3_next:
# full-attention layers beside linear-attention layers whose recurrent states must stay float32
FAMILIES = ["llama", "mistral", "qwen3_next"]
SIXTEEN = ["float16", "bfloat16"]


def load(name: str, devices: str = "cpu-sim:1", split: list[float] | None = None, **kw: Any) -> tw.Model:
    return tw.load(FIXTURES / name / "hf", devices=devices, tensor_split=split, **kw)


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def eps(dtype: str) -> float:
    return float(dtypes.finfo(dtype).eps)


# --- the attention op against a from-scratch reference ---------------------------------------------------------


def reference_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: np.ndarray, scale: float, window: int | None
) -> np.ndarray:
    """softmax(q k^T * scale) v in float64, one query at a time, over keys/values of positions 0..len-1 (GQA)."""
    n_head, n_kv = q.shape[1], keys.shape[1]
    out = np.zeros(q.shape)
    for t, p in enumerate(pos):
        seen = np.arange(len(keys))
        seen = seen[(seen <= p) & (seen > p - window if window else True)]
        for h in range(n_head):
            kv = h // (n_head // n_kv)
            s = keys[seen, kv] @ q[t, h] * scale
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ values[seen, kv]
    return out


@pytest.mark.parametrize("window", [None, 4], ids=["kv", "ring"])
@pytest.mark.parametrize("cache", SIXTEEN)
def test_attention_over_a_16bit_cache_equals_float64_attention_over_the_rounded_keys_and_values(
    cache: str, window: int | None
) -> None:
    """A prompt of 6 then 4 single steps: each step's output is the exact attention over every key and value so
    far rounded once to the cache dtype (float32 compute: 1e-5), and differs from attention over unrounded ones.
    The ring (4 slots) has wrapped by the end, and its step's own keys are read as stored too."""
    rng = np.random.default_rng(0)
    n, n_head, n_kv, hd, scale = 10, 4, 2, 8, 8**-0.5
    q, k, v = (rng.standard_normal((n, h, hd)).astype(np.float32) for h in (n_head, n_kv, n_kv))
    caches: dict[str, np.ndarray] = {}
    got = []
    for lo, hi in ((0, 6), *((i, i + 1) for i in range(6, n))):
        g = Graph("float32")
        qt, kt, vt = (g.input(x, (hi - lo, h, hd), "float32") for x, h in (("q", n_head), ("k", n_kv), ("v", n_kv)))
        pos = g.input("positions", (hi - lo,))
        kind, rows = ("ring", window) if window else ("kv", n)
        kc, vc = (g.cache(c, (rows, n_kv, hd), kind, axis=1, dtype=cache, window=window) for c in ("kc", "vc"))
        g.output("y", g.attention(qt, kt, vt, pos, scale=scale, cache=(kc, vc), window=window))
        feeds = {"q": q[lo:hi], "k": k[lo:hi], "v": v[lo:hi], "positions": np.arange(lo, hi, dtype=np.int32)}
        got.append(g.evaluate(feeds, {}, caches)["y"])
        assert caches["kc"].dtype == dtypes.to_dtype(cache)
    y = np.concatenate(got)
    kr, vr = (x.astype(dtypes.to_dtype(cache)).astype(np.float64) for x in (k, v))
    np.testing.assert_allclose(y, reference_attention(q, kr, vr, np.arange(n), scale, window), rtol=0, atol=1e-5)
    exact = reference_attention(q, k.astype(np.float64), v.astype(np.float64), np.arange(n), scale, window)
    assert np.abs(y - exact).max() > 1e-4  # the cache really holds 16 bits


# --- models ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_16bit_cache_logits_stay_within_the_cache_dtypes_rounding_of_transformers(family: str) -> None:
    """At TP 2 split 3:1, the fixture's 24 tokens: a float16 (bfloat16) cache keeps the logits within one machine
    epsilon of the cache dtype (9.8e-4; 7.8e-3), relative to the largest logit, of transformers' float32 run (each
    cached value is off by at most half an epsilon, and attention averages such values). The 16-bit runs are not
    the float32 cache's, float16 lands nearer than bfloat16, and cache_dtype="float32" is the default exactly."""
    want = expected(family)
    ids, ref = want["tokens"].tolist(), want["logits"]
    scale = float(np.abs(ref).max())
    default = load(family, "cpu-sim:2", [3, 1]).logits(ids)
    np.testing.assert_array_equal(load(family, "cpu-sim:2", [3, 1], cache_dtype="float32").logits(ids), default)
    err = {}
    for cache in SIXTEEN:
        got = load(family, "cpu-sim:2", [3, 1], cache_dtype=cache).logits(ids)
        err[cache] = float(np.abs(got - ref).max())
        assert err[cache] <= eps(cache) * scale, (cache, err[cache], eps(cache) * scale)
        assert not np.array_equal(got, default)
    assert err["float16"] < err["bfloat16"]


@pytest.mark.parametrize("family", FAMILIES)
def test_16bit_cache_holds_half_the_kv_bytes_on_the_devices_and_in_the_plan(family: str) -> None:
    """Bytes the devices allocate for the caches (cpu-sim's live bytes) and the plan's KV-cache bytes: attention's
    caches halve, recurrent states (qwen3_next) keep their float32 bytes."""
    held, planned = {}, {}
    for cache in ("float32", "float16", "bfloat16"):
        model = load(family, "cpu-sim:2", [3, 1], cache_dtype=cache)
        devs = model.executor.devices
        before = [d.memory_info().used for d in devs]
        model.executor.ensure_caches(model.graphs(tokens=1))  # nothing ran yet: this allocates every cache
        held[cache] = [d.memory_info().used - b for d, b in zip(devs, before, strict=True)]
        p = model.plan
        planned[cache] = (p.cache_bytes, p.state_bytes)
        assert held[cache] == p.cache_bytes
    kv32 = [c - s for c, s in zip(*planned["float32"], strict=True)]
    for cache in SIXTEEN:
        cache_bytes, state_bytes = planned[cache]
        assert state_bytes == planned["float32"][1]
        assert [c - s for c, s in zip(cache_bytes, state_bytes, strict=True)] == [b // 2 for b in kv32]
    assert family != "qwen3_next" or any(planned["float32"][1])


def test_recurrent_states_stay_float32_and_k_and_v_take_their_own_dtypes() -> None:
    model = load("qwen3_next", cache_dtype=("bfloat16", "float16"))
    roles = kvcache.kv_caches(model.graphs(tokens=1))
    assert roles and set(roles.values()) == {"k", "v"}
    for name, t in model.caches.items():
        want = {"k": dtypes.bfloat16, "v": dtypes.float16}.get(roles.get(name, ""), dtypes.float32)
        assert t.dtype == want, name
        assert all(a.dtype == want for a in model.executor.caches.get(name, []))
    assert "kv cache k bf16, v f16" in repr(model)
    assert load("llama", dtype="float64").caches["blk.0.k_cache"].dtype == dtypes.float64  # the compute dtype


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("cache", SIXTEEN)
def test_greedy_decode_over_a_16bit_cache_across_prefill_and_single_steps(family: str, cache: str) -> None:
    """A 16-token prompt, then 8 tokens one step at a time: TP 1 and TP 2 (1:3) give the same greedy tokens as
    transformers' float32 greedy run of the fixture; stepping gives the logits of evaluating everything at once
    (every value is rounded once, whatever the steps; mistral's rings wrap on the way). Only float32 noise differs
    (BLAS blocks 16 rows unlike 24), and where it flips a value's rounding to the cache dtype that value moves by
    one unit in its last place: so a quarter of the epsilon bound above, not float32's 1e-5."""
    want = expected(family)
    prompt = want["tokens"][: int(want["greedy_prompt_len"])].tolist()
    runs = [load(family, cache_dtype=cache), load(family, "cpu-sim:2", [1, 3], cache_dtype=cache)]
    for model in runs:
        gen = model.generate(prompt, len(want["greedy"]), temperature=0.0)
        assert isinstance(gen, tw.runtime.session.Generation)
        assert gen.tokens == want["greedy"].tolist()
    ids = want["tokens"].tolist()
    sess = runs[1].session()
    stepped = np.concatenate([sess.eval(ids[:16]), *(sess.eval([t]) for t in ids[16:])])
    whole = runs[1].logits(ids)
    np.testing.assert_allclose(stepped, whole, rtol=0, atol=eps(cache) * float(np.abs(whole).max()) / 4)


@pytest.mark.parametrize("family", ["mistral", "qwen3_next"])
def test_state_saved_from_a_float16_cache_restores_into_float16_and_converts_into_float32(
    family: str, tmp_path: Path
) -> None:
    """Saved at TP 2 (3:1) from a float16 cache: the file holds F16 caches (read by the safetensors package) and
    float32 states; restored with a float16 cache it holds the saved values exactly and continues as the saver
    does (bit for bit on the saver's split), and into a float32 cache it holds them widened exactly. A float32
    state restores into a float16 cache rounded once. A flipped bit in the file is still caught."""
    ids = expected(family)["tokens"].tolist()
    saver = load(family, "cpu-sim:2", [3, 1], cache_dtype="float16")
    sess = saver.session()
    sess.eval(ids[:18])
    path = sess.save(tmp_path / "f16.tws")
    roles = kvcache.kv_caches(saver.graphs(tokens=1))
    tensors = safetensors.numpy.load_file(str(path))
    assert {n: a.dtype for n, a in tensors.items() if n in roles} == dict.fromkeys(roles, np.dtype(np.float16))
    assert all(a.dtype == np.float32 for n, a in tensors.items() if n not in roles)

    straight = sess.eval(ids[18:])  # the saver goes on: a restore on its split must compute exactly this
    same = load(family, "cpu-sim:2", [3, 1], cache_dtype="float16").restore(path)
    np.testing.assert_array_equal(same.eval(ids[18:]), straight)
    one = load(family, cache_dtype="float16")
    resumed = one.restore(path)
    for name in roles:
        np.testing.assert_array_equal(one.executor.read_cache(name, held_rows(one, name, 18)), tensors[name])
    # at TP 1 the new tokens' float32 noise may flip a rounding to float16 (see the greedy test above)
    atol = eps("float16") * float(np.abs(straight).max()) / 4
    np.testing.assert_allclose(resumed.eval(ids[18:]), straight, rtol=0, atol=atol)

    wide = load(family, "cpu-sim:3", [1, 1, 1])
    wide.restore(path)
    for name in roles:
        rows = held_rows(wide, name, 18)
        np.testing.assert_array_equal(wide.executor.read_cache(name, rows), tensors[name].astype(np.float32))

    f32 = load(family).session()
    f32.eval(ids[:18])
    f32_path = f32.save(tmp_path / "f32.tws")
    narrow = load(family, cache_dtype="float16")
    narrow.restore(f32_path)
    saved32 = safetensors.numpy.load_file(str(f32_path))
    for name in roles:
        rows = held_rows(narrow, name, 18)
        np.testing.assert_array_equal(narrow.executor.read_cache(name, rows), saved32[name].astype(np.float16))

    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    (tmp_path / "flipped.tws").write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum mismatch"):
        load(family, cache_dtype="float16").restore(tmp_path / "flipped.tws")


def held_rows(model: tw.Model, name: str, n: int) -> np.ndarray:
    """The rows of cache ``name`` that hold positions 0..n-1 (a ring: the last ones it keeps), in position order:
    the order a state file stores them in."""
    t = model.caches[name]
    assert t.cache is not None
    held = t.cache.positions(t.shape[0], n)
    assert held is not None
    return np.arange(held.start, held.stop) % t.shape[0]


def test_state_saved_from_a_bfloat16_cache_restores(tmp_path: Path) -> None:
    ids = expected("llama")["tokens"].tolist()
    sess = load("llama", "cpu-sim:2", [1, 2], cache_dtype="bfloat16").session()
    sess.eval(ids[:12])
    path = sess.save(tmp_path / "bf16.tws")
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["blk.0.k_cache"]["dtype"] == "BF16"
    straight = load("llama", cache_dtype="bfloat16").logits(ids)[12:]
    np.testing.assert_allclose(
        load("llama", cache_dtype="bf16").restore(path).eval(ids[12:]), straight, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("bad", ["int8", "float8", "q8_0", "int32", np.int8, ("f16", "f16", "f16"), ("f16", "q4_0")])
def test_a_cache_dtype_that_is_not_a_float_is_one_error_naming_the_allowed_values(bad: Any) -> None:
    with pytest.raises(UnsupportedError) as e:
        load("llama", cache_dtype=bad)
    msg = str(e.value)
    assert "\n" not in msg and ("float32, float16, bfloat16" in msg or "(k, v) pair" in msg)


def test_a_backend_that_cannot_run_attention_over_a_cache_dtype_refuses_it_at_load() -> None:
    """A GPU backend holds bfloat16 as bits with no attention kernel for it: asking it for a bfloat16 cache is
    refused by name (here a stand-in device with the cuda backend's capabilities)."""
    caps = Capabilities(dtypes=frozenset({"float32", "float16", "float64", "int32"}))
    gpu = SimpleNamespace(name="cuda:0", backend=SimpleNamespace(name="cuda", capabilities=caps))
    types = kvcache.cache_types(("float16", "bfloat16"), "float32")
    with pytest.raises(UnsupportedError, match=r"cuda:0 \(cuda\) cannot hold a bfloat16 KV cache; .*float32, float16"):
        kvcache.check_devices([gpu], types, "float32")  # type: ignore[list-item]
    kvcache.check_devices([gpu], kvcache.cache_types("f16", "float32"), "float32")  # type: ignore[list-item]


# --- the command line ------------------------------------------------------------------------------------------

QWEN3 = str(FIXTURES / "qwen3" / "hf")


def test_every_command_that_takes_a_context_takes_cache_types() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    with_ctx = {name for name, opts in options.items() if "--ctx-size" in opts}
    assert {"run", "chat", "serve", "bench", "plan"} <= with_ctx
    for name in with_ctx:
        assert {"-ctk", "--cache-type-k", "-ctv", "--cache-type-v"} <= options[name], name


def test_plan_reports_kv_bytes_in_the_chosen_cache_types(capsys: pytest.CaptureFixture[str]) -> None:
    plans = {}
    for flags in ([], ["-ctk", "f16", "-ctv", "f16"], ["--cache-type-k", "bf16", "--cache-type-v", "f32"]):
        assert main(["plan", QWEN3, "--devices", "cpu-sim:2", "-ts", "3,1", "-c", "128", "--json", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        plans[tuple(flags)] = out
    full, half, mixed = plans.values()
    assert (full["cache_type_k"], half["cache_type_k"], mixed["cache_type_k"]) == ("float32", "float16", "bfloat16")
    assert mixed["cache_type_v"] == "float32"
    kv = [[d["kv_cache_bytes"] for d in p["devices"]] for p in (full, half, mixed)]
    assert kv[1] == [b // 2 for b in kv[0]] and kv[2] == [3 * b // 4 for b in kv[0]]
    assert main(["plan", QWEN3, "-ctk", "f16", "-ctv", "f16"]) == 0
    assert "kv cache (256 tok, f16)" in capsys.readouterr().out


def test_run_with_16bit_cache_types_generates_and_bad_types_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", QWEN3, "-p", "hello", "-n", "4", "-ctk", "bf16", "-ctv", "f16", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 4
    for value in ("q8_0", "int8"):
        with pytest.raises(SystemExit) as e:
            main(["run", QWEN3, "-p", "x", "-ctk", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert err.splitlines()[-1].startswith(
            f"tensorweave run: error: argument -ctk/--cache-type-k: expected one of f32, f16, bf16, got '{value}'"
        )
    assert "quantized KV caches are not supported" in _last_error(["bench", QWEN3, "-ctv", "q4_0"], capsys)


def _last_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("window", [None, 4], ids=["kv", "ring"])
@pytest.mark.parametrize("cache", SIXTEEN)
def test_cpu_sim_attention_over_a_16bit_cache_is_the_reference_bit_for_bit(cache: str, window: int | None) -> None:
    """cpu-sim widens 16-bit keys and values with a compiled conversion instead of numpy's: the same values."""
    from tensorweave.backends.cpu_sim import KERNELS
    from tensorweave.core.ops import OPS

    if "attention" not in KERNELS:
        pytest.skip("numba is not installed: cpu-sim runs the reference attention")
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, h, 16)).astype(np.float32) for h in (4, 2, 2))
    caches = [rng.standard_normal((window or 16, 2, 16)).astype(dtypes.to_dtype(cache)) for _ in "kv"]
    pos = np.arange(9, 12, dtype=np.int32)
    outs = []
    for kernel in (OPS["attention"].kernel, KERNELS["attention"]):
        out = np.empty(q.shape, np.float32)
        kernel(np, out, q, k, v, pos, *(c.copy() for c in caches), scale=0.25, cache=True, window=window)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_cpu_sim_attention_widens_16bit_caches_and_keeps_the_compiled_step_for_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only 16-bit caches take the widening path (core's kernel through the compiled row conversion): a float32
    cache goes to the compiled decode step as before."""
    from tensorweave.backends import cpu_kernels
    from tensorweave.backends.cpu_sim import KERNELS

    if "attention" not in KERNELS:
        pytest.skip("numba is not installed: cpu-sim runs the reference attention")
    calls: list[str] = []
    monkeypatch.setattr(cpu_kernels, "_ATTEND", lambda *args: calls.append("compiled"))
    monkeypatch.setattr(cpu_kernels, "_attend_16bit", lambda xp, out, *ins, **kw: calls.append(ins[4].dtype.name))
    q, k, v = (np.ones((1, h, 8), np.float32) for h in (2, 1, 1))
    for cache in ("float32", "float16", "bfloat16"):
        ck, cv = (np.zeros((4, 1, 8), dtypes.to_dtype(cache)) for _ in "kv")
        KERNELS["attention"](
            np, np.empty(q.shape, np.float32), q, k, v, np.zeros(1, np.int32), ck, cv, scale=1.0, cache=True
        )
    assert calls == ["compiled", "float16", "bfloat16"]

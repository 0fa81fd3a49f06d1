"""Weights held as stored: 16-bit floats and GGUF quantization blocks stay compact on the devices, activations are
float32, and splits fall on block boundaries.

References are independent: ``gguf.quants`` for dequantization, transformers' float32 logits on exactly the weights a
file holds (tools/make_weight_fixtures.py), and the unsharded numpy graph on ``gguf.quants``-dequantized weights.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from test_loaders import reference

import tensorweave as tw
from tensorweave.backends.cpu_kernels import FEW_ROWS, KERNELS, fast_linear
from tensorweave.backends.cpu_sim import CpuSimBackend
from tensorweave.conformance.cases import random_held
from tensorweave.core import dtypes
from tensorweave.core.device import Capabilities, DeviceSpec
from tensorweave.core.graph import Graph
from tensorweave.core.ops.weights import Packed, dequantize, linear, take_rows
from tensorweave.core.sharding import Role, local_slice
from tensorweave.runtime import formats
from tensorweave.runtime.bench import plan_model

FIXTURES = Path(__file__).parent / "fixtures" / "models"
QUANTS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
TP_SPLITS = [("cpu-sim", None), ("cpu-sim:2", [3, 1]), ("cpu-sim:3", [1, 2, 1]), ("cpu-sim:4", [1, 1, 1, 5])]


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random rows of ``fmt`` blocks with sane float16 scales (the conformance kit's generator)."""
    return random_held(fmt, (rows, cols), np.random.default_rng(seed))


@pytest.mark.parametrize("fmt", QUANTS)
def test_reference_dequantization_equals_gguf_quants(fmt: str) -> None:
    f = dtypes.FORMATS[fmt]
    assert gguf.GGML_QUANT_SIZES[Q[fmt.upper()]] == (f.block, f.block_bytes)
    raw = random_blocks(fmt, 6, 2 * f.block, seed=1)
    want = gguf_dequantize(raw, Q[fmt.upper()])
    np.testing.assert_array_equal(dequantize(np, raw, f), want)
    w = Packed(raw, f, (6, 2 * f.block))
    ids = np.array([4, 0, 4], np.int32)
    np.testing.assert_array_equal(take_rows(np, w, ids), want[ids])  # only the rows read are dequantized
    x = np.random.default_rng(2).standard_normal((3, 2 * f.block)).astype(np.float32)
    np.testing.assert_allclose(linear(np, x, w), x.astype(np.float64) @ want.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS + 12])
@pytest.mark.parametrize("fmt", ["f16", "bf16", *QUANTS])
def test_compiled_kernels_equal_the_reference(fmt: str, rows: int) -> None:
    """cpu-sim's numba kernels (fused decode, convert-then-BLAS prompts) against the numpy reference, float16's
    inf/NaN/subnormals included; zero-size weight shards and activations pass through."""
    rng = np.random.default_rng(3)
    n, k = 70, 512
    base = rng.standard_normal((n, k)).astype(np.float32)
    if fmt == "q8_0":
        w: Any = Packed(gguf.quants.quantize(base, Q.Q8_0), dtypes.FORMATS["q8_0"], (n, k))
    elif fmt != "f16" and fmt != "bf16":
        w = Packed(random_blocks(fmt, n, k), dtypes.FORMATS[fmt], (n, k))
    else:
        w = base.astype(dtypes.to_dtype("float16" if fmt == "f16" else "bfloat16"))
        if fmt == "f16":
            w[0, :4] = [np.inf, -np.inf, 6e-8, -3e-5]
            w[1, 0] = np.nan
    x = rng.standard_normal((rows, k)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 in the float16 row is NaN, in both
        want = linear(np, x, w)
        got = fast_linear(np, x, w)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = np.empty((rows, n), np.float32)
    with np.errstate(invalid="ignore"):
        KERNELS["matmul"](np, out, x, w)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    empty = w[:0] if not isinstance(w, Packed) else Packed(w.data[:0], w.fmt, (0, k))
    assert fast_linear(np, x, empty).shape == (rows, 0)


@pytest.mark.parametrize("fmt", ["f16", "q8_0"])
def test_large_weights_split_their_rows_over_threads_in_a_fresh_process(fmt: str) -> None:
    """A weight past PARALLEL_MIN runs the parallel kernel, also when both twins (parallel and one-thread) load from
    numba's cache: they once shared a cache entry, and a fresh process then ran large weights on one thread."""
    code = f"""
import numpy as np, numba
from tensorweave.backends import cpu_kernels as ck
from tensorweave.core import dtypes
from tensorweave.core.ops.weights import Packed
numba.set_num_threads(2)
x = np.ones((1, 512), np.float32)
small, big = (np.zeros((n, 512), np.float16) for n in (8, 2 * ck.PARALLEL_MIN // 512))
if "{fmt}" == "q8_0":
    q8 = dtypes.FORMATS["q8_0"]
    small, big = (Packed(np.zeros((w.shape[0], 16 * 34), np.uint8), q8, w.shape) for w in (small, big))
ck.fast_linear(np, x, big)
print(numba.threading_layer())  # raises where no parallel region ever ran
ck.fast_linear(np, x, small)  # the one-thread twin saves to the cache last
"""
    for _ in range(2):  # the second run loads both twins from the cache the first one wrote
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() in ("omp", "tbb"), run.stdout


def write_quantized(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """A one-layer qwen3 GGUF whose matrices are all ``fmt`` blocks (norms F32); returns the stored tensors."""
    hidden, ffn, n_head, n_kv, hd, vocab = 256, 512, 4, 2, 64, 64
    w = gguf.GGUFWriter(str(path), "qwen3")
    for add, v in [
        (w.add_block_count, 1),
        (w.add_embedding_length, hidden),
        (w.add_head_count, n_head),
        (w.add_head_count_kv, n_kv),
        (w.add_key_length, hd),
        (w.add_value_length, hd),
        (w.add_feed_forward_length, ffn),
        (w.add_context_length, 64),
        (w.add_vocab_size, vocab),
    ]:
        add(v)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    shapes = {
        "token_embd": (vocab, hidden),
        "blk.0.attn_q": (n_head * hd, hidden),
        "blk.0.attn_k": (n_kv * hd, hidden),
        "blk.0.attn_v": (n_kv * hd, hidden),
        "blk.0.attn_output": (hidden, n_head * hd),
        "blk.0.ffn_gate": (ffn, hidden),
        "blk.0.ffn_up": (ffn, hidden),
        "blk.0.ffn_down": (hidden, ffn),
        "output": (vocab, hidden),
    }
    stored: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(7)
    for i, (name, shape) in enumerate(shapes.items()):
        stored[name] = random_blocks(fmt, *shape, seed=i)
        w.add_tensor(name + ".weight", stored[name], raw_dtype=Q[fmt.upper()])
    for name, n in [("blk.0.attn_norm", hidden), ("blk.0.ffn_norm", hidden), ("output_norm", hidden)]:
        stored[name] = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(name + ".weight", stored[name])
    for name in ("blk.0.attn_q_norm", "blk.0.attn_k_norm"):
        stored[name] = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32)
        w.add_tensor(name + ".weight", stored[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("fmt", QUANTS)
def test_every_quant_type_loads_per_device_slice_under_an_uneven_split(tmp_path: Path, fmt: str) -> None:
    stored = write_quantized(tmp_path / f"{fmt}.gguf", fmt)
    qtype = Q[fmt.upper()]
    model = tw.load(tmp_path / f"{fmt}.gguf", devices="cpu-sim:3", tensor_split=[2, 1, 1])
    ex, g = model.executor, model.graphs(tokens=1)
    for name, raw in stored.items():
        if raw.dtype != np.uint8:
            continue
        assert ex.formats[name].name == fmt
        t = g.weights[name]
        state = t.placement(ex.ratios)
        parts = [dev.to_host(a) for dev, a in zip(ex.devices, ex.weights[name], strict=True)]
        assert all(p.dtype == np.uint8 for p in parts)  # held as the file's blocks, not as floats
        whole = gguf_dequantize(raw, qtype)
        for rank, part in enumerate(parts):  # each device's bytes dequantize to its slice of the whole
            mine = whole[local_slice(t.shape, state, rank)]
            assert part.nbytes == ex.formats[name].nbytes(mine.shape)
            if part.size:  # (gguf.quants cannot take an empty array)
                np.testing.assert_array_equal(gguf_dequantize(part, qtype), mine)
    sizes = {n: [p.shape for p in ex.weights[n]] for n in ("blk.0.ffn_down", "blk.0.attn_output")}
    assert len({s for s in sizes["blk.0.ffn_down"]}) > 1  # uneven: the devices differ
    weights = {n: gguf_dequantize(a, qtype) if a.dtype == np.uint8 else a for n, a in stored.items()}
    ids = np.array([3, 17, 42, 5, 63], np.int32)
    want = reference(model.family, model.config, weights, ids)
    got = model.logits(ids)
    assert float(np.abs(got - want).max()) < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert any("units of" in n for n in model.plan.notes)  # the widened split unit is reported


def test_a_k_quant_file_takes_about_its_size_in_device_memory_whatever_the_split(tmp_path: Path) -> None:
    path = tmp_path / "q4_k.gguf"
    write_quantized(path, "q4_k")
    size = path.stat().st_size
    for devices, split in TP_SPLITS:
        model = tw.load(path, devices=devices, tensor_split=split)
        held = sum(d.memory_info().used for d in model.executor.devices)  # weights only: no step has run yet
        assert held <= 1.3 * size, f"{devices} {split}: {held} bytes held for a {size}-byte file"


def expected_weights(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "weights" / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_gguf_mixing_q8_0_f16_f32_matches_transformers_at_tp_1_to_4(name: str) -> None:
    ref = expected_weights(name)
    for devices, split in TP_SPLITS:
        model = tw.load(FIXTURES / name / "weights" / "model-mixed.gguf", devices=devices, tensor_split=split)
        held = {f.name for f in model.executor.formats.values()}
        assert held == {"q8_0", "f16", "f32"} and model.config.dtype == "float32"
        err = float(np.abs(model.logits(ref["tokens"]) - ref["logits_mixed"]).max())
        assert err < 1e-3, f"{name} {devices} {split}: {err:.2e}"


@pytest.mark.parametrize("half", ["bf16", "f16"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_16_bit_checkpoints_match_transformers_float32_on_the_rounded_weights(name: str, half: str) -> None:
    ref = expected_weights(name)
    for devices, split in TP_SPLITS:
        model = tw.load(FIXTURES / name / "weights" / f"hf-{half}", devices=devices, tensor_split=split)
        assert model.executor.formats["blk.0.ffn_up"].name == half and model.config.dtype == "float32"
        assert model.executor.weights["blk.0.ffn_up"][0].dtype == dtypes.to_dtype(half)
        err = float(np.abs(model.logits(ref["tokens"]) - ref[f"logits_{half}"]).max())
        assert err < 1e-3, f"{name} {half} {devices} {split}: {err:.2e}"


def test_plan_reports_bytes_as_held_and_the_format_mix() -> None:
    q8 = FIXTURES / "llama" / "model-q8_0.gguf"
    model = tw.load(q8, devices="cpu-sim:2")
    p = model.plan
    assert set(p.weight_formats) == {"q8_0", "f32"} and p.weight_formats["q8_0"] > p.weight_formats["f32"]
    held = sum(a.nbytes for parts in model.executor.weights.values() for a in parts)
    assert sum(p.weight_bytes) == held  # what the devices hold, blocks counted as bytes
    assert "weights as held, all devices: q8_0" in p.summary()
    planned, f32 = plan_model(q8, "cpu-sim:2"), plan_model(FIXTURES / "llama" / "model-f32.gguf", "cpu-sim:2")
    assert planned.formats.keys() == {"q8_0", "f32"} and planned.weight_bytes < f32.weight_bytes / 3
    assert plan_model(q8, "cpu-sim:2", dtype="float32").formats.keys() == {"f32"}  # dtype= converts


def test_dtype_converts_the_weights_and_an_impossible_one_is_one_clear_error() -> None:
    path = FIXTURES / "llama" / "weights" / "hf-bf16"
    model = tw.load(path, dtype="float16")
    assert model.executor.formats["blk.0.attn_q"].name == "f16" and model.config.dtype == "float32"
    assert tw.load(path, dtype="float64").config.dtype == "float64"
    with pytest.raises(tw.errors.UnsupportedError, match="dtype int32: a model computes in a float dtype"):
        tw.load(path, dtype="int32")
    with pytest.raises(tw.errors.UnsupportedError, match="quantized files load as stored"):
        tw.load(path, dtype="q8_0")


class FloatOnlyBackend(CpuSimBackend):
    """cpu-sim's devices with a backend that takes no 16-bit or quantized weights (as a third party's may)."""

    capabilities = Capabilities(dtypes=frozenset(dtypes.DTYPES))


def test_a_backend_without_a_format_gets_that_weight_converted_once_at_load_visibly() -> None:
    devs = FloatOnlyBackend().devices(DeviceSpec.parse("cpu-sim:2"))
    model = tw.load(FIXTURES / "llama" / "model-q8_0.gguf", devices=devs)
    assert {f.name for f in model.executor.formats.values()} == {"f32"}
    assert any("q8_0 weight(s) converted to f32" in n for n in model.plan.notes)
    ref = np.load(FIXTURES / "llama" / "expected.npz")
    assert float(np.abs(model.logits(ref["tokens"]) - ref["logits_q8_0"]).max()) < 1e-3


def test_a_split_that_cannot_keep_whole_blocks_names_the_tensor() -> None:
    g = Graph()
    g.weight("blk.0.attn_output", (16, 96), Role.ROW, groups=3)
    with pytest.raises(tw.errors.SplitError, match=r"blk\.0\.attn_output"):
        formats.block_groups(g, {"blk.0.attn_output": dtypes.FORMATS["q4_k"]}, world=2)
    units, notes = formats.block_groups(g, {"blk.0.attn_output": dtypes.FORMATS["q8_0"]}, world=2)
    assert units == {} and not notes  # 32 columns per group: already whole Q8_0 blocks


def test_kernels_run_on_tbb_where_the_tbb_wheel_is_installed() -> None:
    """The tbb wheel (a dependency on Linux x86_64) keeps its library where the loader does not look; cpu_kernels
    loads it by path so numba's TBB layer starts instead of OpenMP (no waiting for workers to wake per kernel)."""
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the tbb wheel is not installed here (a dependency on Linux x86_64 only)")
    code = """
import numpy as np, numba
from tensorweave.backends import cpu_kernels as ck
numba.set_num_threads(2)
ck.fast_linear(np, np.ones((1, 512), np.float32), np.zeros((2 * ck.PARALLEL_MIN // 512, 512), np.float16))
print(numba.threading_layer())
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "tbb", run.stdout

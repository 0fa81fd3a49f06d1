"""cpu-sim's compiled twins of a decode step's small ops (rms_norm, swiglu/geglu, rope, attention) equal core's
numpy reference kernels on random inputs, and hand the cases they do not take back to the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorweave
from tensorweave.backends.cpu_kernels import FEW_ROWS, KERNELS
from tensorweave.core import dtypes
from tensorweave.core.ops import OPS

pytestmark = pytest.mark.skipif("rope" not in KERNELS, reason="numba is not installed")
seeds = st.integers(0, 2**32 - 1)


def both(op: str, out_shape: tuple[int, ...], *inputs: Any, **attrs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(reference, compiled) outputs of ``op``; inputs are copied for each so in-place cache writes do not mix."""
    ref, got = np.full(out_shape, np.nan, np.float32), np.full(out_shape, np.nan, np.float32)
    OPS[op].kernel(np, ref, *[a.copy() if isinstance(a, np.ndarray) else a for a in inputs], **attrs)
    KERNELS[op](np, got, *[a.copy() if isinstance(a, np.ndarray) else a for a in inputs], **attrs)
    return ref, got


@settings(max_examples=40, deadline=None)
@given(seed=seeds, rows=st.integers(1, 5), hidden=st.integers(1, 300), plus_one=st.booleans(), weight=st.booleans())
def test_rms_norm_equals_the_reference(seed: int, rows: int, hidden: int, plus_one: bool, weight: bool) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, hidden)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(hidden).astype(np.float32) if weight else None
    ref, got = both("rms_norm", x.shape, x, w, eps=1e-6, plus_one=plus_one)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_rms_norm_takes_16_bit_weights_and_leaves_16_bit_activations_to_the_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)  # q/k norms: over head_dim, any leading shape
    w = rng.standard_normal(64).astype(dtypes.bfloat16)
    ref, got = both("rms_norm", x.shape, x, w, eps=1e-6)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    x16 = x.astype(np.float16)
    ref, got = both("rms_norm", x.shape, x16, w, eps=1e-6)
    np.testing.assert_array_equal(got, ref)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=st.integers(1, 3000), op=st.sampled_from(["swiglu", "geglu"]))
def test_glu_equals_the_reference(seed: int, n: int, op: str) -> None:
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((1, n)) * 8).astype(np.float32)  # far into both tails of the sigmoid
    up = rng.standard_normal((1, n)).astype(np.float32)
    ref, got = both(op, gate.shape, gate, up)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    tokens=st.integers(1, 6),
    heads=st.integers(1, 5),
    half_dim=st.integers(1, 40),
    rot_part=st.sampled_from([1.0, 0.5, 0.25]),
    neox=st.booleans(),
    scaling=st.sampled_from([None, {"rope_type": "linear", "factor": 8.0}]),
)
def test_rope_equals_the_reference(
    seed: int, tokens: int, heads: int, half_dim: int, rot_part: float, neox: bool, scaling: Any
) -> None:
    rng = np.random.default_rng(seed)
    hd = 2 * half_dim
    n_rot = max(2, int(hd * rot_part) // 2 * 2)
    x = rng.standard_normal((tokens, heads, hd)).astype(np.float32)
    pos = rng.integers(0, 100_000, tokens).astype(np.int32)
    ref, got = both("rope", x.shape, x, pos, theta=1e6, neox=neox, n_rot=n_rot, scaling=scaling)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    tokens=st.integers(1, FEW_ROWS),
    kv=st.integers(1, 3),
    group=st.integers(1, 3),
    cached=st.integers(0, 20),
    softcap=st.sampled_from([None, 30.0]),
    write=st.booleans(),
)
def test_decode_attention_equals_the_reference(
    seed: int, tokens: int, kv: int, group: int, cached: int, softcap: Any, write: bool
) -> None:
    """Queries at consecutive positions after ``cached`` ones, GQA, softcap, and a KV-shared layer's read-only pass."""
    rng = np.random.default_rng(seed)
    hd, ctx = 16, 32
    q = rng.standard_normal((tokens, kv * group, hd)).astype(np.float32)
    k, v = (rng.standard_normal((tokens, kv, hd)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.standard_normal((ctx, kv, hd)).astype(np.float32) for _ in range(2))
    pos = np.arange(cached, cached + tokens, dtype=np.int32) % ctx
    attrs = {"scale": hd**-0.5, "softcap": softcap, "cache": True, "write": write}
    caches = [ck.copy(), cv.copy()], [ck.copy(), cv.copy()]
    ref, got = np.empty_like(q), np.empty_like(q)
    OPS["attention"].kernel(np, ref, q, k, v, pos, *caches[0], **attrs)
    KERNELS["attention"](np, got, q, k, v, pos, *caches[1], **attrs)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0], caches[1], strict=True):  # the cache writes, too
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("attrs", [{"window": 4}, {"causal": False}, {"sinks": True}])
def test_attention_cases_the_compiled_kernel_does_not_take_go_to_the_reference(attrs: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 8)).astype(np.float32) for _ in range(2))
    ck, cv = (np.zeros((6 if not attrs.get("window") else 4, 2, 8), np.float32) for _ in range(2))
    pos = np.array([3, 4], np.int32)
    extra = [rng.standard_normal(4).astype(np.float32)] if attrs.get("sinks") else []
    full = {"scale": 0.3, "cache": True, **attrs}
    ref, got = np.empty_like(q), np.empty_like(q)
    OPS["attention"].kernel(np, ref, q, k, v, pos, ck.copy(), cv.copy(), *extra, **full)
    KERNELS["attention"](np, got, q, k, v, pos, ck.copy(), cv.copy(), *extra, **full)
    np.testing.assert_array_equal(got, ref)


def test_compiled_kernels_cache_in_the_user_cache_directory_not_in_the_package(tmp_path: Path) -> None:
    """numba's cache files beside an installed package outlive `pip uninstall`, and the leftover folder then shadows
    an editable install as an empty namespace package; they go to $XDG_CACHE_HOME/tensorweave/numba instead."""
    package = Path(tensorweave.__file__).parent
    before = {p: p.stat().st_mtime_ns for p in package.rglob("*.nb[ic]")}
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    code = "import numpy as np; from tensorweave.backends.cpu_kernels import KERNELS as K; " + (
        "x = np.ones((1, 8), np.float32); K['rms_norm'](np, np.empty_like(x), x, None, eps=1e-6)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert list((tmp_path / "tensorweave" / "numba").rglob("*_RMS_NORM*.nbi"))
    assert {p: p.stat().st_mtime_ns for p in package.rglob("*.nb[ic]")} == before

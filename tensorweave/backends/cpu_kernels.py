"""cpu-sim's fast kernels for weights held narrow (float16, bfloat16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants
llama.cpp's mixes are made of), compiled with numba.

Decode multiplies a few activation rows by a whole weight: memory-bound, so the win is reading 2 (16-bit) or 1.06
(Q8_0) bytes per weight instead of float32's 4. numba compiles loops that convert in registers and accumulate in
float32, over rows in parallel (``prange``), so no float copy of the weight is ever written. Prompts (many rows)
are compute-bound instead: a cache-sized block of weight rows is converted to float32 and multiplied by BLAS.
numba has no float16 type on CPU, so two tiny LLVM intrinsics convert 16-bit bits to float32 (fpext from half,
which LLVM vectorizes to F16C's vcvtph2ps; bfloat16 is a shift). Measured on one core of this machine (EPYC, AVX2,
a [8192, 2048] weight times one row, medians): float32 BLAS 3.6 ms, float16 2.5 ms, bfloat16 2.3 ms, Q8_0 3.2 ms,
against the reference's numpy conversions at 10-25x that; numba's float16 by bit tricks was 8 ms, a lookup table
7 ms.

Every format has both: a fused decode kernel and a conversion of rows for prompts (Q4_0/1, Q5_0/1 and the
K-quants convert through the per-block helpers ``_q45_block``, ``_qk_block``, ``_q6k_block``; Q6_K's decode shares
its helper, the others keep fused loops that fold the minimum into one sum per sub-block). Everything is checked
against core's reference (``ops.weights``) in tests/test_weight_formats.py. Without numba installed the backend
runs the reference kernels alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.ops import OPS
from ..core.ops.moe import moe_kernel
from ..core.ops.weights import CHUNK_BYTES, Packed, is_narrow, linear

FEW_ROWS = 8  # activation rows up to which the fused (weight-streaming) kernels beat convert-then-BLAS
PARALLEL_MIN = 1 << 18  # weight values from which a fused kernel splits its rows over threads

numba: Any
try:
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; a trimmed install still runs the reference
    numba = None

intrinsic: Any = _intrinsic if numba is not None else None  # typed loosely: the decorated are called from numba

if numba is not None:
    # cpu-sim's devices call kernels from a thread each: only a thread-safe layer (OpenMP, TBB) may run them; the
    # default picks workqueue when those are missing, which aborts on concurrent calls
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "threadsafe"
    # OpenMP threads that spin after a parallel region starve BLAS's and the other devices' threads: on a loaded
    # 2-core machine a tiny model decoded at 8 tok/s spinning and 134 passive (190 on one thread). Passive waiting
    # costs a wake-up per kernel instead. Read when numba first loads its OpenMP layer; the user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    @intrinsic  # type: ignore[untyped-decorator]
    def _f16(typingctx: Any, bits: Any) -> Any:
        """float16 bits (uint16) -> float32, as the CPU converts (F16C's vcvtph2ps where it has it)."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic  # type: ignore[untyped-decorator]
    def _bf16(typingctx: Any, bits: Any) -> Any:
        """bfloat16 bits (uint16) -> float32: the upper half of a float32."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _HALF_FEW(x: Any, w: Any, bf16: bool, out: Any) -> None:  # x [T, K] f32, w [N, K] 16-bit bits -> [T, N]
        for n in prange(w.shape[0]):
            row = w[n]
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                if bf16:  # two loops, not a select per value: each vectorizes
                    for k in range(row.shape[0]):
                        acc += x[t, k] * _bf16(row[k])
                else:
                    for k in range(row.shape[0]):
                        acc += x[t, k] * _f16(row[k])
                out[t, n] = acc

    @njit(cache=True, nogil=True)
    def _HALF_ROWS(w: Any, bf16: bool, out: Any) -> None:  # w [N, K] 16-bit bits -> out [N, K] f32
        for n in range(w.shape[0]):
            if bf16:
                for k in range(w.shape[1]):
                    out[n, k] = _bf16(w[n, k])
            else:
                for k in range(w.shape[1]):
                    out[n, k] = _f16(w[n, k])

    @njit(cache=True, inline="always")
    def _f16_at(raw: Any, off: int) -> Any:  # the little-endian float16 at byte ``off`` of ``raw``, as float32
        return _f16(np.uint16(raw[off]) | (np.uint16(raw[off + 1]) << 8))

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _Q8_0_FEW(x: Any, data: Any, qs: Any, out: Any) -> None:  # data [N, nb*34] uint8, qs its int8 view
        nb = data.shape[1] // 34
        for n in prange(data.shape[0]):
            row, q = data[n], qs[n]
            for t in range(x.shape[0]):
                lanes = np.zeros(32, np.float32)  # one accumulator per block position: vectorizes across blocks
                for b in range(nb):
                    d = _f16_at(row, b * 34)
                    xb, qb = x[t, b * 32 : b * 32 + 32], q[b * 34 + 2 : b * 34 + 34]
                    for j in range(32):
                        lanes[j] += d * (xb[j] * np.float32(qb[j]))
                out[t, n] = lanes.sum()

    @njit(cache=True, nogil=True)
    def _Q8_0_ROWS(data: Any, qs: Any, out: Any) -> None:  # -> out [N, nb*32] f32
        nb = data.shape[1] // 34
        for n in range(data.shape[0]):
            for b in range(nb):
                d = _f16_at(data[n], b * 34)
                for j in range(32):
                    out[n, b * 32 + j] = d * np.float32(qs[n, b * 34 + 2 + j])

    @intrinsic  # type: ignore[untyped-decorator]
    def _bits(typingctx: Any, byte: Any, shift: Any, mask: Any) -> Any:
        """float32((byte >> shift) & mask) computed on 8 bits: numba would widen to int64, whose conversion to float
        does not vectorize without AVX-512."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            i8 = ir.IntType(8)
            v = builder.lshr(args[0], builder.trunc(args[1], i8))
            return builder.uitofp(builder.and_(v, builder.trunc(args[2], i8)), ir.FloatType())

        return types.float32(types.uint8, types.int64, types.int64), codegen

    @njit(cache=True, inline="always")
    def _scale_min_k4(s: Any, j: int) -> tuple[Any, Any]:  # ggml's get_scale_min_k4 on a block's 12 scale bytes
        if j < 4:
            return np.float32(s[j] & 63), np.float32(s[j + 4] & 63)
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)
        return np.float32(sc), np.float32((s[j + 4] >> 4) | ((s[j] >> 6) << 4))

    @njit(cache=True, inline="always")
    def _qk_block(blk: Any, five: bool, vals: Any) -> None:  # one Q4_K/Q5_K block -> 256 float32 values
        d, dmin = _f16_at(blk, 0), _f16_at(blk, 2)
        for j in range(8):  # as _QK_FEW: sub-block j, nibbles (j % 2) of qs bytes 32 * (j // 2) ..
            sc, m = _scale_min_k4(blk[4:16], j)
            base, shift = (48 if five else 16) + 32 * (j // 2), 4 * (j % 2)
            scale, low = d * sc, dmin * m
            for lane in range(32):
                q = _bits(blk[base + lane], shift, 15)
                if five:
                    q += 16 * _bits(blk[16 + lane], j, 1)
                vals[32 * j + lane] = scale * q - low

    @njit(cache=True, inline="always")
    def _q45_block(blk: Any, five: bool, with_min: bool, vals: Any) -> None:  # Q4_0/Q4_1/Q5_0/Q5_1 -> 32 values
        d = _f16_at(blk, 0)
        c = _f16_at(blk, 2) if with_min else -d * np.float32(16.0 if five else 8.0)
        qs_at, qh_at = (4 if with_min else 2) + (4 if five else 0), 4 if with_min else 2
        for lane in range(16):
            lo, hi = _bits(blk[qs_at + lane], 0, 15), _bits(blk[qs_at + lane], 4, 15)
            if five:
                lo += 16 * _bits(blk[qh_at + lane // 8], lane % 8, 1)
                hi += 16 * _bits(blk[qh_at + 2 + lane // 8], lane % 8, 1)
            vals[lane], vals[lane + 16] = d * lo + c, d * hi + c

    @njit(cache=True, inline="always")
    def _q6k_block(blk: Any, vals: Any) -> None:  # one Q6_K block (210 bytes) -> 256 float32 values
        d = _f16_at(blk, 208)
        for half in range(2):  # values 128 half + 32 g + l, g = 0..3, from ql[l], ql[l + 32], qh[l]
            for h in range(2):  # a scale per 16 values
                sc = 192 + 8 * half + h
                s0 = d * np.float32(np.int8(blk[sc]))
                s1 = d * np.float32(np.int8(blk[sc + 2]))
                s2 = d * np.float32(np.int8(blk[sc + 4]))
                s3 = d * np.float32(np.int8(blk[sc + 6]))
                for l in range(16 * h, 16 * h + 16):
                    ql0, ql1, qh = blk[64 * half + l], blk[64 * half + 32 + l], blk[128 + 32 * half + l]
                    at = 128 * half + l
                    vals[at] = s0 * (_bits(ql0, 0, 15) + 16 * _bits(qh, 0, 3) - 32)
                    vals[at + 32] = s1 * (_bits(ql1, 0, 15) + 16 * _bits(qh, 2, 3) - 32)
                    vals[at + 64] = s2 * (_bits(ql0, 4, 15) + 16 * _bits(qh, 4, 3) - 32)
                    vals[at + 96] = s3 * (_bits(ql1, 4, 15) + 16 * _bits(qh, 6, 3) - 32)

    @njit(parallel=True, cache=True, nogil=True)
    def _BLOCK_ROWS(data: Any, kind: int, size: int, five: bool, with_min: bool, out: Any) -> None:
        """Rows of Q4_0/1, Q5_0/1 (kind 0, 32 values a block), Q4_K/Q5_K (kind 1) or Q6_K (kind 2, 256 values) as
        float32, for prompts (converted a chunk of rows at a time, then BLAS)."""
        per = 32 if kind == 0 else 256
        for n in prange(data.shape[0]):
            for b in range(data.shape[1] // size):
                blk, vals = data[n, b * size : b * size + size], out[n, b * per : b * per + per]
                if kind == 0:
                    _q45_block(blk, five, with_min, vals)
                elif kind == 1:
                    _qk_block(blk, five, vals)
                else:
                    _q6k_block(blk, vals)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _QK_FEW(x: Any, data: Any, five: bool, out: Any) -> None:  # Q4_K (144-byte blocks) or Q5_K (176)
        size = 176 if five else 144
        nb = data.shape[1] // size
        for n in prange(data.shape[0]):
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for b in range(nb):
                    blk = data[n, b * size : b * size + size]
                    d = _f16_at(blk, 0)
                    dmin = _f16_at(blk, 2)
                    for j in range(8):  # sub-block j: nibbles (j % 2) of qs bytes 32 * (j // 2) .. + 32
                        sc, m = _scale_min_k4(blk[4:16], j)
                        base, shift = (48 if five else 16) + 32 * (j // 2), 4 * (j % 2)
                        xs = x[t, b * 256 + 32 * j : b * 256 + 32 * j + 32]
                        dot, total = np.float32(0.0), np.float32(0.0)  # sum(x * q) and sum(x): the min once
                        if five:  # the fifth bit of value l of sub-block j is bit j of qh[l] (bytes 16..48)
                            for lane in range(32):
                                q = _bits(blk[base + lane], shift, 15) + 16 * _bits(blk[16 + lane], j, 1)
                                dot += xs[lane] * q
                                total += xs[lane]
                        else:
                            for lane in range(32):
                                dot += xs[lane] * _bits(blk[base + lane], shift, 15)
                                total += xs[lane]
                        acc += d * sc * dot - dmin * m * total
                out[t, n] = acc

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _Q45_FEW(x: Any, data: Any, size: int, five: bool, with_min: bool, out: Any) -> None:
        """Q4_0 (18-byte blocks), Q4_1 (20), Q5_0 (22), Q5_1 (24): d [, m] [, qh u32], 16 bytes of nibbles; value
        l < 16 is the low nibble of byte l, value l + 16 its high nibble; Q5 adds bit l of qh as the fifth bit."""
        nb = data.shape[1] // size
        offset = np.float32(0.0 if with_min else (16.0 if five else 8.0))
        qs_at = (4 if with_min else 2) + (4 if five else 0)
        qh_at = 4 if with_min else 2
        for n in prange(data.shape[0]):
            acc = np.zeros(x.shape[0], np.float32)
            for b in range(nb):  # block-major: a block's scales are read once for every token
                blk = data[n, b * size : b * size + size]
                d = _f16_at(blk, 0)
                c = _f16_at(blk, 2) if with_min else -d * offset
                for t in range(x.shape[0]):
                    xs = x[t, b * 32 : b * 32 + 32]
                    dot, total = np.float32(0.0), np.float32(0.0)
                    for lane in range(16):
                        lo, hi = _bits(blk[qs_at + lane], 0, 15), _bits(blk[qs_at + lane], 4, 15)
                        if five:
                            lo += 16 * _bits(blk[qh_at + lane // 8], lane % 8, 1)
                            hi += 16 * _bits(blk[qh_at + 2 + lane // 8], lane % 8, 1)
                        dot += xs[lane] * lo + xs[lane + 16] * hi
                        total += xs[lane] + xs[lane + 16]
                    acc[t] += d * dot + c * total
            for t in range(x.shape[0]):
                out[t, n] = acc[t]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _Q6_K_FEW(x: Any, data: Any, out: Any) -> None:  # data [N, nb*210] uint8
        nb = data.shape[1] // 210
        for n in prange(data.shape[0]):
            vals = np.empty(256, np.float32)  # one block as float32, then dotted with every token's slice
            acc = np.zeros(x.shape[0], np.float32)
            for b in range(nb):
                _q6k_block(data[n, b * 210 : b * 210 + 210], vals)
                for t in range(x.shape[0]):
                    dot = np.float32(0.0)
                    for k in range(256):
                        dot += x[t, b * 256 + k] * vals[k]
                    acc[t] += dot
            for t in range(x.shape[0]):
                out[t, n] = acc[t]


def set_threads(n: int | None) -> None:
    """Threads the compiled kernels use on this thread (numba keeps the count per thread); None: every core."""
    if numba is not None:
        numba.set_num_threads(min(n or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))


def _compiled(w: Any) -> str | None:
    """Which compiled kernel serves weight ``w``: its format name ("f16", "bf16", "q8_0", "q4_k" ...), or None."""
    if numba is None:
        return None
    if isinstance(w, Packed):
        fused = w.fmt.name in dtypes.QUANT_BLOCKS and w.data.ndim == 2 and w.data.flags.c_contiguous
        return w.fmt.name if fused else None
    if w.ndim == 2 and w.flags.c_contiguous and w.dtype in (dtypes.float16, dtypes.bfloat16):
        return "bf16" if w.dtype == dtypes.bfloat16 else "f16"
    return None


def rows_float32(w: Any, lo: int, hi: int, kind: str) -> np.ndarray:
    """Rows [lo, hi) of a weight a compiled kernel serves, as float32."""
    out = np.empty((hi - lo, w.shape[1]), np.float32)
    if kind == "q8_0":
        data = w.data[lo:hi]
        _Q8_0_ROWS(data, data.view(np.int8), out)
    elif kind in ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"):
        block_kind = 2 if kind == "q6_k" else 1 if kind.endswith("_k") else 0
        _BLOCK_ROWS(w.data[lo:hi], block_kind, w.fmt.block_bytes, kind[1] == "5", kind[3] == "1", out)
    else:
        _HALF_ROWS(w[lo:hi].view(np.uint16), kind == "bf16", out)
    return out


def fast_linear(xp: Any, x: Any, w: Any, out: Any = None) -> Any:
    """``ops.weights.linear`` with compiled kernels where one serves ``w`` (same results, float32 accumulation)."""
    kind = _compiled(w) if x.dtype == dtypes.float32 and x.size and math.prod(w.shape) else None
    if kind is None:
        return linear(xp, x, w, out)
    lead, (n_out, n_in) = x.shape[:-1], w.shape
    x2 = np.ascontiguousarray(x.reshape(-1, n_in))
    direct = out is not None and out.dtype == np.float32 and out.flags.c_contiguous
    res = out.reshape(x2.shape[0], n_out) if direct else np.empty((x2.shape[0], n_out), np.float32)
    if x2.shape[0] <= FEW_ROWS:
        threads = numba.get_num_threads()
        if n_out * n_in < PARALLEL_MIN:  # a small weight: waking threads costs more than it saves
            numba.set_num_threads(1)
        try:
            if kind == "q8_0":
                _Q8_0_FEW(x2, w.data, w.data.view(np.int8), res)
            elif kind in ("q4_k", "q5_k"):
                _QK_FEW(x2, w.data, kind == "q5_k", res)
            elif kind in ("q4_0", "q4_1", "q5_0", "q5_1"):
                _Q45_FEW(x2, w.data, w.fmt.block_bytes, kind[1] == "5", kind[3] == "1", res)
            elif kind == "q6_k":
                _Q6_K_FEW(x2, w.data, res)
            else:
                _HALF_FEW(x2, w.view(np.uint16), kind == "bf16", res)
        finally:
            numba.set_num_threads(threads)
    else:
        step = max(1, CHUNK_BYTES // (4 * max(n_in, 1)))
        for lo in range(0, n_out, step):
            hi = min(lo + step, n_out)
            np.matmul(x2, rows_float32(w, lo, hi, kind).T, out=res[:, lo:hi])
    if out is None:
        return res.reshape(*lead, n_out)
    if not direct:
        out[...] = res.reshape(*lead, n_out)
    return out


def _k_matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
    if is_narrow(w):
        fast_linear(xp, x, w, out)
    else:
        OPS["matmul"].kernel(xp, out, x, w)


def _matmul_t(xp: Any, x: Any, w: Any) -> Any:
    return fast_linear(xp, x, w) if is_narrow(w) else x @ w.T


KERNELS: dict[str, Callable[..., Any]] = (
    {"matmul": _k_matmul, "moe_ffn": moe_kernel(_matmul_t)} if numba is not None else {}
)

__all__ = ["FEW_ROWS", "KERNELS", "fast_linear", "rows_float32"]

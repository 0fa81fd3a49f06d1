"""Weights as they are held on a device, and the reference math over them: the truth the fast kernels are held to.

A float weight (float32, float16, bfloat16) is a plain array. A quantized weight is a ``Packed``: raw GGUF blocks
(uint8 [..., blocks * block_bytes], ggml's row layout) with its ``WeightFormat`` and logical shape; the executor
hands kernels one for every quantized weight input. ``dequantize`` turns rows of blocks into float32 with array
operations only (numpy or CuPy alike); the layouts follow ggml's block structs (written from the format, checked
against ``gguf.quants`` in tests/test_weight_formats.py).

``linear`` (x @ W^T) and ``take_rows`` (an embedding lookup) never widen a whole 16-bit or quantized weight: they
convert ``CHUNK_BYTES`` of float32 rows at a time, so the float copy of a weight exists a cache-sized piece at a time.
Activations and results are float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import dtypes
from ..dtypes import WeightFormat

CHUNK_BYTES = 1 << 20  # float32 bytes of weight rows converted at a time (fits a core's L2)


@dataclass(frozen=True)
class Packed:
    """A quantized weight on a device: ``data`` uint8 [..., blocks * block_bytes] of ``fmt``, logically ``shape``."""

    data: Any
    fmt: WeightFormat
    shape: tuple[int, ...]

    dtype = dtypes.float32  # what it computes as

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, i: Any) -> Packed:
        """Leading-axis indexing (an expert of a stacked [E, out, in] weight, a range of rows)."""
        data = self.data[i]
        return Packed(data, self.fmt, (*data.shape[:-1], self.shape[-1]))


def _f16(xp: Any, b: Any) -> Any:
    """Little-endian float16 from bytes [..., 2] -> float32 [...]."""
    u = b[..., 0].astype(xp.uint16) | (b[..., 1].astype(xp.uint16) << 8)
    return u.view(xp.float16).astype(xp.float32)


def _scale_min_k4(xp: Any, s: Any) -> tuple[Any, Any]:
    """The 8 six-bit scales and mins packed in the 12 bytes ``s`` [..., 12] of a Q4_K/Q5_K block."""
    lo, hi = s[..., 0:4], s[..., 4:8]
    tail = s[..., 8:12]
    sc = xp.concatenate([lo & 63, (tail & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = xp.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc.astype(xp.float32), mn.astype(xp.float32)


def _bits(xp: Any, b: Any, n: int) -> Any:
    """The low ``n`` bits of little-endian bytes b [..., n // 8] as 0/1 values [..., n]."""
    shifts = xp.arange(8, dtype=xp.uint8)
    return ((b[..., :, None] >> shifts) & 1).reshape(*b.shape[:-1], n)


def _nibbles(xp: Any, qs: Any) -> Any:
    """Bytes [..., k] -> [..., 2k]: the low nibbles, then the high ones (ggml's order within a block)."""
    return xp.concatenate([qs & 15, qs >> 4], axis=-1)


def _dequantize_blocks(xp: Any, name: str, b: Any) -> Any:
    """Blocks b [..., block_bytes] (uint8) of format ``name`` -> float32 [..., block]."""
    if name == "q8_0":
        return _f16(xp, b[..., 0:2])[..., None] * b[..., 2:34].view(xp.int8).astype(xp.float32)
    if name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        d = _f16(xp, b[..., 0:2])[..., None]
        offset = 2 if name.endswith("_0") else 4
        five = name.startswith("q5")
        q = _nibbles(xp, b[..., offset + 4 * five : offset + 4 * five + 16]).astype(xp.int16)
        if five:
            q = q | (_bits(xp, b[..., offset : offset + 4], 32).astype(xp.int16) << 4)
        if name.endswith("_0"):
            return d * (q - (16 if five else 8)).astype(xp.float32)
        return d * q.astype(xp.float32) + _f16(xp, b[..., 2:4])[..., None]
    if name in ("q4_k", "q5_k"):
        d, dmin = _f16(xp, b[..., 0:2])[..., None], _f16(xp, b[..., 2:4])[..., None]
        sc, mn = _scale_min_k4(xp, b[..., 4:16])
        qs = b[..., 48:176] if name == "q5_k" else b[..., 16:144]
        chunks = qs.reshape(*qs.shape[:-1], 4, 32)
        q = xp.stack([chunks & 15, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32).astype(xp.int16)
        if name == "q5_k":  # bit j of qh[l] is the fifth bit of value l of sub-block j
            qh = b[..., 16:48]
            high = (qh[..., None, :] >> xp.arange(8, dtype=xp.uint8)[:, None]) & 1
            q = q | (high.astype(xp.int16) << 4)
        y = (d * sc)[..., None] * q.astype(xp.float32) - (dmin * mn)[..., None]
        return y.reshape(*b.shape[:-1], 256)
    if name == "q6_k":
        ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 2, 32)  # half, (first/second 32 bytes), l
        qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)
        sc = b[..., 192:208].view(xp.int8).astype(xp.float32).reshape(*b.shape[:-1], 2, 4, 2, 1)
        d = _f16(xp, b[..., 208:210])[..., None, None, None, None]
        low = xp.concatenate([ql & 15, ql >> 4], axis=-2)  # [.., 2, 4, 32]: groups l, l+32, l+64, l+96
        high = (qh >> (xp.arange(4, dtype=xp.uint8) * 2)[:, None]) & 3  # [.., 2, 4, 32]
        q = (low.astype(xp.int16) | (high.astype(xp.int16) << 4)) - 32
        y = d * sc * q.astype(xp.float32).reshape(*b.shape[:-1], 2, 4, 2, 16)
        return y.reshape(*b.shape[:-1], 256)
    raise NotImplementedError(f"no dequantization for weight format {name!r}")


def dequantize(xp: Any, data: Any, fmt: WeightFormat) -> Any:
    """Rows of blocks ``data`` uint8 [..., blocks * block_bytes] -> float32 [..., blocks * block]."""
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, data.shape[-1] // fmt.block_bytes, fmt.block_bytes)
    return _dequantize_blocks(xp, fmt.name, blocks).reshape(*lead, blocks.shape[-2] * fmt.block)


def rows_float32(xp: Any, w: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of a 2-D weight (float array or Packed) as float32."""
    if isinstance(w, Packed):
        return dequantize(xp, w.data[lo:hi], w.fmt)
    part = w[lo:hi]
    return part if part.dtype in (dtypes.float32, dtypes.float64) else part.astype(dtypes.float32)


def is_narrow(w: Any) -> bool:
    """Whether ``w`` is held narrower than it computes (quantized, or a 16-bit float)."""
    return isinstance(w, Packed) or (isinstance(w.dtype, np.dtype) and w.dtype in (dtypes.float16, dtypes.bfloat16))


def linear(xp: Any, x: Any, w: Any, out: Any = None) -> Any:
    """x [..., in] @ W^T for W [out, in] held as a float array or Packed; float32 result (float64 stays float64)
    written into ``out`` when given. A narrow weight is converted ``CHUNK_BYTES`` of rows at a time."""
    acc = dtypes.float64 if x.dtype == dtypes.float64 else dtypes.float32
    n_out, n_in = w.shape
    if out is None:
        out = xp.empty((*x.shape[:-1], n_out), acc)
    xa = x.astype(acc) if x.dtype != acc else x
    if not is_narrow(w):
        if w.dtype == acc and out.dtype == acc:
            xp.matmul(xa, w.T, out=out)
        else:
            out[...] = xp.matmul(xa, w.astype(acc).T)
        return out
    step = max(1, CHUNK_BYTES // (4 * max(n_in, 1)))
    for lo in range(0, n_out, step):
        hi = min(lo + step, n_out)
        out[..., lo:hi] = xp.matmul(xa, rows_float32(xp, w, lo, hi).astype(acc, copy=False).T)
    return out


def take_rows(xp: Any, table: Any, ids: Any) -> Any:
    """table[ids] as float32 for a float or Packed table, converting only the rows read."""
    if isinstance(table, Packed):
        return dequantize(xp, table.data[ids], table.fmt)
    rows = table[ids]
    return rows.astype(dtypes.float32) if rows.dtype in (dtypes.float16, dtypes.bfloat16) else rows


def nbytes(w: Any) -> int:
    return int(w.data.nbytes) if isinstance(w, Packed) else int(math.prod(w.shape)) * w.dtype.itemsize


def matmul_t(xp: Any, x: Any, w: Any) -> Any:
    """x @ W^T in x's accumulator dtype, for any held weight (the reference kernels' one entry point)."""
    return linear(xp, x, w) if is_narrow(w) else x @ w.T

"""The dtypes tensorweave moves between devices: float32, float16, bfloat16 (ml_dtypes), float64, int32; and the
formats weights are held in (``WeightFormat``: those floats, or GGUF quantization blocks as raw bytes).

Everything is a numpy dtype underneath so host code, backends and communicators agree on one vocabulary.
Reduced-precision floats accumulate in float32 and are rounded once at the end (never bf16 + bf16 chains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import UnsupportedError

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float64 = np.dtype(np.float64)
int32 = np.dtype(np.int32)

# Canonical name -> dtype, and every alias a user may type.
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": float32,
    "float16": float16,
    "bfloat16": bfloat16,
    "float64": float64,
    "int32": int32,
}
_ALIASES = {
    "f32": "float32",
    "fp32": "float32",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "f64": "float64",
    "fp64": "float64",
    "double": "float64",
    "i32": "int32",
}
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int32": "i32"}

# Default comparison tolerances (rtol, atol), as PyTorch's testing defaults.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "int32": (0.0, 0.0),
}


_NAME_OF: dict[np.dtype[Any], str] = {v: k for k, v in DTYPES.items()}  # hot paths (collective checks) use it


def to_dtype(x: Any) -> np.dtype[Any]:
    """Resolve a name ("bf16", "float32"), a numpy dtype or scalar type into one of DTYPES.

    Raises UnsupportedError naming the dtype when it is not one tensorweave handles.
    """
    if isinstance(x, np.dtype) and x in _NAME_OF:
        return x
    if isinstance(x, str):
        name = _ALIASES.get(x.lower(), x.lower())
        if name in DTYPES:
            return DTYPES[name]
        raise UnsupportedError(f"unsupported dtype {x!r}; known: {', '.join(DTYPES)}")
    try:
        dt: np.dtype[Any] = np.dtype(x)
    except TypeError:
        raise UnsupportedError(f"unsupported dtype {x!r}; known: {', '.join(DTYPES)}") from None
    if dt not in DTYPES.values():
        raise UnsupportedError(f"unsupported dtype {dt.name}; known: {', '.join(DTYPES)}")
    return dt


def name(x: Any) -> str:
    """Canonical name of a dtype: name(ml_dtypes.bfloat16) == "bfloat16"."""
    return _NAME_OF[to_dtype(x)]


def short_name(x: Any) -> str:
    """Short name used in test ids and tables: "bf16", "f32"."""
    return _SHORT[name(x)]


def accumulator(x: Any) -> np.dtype[Any]:
    """The dtype reductions over x accumulate in: float32 for 16-bit floats, else x itself."""
    dt = to_dtype(x)
    return float32 if dt in (float16, bfloat16) else dt


def finfo(x: Any) -> Any:
    """Machine limits (eps, tiny, max) of a float dtype; unlike np.finfo it knows bfloat16."""
    return ml_dtypes.finfo(to_dtype(x))  # type: ignore[no-untyped-call]


def is_float(x: Any) -> bool:
    return to_dtype(x) != int32


# --- bfloat16 as uint16 bits, for array namespaces without a bfloat16 dtype (CuPy) ---------------------------


def bf16_bits_to_float32(xp: Any, bits: Any) -> Any:
    """uint16 bfloat16 bit patterns -> float32 values (exact: bfloat16 is float32's upper half)."""
    return (bits.astype(xp.uint32) << 16).view(xp.float32)  # methods, not xp.astype: CuPy lacks the latter


def float32_to_bf16_bits(xp: Any, x: Any) -> Any:
    """float32 -> uint16 bfloat16 bits, rounding to nearest even like ml_dtypes; NaN stays a (quiet) NaN."""
    b = x.view(xp.uint32)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return xp.where(xp.isnan(x), (b >> 16) | 0x40, rounded).astype(xp.uint16)


def float64_to_float32_round_odd(xp: Any, x: Any) -> Any:
    """float64 -> float32 rounded to odd (truncate, then set the lowest bit when inexact), so that rounding the result
    once more to bfloat16 equals rounding the float64 value once (ml_dtypes rounds float64 -> float32 -> bfloat16,
    twice). Values past float32's range (inf too) clip to its max, which still rounds to bfloat16 inf."""
    big = float(np.finfo(np.float32).max)
    x = xp.clip(x, -big, big)
    f = x.astype(float32)
    f = xp.where(xp.abs(f.astype(float64)) > xp.abs(x), xp.nextafter(f, xp.float32(0)), f)  # truncate
    return (f.view(xp.uint32) | (f.astype(float64) != x).astype(xp.uint32)).view(float32)


# --- weight storage formats ------------------------------------------------------------------------------------
# A weight is computed with in float32 (the graph's compute dtype) but held on its device as it was stored: a
# float array, or GGUF quantization blocks as raw bytes. Quantized rows are ggml's: the last (input-feature) axis
# is cut into blocks of ``block`` values, each ``block_bytes`` bytes, so a device's part of a weight is a byte
# array [..., blocks * block_bytes] and a split along the last axis must fall on block boundaries.


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is held: ``name`` (GGUF's type name, lower case), ``block`` values per ``block_bytes`` bytes
    along the last axis; ``dtype`` is the array dtype it is held in (uint8 for quantization blocks)."""

    name: str
    block: int
    block_bytes: int
    dtype: np.dtype[Any]

    @property
    def quantized(self) -> bool:
        return self.dtype == np.uint8

    def held_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The array shape a weight of logical ``shape`` is held in (the last axis in bytes when quantized)."""
        if not self.quantized:
            return tuple(shape)
        return (*shape[:-1], shape[-1] // self.block * self.block_bytes)

    def held_index(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
        """A slice of the logical weight as a slice of its held array (the last axis in bytes, on block bounds)."""
        if not self.quantized or not index:
            return index
        last = index[-1]
        start, stop = last.start or 0, last.stop
        if start % self.block or (stop is not None and stop % self.block) or last.step not in (None, 1):
            raise ValueError(f"{self.name}: columns {start}:{stop} are not on {self.block}-value block boundaries")
        b, n = self.block, self.block_bytes
        return (*index[:-1], slice(start // b * n, None if stop is None else stop // b * n))

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(self.held_shape(shape)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"<weight format {self.name}>"


_U8 = np.dtype(np.uint8)
# GGUF block layouts tensorweave keeps as stored: values per block, bytes per block (ggml's block_q8_0 ... block_q6_K)
QUANT_BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24)}
QUANT_BLOCKS.update({"q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)})
FORMATS: dict[str, WeightFormat] = {
    **{_SHORT[name(d)]: WeightFormat(_SHORT[name(d)], 1, d.itemsize, d) for d in (float32, float64, float16, bfloat16)},
    **{q: WeightFormat(q, block, nbytes, _U8) for q, (block, nbytes) in QUANT_BLOCKS.items()},
}
STORAGE = frozenset(DTYPES.values()) | {_U8}  # array dtypes a device holds (uint8: quantization blocks)


def weight_format(x: Any) -> WeightFormat:
    """A format by name ("q8_0", "Q4_K", "bf16") or by float dtype (a dtype is held as itself)."""
    if isinstance(x, WeightFormat):
        return x
    if isinstance(x, str) and x.lower() in FORMATS:
        return FORMATS[x.lower()]
    dt = to_dtype(x)
    if dt == int32:
        raise UnsupportedError("int32 cannot hold weights; weights are float32, float16, bfloat16 or float64")
    return FORMATS[_SHORT[name(dt)]]


def check_storage(dt: Any) -> np.dtype[Any]:
    """``dt`` if a device may hold arrays of it (a DTYPES dtype, or uint8 quantization blocks), else
    UnsupportedError."""
    d = np.dtype(dt) if not isinstance(dt, np.dtype) else dt
    return d if d in STORAGE else to_dtype(d)

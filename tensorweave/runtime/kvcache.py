"""The dtype attention's key and value caches are stored in (``tw.load(cache_dtype=...)``, ``-ctk``/``-ctv``).

By default the KV cache is held in the compute dtype (float32; float64 for a float64 model). A 16-bit cache
(float16 or bfloat16, as llama.cpp's ``--cache-type-k/-v f16|bf16``) halves its memory: keys and values are
rounded once as they are written, and attention converts them back to float32 as it reads them and accumulates in
float32 (``core.ops.attention``), so only the storage is narrower. K and V are separate cache tensors, so each may
have its own dtype at no cost.

Families trace their graphs in the compute dtype and never hear of this: the runtime retypes, after tracing, the
caches that an ``attention`` node reads as its key or value cache (``apply``). Everything else a family declares
as a cache (recurrent and convolution states, which are rewritten whole every step and whose rounding errors would
compound) stays in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.device import Device
from ..core.graph import Graph
from ..errors import TensorweaveError, UnsupportedError

CACHE_DTYPES = ("float32", "float16", "bfloat16", "float64")  # float64: a float64 model's default


@dataclass(frozen=True)
class CacheTypes:
    """The dtypes of attention's key cache (``k``) and value cache (``v``)."""

    k: np.dtype[Any]
    v: np.dtype[Any]

    @property
    def names(self) -> tuple[str, str]:
        return dtypes.name(self.k), dtypes.name(self.v)

    def __str__(self) -> str:
        """ "f16" when K and V agree, "k f16, v f32" otherwise (llama.cpp's short names)."""
        k, v = dtypes.short_name(self.k), dtypes.short_name(self.v)
        return k if k == v else f"k {k}, v {v}"


def parse(value: Any, what: str = "cache_dtype") -> np.dtype[Any]:
    """One KV-cache dtype from a name ("f16", "bfloat16"), a numpy dtype or scalar type, or one of ours; anything
    else (an integer or 8-bit type, a quantized format) is one ``UnsupportedError`` naming the allowed values."""
    try:
        dt = dtypes.to_dtype(value)
    except TensorweaveError:
        dt = None
    if dt is None or dtypes.name(dt) not in CACHE_DTYPES:
        shown = value if isinstance(value, str) else getattr(value, "__name__", value)
        raise UnsupportedError(
            f"{what}={shown!r}: a KV cache is held in {', '.join(CACHE_DTYPES[:-1])} (or float64, a float64 "
            "model's default); quantized KV caches are not supported"
        )
    return dt


def cache_types(cache_dtype: Any, compute: Any) -> CacheTypes:
    """``cache_dtype`` (None, one dtype for K and V, or a ``(k, v)`` pair whose items may be None) resolved
    against the compute dtype, the default of each."""
    compute = dtypes.to_dtype(compute)
    if not isinstance(cache_dtype, (tuple, list)):
        one = compute if cache_dtype is None else parse(cache_dtype)
        return CacheTypes(one, one)
    if len(cache_dtype) != 2:
        raise UnsupportedError(f"cache_dtype={cache_dtype!r}: give one dtype, or a (k, v) pair of them")
    k, v = cache_dtype
    return CacheTypes(
        compute if k is None else parse(k, "cache_dtype (k)"), compute if v is None else parse(v, "cache_dtype (v)")
    )


def kv_caches(graph: Graph) -> dict[str, str]:
    """Cache name -> "k" or "v": the caches ``graph``'s attention nodes read as their key or value cache."""
    roles: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "attention" or not node.attrs.get("cache"):
            continue
        for t, role in zip(node.inputs[4:6], "kv", strict=True):  # (q, k, v, positions, k_cache, v_cache, ...)
            if roles.setdefault(t.name, role) != role:
                roles[t.name] = "kv"  # one cache serving as both (no family does this today)
    return roles


def apply(graph: Graph, types: CacheTypes) -> Graph:
    """Retype ``graph``'s attention key and value caches to ``types`` (in place; returns ``graph``)."""
    for name, role in kv_caches(graph).items():
        if role == "kv" and types.k != types.v:
            raise UnsupportedError(
                f"cache {name!r} is both a key and a value cache: it needs one dtype, not k {types.names[0]} and "
                f"v {types.names[1]}"
            )
        graph.caches[name].dtype = types.k if role in ("k", "kv") else types.v
    return graph


def check_devices(devices: Sequence[Device], types: CacheTypes, compute: Any) -> None:
    """``UnsupportedError`` when a device's backend cannot run attention over a cache of a requested dtype
    (checked at load, rather than at the first step, so the user hears it before weights are placed)."""
    wanted = {dtypes.name(dt) for dt in (types.k, types.v)} - {dtypes.name(compute)}
    for dev in devices:
        caps = dev.backend.capabilities
        for name in sorted(wanted):
            if not caps.supports("attention", name):
                held = ", ".join(n for n in CACHE_DTYPES if caps.supports("attention", n))
                raise UnsupportedError(
                    f"{dev.name} ({dev.backend.name}) cannot hold a {name} KV cache; its backend takes {held}"
                )

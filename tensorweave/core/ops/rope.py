"""Rotary position embedding: ``rope`` over [tokens, heads, head_dim] (NeoX or GPT-J pairing, partial rotary,
linear/llama3/per-pair-factor frequency scaling), and ``rope_inv_freq``, the frequencies other kernels reuse."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ...errors import UnsupportedError
from .. import dtypes
from .elementwise import _acc, _keep_axes
from .registry import Meta, OpDef, _need, register

ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_inv_freq(n_rot: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Per-pair inverse frequencies (float64) for ``n_rot`` rotated dims, with optional linear/llama3 scaling.

    ``scaling`` is a Hugging Face ``rope_scaling``/``rope_parameters`` dict: the kind under ``rope_type`` (or the
    older ``type``), plus that kind's keys.
    """
    inv = theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "none"))
    if kind in ("none", "default"):
        return inv
    if kind == "factors":  # llama.cpp's rope_freqs tensor: one divisor per pair (how GGUF stores llama3 scaling)
        factors = np.asarray(scaling.get("factors", ()), dtype=np.float64)
        if factors.shape != inv.shape:
            raise UnsupportedError(f"rope: {factors.size} frequency factors for {inv.size} rotated pairs")
        return inv / factors
    if kind not in ROPE_SCALING_KEYS:
        raise UnsupportedError(
            f"rope scaling type {kind!r} is not supported (known: none, default, linear, llama3, factors)"
        )
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise UnsupportedError(f"rope scaling {kind!r} needs {', '.join(missing)}; got keys {sorted(scaling)}")
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)


@functools.lru_cache(maxsize=64)
def _cached_inv_freq(n_rot: int, theta: float, scaling: tuple[tuple[str, Any], ...]) -> np.ndarray:
    """rope_inv_freq once per (n_rot, theta, scaling): decode steps call rope in every layer."""
    inv = rope_inv_freq(n_rot, theta, dict(scaling))
    inv.flags.writeable = False
    return inv


def _current_device(xp: Any) -> int:
    """The ordinal of the GPU that ``xp`` (CuPy) allocates on now; 0 for namespaces with one memory."""
    cuda = getattr(xp, "cuda", None)
    return int(cuda.runtime.getDevice()) if cuda is not None else 0


@functools.lru_cache(maxsize=64)
def _inv_freq_on(xp: Any, device: int, n_rot: int, theta: float, scaling: tuple[tuple[str, Any], ...]) -> Any:
    """The frequencies as an array of ``xp`` on ``device``, uploaded once: a copy from the host in every layer of
    every step would cost a host-to-device transfer each (measured on an H200: 768 uploads in 32 decode steps)."""
    return xp.asarray(_cached_inv_freq(n_rot, theta, scaling))


def _infer_rope(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (ps, pd) = metas
    _need(len(xs) == 3, f"rope: x must be [tokens, heads, head_dim], got {xs}")
    _need(ps == xs[:1] and pd == dtypes.int32, f"rope: positions must be int32 [{xs[0]}], got {ps} {pd.name}")
    n_rot = attrs.get("n_rot") or xs[2]
    _need(n_rot % 2 == 0 and n_rot <= xs[2], f"rope: n_rot {n_rot} must be even and <= head_dim {xs[2]}")
    rope_inv_freq(n_rot, 1.0, attrs.get("scaling"))  # rejects unknown scaling types at trace time
    return xs, xd


def _k_rope(
    xp: Any,
    out: Any,
    x: Any,
    positions: Any,
    *,
    theta: float = 10000.0,
    neox: bool = True,
    n_rot: int | None = None,
    scaling: dict[str, Any] | None = None,
) -> None:
    n_rot = n_rot or x.shape[2]
    half = n_rot // 2
    xa = _acc(x)
    inv = _inv_freq_on(xp, _current_device(xp), n_rot, theta, tuple(sorted((scaling or {}).items())))
    ang = positions.astype(np.float64)[:, None, None] * inv[None, None, :]
    cos, sin = xp.cos(ang).astype(xa.dtype), xp.sin(ang).astype(xa.dtype)
    if neox:  # pairs (i, i + half): HF's rotate_half convention
        a, b = (slice(0, half), slice(half, n_rot))
    else:  # pairs (2i, 2i + 1): GPT-J / ggml "normal" convention
        a, b = (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x1, x2 = xa[..., a], xa[..., b]
    out[..., a] = x1 * cos - x2 * sin
    out[..., b] = x2 * cos + x1 * sin
    out[..., n_rot:] = x[..., n_rot:]


register(
    OpDef(
        "rope",
        _infer_rope,
        _k_rope,
        _keep_axes(-1),
        arity=(2, 2),
        doc="rotary embedding of [T, heads, dim]",
        attrs={"theta": 10000.0, "neox": True, "n_rot": None, "scaling": None},
    )
)

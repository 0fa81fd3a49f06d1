"""Attention: softmax(q k^T * scale) v with grouped KV heads, causal and sliding-window masks, logit softcap,
attention sinks, and a KV cache that is either position-indexed or, for a sliding window, a ring of slots.

The caches may be held narrower than q/k/v (a float16 or bfloat16 KV cache): keys and values are rounded once as
they are written, read back widened to float32 (``as_float32``), and scores and outputs accumulate in float32."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .. import dtypes
from ..sharding import REPLICATED, Split, State
from .elementwise import _acc, on_host, softmax
from .registry import REQUIRED, Meta, OpDef, Shape, _need, register


def attention_inputs(inputs: Sequence[Any], attrs: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """(q, k, v, positions, cache_k, cache_v, sinks) from an attention node's input list (optional ones None)."""
    q, k, v, pos, *rest = inputs
    ck = cv = sinks = None
    if attrs.get("cache"):
        ck, cv, *rest = rest
    if attrs.get("sinks"):
        sinks = rest[0]
    return q, k, v, pos, ck, cv, sinks


def _infer_attention(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    q, k, v, pos, ck, cv, sinks = attention_inputs(metas, attrs)
    (qs, qd), (ks, _), (vs, _) = q, k, v
    _need(len(qs) == 3 and len(ks) == 3, f"attention: q and k must be [tokens, heads, head_dim], got {qs}, {ks}")
    _need(ks == vs, f"attention: k {ks} and v {vs} must have the same shape")
    _need(qs[0] == ks[0] and qs[2] == ks[2], f"attention: q {qs} and k {ks} disagree on tokens or head_dim")
    heads_ok = qs[1] % ks[1] == 0 if ks[1] else qs[1] == 0  # a device may hold zero heads
    _need(heads_ok, f"attention: {qs[1]} query heads are not a multiple of {ks[1]} KV heads")
    _need(pos == ((qs[0],), dtypes.int32), f"attention: positions must be int32 [{qs[0]}], got {pos}")
    if ck is not None:
        _need(ck[0] == cv[0] and ck[0][1:] == ks[1:], f"attention: caches {ck[0]}, {cv[0]} must be [ctx, *{ks[1:]}]")
    if sinks is not None:
        _need(sinks[0] == (qs[1],), f"attention: sinks must be [{qs[1]}] (one per query head), got {sinks[0]}")
    return qs, qd


def as_float32(xp: Any, x: Any) -> Any:
    """Keys or values as read from a cache, in float32 (a float16 or bfloat16 KV cache) or as they are."""
    return _acc(x)


def attention_kernel(widen: Callable[[Any, Any], Any] = as_float32) -> Callable[..., None]:
    """The attention kernel over ``widen(xp, x)``, which returns keys or values read from a cache in float32: a
    backend with a faster 16-bit conversion than numpy's ``astype`` (no SIMD path for float16) builds its attention
    from it, as a backend with a faster matmul builds its moe_ffn."""

    def kernel(
        xp: Any,
        out: Any,
        *inputs: Any,
        scale: float,
        causal: bool = True,
        window: int | None = None,
        softcap: float | None = None,
        cache: bool = False,
        sinks: bool = False,
        write: bool = True,
    ) -> None:
        q, k, v, pos, ck, cv, sk = attention_inputs(inputs, {"cache": cache, "sinks": sinks})
        n_tok, n_head, hd = q.shape
        n_kv = k.shape[1]
        group = n_head // n_kv if n_kv else 0  # a device may hold zero heads
        host = on_host(pos)  # see on_host: on an H200 the shortcuts cost 3 stream stalls per layer and step
        if ck is not None and window:
            k, v, kpos = _ring_cache(xp, ck, cv, k, v, pos, write)
        elif ck is not None:  # append this step's keys/values, then attend over the cache up to the last position
            if write:
                ck[pos] = k
                cv[pos] = v
            if host:
                length = int(pos.max()) + 1 if n_tok else 0
                k, v, kpos = ck[:length], cv[:length], xp.arange(length)
            else:  # the whole cache; the slots past the last position are masked below (zeroed or stale, never NaN)
                k, v, kpos = ck, cv, xp.arange(ck.shape[0])
        else:
            kpos = pos
        # Batched matmuls over KV heads (BLAS) rather than einsum: [kv, group * tokens, hd] @ [kv, hd, keys].
        qa = _acc(q).reshape(n_tok, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n_tok, hd)
        n_keys = k.shape[0]
        scores = xp.matmul(qa, widen(xp, k).transpose(1, 2, 0)).reshape(n_kv, group, n_tok, n_keys)
        scores *= scale
        if softcap:
            scores = softcap * xp.tanh(scores / softcap)
        visible = xp.ones((n_tok, kpos.shape[0]), dtype=bool)
        if causal:
            visible &= kpos[None, :] <= pos[:, None]
        if cache and window:
            visible &= kpos[None, :] >= 0
        if window:
            visible &= kpos[None, :] > pos[:, None] - window
        if cache and not causal and not host and n_tok:
            visible &= kpos[None, :] <= xp.max(pos)  # the whole cache was read: not past the last position
        if not host or not bool(visible.all()):
            scores = xp.where(visible, scores, -xp.inf)
        if sk is not None:  # a learned per-head logit that only joins the softmax's denominator
            sink = xp.broadcast_to(_acc(sk).reshape(n_kv, group, 1, 1), (*scores.shape[:3], 1))
            probs = softmax(xp, xp.concatenate([scores, sink], axis=-1))[..., :-1]
        else:
            probs = softmax(xp, scores)
        if not host or not bool(visible.any(axis=-1).all()):
            probs = xp.where(visible, probs, 0.0)  # rows with nothing visible give 0, not NaN
        y = xp.matmul(
            probs.reshape(n_kv, group * n_tok, n_keys), widen(xp, v).transpose(1, 0, 2)
        )  # [kv, group*tok, hd]
        out[...] = y.reshape(n_kv, group, n_tok, hd).transpose(2, 0, 1, 3).reshape(n_tok, n_head, hd)

    return kernel


_k_attention = attention_kernel()


def _ring_cache(xp: Any, ck: Any, cv: Any, k: Any, v: Any, pos: Any, write: bool = True) -> tuple[Any, Any, Any]:
    """A sliding-window layer's cache is a ring of R slots: position p lives in slot p % R, so R = window slots
    serve any context length. The step's positions must be consecutive and follow the cached ones (a session's
    are). The queries attend over the ring as it was before this step plus the step's own keys; then the step's
    last R keys overwrite their slots. Returns (keys, values, key positions); never-written slots get negative
    positions, which no query sees.

    ``write=False`` reads a ring another attention (the layer whose cache a KV-shared layer reuses) already
    updated with this step's keys, which come again as ``k``/``v``: the slots holding this step's positions are
    hidden, so each key is seen once."""
    n_slots, n_tok = ck.shape[0], k.shape[0]
    start = pos[:1].astype(xp.int64) if n_tok else 0  # an array, not int(pos[0]): no host round trip on a GPU
    slots = xp.arange(n_slots)
    held = start - 1 - (start - 1 - slots) % n_slots  # the latest position before this step in each slot
    if not write and n_tok:
        last = start + n_tok - 1
        now = last - (last - slots) % n_slots  # the latest position up to the step's last in each slot
        held = xp.where(now >= start, -1, now)  # slots this step wrote: their keys come as k/v
    if ck.dtype != k.dtype or cv.dtype != v.dtype:
        # a 16-bit cache (runtime/kvcache.py): attend over the step's keys as stored, as a kv cache does, so the
        # result does not depend on how a context was cut into steps
        k, v = k.astype(ck.dtype), v.astype(cv.dtype)
    keys, values = xp.concatenate([ck, k]), xp.concatenate([cv, v])
    keep = min(n_tok, n_slots) if write else 0
    if keep:
        ck[pos[n_tok - keep :] % n_slots] = k[n_tok - keep :]
        cv[pos[n_tok - keep :] % n_slots] = v[n_tok - keep :]
    return keys, values, xp.concatenate([held, pos.astype(held.dtype)])


def _rule_attention(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    _, k, _, _, ck, _, sinks = attention_inputs(ins, attrs)
    kv = ck if ck is not None else k
    if not (isinstance(kv, Split) and kv.axis == 1):
        return [REPLICATED] * len(ins), REPLICATED
    group = shapes[0][1] // shapes[1][1]  # query heads per KV head travel with their KV head
    heads = Split(1, tuple(s * group for s in kv.sizes))
    req: list[State] = [heads, kv, kv, REPLICATED]
    if ck is not None:
        req += [kv, kv]
    if sinks is not None:
        req.append(Split(0, heads.sizes))
    return req, heads


register(
    OpDef(
        "attention",
        _infer_attention,
        _k_attention,
        _rule_attention,
        arity=(4, 7),
        doc="softmax(qk^T) v, GQA",
        attrs={
            "scale": REQUIRED,
            "causal": True,
            "window": None,
            "softcap": None,
            "cache": False,
            "sinks": False,
            "write": True,  # False: read a cache another attention of the step wrote (KV sharing, Gemma 4)
        },
    )
)

"""Kernels in the array API standard for the ops whose reference kernels use numpy beyond it.

tensorweave's reference kernels (``tensorweave.core.ops``) are written for numpy-like namespaces: some write
through ``out=`` arguments, call array methods (``x.reshape``), or index with integer arrays. The element-wise,
softmax and norm kernels use only the standard and run here unchanged; the ops below get a version of their own,
with the reference kernel's signature ``kernel(xp, out, *inputs, **attrs)`` (views: ``kernel(xp, x, **attrs)``
returning a view). Everything here computes with ``xp`` functions only.

The standard has no scatter (``a[idx] += b``) and no integer-array assignment, which changes two kernels: the KV
cache takes contiguous position runs as one slice (a loop over tokens otherwise), and ``moe_ffn`` runs each
expert that has any routed token over every token, weighted by its (mostly zero) routing weight, instead of
gathering and scattering the routed rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from tensorweave.core.ops import ACTIVATIONS, attention_inputs, rope_inv_freq, sigmoid, softmax
from tensorweave.errors import ShapeError

Shape = tuple[int, ...]


def _add(xp: Any, out: Any, a: Any, b: Any) -> None:
    out[...] = a + b


def _mul(xp: Any, out: Any, a: Any, b: Any) -> None:
    out[...] = a * b


def _cast(xp: Any, out: Any, x: Any, *, dtype: str = "") -> None:
    out[...] = xp.astype(x, out.dtype)


def _matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
    out[...] = xp.matmul(x, xp.matrix_transpose(w))


def _concat(xp: Any, out: Any, *xs: Any, axis: int = -1) -> None:
    out[...] = xp.concat(xs, axis=axis)


def _reshape(xp: Any, x: Any, *, shape: Shape) -> Any:
    return xp.reshape(x, tuple(shape))


def _transpose(xp: Any, x: Any, *, perm: Sequence[int]) -> Any:
    return xp.permute_dims(x, tuple(perm))


def _embedding(xp: Any, out: Any, ids: Any, table: Any, *, offset: int = 0, vocab: int = 0) -> None:
    """table[ids]; a device holding vocabulary rows [offset, offset + len(table)) writes zeros for the others."""
    vocab = vocab or table.shape[0]
    flat = xp.reshape(ids, (-1,))
    if flat.shape[0]:
        lo, hi = int(xp.min(flat)), int(xp.max(flat))
        if lo < 0 or hi >= vocab:
            raise ShapeError(f"embedding: token ids must be in 0..{vocab - 1}, got {lo}..{hi}")
    if table.shape[0] == 0:
        out[...] = 0
        return
    local = flat - offset
    mine = (local >= 0) & (local < table.shape[0])
    rows = xp.take(table, xp.where(mine, local, 0), axis=0)
    out[...] = xp.reshape(xp.where(mine[:, None], rows, 0.0), out.shape)


@functools.lru_cache(maxsize=64)
def _inv_freq(xp: Any, n_rot: int, theta: float, scaling: tuple[tuple[str, Any], ...]) -> Any:
    # A constant of the op's attributes, computed once on the host and uploaded (decode calls rope every layer).
    return xp.asarray(rope_inv_freq(n_rot, theta, dict(scaling)))


def _rope(
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
    inv = _inv_freq(xp, n_rot, theta, tuple(sorted((scaling or {}).items())))
    ang = xp.astype(positions, xp.float64)[:, None, None] * inv[None, None, :]
    cos, sin = xp.astype(xp.cos(ang), x.dtype), xp.astype(xp.sin(ang), x.dtype)
    a, b = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x1, x2 = x[..., a], x[..., b]
    out[..., a] = x1 * cos - x2 * sin
    out[..., b] = x2 * cos + x1 * sin
    out[..., n_rot:] = x[..., n_rot:]


def _write_rows(xp: Any, cache: Any, pos: Any, rows: Any) -> None:
    """cache[pos] = rows without integer-array assignment: one slice when the positions are a run."""
    n = pos.shape[0]
    if n == 0:
        return
    start = int(pos[0])
    if bool(xp.all(pos == xp.arange(start, start + n, dtype=pos.dtype))):
        cache[start : start + n, ...] = rows
        return
    for i in range(n):
        cache[int(pos[i]), ...] = rows[i, ...]


def _ring_cache(xp: Any, ck: Any, cv: Any, k: Any, v: Any, pos: Any, write: bool = True) -> tuple[Any, Any, Any]:
    """A sliding-window layer's ring: the queries see the ring as it was before this step (each slot holding the
    latest earlier position p with p % slots == slot; negative: never written) plus the step's own keys; then the
    step's last `slots` keys overwrite their slots. `write=False`: another attention already wrote this step's
    keys (a KV-shared layer), so the slots holding this step's positions are hidden and nothing is written."""
    n_slots, n_tok = ck.shape[0], k.shape[0]
    start = int(pos[0]) if n_tok else 0
    slots = xp.arange(n_slots, dtype=pos.dtype)
    held = start - 1 - xp.remainder(start - 1 - slots, n_slots)
    if not write and n_tok:
        now = start + n_tok - 1 - xp.remainder(start + n_tok - 1 - slots, n_slots)
        held = xp.where(now >= start, xp.full_like(now, -1), now)
    keys, values = xp.concat([ck, k]), xp.concat([cv, v])
    for i in range(max(0, n_tok - n_slots) if write else n_tok, n_tok):
        ck[int(pos[i]) % n_slots, ...] = k[i, ...]
        cv[int(pos[i]) % n_slots, ...] = v[i, ...]
    return keys, values, xp.concat([held, pos])


def _attention(
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
    if ck is not None and window:  # a ring of slots (position p in slot p % slots), as tensorweave.core.ops
        k, v, kpos = _ring_cache(xp, ck, cv, k, v, pos, write)
    elif ck is not None:  # append this step's keys/values, then attend over the cache up to the last position
        if write:  # (write=False: another attention of this step already did)
            _write_rows(xp, ck, pos, k)
            _write_rows(xp, cv, pos, v)
        length = int(xp.max(pos)) + 1 if n_tok else 0
        k, v, kpos = ck[:length, ...], cv[:length, ...], xp.arange(length, dtype=pos.dtype)
    else:
        kpos = pos
    n_keys = k.shape[0]
    qa = xp.reshape(xp.permute_dims(xp.reshape(q, (n_tok, n_kv, group, hd)), (1, 2, 0, 3)), (n_kv, group * n_tok, hd))
    scores = xp.reshape(xp.matmul(qa, xp.permute_dims(k, (1, 2, 0))), (n_kv, group, n_tok, n_keys)) * scale
    if softcap:
        scores = softcap * xp.tanh(scores / softcap)
    visible = xp.ones((n_tok, n_keys), dtype=xp.bool)
    if causal:
        visible = visible & (kpos[None, :] <= pos[:, None])
    if window:
        visible = visible & (kpos[None, :] > pos[:, None] - window)
    if cache and window:
        visible = visible & (kpos[None, :] >= 0)  # ring slots never written yet
    if not bool(xp.all(visible)):
        scores = xp.where(visible, scores, -xp.inf)
    if sk is not None:  # a learned per-head logit that only joins the softmax's denominator
        sink = xp.broadcast_to(xp.reshape(sk, (n_kv, group, 1, 1)), (n_kv, group, n_tok, 1))
        probs = softmax(xp, xp.concat([scores, sink], axis=-1))[..., :-1]
    else:
        probs = softmax(xp, scores)
    if not bool(xp.all(xp.any(visible, axis=-1))):
        probs = xp.where(visible, probs, 0.0)  # rows with nothing visible give 0, not NaN
    y = xp.matmul(xp.reshape(probs, (n_kv, group * n_tok, n_keys)), xp.permute_dims(v, (1, 0, 2)))
    out[...] = xp.reshape(xp.permute_dims(xp.reshape(y, (n_kv, group, n_tok, hd)), (2, 0, 1, 3)), out.shape)


def _topk_route(
    xp: Any, out: Any, logits: Any, *, k: int, gating: str = "softmax", norm: bool = True, scale: float = 1.0
) -> None:
    probs = softmax(xp, logits) if gating == "softmax" else sigmoid(xp, logits)
    idx = xp.argsort(-probs, axis=-1, stable=True)[:, :k]  # ties: the lower expert index wins, as in the reference
    w = xp.take_along_axis(probs, idx, axis=-1)
    if norm:
        w = w / xp.sum(w, axis=-1, keepdims=True)
    hit = idx[:, :, None] == xp.arange(probs.shape[1], dtype=idx.dtype)[None, None, :]  # [tokens, k, experts]
    out[...] = xp.sum(xp.where(hit, (w * scale)[:, :, None], 0.0), axis=1)


def _moe_ffn(xp: Any, out: Any, x: Any, route: Any, gate: Any, up: Any, down: Any, *, act: str = "silu") -> None:
    fn = ACTIVATIONS[act]
    acc = xp.zeros(out.shape, dtype=out.dtype)
    for e in range(route.shape[1]):
        weight = route[:, e : e + 1]
        if not bool(xp.any(weight != 0)):
            continue
        h = fn(xp, xp.matmul(x, xp.matrix_transpose(gate[e, ...]))) * xp.matmul(x, xp.matrix_transpose(up[e, ...]))
        acc = acc + weight * xp.matmul(h, xp.matrix_transpose(down[e, ...]))
    out[...] = acc


KERNELS: dict[str, Callable[..., Any]] = {
    "add": _add,
    "mul": _mul,
    "cast": _cast,
    "matmul": _matmul,
    "concat": _concat,
    "reshape": _reshape,
    "transpose": _transpose,
    "embedding": _embedding,
    "rope": _rope,
    "attention": _attention,
    "topk_route": _topk_route,
    "moe_ffn": _moe_ffn,
}

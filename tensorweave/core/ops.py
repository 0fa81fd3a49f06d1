"""The op registry: each op = shape/dtype inference + reference kernel + sharding rule.

Kernels are written against an array namespace ``xp`` (numpy on cpu-sim, cupy on GPUs) with numpy's API, and
write their result into a preallocated ``out`` so the executor's static buffer plan holds. The math helpers
(``sigmoid``, ``softmax``, ``ACTIVATIONS``) and the element-wise, softmax and norm kernels use only the array API
standard, so backends over a strict array-API namespace reuse them and override the rest through
``Backend.kernels`` (see examples/tensorweave-array-api-strict). 16-bit floats compute
in float32 and round once into ``out``; float64 stays float64, which makes the float64 runs the reference for
equivalence tests. View ops (reshape, transpose, slice, shard) return a view of their input instead.

A sharding rule gets the split states of the inputs (see ``sharding``) and returns the states it needs them in
(the planner inserts the conversions: allreduce, allgather or a local slice) and the state of the output.
Ops whose attributes depend on the device's part (reshape targets, slice bounds, vocabulary offsets) give a
``localize`` function. Third parties add ops with ``register(OpDef(...))``; an op without a rule makes the planner
refuse the graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ShapeError, UnsupportedError
from . import dtypes
from .sharding import PARTIAL, REPLICATED, Partial, Split, State

Shape = tuple[int, ...]
Meta = tuple[Shape, np.dtype[Any]]
Infer = Callable[[list[Meta], dict[str, Any]], Meta]
Rule = Callable[[list[State], list[Shape], Shape, dict[str, Any]], tuple[list[State], State]]
# (attrs, input states, input shapes, output state, output shape, rank) -> the attrs device ``rank`` runs with
Localize = Callable[[dict[str, Any], list[State], list[Shape], State, Shape, int], dict[str, Any]]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Infer  # (input metas, attrs) -> output meta; raises ShapeError naming the problem
    kernel: Callable[..., Any]  # kernel(xp, out, *inputs, **attrs) -> None; view ops: kernel(xp, x, **attrs) -> view
    shard: Rule | None  # None: the planner refuses graphs that use this op on more than one device
    view: bool = False
    arity: tuple[int, int] = (1, 1)  # min, max number of inputs
    doc: str = field(default="", compare=False)
    localize: Localize | None = None  # attrs that depend on the device's part (reshape targets, slice offsets)


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add an op to the registry (third parties may add their own; names must be new)."""
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def infer(name: str, metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    op = OPS.get(name)
    if op is None:
        raise UnsupportedError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}")
    lo, hi = op.arity
    if not lo <= len(metas) <= hi:
        raise ShapeError(f"{name}: takes {lo}..{hi} inputs, got {len(metas)}")
    return op.infer(metas, attrs)


# --- numeric helpers ------------------------------------------------------------------------------------------


_WIDEN = (dtypes.float16, dtypes.bfloat16)


def _acc(x: Any) -> Any:
    """x in its accumulator dtype (float32 for 16-bit floats); x itself otherwise.

    Only numpy dtypes (numpy, cupy) are widened: array-API namespaces with dtypes of their own (array_api_strict) have
    no 16-bit floats, and comparing their dtypes with numpy's is an error there."""
    return x.astype(dtypes.float32) if isinstance(x.dtype, np.dtype) and x.dtype in _WIDEN else x


def sigmoid(xp: Any, x: Any) -> Any:
    # exp(-|x|) <= 1 never overflows; unlike 0.5 * (1 + tanh(x / 2)) it keeps full relative precision for x << 0
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0, e) / (1.0 + e)


def _silu(xp: Any, x: Any) -> Any:
    return x * sigmoid(xp, x)


def _gelu_tanh(xp: Any, x: Any) -> Any:
    # 0.5 * (1 + tanh(u)) == sigmoid(2u), without the cancellation of 1 + tanh(u) for very negative u
    return x * sigmoid(xp, 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))


def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    m = xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(x - xp.where(xp.isfinite(m), m, 0))
    return e / xp.sum(e, axis=axis, keepdims=True)


ACTIVATIONS: dict[str, Callable[[Any, Any], Any]] = {"silu": _silu, "gelu": _gelu_tanh}


# --- inference helpers ----------------------------------------------------------------------------------------


def _same(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    return metas[0]


def _broadcast(name: str) -> Infer:
    def infer(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
        try:
            shape = tuple(int(s) for s in np.broadcast_shapes(*(m[0] for m in metas)))
        except ValueError:
            raise ShapeError(f"{name}: shapes {[m[0] for m in metas]} do not broadcast") from None
        kinds = {m[1] for m in metas}
        if len(kinds) > 1:
            raise ShapeError(f"{name}: inputs have different dtypes {sorted(d.name for d in kinds)}; cast first")
        return shape, metas[0][1]

    return infer


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


# --- sharding rule helpers -------------------------------------------------------------------------------------


def _elementwise(linear: str = "") -> Rule:
    """Rule for broadcasting element-wise ops.

    ``linear``: "sum" when PARTIAL inputs may stay partial if all inputs are partial (add, scale), "product" when
    exactly one partial input times replicated others stays partial (mul: the delayed MoE reduce), "" otherwise.
    """

    def rule(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
        partial = [isinstance(s, Partial) for s in ins]
        full = [tuple(s) == out for s in shapes]
        if any(partial):
            if linear == "sum" and all(partial) and all(full):
                return list(ins), PARTIAL
            if linear == "product" and sum(partial) == 1 and full[partial.index(True)]:
                return [PARTIAL if p else REPLICATED for p in partial], PARTIAL
        rank = len(out)
        target: Split | None = None
        for s, shp in zip(ins, shapes, strict=True):
            if isinstance(s, Split) and shp[s.axis] == out[s.axis + rank - len(shp)]:
                target = Split(s.axis + rank - len(shp), s.sizes)
                break
        if target is None:
            return [REPLICATED] * len(ins), REPLICATED
        req: list[State] = []
        for shp in shapes:
            a = target.axis - (rank - len(shp))
            split_here = a >= 0 and shp[a] == out[target.axis]
            req.append(Split(a, target.sizes) if split_here else REPLICATED)
        return req, target

    return rule


def _keep_axes(*fixed: int) -> Rule:
    """First input may stay split along any axis but ``fixed`` (negative = from the end); other inputs replicated."""

    def rule(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
        x = ins[0]
        banned = {a % len(shapes[0]) for a in fixed} | {attrs.get("axis", -1) % len(shapes[0])}
        keep = isinstance(x, Split) and x.axis not in banned
        first: State = x if keep else REPLICATED
        return [first] + [REPLICATED] * (len(ins) - 1), first

    return rule


def _replicated(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    return [REPLICATED] * len(ins), REPLICATED


# --- element-wise ops -----------------------------------------------------------------------------------------


def _k_add(xp: Any, out: Any, a: Any, b: Any) -> None:
    xp.add(a, b, out=out)


def _k_mul(xp: Any, out: Any, a: Any, b: Any) -> None:
    xp.multiply(a, b, out=out)


def _k_scale(xp: Any, out: Any, x: Any, *, scale: float) -> None:
    out[...] = _acc(x) * scale


def _unary(fn: Callable[[Any, Any], Any]) -> Callable[..., None]:
    def kernel(xp: Any, out: Any, x: Any) -> None:
        out[...] = fn(xp, _acc(x))

    return kernel


def _k_softplus(xp: Any, x: Any) -> Any:
    return xp.logaddexp(0.0, x)


def _k_softcap(xp: Any, out: Any, x: Any, *, cap: float) -> None:
    out[...] = cap * xp.tanh(_acc(x) / cap)


def _k_softmax(xp: Any, out: Any, x: Any, *, axis: int = -1) -> None:
    out[...] = softmax(xp, _acc(x), axis)


def _glu(act: str) -> Callable[..., None]:
    fn = ACTIVATIONS[act]

    def kernel(xp: Any, out: Any, gate: Any, up: Any) -> None:
        out[...] = fn(xp, _acc(gate)) * _acc(up)

    return kernel


def _k_cast(xp: Any, out: Any, x: Any, *, dtype: str = "") -> None:
    if x.dtype == dtypes.float64 and out.dtype == dtypes.bfloat16:
        # ml_dtypes converts float64 -> float32 -> bfloat16, rounding twice; via float32 rounded to odd, the
        # final rounding to bfloat16 equals rounding the float64 value once
        big = float(np.finfo(np.float32).max)
        x = xp.clip(x, -big, big)  # past float32's range (inf too): its max still rounds to bfloat16 inf
        f = x.astype(dtypes.float32)
        f = xp.where(xp.abs(f.astype(dtypes.float64)) > xp.abs(x), xp.nextafter(f, xp.float32(0)), f)  # truncate
        x = (f.view(xp.uint32) | (f.astype(dtypes.float64) != x).astype(xp.uint32)).view(dtypes.float32)
    out[...] = x


def _infer_cast(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    return metas[0][0], dtypes.to_dtype(attrs["dtype"])


# --- linear algebra, embeddings, norms ------------------------------------------------------------------------


def _infer_matmul(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (ws, _) = metas
    _need(len(ws) == 2 and len(xs) >= 1, f"matmul: x {xs} @ W^T needs W of shape [out, in], got {ws}")
    _need(xs[-1] == ws[1], f"matmul: x has {xs[-1]} features but W {ws} expects {ws[1]} (W is [out, in])")
    return (*xs[:-1], ws[0]), xd


def _k_matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
    if x.dtype == w.dtype == out.dtype and out.dtype in (dtypes.float32, dtypes.float64):
        xp.matmul(x, w.T, out=out)
    else:
        out[...] = xp.matmul(_acc(x), _acc(w).T)


def _rule_matmul(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    x, w = ins
    last = len(shapes[0]) - 1
    if isinstance(w, Split) and w.axis == 0:  # column-parallel: each device computes its output features
        return [REPLICATED, w], Split(len(out) - 1, w.sizes)
    if isinstance(w, Split):  # row-parallel: each device holds its input features -> partial sums
        return [Split(last, w.sizes), w], PARTIAL
    if isinstance(x, Partial):  # linear in x: stay partial
        return [x, w], PARTIAL
    if isinstance(x, Split) and x.axis != last:  # split rows (tokens) through a replicated weight
        return [x, w], x
    return [REPLICATED, w], REPLICATED


def _infer_embedding(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (ids, idt), (ts, td) = metas
    _need(idt == dtypes.int32, f"embedding: token ids must be int32, got {idt.name}")
    _need(len(ts) == 2, f"embedding: the table must be [vocab, hidden], got {ts}")
    return (*ids, ts[1]), td


def _k_embedding(xp: Any, out: Any, ids: Any, table: Any, *, offset: int = 0, vocab: int = 0) -> None:
    """table[ids]. A device holding only vocabulary rows [offset, offset + len(table)) of ``vocab`` looks up those
    and writes zeros elsewhere, so the devices' parts sum to the whole lookup (PARTIAL)."""
    vocab = vocab or table.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ShapeError(f"embedding: token ids must be in 0..{vocab - 1}, got {int(ids.min())}..{int(ids.max())}")
    if table.shape[0] == vocab:
        out[...] = table[ids]
        return
    local = ids - offset
    mine = (local >= 0) & (local < table.shape[0])
    out[...] = 0
    out[mine] = table[local[mine]]


def _rule_embedding(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    table = ins[1]
    if isinstance(table, Split) and table.axis == 0:  # a vocab-split table (tied with the LM head): partial rows
        return [REPLICATED, table], PARTIAL
    return [REPLICATED, REPLICATED], REPLICATED


def _localize_embedding(
    attrs: dict[str, Any], ins: list[State], shapes: list[Shape], out: State, shape: Shape, rank: int
) -> dict[str, Any]:
    table = ins[1]
    if not isinstance(table, Split):
        return attrs
    return {**attrs, "offset": sum(table.sizes[:rank]), "vocab": shapes[1][0]}


def _infer_norm(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    xs, xd = metas[0]
    for ws, _ in metas[1:]:
        _need(ws == xs[-1:], f"norm: weight/bias of shape {ws} does not match the last axis of {xs}")
    return xs, xd


def _k_rms_norm(xp: Any, out: Any, x: Any, w: Any = None, *, eps: float, plus_one: bool = False) -> None:
    xa = _acc(x)
    y = xa / xp.sqrt(xp.mean(xa * xa, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * (1.0 + _acc(w)) if plus_one else y * _acc(w)
    out[...] = y


def _k_layer_norm(xp: Any, out: Any, x: Any, w: Any = None, b: Any = None, *, eps: float) -> None:
    xa = _acc(x)
    c = xa - xp.mean(xa, axis=-1, keepdims=True)
    y = c / xp.sqrt(xp.mean(c * c, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * _acc(w)
    if b is not None:
        y = y + _acc(b)
    out[...] = y


# --- rope -----------------------------------------------------------------------------------------------------


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
    inv = xp.asarray(_cached_inv_freq(n_rot, theta, tuple(sorted((scaling or {}).items()))))
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


# --- attention ------------------------------------------------------------------------------------------------


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


def _k_attention(
    xp: Any,
    out: Any,
    *inputs: Any,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    cache: bool = False,
    sinks: bool = False,
) -> None:
    q, k, v, pos, ck, cv, sk = attention_inputs(inputs, {"cache": cache, "sinks": sinks})
    n_tok, n_head, hd = q.shape
    n_kv = k.shape[1]
    group = n_head // n_kv if n_kv else 0  # a device may hold zero heads
    if ck is not None and window:
        k, v, kpos = _ring_cache(xp, ck, cv, k, v, pos)
    elif ck is not None:  # append this step's keys/values, then attend over the cache up to the last position
        ck[pos] = k
        cv[pos] = v
        length = int(pos.max()) + 1 if n_tok else 0
        k, v, kpos = ck[:length], cv[:length], xp.arange(length)
    else:
        kpos = pos
    # Batched matmuls over KV heads (BLAS) rather than einsum: [kv, group * tokens, hd] @ [kv, hd, keys].
    qa = _acc(q).reshape(n_tok, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n_tok, hd)
    n_keys = k.shape[0]
    scores = xp.matmul(qa, _acc(k).transpose(1, 2, 0)).reshape(n_kv, group, n_tok, n_keys)
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
    if not bool(visible.all()):
        scores = xp.where(visible, scores, -xp.inf)
    if sk is not None:  # a learned per-head logit that only joins the softmax's denominator
        sink = xp.broadcast_to(_acc(sk).reshape(n_kv, group, 1, 1), (*scores.shape[:3], 1))
        probs = softmax(xp, xp.concatenate([scores, sink], axis=-1))[..., :-1]
    else:
        probs = softmax(xp, scores)
    if not bool(visible.any(axis=-1).all()):
        probs = xp.where(visible, probs, 0.0)  # rows with nothing visible give 0, not NaN
    y = xp.matmul(probs.reshape(n_kv, group * n_tok, n_keys), _acc(v).transpose(1, 0, 2))  # [kv, group * tokens, hd]
    out[...] = y.reshape(n_kv, group, n_tok, hd).transpose(2, 0, 1, 3).reshape(n_tok, n_head, hd)


def _ring_cache(xp: Any, ck: Any, cv: Any, k: Any, v: Any, pos: Any) -> tuple[Any, Any, Any]:
    """A sliding-window layer's cache is a ring of R slots: position p lives in slot p % R, so R = window slots
    serve any context length. The step's positions must be consecutive and follow the cached ones (a session's
    are). The queries attend over the ring as it was before this step plus the step's own keys; then the step's
    last R keys overwrite their slots. Returns (keys, values, key positions); never-written slots get negative
    positions, which no query sees."""
    n_slots, n_tok = ck.shape[0], k.shape[0]
    start = int(pos[0]) if n_tok else 0
    slots = xp.arange(n_slots)
    held = start - 1 - (start - 1 - slots) % n_slots  # the latest position before this step in each slot
    keys, values = xp.concatenate([ck, k]), xp.concatenate([cv, v])
    keep = min(n_tok, n_slots)
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


# --- MoE ------------------------------------------------------------------------------------------------------


def _infer_topk(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (ls, ld) = metas[0]
    _need(len(ls) == 2, f"topk_route: router logits must be [tokens, experts], got {ls}")
    _need(0 < attrs["k"] <= ls[1], f"topk_route: k={attrs['k']} must be in 1..{ls[1]} experts")
    _need(attrs.get("gating", "softmax") in ("softmax", "sigmoid"), "topk_route: gating must be softmax or sigmoid")
    return ls, ld


def _k_topk(
    xp: Any, out: Any, logits: Any, *, k: int, gating: str = "softmax", norm: bool = True, scale: float = 1.0
) -> None:
    la = _acc(logits)
    probs = softmax(xp, la) if gating == "softmax" else sigmoid(xp, la)
    # ties: the lower expert index wins (a stable sort; cupy's argsort always is, and accepts no other kind)
    idx = (xp.argsort(-probs, axis=-1, kind="stable") if xp is np else xp.argsort(-probs, axis=-1))[:, :k]
    w = xp.take_along_axis(probs, idx, axis=-1)
    if norm:
        w = w / xp.sum(w, axis=-1, keepdims=True)
    out[...] = 0
    out[xp.arange(out.shape[0])[:, None], idx] = w * scale


def _infer_moe(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (rs, _), (gs, _), (us, _), (ds, _) = metas
    ranks = [len(xs), len(rs), len(gs), len(us), len(ds)]
    _need(ranks == [2, 2, 3, 3, 3], f"moe_ffn: x, route, gate, up, down must have 2, 2, 3, 3, 3 axes, got {ranks}")
    n_tok, hidden = xs
    n_exp, n_ff = gs[0], gs[1]
    _need(rs == (n_tok, n_exp), f"moe_ffn: routing weights must be [{n_tok}, {n_exp}], got {rs}")
    _need(gs == us == (n_exp, n_ff, hidden), f"moe_ffn: gate {gs} and up {us} must be [experts, ff, {hidden}]")
    _need(ds == (n_exp, hidden, n_ff), f"moe_ffn: down must be [{n_exp}, {hidden}, {n_ff}], got {ds}")
    _need(attrs.get("act", "silu") in ACTIVATIONS, f"moe_ffn: act must be one of {sorted(ACTIVATIONS)}")
    return xs, xd


def _k_moe(xp: Any, out: Any, x: Any, route: Any, gate: Any, up: Any, down: Any, *, act: str = "silu") -> None:
    """sum over experts e of route[:, e] * down_e(act(gate_e x) * up_e x), only for the tokens routed to e."""
    fn = ACTIVATIONS[act]
    acc = xp.zeros(out.shape, dtypes.accumulator(out.dtype))
    xa = _acc(x)
    for e in range(route.shape[1]):
        rows = xp.nonzero(route[:, e])[0]
        if rows.shape[0] == 0:
            continue
        xe = xa[rows]
        h = fn(xp, xe @ _acc(gate[e]).T) * (xe @ _acc(up[e]).T)
        acc[rows] += _acc(route[rows, e])[:, None] * (h @ _acc(down[e]).T)
    out[...] = acc


def _rule_moe(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    gate = ins[2]
    if isinstance(gate, Split) and gate.axis == 1:  # experts sliced along n_ff: partial sums, reduced once, later
        return [REPLICATED, REPLICATED, gate, Split(1, gate.sizes), Split(2, gate.sizes)], PARTIAL
    return [REPLICATED] * 5, REPLICATED


# --- shape ops ------------------------------------------------------------------------------------------------


def _infer_reshape(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    xs, xd = metas[0]
    shape = tuple(int(s) for s in attrs["shape"])
    _need(math.prod(shape) == math.prod(xs) and all(s >= 0 for s in shape), f"reshape: cannot reshape {xs} to {shape}")
    return shape, xd


def _axis_groups(a: Shape, b: Shape) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of axes of ``a`` and ``b`` with equal products (the structure of a reshape)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb = [i] if i < len(a) else [], [j] if j < len(b) else []
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = i + bool(ga), j + bool(gb)
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        groups.append((ga, gb))
    return groups


def _rule_reshape(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    x, src = ins[0], shapes[0]
    if not isinstance(x, Split):
        return [x], x  # replicated and partial values reshape as they are
    for ga, gb in _axis_groups(src, out) or []:
        if x.axis not in ga or not gb:
            continue
        # the split axis must lead its group: a merge scales the sizes, a split into axes divides them
        inner_in, inner_out = math.prod(src[a] for a in ga[1:]), math.prod(out[b] for b in gb[1:])
        if x.axis == ga[0] and all(s * inner_in % inner_out == 0 for s in x.sizes):
            return [x], Split(gb[0], tuple(s * inner_in // inner_out for s in x.sizes))
    return [REPLICATED], REPLICATED


def _localize_reshape(
    attrs: dict[str, Any], ins: list[State], shapes: list[Shape], out: State, shape: Shape, rank: int
) -> dict[str, Any]:
    return {**attrs, "shape": shape}  # the device's part of the target shape


def _k_reshape(xp: Any, x: Any, *, shape: Shape) -> Any:
    return x.reshape(shape)


def _infer_transpose(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    xs, xd = metas[0]
    perm = tuple(attrs["perm"])
    _need(sorted(perm) == list(range(len(xs))), f"transpose: {perm} is not a permutation of {len(xs)} axes")
    return tuple(xs[p] for p in perm), xd


def _rule_transpose(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    x = ins[0]
    return [x], Split(list(attrs["perm"]).index(x.axis), x.sizes) if isinstance(x, Split) else x


def _k_transpose(xp: Any, x: Any, *, perm: Sequence[int]) -> Any:
    return x.transpose(perm)


def _infer_slice(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    xs, xd = metas[0]
    axis = attrs["axis"] % len(xs)
    start, stop, _ = slice(attrs["start"], attrs["stop"]).indices(xs[axis])
    out = list(xs)
    out[axis] = max(stop - start, 0)
    return tuple(out), xd


def _rule_slice(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    x = ins[0]
    if isinstance(x, Split) and x.axis == attrs["axis"] % len(out):
        return [REPLICATED], REPLICATED
    return [x], x


def _localize_shard(
    attrs: dict[str, Any], ins: list[State], shapes: list[Shape], out: State, shape: Shape, rank: int
) -> dict[str, Any]:
    assert isinstance(out, Split)
    start = sum(out.sizes[:rank])
    return {**attrs, "start": start, "stop": start + out.sizes[rank]}


def _k_slice(xp: Any, x: Any, *, axis: int, start: int, stop: int) -> Any:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _infer_concat(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    shapes = [m[0] for m in metas]
    axis = attrs.get("axis", -1) % len(shapes[0])
    rest = {s[:axis] + s[axis + 1 :] for s in shapes}
    _need(len(rest) == 1 and len({m[1] for m in metas}) == 1, f"concat: shapes {shapes} differ off axis {axis}")
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return tuple(out), metas[0][1]


def _rule_concat(ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]) -> tuple[list[State], State]:
    axis = attrs.get("axis", -1) % len(out)
    first = ins[0]
    if all(isinstance(s, Partial) for s in ins) or (
        isinstance(first, Split) and first.axis != axis and all(s == first for s in ins)
    ):
        return list(ins), first
    return [REPLICATED] * len(ins), REPLICATED


def _k_concat(xp: Any, out: Any, *xs: Any, axis: int = -1) -> None:
    xp.concatenate(xs, axis=axis, out=out)


# --- collectives (inserted by the planner; identities on one device) -------------------------------------------


def _k_identity(xp: Any, out: Any, x: Any, **attrs: Any) -> None:
    out[...] = x


def _rule_allreduce(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    return [ins[0] if isinstance(ins[0], Partial) else REPLICATED], REPLICATED


# --- the registry -----------------------------------------------------------------------------------------------

_BINARY = (2, 2)
for _op in [
    OpDef("add", _broadcast("add"), _k_add, _elementwise("sum"), arity=_BINARY, doc="a + b (broadcasting)"),
    OpDef("mul", _broadcast("mul"), _k_mul, _elementwise("product"), arity=_BINARY, doc="a * b (broadcasting)"),
    OpDef("scale", _same, _k_scale, _elementwise("sum"), doc="x * scale"),
    OpDef("silu", _same, _unary(_silu), _elementwise(), doc="x * sigmoid(x)"),
    OpDef("gelu", _same, _unary(_gelu_tanh), _elementwise(), doc="gelu, tanh approximation"),
    OpDef("sigmoid", _same, _unary(sigmoid), _elementwise()),
    OpDef("softplus", _same, _unary(_k_softplus), _elementwise(), doc="log(1 + exp(x))"),
    OpDef("tanh_softcap", _same, _k_softcap, _elementwise(), doc="cap * tanh(x / cap)"),
    OpDef("swiglu", _broadcast("swiglu"), _glu("silu"), _elementwise(), arity=_BINARY, doc="silu(gate) * up"),
    OpDef("geglu", _broadcast("geglu"), _glu("gelu"), _elementwise(), arity=_BINARY, doc="gelu(gate) * up"),
    OpDef("cast", _infer_cast, _k_cast, _elementwise(), doc="convert to attrs['dtype'], rounding once"),
    OpDef("softmax", _same, _k_softmax, _keep_axes(), doc="softmax over attrs['axis'] (default last)"),
    OpDef("matmul", _infer_matmul, _k_matmul, _rule_matmul, arity=_BINARY, doc="x @ W^T, W is [out, in]"),
    OpDef(
        "embedding",
        _infer_embedding,
        _k_embedding,
        _rule_embedding,
        arity=_BINARY,
        doc="table[ids]",
        localize=_localize_embedding,
    ),
    OpDef("rms_norm", _infer_norm, _k_rms_norm, _keep_axes(-1), arity=(1, 2), doc="x / rms(x) * w (or 1 + w)"),
    OpDef("layer_norm", _infer_norm, _k_layer_norm, _keep_axes(-1), arity=(1, 3), doc="(x - mean) / std * w + b"),
    OpDef("rope", _infer_rope, _k_rope, _keep_axes(-1), arity=_BINARY, doc="rotary embedding of [T, heads, dim]"),
    OpDef("attention", _infer_attention, _k_attention, _rule_attention, arity=(4, 7), doc="softmax(qk^T) v, GQA"),
    OpDef("topk_route", _infer_topk, _k_topk, _replicated, doc="router logits -> dense [T, E] top-k weights"),
    OpDef("moe_ffn", _infer_moe, _k_moe, _rule_moe, arity=(5, 5), doc="routed sum of expert FFNs"),
    OpDef("reshape", _infer_reshape, _k_reshape, _rule_reshape, view=True, localize=_localize_reshape),
    OpDef("transpose", _infer_transpose, _k_transpose, _rule_transpose, view=True),
    OpDef("slice", _infer_slice, _k_slice, _rule_slice, view=True, doc="x[start:stop] along attrs['axis']"),
    OpDef(
        "shard",
        _infer_slice,
        _k_slice,
        None,
        view=True,
        doc="a device's part (planner-inserted)",
        localize=_localize_shard,
    ),
    OpDef("concat", _infer_concat, _k_concat, _rule_concat, arity=(1, 64)),
    OpDef("copy", _same, _k_identity, _elementwise("sum"), doc="a contiguous copy"),
    OpDef("allreduce", _same, _k_identity, _rule_allreduce, doc="sum of PARTIAL values (planner-inserted)"),
    OpDef("allgather", _same, _k_identity, _replicated, doc="whole value from SPLIT parts (planner-inserted)"),
]:
    register(_op)

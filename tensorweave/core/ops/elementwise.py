"""Element-wise, softmax and norm ops, and the numeric, shape-rule and sharding-rule helpers the other families share.

The math helpers (``sigmoid``, ``softmax``, ``ACTIVATIONS``) and the kernels here use only the array API standard, so
backends over a strict array-API namespace reuse them (see examples/tensorweave-array-api-strict). 16-bit floats
compute in float32 (``_acc``) and round once into ``out``; float64 stays float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import ShapeError
from .. import dtypes
from ..sharding import PARTIAL, REPLICATED, Partial, Split, State
from .registry import REQUIRED, Infer, Meta, OpDef, Rule, Shape, _need, register

# --- numeric helpers ------------------------------------------------------------------------------------------


_WIDEN = (dtypes.float16, dtypes.bfloat16)


def on_host(a: Any) -> bool:
    """Whether ``a`` is in host memory (numpy), where reading it from Python (``int()``, ``bool()``) is free. On a
    GPU each such read stalls the stream until the queued kernels finish, so kernels take their data-dependent
    shortcuts only on the host and a sync-free path for device arrays."""
    return isinstance(a, np.ndarray)


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


# --- norms ----------------------------------------------------------------------------------------------------


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


_BINARY = (2, 2)
for _op in [
    OpDef("add", _broadcast("add"), _k_add, _elementwise("sum"), arity=_BINARY, doc="a + b (broadcasting)"),
    OpDef("mul", _broadcast("mul"), _k_mul, _elementwise("product"), arity=_BINARY, doc="a * b (broadcasting)"),
    OpDef("scale", _same, _k_scale, _elementwise("sum"), doc="x * scale", attrs={"scale": REQUIRED}),
    OpDef("silu", _same, _unary(_silu), _elementwise(), doc="x * sigmoid(x)"),
    OpDef("gelu", _same, _unary(_gelu_tanh), _elementwise(), doc="gelu, tanh approximation"),
    OpDef("sigmoid", _same, _unary(sigmoid), _elementwise()),
    OpDef("softplus", _same, _unary(_k_softplus), _elementwise(), doc="log(1 + exp(x))"),
    OpDef("tanh_softcap", _same, _k_softcap, _elementwise(), doc="cap * tanh(x / cap)", attrs={"cap": REQUIRED}),
    OpDef("swiglu", _broadcast("swiglu"), _glu("silu"), _elementwise(), arity=_BINARY, doc="silu(gate) * up"),
    OpDef("geglu", _broadcast("geglu"), _glu("gelu"), _elementwise(), arity=_BINARY, doc="gelu(gate) * up"),
    OpDef(
        "softmax", _same, _k_softmax, _keep_axes(), doc="softmax over attrs['axis'] (default last)", attrs={"axis": -1}
    ),
    OpDef(
        "rms_norm",
        _infer_norm,
        _k_rms_norm,
        _keep_axes(-1),
        arity=(1, 2),
        doc="x / rms(x) * w (or 1 + w)",
        attrs={"eps": REQUIRED, "plus_one": False},
    ),
    OpDef(
        "layer_norm",
        _infer_norm,
        _k_layer_norm,
        _keep_axes(-1),
        arity=(1, 3),
        doc="(x - mean) / std * w + b",
        attrs={"eps": REQUIRED},
    ),
]:
    register(_op)

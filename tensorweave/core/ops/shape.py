"""Shape and bookkeeping ops: the views (reshape, transpose, slice, a device's shard), concat, cast, copy, and the
collectives the planner inserts (allreduce, allgather: identities on one device, run by the communicator)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import dtypes
from ..sharding import REPLICATED, Partial, Split, State
from .elementwise import _elementwise, _replicated, _same
from .registry import REQUIRED, Meta, OpDef, Shape, _need, register


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


# --- cast -----------------------------------------------------------------------------------------------------


def _k_cast(xp: Any, out: Any, x: Any, *, dtype: str = "") -> None:
    if x.dtype == dtypes.float64 and out.dtype == dtypes.bfloat16:  # ml_dtypes would round twice
        x = dtypes.float64_to_float32_round_odd(xp, x)
    out[...] = x


def _infer_cast(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    return metas[0][0], dtypes.to_dtype(attrs["dtype"])


# --- collectives (inserted by the planner; identities on one device) -------------------------------------------


def _k_identity(xp: Any, out: Any, x: Any, **attrs: Any) -> None:
    out[...] = x


def _rule_allreduce(
    ins: list[State], shapes: list[Shape], out: Shape, attrs: dict[str, Any]
) -> tuple[list[State], State]:
    return [ins[0] if isinstance(ins[0], Partial) else REPLICATED], REPLICATED


_SLICE = {"axis": REQUIRED, "start": REQUIRED, "stop": REQUIRED}
for _op in [
    OpDef(
        "reshape",
        _infer_reshape,
        _k_reshape,
        _rule_reshape,
        view=True,
        localize=_localize_reshape,
        attrs={"shape": REQUIRED},
    ),
    OpDef("transpose", _infer_transpose, _k_transpose, _rule_transpose, view=True, attrs={"perm": REQUIRED}),
    OpDef(
        "slice", _infer_slice, _k_slice, _rule_slice, view=True, doc="x[start:stop] along attrs['axis']", attrs=_SLICE
    ),
    OpDef(
        "shard",
        _infer_slice,
        _k_slice,
        None,
        view=True,
        doc="a device's part (planner-inserted)",
        localize=_localize_shard,
        attrs=_SLICE,
    ),
    OpDef("concat", _infer_concat, _k_concat, _rule_concat, arity=(1, 64), attrs={"axis": -1}),
    OpDef(
        "cast",
        _infer_cast,
        _k_cast,
        _elementwise(),
        doc="convert to attrs['dtype'], rounding once",
        attrs={"dtype": REQUIRED},
    ),
    OpDef("copy", _same, _k_identity, _elementwise("sum"), doc="a contiguous copy"),
    OpDef("allreduce", _same, _k_identity, _rule_allreduce, doc="sum of PARTIAL values (planner-inserted)"),
    OpDef(
        "allgather",
        _same,
        _k_identity,
        _replicated,
        doc="whole value from SPLIT parts (planner-inserted)",
        attrs={"axis": None},  # the planner gives the split axis; on one device the op is an identity
    ),
]:
    register(_op)

"""Linear algebra ops: ``matmul`` (x @ W^T, column- or row-parallel by the weight's split) and ``embedding``
(a table lookup that also works on a vocabulary-split table, giving partial rows). Both take their weight as it is
held (a float array, or a quantized ``Packed``; see weights.py) and compute in float32."""

from __future__ import annotations

from typing import Any

from ...errors import ShapeError
from .. import dtypes
from ..sharding import PARTIAL, REPLICATED, Partial, Split, State
from .elementwise import _acc, on_host
from .registry import Meta, OpDef, Shape, _need, register
from .weights import is_narrow, linear, take_rows


def _infer_matmul(metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    (xs, xd), (ws, _) = metas
    _need(len(ws) == 2 and len(xs) >= 1, f"matmul: x {xs} @ W^T needs W of shape [out, in], got {ws}")
    _need(xs[-1] == ws[1], f"matmul: x has {xs[-1]} features but W {ws} expects {ws[1]} (W is [out, in])")
    return (*xs[:-1], ws[0]), xd


def _k_matmul(xp: Any, out: Any, x: Any, w: Any) -> None:
    if is_narrow(w):  # 16-bit or quantized: converted a block of rows at a time, never whole
        linear(xp, x, w, out)
    elif x.dtype == w.dtype == out.dtype and out.dtype in (dtypes.float32, dtypes.float64):
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
    # The range check reads the ids (see on_host): device arrays go unchecked here; Session.eval checks token ids
    # on the host before they are uploaded.
    if on_host(ids) and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ShapeError(f"embedding: token ids must be in 0..{vocab - 1}, got {int(ids.min())}..{int(ids.max())}")
    if table.shape[0] == vocab:
        out[...] = take_rows(xp, table, ids) if is_narrow(table) else table[ids]
        return
    if table.shape[0] == 0:  # a device may hold no vocabulary rows
        out[...] = 0
        return
    local = ids - offset
    mine = (local >= 0) & (local < table.shape[0])
    # where() rather than out[mine] = ...: boolean indexing sizes its result from the data, a host round trip on GPUs
    rows = xp.clip(local, 0, table.shape[0] - 1)
    out[...] = xp.where(mine[:, None], take_rows(xp, table, rows) if is_narrow(table) else table[rows], 0)


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


register(
    OpDef("matmul", _infer_matmul, _k_matmul, _rule_matmul, arity=(2, 2), doc="x @ W^T, W is [out, in]", held=(1,))
)
register(
    OpDef(
        "embedding",
        _infer_embedding,
        _k_embedding,
        _rule_embedding,
        arity=(2, 2),
        doc="table[ids]",
        localize=_localize_embedding,
        attrs={"offset": 0, "vocab": 0},  # set by the planner on a device holding part of the vocabulary
        held=(1,),
    )
)

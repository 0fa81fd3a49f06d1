"""The op registry: an op is a shape/dtype rule, a reference kernel, a sharding rule and its declared attributes.

Every node a ``Graph`` traces goes through ``infer``, so an unknown op, a wrong number of inputs, an attribute the
op does not declare (a typo) or a missing required one fails there, at trace time, naming the op.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import OpAttributeError, ShapeError, UnsupportedError
from ..sharding import State

Shape = tuple[int, ...]
Meta = tuple[Shape, np.dtype[Any]]
Infer = Callable[[list[Meta], dict[str, Any]], Meta]
Rule = Callable[[list[State], list[Shape], Shape, dict[str, Any]], tuple[list[State], State]]
# (attrs, input states, input shapes, output state, output shape, rank) -> the attrs device ``rank`` runs with
Localize = Callable[[dict[str, Any], list[State], list[Shape], State, Shape, int], dict[str, Any]]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the "default" of an attribute every node of the op must give


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
    # attribute name -> the kernel's default (REQUIRED: none); a node giving any other name is refused
    attrs: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # input positions whose kernel takes a weight as held (16-bit array or quantized ``weights.Packed``) and
    # computes in float32; a weight any other op reads is converted to the compute dtype at load
    held: tuple[int, ...] = ()


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add an op to the registry (third parties may add their own; names must be new)."""
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def lookup(name: str) -> OpDef:
    op = OPS.get(name)
    if op is None:
        raise UnsupportedError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}")
    return op


def infer(name: str, metas: list[Meta], attrs: dict[str, Any]) -> Meta:
    """The output (shape, dtype) of op ``name`` on inputs ``metas``; checks arity and attribute names first."""
    op = lookup(name)
    lo, hi = op.arity
    if not lo <= len(metas) <= hi:
        raise ShapeError(f"{name}: takes {lo}..{hi} inputs, got {len(metas)}")
    takes = ", ".join(a if d is REQUIRED else f"{a}={d!r}" for a, d in op.attrs.items()) or "no attributes"
    for a in attrs:
        if a not in op.attrs:
            near = difflib.get_close_matches(a, list(op.attrs), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise OpAttributeError(f"{name}: unknown attribute {a!r}{hint}; {name} takes {takes}")
    for a, default in op.attrs.items():
        if default is REQUIRED and a not in attrs:
            raise OpAttributeError(f"{name}: missing required attribute {a!r}; {name} takes {takes}")
    return op.infer(metas, attrs)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)

"""The planner: one graph + N devices + tensor_split -> one program per device, collectives inserted.

It walks the graph in trace order keeping every value's split state (``sharding``). Weights get theirs from their
role, caches from their declared split axis; inputs are replicated. Each op's sharding rule says which states it
needs its inputs in and what state its output has; where a value is not in the state a consumer needs, the planner
converts it:

    PARTIAL  -> REPLICATED   allreduce (the only place partial sums are summed)
    SPLIT    -> REPLICATED   allgather (e.g. vocab-split logits)
    REPLICATED -> SPLIT      a local slice, free
    anything else            via REPLICATED

Conversions are memoized per value, so a value reduced once serves every consumer. A dense transformer layer
comes out with two allreduces (attention output, FFN down); an MoE block with one, after the routing-weight
multiply and the sum over experts. Weights are never gathered: using a split weight against its role is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PlanError, format_bytes
from . import dtypes
from .graph import Graph, Tensor
from .ops import OPS, Shape, infer
from .sharding import (
    PARTIAL,
    REPLICATED,
    Partial,
    Replicated,
    Split,
    State,
    local_shape,
    local_slice,
    normalize_split,
)

COLLECTIVES = ("allreduce", "allgather")


@dataclass
class Value:
    """A value of the distributed program: a graph tensor, or one made by a conversion."""

    id: int
    name: str
    shape: Shape  # whole (global) shape
    dtype: np.dtype[Any]
    state: State
    kind: str  # "input" | "weight" | "cache" | "node"
    tensor: Tensor | None = None


@dataclass
class Step:
    """One op of the distributed program (the same on every device, shapes aside)."""

    op: str
    inputs: tuple[int, ...]
    out: int
    attrs: dict[str, Any]


@dataclass
class Instr:
    """One op of one device's program, with that device's attributes and output shape."""

    op: str
    inputs: tuple[int, ...]
    out: int
    attrs: dict[str, Any]
    shape: Shape


@dataclass
class Program:
    rank: int
    instrs: list[Instr]
    shapes: dict[int, Shape]  # local shape of every value on this device


@dataclass(frozen=True)
class Collective:
    kind: str  # "allreduce" | "allgather"
    value: str  # name of the value it produces
    shape: Shape
    dtype: str
    nbytes: int  # payload: the whole value's size (what every rank ends up holding)


@dataclass
class Plan:
    """Where everything lives and what moves, for one graph on ``world_size`` devices."""

    graph: Graph
    world_size: int
    ratios: tuple[float, ...]
    values: list[Value]
    steps: list[Step]
    outputs: dict[str, int]
    programs: list[Program] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    weight_bytes: list[int] = field(default_factory=list)  # per device, as held (16-bit, quantized blocks ...)
    weight_formats: dict[str, int] = field(default_factory=dict)  # format name -> bytes over all devices
    notes: list[str] = field(default_factory=list)  # what loading decided: conversions, split granularity
    cache_bytes: list[int] = field(default_factory=list)  # per device, the KV cache as preallocated (all ctx)
    state_bytes: list[int] = field(default_factory=list)  # per device, the part of cache_bytes in recurrent states

    @property
    def tokens(self) -> int | None:
        return self.graph.tokens

    @property
    def comm_bytes(self) -> int:
        """Bytes communicated per step: the sum of every collective's payload."""
        return sum(c.nbytes for c in self.collectives)

    @property
    def comm_bytes_per_token(self) -> float | None:
        return self.comm_bytes / self.tokens if self.tokens else None

    def weight_slice(self, name: str, rank: int) -> tuple[slice, ...]:
        """The part of weight ``name`` that device ``rank`` holds (what a loader reads for it)."""
        v = next(v for v in self.values if v.kind == "weight" and v.name == name)
        return local_slice(v.shape, v.state, rank)

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.collectives)

    def summary(self) -> str:
        """A readable report: per-device bytes, the collectives of one step, bytes communicated."""
        ratios = ", ".join(f"{r:g}" for r in self.ratios)
        lines = [f"plan of {self.graph.name!r}: {self.world_size} device(s), tensor_split [{ratios}]"]
        states = any(self.state_bytes)  # a recurrent model: its states apart from the KV cache
        lines.append(
            f"{'rank':>6}  {'weights':>12}  {'kv cache':>12}" + (f"  {'recurrent state':>15}" if states else "")
        )
        for r in range(self.world_size):
            kv, state = self.cache_bytes[r] - self.state_bytes[r], self.state_bytes[r]
            row = f"{r:>6}  {format_bytes(self.weight_bytes[r]):>12}  {format_bytes(kv):>12}"
            lines.append(row + (f"  {format_bytes(state):>15}" if states else ""))
        groups: dict[tuple[str, Shape, str], int] = {}
        for c in self.collectives:
            key = (c.kind, c.shape, c.dtype)
            groups[key] = groups.get(key, 0) + 1
        if self.weight_formats:
            total = sum(self.weight_formats.values()) or 1
            mix = ", ".join(
                f"{k} {format_bytes(b)} ({100 * b / total:.0f}%)"
                for k, b in sorted(self.weight_formats.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"weights as held, all devices: {mix}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"collectives per step ({len(self.collectives)}):")
        for (kind, shape, dt), n in groups.items():
            nbytes = math.prod(shape) * dtypes.to_dtype(dt).itemsize
            lines.append(f"  {n:>4} x {kind:<9} {list(shape)} {dt} ({format_bytes(nbytes)} each)")
        per_token = self.comm_bytes_per_token
        lines.append(
            f"communicated per step: {format_bytes(self.comm_bytes)}"
            + (f" ({format_bytes(per_token)} per token at {self.tokens} tokens/step)" if per_token is not None else "")
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph.name,
            "world_size": self.world_size,
            "tensor_split": list(self.ratios),
            "tokens_per_step": self.tokens,
            "devices": [
                {"rank": r, "weight_bytes": w, "kv_cache_bytes": c, "state_bytes": s}
                for r, (w, c, s) in enumerate(zip(self.weight_bytes, self.cache_bytes, self.state_bytes, strict=True))
            ],
            "collectives": [
                {"kind": c.kind, "value": c.value, "shape": list(c.shape), "dtype": c.dtype, "bytes": c.nbytes}
                for c in self.collectives
            ],
            "weight_formats": dict(self.weight_formats),
            "notes": list(self.notes),
            "bytes_per_step": self.comm_bytes,
            "bytes_per_token": self.comm_bytes_per_token,
        }


class _Planner:
    def __init__(
        self, graph: Graph, ratios: tuple[float, ...], formats: Mapping[str, dtypes.WeightFormat] | None = None
    ) -> None:
        self.graph, self.ratios, self.world = graph, ratios, len(ratios)
        self.formats = formats or {}
        self.values: list[Value] = []
        self.steps: list[Step] = []
        self.memo: dict[tuple[int, State], int] = {}
        self.of_tensor: dict[int, int] = {}  # graph tensor id -> value id
        self.consumer = ""  # for error messages

    def value(self, name: str, shape: Shape, dtype: np.dtype[Any], state: State, kind: str) -> int:
        if self.world == 1:
            state = REPLICATED  # one device holds everything; nothing to convert
        self.values.append(Value(len(self.values), name, shape, dtype, state, kind))
        return len(self.values) - 1

    def step(self, op: str, inputs: tuple[int, ...], state: State, shape: Shape, **attrs: Any) -> int:
        src = self.values[inputs[0]]
        out = self.value(f"{op}({src.name})", shape, src.dtype, state, "node")
        self.steps.append(Step(op, inputs, out, attrs))
        return out

    def convert(self, vid: int, target: State) -> int:
        v = self.values[vid]
        if v.state == target:
            return vid
        key = (vid, target)
        if key in self.memo:
            return self.memo[key]
        if v.kind in ("weight", "cache") and not isinstance(v.state, Replicated):
            t = v.tensor
            how = "?" if t is None else f"role {t.role.value}" if t.cache is None else f"split axis {t.cache.axis}"
            raise PlanError(
                f"{v.kind} {v.name!r} ({how}) is {v.state} but {self.consumer} needs it {target}; weights and "
                "caches are never gathered at run time: give it a role (split axis) that matches how the op uses it"
            )
        if isinstance(target, Partial):
            raise PlanError(f"{self.consumer}: cannot turn {v.name!r} ({v.state}) into partial sums")
        out = vid
        if isinstance(v.state, Partial):
            out = self.step("allreduce", (vid,), REPLICATED, v.shape)
        elif isinstance(v.state, Split):
            out = self.step("allgather", (vid,), REPLICATED, v.shape, axis=v.state.axis)
        if isinstance(target, Split):
            out = self.step("shard", (out,), target, v.shape, axis=target.axis)
        self.memo[key] = out
        return out

    def run(self) -> Plan:
        g = self.graph
        for t in g.tensors:
            if t.kind == "node":
                continue
            state = t.placement(self.ratios) if t.kind != "input" else REPLICATED
            self.of_tensor[t.id] = vid = self.value(t.name, t.shape, t.dtype, state, t.kind)
            self.values[vid].tensor = t
        for i, node in enumerate(g.nodes):
            op = OPS[node.op]
            self.consumer = f"op {node.op!r} (node {i}, {node.out.name})"
            # A value an earlier consumer already made whole is whole here too: a linear op on it then runs
            # replicated instead of carrying partial sums to a second reduce of its (maybe wider) output.
            vids = [self.memo.get((self.of_tensor[t.id], REPLICATED), self.of_tensor[t.id]) for t in node.inputs]
            if op.shard is None:
                if self.world > 1:
                    raise PlanError(
                        f"{self.consumer} has no sharding rule, so the graph cannot be split over {self.world} "
                        "devices; give the op a rule (ops.OpDef.shard) or run on one device"
                    )
                req: list[State] = [REPLICATED] * len(node.inputs)
                out_state: State = REPLICATED
            else:
                ins = [self.values[v].state for v in vids]
                req, out_state = op.shard(ins, [t.shape for t in node.inputs], node.out.shape, node.attrs)
            args = tuple(self.convert(v, s) for v, s in zip(vids, req, strict=True))
            vid = self.value(node.out.name, node.out.shape, node.out.dtype, out_state, "node")
            self.values[vid].tensor = node.out
            self.steps.append(Step(node.op, args, vid, dict(node.attrs)))
            self.of_tensor[node.out.id] = vid
        outputs = {}
        for name, t in g.outputs.items():
            self.consumer = f"output {name!r}"
            outputs[name] = self.convert(self.of_tensor[t.id], REPLICATED)
        plan = Plan(g, self.world, self.ratios, self.values, self.steps, outputs)
        plan.programs = [self.program(r) for r in range(self.world)]
        plan.collectives = [
            Collective(
                s.op,
                self.values[s.out].name,
                self.values[s.out].shape,
                dtypes.name(self.values[s.out].dtype),
                math.prod(self.values[s.out].shape) * self.values[s.out].dtype.itemsize,
            )
            for s in self.steps
            if s.op in COLLECTIVES
        ]
        prog_bytes = [[math.prod(p.shapes[v.id]) * v.dtype.itemsize for v in self.values] for p in plan.programs]
        weights = [v for v in self.values if v.kind == "weight"]
        for v in weights:
            fmt = self.formats.get(v.name) or dtypes.weight_format(v.dtype)
            for b, p in zip(prog_bytes, plan.programs, strict=True):
                b[v.id] = fmt.nbytes(p.shapes[v.id])
                plan.weight_formats[fmt.name] = plan.weight_formats.get(fmt.name, 0) + b[v.id]
        plan.weight_bytes = [sum(b[v.id] for v in weights) for b in prog_bytes]
        caches = [v for v in self.values if v.kind == "cache"]
        plan.cache_bytes = [sum(b[v.id] for v in caches) for b in prog_bytes]
        states = [
            v for v in caches if v.tensor is not None and v.tensor.cache is not None and v.tensor.cache.kind == "state"
        ]
        plan.state_bytes = [sum(b[v.id] for v in states) for b in prog_bytes]
        return plan

    def program(self, rank: int) -> Program:
        shapes = {v.id: local_shape(v.shape, v.state, rank) for v in self.values}
        instrs = []
        for s in self.steps:
            attrs = dict(s.attrs)
            shape = shapes[s.out]
            localize = OPS[s.op].localize
            if localize is not None and self.world > 1:
                ins = [self.values[i].state for i in s.inputs]
                attrs = localize(
                    attrs, ins, [self.values[i].shape for i in s.inputs], self.values[s.out].state, shape, rank
                )
            if s.op not in COLLECTIVES:  # self-check: the rule's output state must match the op's shape rule
                got = infer(s.op, [(shapes[i], self.values[i].dtype) for i in s.inputs], attrs)[0]
                if got != shape:
                    raise PlanError(
                        f"op {s.op!r} ({self.values[s.out].name}) on rank {rank}: its sharding rule promises shape "
                        f"{shape} but its inputs give {got}; the op's sharding rule is inconsistent"
                    )
            instrs.append(Instr(s.op, s.inputs, s.out, attrs, shape))
        return Program(rank, instrs, shapes)


def plan(
    graph: Graph,
    world_size: int,
    tensor_split: Any = None,
    formats: Mapping[str, dtypes.WeightFormat] | None = None,
) -> Plan:
    """Split ``graph`` over ``world_size`` devices with ``tensor_split`` ratios (None or all zeros: even); weight
    bytes count each weight in its held format (``formats``, default its graph dtype)."""
    return _Planner(graph, normalize_split(tensor_split, world_size), formats).run()


__all__ = ["PARTIAL", "Collective", "Instr", "Plan", "PlanError", "Program", "Step", "Value", "plan"]

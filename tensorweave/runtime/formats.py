"""Which format each weight is held in on the devices, and the split granularity that quantization blocks impose.

A weight stays as stored (float16, bfloat16, GGUF quantization blocks) when every op that reads it takes it that way
(``OpDef.held``: matmul, embedding, moe_ffn) and every device's backend lists the format in
``Capabilities.weight_formats``; otherwise it is converted to the compute dtype once, at load, and the plan says so.
``dtype=`` converts every such weight to that float type instead. Activations, accumulation and caches use the
compute dtype: float32 (float64 when asked for, or when the checkpoint is float64).

A quantized weight split along its last (input) axis must be cut on block boundaries. As llama.cpp does, the split
unit of every tensor that shares boundaries with it (q/k/v/o and the KV cache of a layer: same KV-head groups;
gate/up/down: same FFN rows) grows to the least common multiple of its own unit and the block; a split that cannot
be honoured (a layer too small for one block per unit) is a ``SplitError`` naming the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.device import Device
from ..core.dtypes import FORMATS, WeightFormat
from ..core.graph import Graph, Tensor
from ..core.model import Checkpoint
from ..core.ops import OPS
from ..errors import SplitError, UnsupportedError

KEEP = frozenset(FORMATS) - {"f64"}  # formats a weight may stay in (float64 weights follow the compute dtype)


def compute_dtype(checkpoint: Checkpoint, dtype: Any) -> np.dtype[Any]:
    """The dtype activations, accumulations and caches use: float32, or float64 for float64 weights."""
    want = checkpoint.dtype if dtype is None else dtypes.to_dtype(dtype)
    return dtypes.float64 if want == dtypes.float64 else dtypes.float32


def requested_format(dtype: Any) -> WeightFormat | None:
    """The float format ``dtype=`` converts weights to (None: keep them as stored); anything else is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and FORMATS.get(dtype.lower(), FORMATS["f32"]).quantized:
        raise UnsupportedError(
            f"dtype={dtype!r}: weights convert to float32, float16, bfloat16 or float64; quantized files load as "
            "stored (quantize with llama.cpp's tools)"
        )
    dt = dtypes.to_dtype(dtype)
    if not dtypes.is_float(dt):
        floats = ", ".join(n for n in dtypes.DTYPES if dtypes.is_float(n))
        raise UnsupportedError(
            f"dtype {dtypes.name(dt)}: a model computes in a float dtype ({floats}); {dtypes.name(dt)} cannot hold "
            "weights"
        )
    return dtypes.weight_format(dt)


def held_inputs(graph: Graph) -> set[str]:
    """Weights that only ops taking held weights read, at those inputs (see ``OpDef.held``)."""
    ok: dict[str, bool] = {}
    for node in graph.nodes:
        held = OPS[node.op].held
        for i, t in enumerate(node.inputs):
            if t.kind == "weight":
                ok[t.name] = ok.get(t.name, True) and i in held
    return {n for n, good in ok.items() if good}


def choose_formats(
    checkpoint: Checkpoint,
    graph: Graph,
    devices: Sequence[Device],
    compute: np.dtype[Any],
    convert: WeightFormat | None,
) -> tuple[dict[str, WeightFormat], list[str]]:
    """Each weight's held format, and notes on what was converted and why."""
    caps = [d.backend.capabilities.weight_formats for d in devices]
    supported = frozenset.intersection(*caps) if caps else KEEP  # devices unknown (planning for elsewhere): all
    backends = ", ".join(sorted({d.backend.name for d in devices}))
    plain = dtypes.weight_format(compute)
    held = held_inputs(graph)
    formats: dict[str, WeightFormat] = {}
    converted: dict[tuple[str, str], int] = {}
    for name in graph.weights:
        stored = checkpoint.format(name)
        if name not in held:
            formats[name] = plain
        elif convert is not None:
            formats[name] = convert
        elif stored in KEEP and stored in supported:
            formats[name] = FORMATS[stored]
        else:
            formats[name] = plain
            if stored is not None and stored not in ("f32", "f64"):
                why = f"{backends} holds no {stored}" if stored in KEEP else f"no kernels for {stored}"
                converted[(stored, why)] = converted.get((stored, why), 0) + 1
    notes = [f"{n} {s} weight(s) converted to {plain.name} at load ({why})" for (s, why), n in converted.items()]
    return formats, notes


def read_as(checkpoint: Checkpoint, formats: dict[str, WeightFormat]) -> Callable[[str, tuple[slice, ...]], Any]:
    """The weight source for ``Executor.load_weights``: stored bytes for a quantized weight kept as stored, the
    stored floats where the file holds floats (the executor converts them), dequantized floats otherwise."""

    def source(name: str, index: tuple[slice, ...]) -> Any:
        stored = FORMATS.get(checkpoint.format(name) or "")
        if formats[name].quantized or (stored is not None and not stored.quantized):
            return checkpoint.read_held(name, index)
        return checkpoint.read(name, index)

    return source


def _linked(t: Tensor) -> tuple[Any, ...]:
    """Tensors that must share split boundaries: a layer's tensors in the same KV-head groups, or (without groups)
    of the same length along the split axis (gate/up/down of one FFN)."""
    axis = t.split_axis
    assert axis is not None
    return (t.layer, "groups", t.groups) if t.groups is not None else (t.layer, "length", t.shape[axis])


def block_groups(graph: Graph, formats: dict[str, WeightFormat], world: int) -> tuple[dict[str, int], list[str]]:
    """New ``groups`` for the tensors whose split unit grows to whole quantization blocks, and notes saying so."""
    if world == 1:
        return {}, []
    sets: dict[tuple[Any, ...], list[Tensor]] = {}
    for t in [*graph.weights.values(), *graph.caches.values()]:
        if t.split_axis is not None:
            sets.setdefault(_linked(t), []).append(t)
    out: dict[str, int] = {}
    notes: set[str] = set()
    for members in sets.values():
        factor, why = 1, ""
        for t in members:
            fmt = formats.get(t.name)
            if t.kind != "weight" or fmt is None or not fmt.quantized or t.split_axis != t.ndim - 1:
                continue
            width = t.shape[-1] // (t.groups or t.shape[-1])  # values per unit along the quantized axis
            need = fmt.block // math.gcd(width, fmt.block)
            if need > 1:
                factor = math.lcm(factor, need)
                why = f"{fmt.name} blocks of {fmt.block} values in {_pattern(t.name)}"
        if factor == 1:
            continue
        for t in members:
            axis = t.split_axis
            assert axis is not None
            units = t.groups or t.shape[axis]
            if units % factor:
                raise SplitError(
                    f"tensor {t.name!r} {t.shape}: a split must keep whole quantization blocks ({why}), which needs "
                    f"units of {factor} of its {units}; load with dtype='float16' or on one device"
                )
            out[t.name] = units // factor
        names = ", ".join(sorted({_pattern(t.name) for t in members}))
        notes.add(f"{names}: split in units of {factor} {'KV-head groups' if members[0].groups else 'rows'} ({why})")
    return out, sorted(notes)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def apply_groups(graph: Graph, groups: dict[str, int]) -> Graph:
    for table in (graph.weights, graph.caches):
        for name, t in table.items():
            if name in groups:
                t.groups = groups[name]
    return graph


def prepare(
    checkpoint: Checkpoint, graph: Graph, devices: Sequence[Device], world: int, dtype: Any
) -> tuple[dict[str, WeightFormat], dict[str, int], list[str]]:
    """For loading or planning ``graph`` over ``devices`` (``world`` ranks): each weight's held format, the split
    groups widened to whole blocks (already applied to ``graph``), and the notes on both."""
    compute = dtypes.to_dtype(graph.dtype)
    formats, notes = choose_formats(checkpoint, graph, devices, compute, requested_format(dtype))
    units, grain = block_groups(graph, formats, world)
    apply_groups(graph, units)
    return formats, units, notes + grain


def mix(formats: dict[str, WeightFormat], graph: Graph) -> dict[str, int]:
    """Bytes per held format over the whole model (each weight once)."""
    out: dict[str, int] = {}
    for name, t in graph.weights.items():
        out[formats[name].name] = out.get(formats[name].name, 0) + formats[name].nbytes(t.shape)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

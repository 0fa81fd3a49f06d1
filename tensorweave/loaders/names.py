"""Stored tensor names -> graph weights, driven by the family's ``Naming`` (core/model.py): the part of loading that
every format shares. A loader hands over its stored names, shapes and a reader of ``tensor[index]``; it gets back,
per graph weight, its shape and a ``Source`` that reads only the asked slice (of a part of a fused tensor, of a
stack of per-expert tensors, transformed or not), so no whole tensor is ever built.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.model import Checkpoint, Derived, Naming
from ..errors import ModelFormatError

Source = Callable[[tuple[slice, ...]], np.ndarray]
Reader = Callable[[str, tuple[slice, ...]], np.ndarray]  # (stored name, index) -> stored_tensor[index]


@dataclass
class Mapped:
    """Graph weights found in a checkpoint: how to read each, its shape, and where it comes from (for messages);
    ``held``: for weights that can stay as stored, their stored format and a reader of that form (see
    ``Checkpoint.read_held``)."""

    sources: dict[str, Source] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    held: dict[str, tuple[str, Source]] = field(default_factory=dict)

    def add(self, name: str, shape: tuple[int, ...], source: Source, origin: str) -> None:
        if name in self.origin:
            raise ModelFormatError(f"{origin} and {self.origin[name]} both hold graph weight {name!r}")
        self.sources[name], self.shapes[name], self.origin[name] = source, shape, origin


class MappedCheckpoint(Checkpoint):
    """A checkpoint whose graph weights ``map_names`` found: ``mapped`` answers shape, names, read and describe."""

    mapped: Mapped

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.mapped.shapes.get(name)

    def names(self) -> list[str]:
        return list(self.mapped.shapes)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.mapped.sources[name](index)

    def format(self, name: str) -> str | None:
        held = self.mapped.held.get(name)
        return held[0] if held else None

    def read_held(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        held = self.mapped.held.get(name)
        return held[1](index) if held else self.read(name, index)

    def describe(self, name: str) -> str:
        """Where graph weight ``name`` comes from: the file and the tensor's own name in it."""
        origin = self.mapped.origin.get(name)
        return f"{origin} (as {name!r})" if origin else super().describe(name)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)"))


def map_names(
    naming: Naming,
    stored: Mapping[str, tuple[int, ...]],
    read: Reader,
    describe: Callable[[str], str],
    family: str,
    where: str,
    unused: Collection[str] = (),
    check: Callable[[str], None] = lambda name: None,
    meta: Mapping[str, Any] | None = None,
    held: Reader | None = None,
    formats: Mapping[str, str] = {},
) -> Mapped:
    """Map every stored tensor through ``naming``. ``describe(stored name)`` names a tensor in errors and ``where``
    the checkpoint; graph weights in ``unused`` (a tied model's redundant head) are dropped; ``check`` is called
    with every stored name that is used; ``meta`` (GGUF metadata) goes to ``Naming.shaped``. A stored name that
    is neither matched nor ignored is a ``ModelFormatError``, unless the naming passes unmatched names through.
    ``held`` reads a stored tensor as it is stored (quantization blocks as bytes) and ``formats`` gives each stored
    name's format: a graph weight that is a plain stored tensor, a cut of one, or a stack of same-format experts
    keeps that form (``Mapped.held``); one that is transformed, squeezed or shifted is read as floats only."""

    def keyed(name: str) -> str:
        return next((new + name[len(old) :] for old, new in naming.prefixes.items() if name.startswith(old)), name)

    exact = {p: t for p, t in naming.names.items() if "{" not in p}
    if naming.shaped is not None:
        try:
            exact.update(naming.shaped({keyed(n): tuple(s) for n, s in stored.items()}, meta or {}))
        except ModelFormatError as e:  # the family's words, with the checkpoint
            raise ModelFormatError(f"{where}: {e}") from None
    patterns = [(_compile(p), p, t) for p, t in naming.names.items() if "{" in p]
    ignore = [re.compile(r) for r in naming.ignore]
    out = Mapped()
    experts: dict[str, tuple[str, dict[str, str], dict[int, str]]] = {}  # graph name -> (pattern, groups, by expert)
    for name, shape in stored.items():
        key = keyed(name)
        if any(r.fullmatch(key) for r in ignore):
            continue
        target, pattern, groups = exact.get(key), key, {}
        if target is None:
            found = next(((m, p, t) for r, p, t in patterns if (m := r.fullmatch(key))), None)
            if found is not None:
                target, pattern, groups = found[2], found[1], found[0].groupdict()
            elif naming.passthrough:
                target = key
            else:
                raise ModelFormatError(f"{describe(name)} has no place in a {family} model")
        check(name)
        if "E" in groups:  # one tensor per expert: stacked below
            if not isinstance(target, str):
                raise TypeError(f"{family}: per-expert pattern {pattern!r} must map to one graph name")
            experts.setdefault(target.format(**groups), (pattern, groups, {}))[2][int(groups["E"])] = name
            continue
        for d in target if isinstance(target, tuple) else (target,):
            d = Derived(d) if isinstance(d, str) else d
            graph = d.name.format(**groups)
            if graph not in unused:
                derived_shape, source = _derive(d, tuple(shape), _reading(read, name))
                out.add(graph, derived_shape, _shifted(source, naming.norm_shift, graph), describe(name))
                plain = d.transform is None and d.squeeze is None and not (naming.norm_shift and graph.endswith("norm"))
                if held is not None and name in formats and plain:
                    out.held[graph] = (formats[name], _derive(d, tuple(shape), _reading(held, name))[1])
    for graph, (pattern, groups, by_expert) in experts.items():
        names = [by_expert.get(e, "") for e in range(max(by_expert) + 1)]
        if "" in names:
            missing = pattern.format(**{**groups, "E": names.index("")})
            raise ModelFormatError(f"{where}: expert tensor {missing!r} is missing")
        first = stored[names[0]]
        for n in names:
            if stored[n] != first:
                raise ModelFormatError(f"{describe(n)} has shape {stored[n]}, expert 0 {first}")
        parts = [_reading(read, n) for n in names]
        origin = f"{where}: tensors {pattern.format(**{**groups, 'E': '*'})!r}"
        out.add(graph, (len(names), *first), _shifted(_stacked(parts), naming.norm_shift, graph), origin)
        kinds = {formats.get(n) for n in names}
        if held is not None and len(kinds) == 1 and None not in kinds and not graph.endswith("norm"):
            out.held[graph] = (formats[names[0]], _stacked([_reading(held, n) for n in names]))
    return out


def _reading(read: Reader, name: str) -> Source:
    return lambda index: read(name, index)


def _derive(d: Derived, shape: tuple[int, ...], read: Source) -> tuple[tuple[int, ...], Source]:
    """The shape and source of a derived weight: a [lo, hi) cut of one axis, a squeezed axis, a transform."""
    lo, hi = d.rows(shape[d.axis]) if d.rows is not None else (0, shape[d.axis] if shape else 0)
    out = list(shape)
    if d.rows is not None:
        out[d.axis] = hi - lo
    if d.squeeze is not None:
        if shape[d.squeeze] != 1:
            raise ModelFormatError(f"{d.name}: stored shape {shape} has no size-1 axis {d.squeeze} to squeeze")
        del out[d.squeeze]

    def source(index: tuple[slice, ...]) -> np.ndarray:
        idx = list(index)
        if d.squeeze is not None:
            idx.insert(d.squeeze, slice(0, 1))
        if d.order is not None:  # the stored positions, read in runs of consecutive ones
            want = lo + d.order(hi - lo)[idx[d.axis]]
            runs = np.split(want, np.flatnonzero(np.diff(want) != 1) + 1) if want.size else []
            parts = [read((*idx[: d.axis], slice(int(r[0]), int(r[-1]) + 1), *idx[d.axis + 1 :])) for r in runs]
            idx[d.axis] = slice(lo, lo)
            a = np.concatenate(parts, axis=d.axis) if parts else read(tuple(idx))
        else:
            if d.rows is not None:
                start, stop, step = idx[d.axis].indices(hi - lo)
                idx[d.axis] = slice(lo + start, lo + stop, step)
            a = read(tuple(idx))
        if d.squeeze is not None:
            a = a.reshape([n for i, n in enumerate(a.shape) if i != d.squeeze])
        return d.transform(np.asarray(a)) if d.transform is not None else a

    if d.rows is None and d.squeeze is None and d.transform is None and d.order is None:
        return shape, read
    return tuple(out), source


def _shifted(source: Source, shift: float, graph: str) -> Source:
    """Norm weights stored as ``w`` for a ``(1 + w)`` norm come out as ``w + shift`` (see ``Naming.norm_shift``)."""
    if not shift or not graph.endswith("norm"):
        return source
    return lambda index: (lambda a: a + np.asarray(shift, a.dtype))(np.asarray(source(index)))


def _stacked(parts: list[Source]) -> Source:
    """One [E, ...] weight from per-expert tensors: only the asked experts and slices are read and stacked."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        chosen = parts[index[0]]
        if not chosen:  # np.stack of nothing has no shape: an empty stack of expert 0's slice
            return parts[0](index[1:])[None][:0]
        return np.stack([p(index[1:]) for p in chosen])

    return read

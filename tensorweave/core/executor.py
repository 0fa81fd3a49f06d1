"""The executor: runs a Plan's per-device programs on any backend's devices.

Weights and KV caches live on the devices (``load_weights`` gives each device only its slice). For every graph it
runs, the executor lowers each device's program once into a static buffer plan: one arena per device and dtype,
each op output at a fixed offset, buffers reused as soon as their last reader ran, views (reshape, transpose, slice)
taken once. Steady-state steps therefore allocate no device memory: they copy the feeds in, run, and read results
out. Arenas are typed (one per dtype, not one of raw bytes) because the array API standard cannot reinterpret
bytes as another dtype, and backends built on it (see examples/tensorweave-array-api-strict) must run these plans
too; view ops go through the backend's kernels for the same reason.

A program runs segment by segment: inside a segment every device works concurrently through ``Device.submit``;
between segments sits one collective, which goes to the ``Communicator`` (the only place devices exchange data).
The same code serves one process driving all devices and one process per rank: a process runs the programs of its
communicator's ``local_ranks``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PlanError, ShapeError, UnsupportedError
from . import dtypes
from .communicator import Communicator
from .device import Device, DeviceArray
from .graph import Graph, Tensor
from .ops import OPS, Shape
from .ops.weights import Packed
from .planner import Plan, plan
from .plugins import open_communicator, open_devices
from .sharding import Split, State, local_shape, local_slice, normalize_split

ALIGN = 256  # bytes; every buffer in an arena starts on this boundary
WeightSource = Mapping[str, Any] | Callable[[str, tuple[slice, ...]], Any]


def _c_strides(shape: Shape) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _contiguous(shape: Shape, strides: tuple[int, ...]) -> bool:
    """numpy's C-contiguity (dims of size 1 ignored; empty arrays are contiguous)."""
    if 0 in shape:
        return True
    expect = 1
    for d, s in zip(reversed(shape), reversed(strides), strict=True):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


@dataclass
class _Ins:
    kind: str  # "op" | "view" | "allreduce" | "allgather"
    op: str
    out: int
    inputs: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Lowered:
    """One device's program in executable form: instructions, and where every value lives."""

    instrs: list[_Ins]
    shapes: dict[int, Shape]
    dtypes: dict[int, np.dtype[Any]]
    slots: dict[int, int]  # buffer value -> byte offset in the arena of its dtype
    arenas: dict[np.dtype[Any], int]  # dtype -> bytes of that dtype's arena
    exports: list[int]  # values the host touches: feeds, collective buffers, outputs


def _view_copy(view: Callable[..., Any]) -> Callable[..., None]:
    """A view op lowered into a buffer (``op`` instruction): copies the view into ``out``. The executor does this
    for a reshape of a value too strided to reshape in place."""

    def kernel(xp: Any, out: Any, x: Any, **attrs: Any) -> None:
        out[...] = view(xp, x, **attrs)

    return kernel


def lower(p: Plan, rank: int) -> _Lowered:
    """Turn rank ``rank``'s program into instructions over a static buffer plan."""
    prog = p.programs[rank]
    shapes = dict(prog.shapes)
    dts = {v.id: v.dtype for v in p.values}
    root: dict[int, int] = {}  # value -> the value owning its storage (itself for buffers and externals)
    strides: dict[int, tuple[int, ...]] = {}
    buffers: list[int] = []  # values with storage of their own in the arena, in definition order
    pinned: set[int] = set()
    instrs: list[_Ins] = []
    next_id = len(p.values)

    def new(shape: Shape, dtype: np.dtype[Any]) -> int:
        nonlocal next_id
        next_id += 1
        shapes[next_id - 1], dts[next_id - 1] = shape, dtype
        return next_id - 1

    def buffer(v: int) -> int:
        root[v], strides[v] = v, _c_strides(shapes[v])
        buffers.append(v)
        return v

    def view(out: int, op: str, src: int, **attrs: Any) -> None:
        root[out] = root[src]
        s = strides[src]
        strides[out] = tuple(s[a] for a in attrs["perm"]) if op == "transpose" else s
        if op == "reshape":
            strides[out] = _c_strides(shapes[out])
        instrs.append(_Ins("view", op, out, (src,), attrs))

    for v in p.values:
        if v.kind == "input":
            pinned.add(buffer(v.id))
        elif v.kind in ("weight", "cache"):
            root[v.id], strides[v.id] = v.id, _c_strides(shapes[v.id])
    readers: dict[int, int] = {}
    for ins in prog.instrs:
        for i in ins.inputs:
            readers[i] = readers.get(i, 0) + 1
    sends: list[int] = []
    for ins in prog.instrs:
        src = ins.inputs[0]
        if ins.op == "allreduce":
            if root.get(src) == src and src in buffers and readers[src] == 1:
                root[ins.out], strides[ins.out] = src, strides[src]  # in place: nothing else reads the partials
                instrs.append(_Ins("allreduce", "allreduce", ins.out, (src,)))
                sends.append(src)
            else:
                instrs.append(_Ins("op", "copy", buffer(ins.out), (src,)))
                instrs.append(_Ins("allreduce", "allreduce", ins.out, (ins.out,)))
                sends.append(ins.out)
        elif ins.op == "allgather":
            axis = ins.attrs["axis"]
            perm = (axis, *[a for a in range(len(shapes[src])) if a != axis])
            send = src
            if axis != 0 or not _contiguous(shapes[src], strides[src]) or root[src] != src:
                moved = new(tuple(shapes[src][a] for a in perm), dts[src])
                view(moved, "transpose", src, perm=perm)
                send = buffer(new(shapes[moved], dts[src]))
                instrs.append(_Ins("op", "copy", send, (moved,)))
            whole = shapes[ins.out]
            gathered = buffer(new(tuple(whole[a] for a in perm), dts[src]))
            instrs.append(_Ins("allgather", "allgather", gathered, (send,)))
            sends += [send, gathered]
            if axis == 0:
                root[ins.out], strides[ins.out] = gathered, strides[gathered]
                instrs.append(_Ins("view", "reshape", ins.out, (gathered,), {"shape": whole}))
            else:
                view(ins.out, "transpose", gathered, perm=tuple(int(i) for i in np.argsort(perm)))
        elif OPS[ins.op].view and not (ins.op == "reshape" and not _contiguous(shapes[src], strides[src])):
            view(ins.out, ins.op, src, **ins.attrs)
        elif ins.op == "reshape":  # a non-contiguous value cannot be reshaped in place: copy it into a buffer
            instrs.append(_Ins("op", "reshape", buffer(ins.out), ins.inputs, ins.attrs))
        else:
            instrs.append(_Ins("op", ins.op, buffer(ins.out), ins.inputs, ins.attrs))
    exports = [v.id for v in p.values if v.kind == "input"] + sends + list(p.outputs.values())
    pinned |= {root[v] for v in p.outputs.values() if root[v] in buffers}
    slots, arenas = _assign_offsets(instrs, root, buffers, pinned, shapes, dts)
    return _Lowered(instrs, shapes, dts, slots, arenas, exports)


def _assign_offsets(
    instrs: list[_Ins],
    root: dict[int, int],
    buffers: list[int],
    pinned: set[int],
    shapes: dict[int, Shape],
    dts: dict[int, np.dtype[Any]],
) -> tuple[dict[int, int], dict[np.dtype[Any], int]]:
    """Byte offsets for every buffer in its dtype's arena, and each arena's size: a buffer's place is reused (same
    dtype and size) once its last reader has run."""
    last: dict[int, int] = {b: -1 for b in buffers}
    defined: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        for v in (*ins.inputs, ins.out):
            r = root.get(v)
            if r in last:
                last[r] = i
        if ins.out in last and ins.out not in defined:
            defined[ins.out] = i
    free: dict[tuple[np.dtype[Any], int], list[int]] = {}
    slots: dict[int, int] = {}
    ends: dict[np.dtype[Any], int] = {}

    def size(b: int) -> tuple[np.dtype[Any], int]:
        n = math.prod(shapes[b]) * dts[b].itemsize
        return dts[b], -(-n // ALIGN) * ALIGN

    def take(b: int) -> None:
        pool = free.get(size(b))
        if pool:
            slots[b] = pool.pop()
        else:
            dt, n = size(b)
            slots[b] = ends.get(dt, 0)
            ends[dt] = slots[b] + n

    for b in buffers:
        if b not in defined:  # inputs: live for the whole run
            take(b)
    releases: dict[int, list[int]] = {}
    for b, i in last.items():
        if b not in pinned:
            releases.setdefault(i, []).append(b)
    for i, ins in enumerate(instrs):
        if ins.out in defined and defined[ins.out] == i and ins.out not in slots:
            take(ins.out)
        for b in releases.get(i, []):
            if b in slots:
                free.setdefault(size(b), []).append(slots[b])
    return slots, ends


class _Context:
    """Device-side state of one lowered program: native arrays bound to kernels, built once on the device."""

    def __init__(self, xp: Any, segments: list[list[tuple[Any, ...]]]) -> None:
        self.xp, self.segments = xp, segments


def _build_context(
    xp: Any,
    kernels: Mapping[str, Callable[..., Any]],
    low: _Lowered,
    arenas: list[Any],
    ext_ids: list[int],
    ext: list[Any],
    packed: Mapping[int, dtypes.WeightFormat] | None = None,
) -> tuple[_Context, list[Any]]:
    env: dict[int, Any] = dict(zip(ext_ids, ext, strict=True))
    for v, fmt in (packed or {}).items():  # quantized weights reach kernels with their format and logical shape
        env[v] = Packed(env[v], fmt, low.shapes[v])
    by_dtype = dict(zip(low.arenas, arenas, strict=True))

    def kernel(op: str) -> Callable[..., Any]:
        return kernels.get(op, OPS[op].kernel)

    reshape = kernel("reshape")
    for v, off in low.slots.items():
        dt, shape = low.dtypes[v], low.shapes[v]
        start = off // dt.itemsize  # ALIGN is a multiple of every itemsize
        env[v] = reshape(xp, by_dtype[dt][start : start + math.prod(shape)], shape=shape)
    segments: list[list[tuple[Any, ...]]] = [[]]
    for ins in low.instrs:
        if ins.kind == "view":
            env[ins.out] = kernel(ins.op)(xp, env[ins.inputs[0]], **ins.attrs)
        elif ins.kind == "op":
            fn = _view_copy(kernel(ins.op)) if OPS[ins.op].view else kernel(ins.op)
            segments[-1].append((ins.op, fn, env[ins.out], [env[i] for i in ins.inputs], ins.attrs))
        else:  # a collective: the segment ends; an in-place allreduce's result is its input's storage
            env.setdefault(ins.out, env[ins.inputs[0]])
            segments.append([])
    return _Context(xp, segments), [env[v] for v in low.exports]


def _run_segment(ctx: _Context, k: int, device: str) -> None:
    for name, fn, out, args, attrs in ctx.segments[k]:
        try:
            fn(ctx.xp, out, *args, **attrs)
        except Exception as e:
            e.add_note(f"while running op {name!r} on {device}")
            raise


@dataclass
class _Compiled:
    graph: Graph  # held so the id() key stays unique
    plan: Plan
    lowered: list[_Lowered]
    contexts: list[_Context]
    arenas: list[list[DeviceArray]]  # per local device: one arena per dtype, in the order of _Lowered.arenas
    exported: list[dict[int, DeviceArray]]  # per local device: value id -> device array (a view of the arena)
    collectives: list[list[_Ins]]  # per local device, in program order
    inputs: dict[str, int]  # input name -> value id


@dataclass
class Timings:
    """Wall time an executor spent in ``run`` and, within it, waiting on the communicator (always on: two
    ``perf_counter`` calls per run and per collective). ``tensorweave bench`` reads it for the share of time in
    collectives; on one device per process it covers this process's ranks only."""

    runs: int = 0
    run_seconds: float = 0.0
    collectives: int = 0
    collective_seconds: float = 0.0

    def reset(self) -> None:
        self.runs, self.run_seconds, self.collectives, self.collective_seconds = 0, 0.0, 0, 0.0


class Executor:
    """Runs graphs split over devices: ``Executor("cpu-sim:4", tensor_split=[3, 1, 1, 1])``.

    ``devices``: a device spec or the devices; ``communicator``: an instance, a name, or None for the backend's
    default. With a multi-process communicator, this process runs its ``local_ranks`` only.
    """

    def __init__(
        self,
        devices: str | Sequence[Device],
        communicator: Communicator | str | None = None,
        tensor_split: Sequence[float] | None = None,
        max_graphs: int = 8,
    ) -> None:
        if isinstance(communicator, Communicator):
            self.comm = communicator
        else:
            devs = open_devices(devices) if isinstance(devices, str) else list(devices)
            self.comm = open_communicator(devs, communicator)
        self.devices: list[Device] = list(self.comm.devices)
        self.ranks: list[int] = list(self.comm.local_ranks)
        self.world_size: int = self.comm.world_size
        self.ratios = normalize_split(tensor_split, self.world_size)
        self.weights: dict[str, list[DeviceArray]] = {}
        self.formats: dict[str, dtypes.WeightFormat] = {}  # how each weight is held (see load_weights)
        self.caches: dict[str, list[DeviceArray]] = {}
        self._specs: dict[str, Tensor] = {}
        self._compiled: OrderedDict[int, _Compiled] = OrderedDict()
        self.max_graphs = max_graphs
        self._lock = threading.Lock()
        self.timings = Timings()

    # --- weights and caches ---------------------------------------------------------------------------------

    def replica(self) -> Executor:
        """Another executor over the same devices, communicator and weights (not copied) with caches of its own:
        one per sequence a server runs at once. The replicas share one lock, so their steps never overlap on the
        devices or interleave their collectives."""
        twin = Executor(self.devices, self.comm, self.ratios, self.max_graphs)
        twin.weights = self.weights
        twin._specs = {n: t for n, t in self._specs.items() if n in self.weights}
        twin._lock = self._lock
        return twin

    def load_weights(
        self,
        graph: Graph,
        source: WeightSource,
        progress: Callable[[str, int], None] | None = None,
        formats: Mapping[str, dtypes.WeightFormat] | None = None,
    ) -> None:
        """Place every weight ``graph`` declares: each device gets only its slice.

        ``source``: name -> array (anything numpy can index, e.g. a memmap), or a callable ``(name, index) ->
        array`` returning just ``array[index]``, so loaders never build a whole tensor they do not need.
        ``progress(name, nbytes)`` is called after each weight with its whole size (for a progress bar).
        ``formats``: how a weight is held on the devices (default: its graph dtype). A float format converts what
        the source gives; a quantized one takes the source's bytes [..., blocks * block_bytes] as they are (only
        ops that declare ``OpDef.held`` for that input may read such a weight).
        """
        for name, t in graph.weights.items():
            state = t.placement(self.ratios)
            fmt = (formats or {}).get(name) or dtypes.weight_format(t.dtype)
            parts = []
            for dev, rank in zip(self.devices, self.ranks, strict=True):
                index = local_slice(t.shape, state, rank)
                if callable(source):
                    host = np.asarray(source(name, index))
                else:
                    if name not in source:
                        raise ShapeError(f"no weight {name!r} ({t.shape} {t.dtype.name}) in the weights given")
                    whole = source[name]
                    if tuple(whole.shape) != fmt.held_shape(t.shape):
                        raise ShapeError(
                            f"weight {name!r} has shape {tuple(whole.shape)}, the model expects {t.shape} "
                            f"held as {fmt.name} {fmt.held_shape(t.shape)}"
                        )
                    host = np.asarray(whole[fmt.held_index(index)])
                want = fmt.held_shape(local_shape(t.shape, state, rank))
                if host.shape != want or (fmt.quantized and host.dtype != fmt.dtype):
                    raise ShapeError(
                        f"weight {name!r}: the slice for rank {rank} is {host.shape} {host.dtype.name}, not {want} "
                        f"as {fmt.name}"
                    )
                parts.append(dev.from_host(np.ascontiguousarray(host, dtype=fmt.dtype)))
            self.weights[name] = parts
            self.formats[name] = fmt
            self._specs[name] = t
            if progress is not None:
                progress(name, fmt.nbytes(t.shape))
        self._compiled.clear()  # compiled programs hold the previous weight arrays

    def reset_caches(self) -> None:
        """Zero every cache (a fresh context)."""
        for parts in self.caches.values():
            for dev, a in zip(self.devices, parts, strict=True):
                dev.submit(_zero, a)
        for dev in self.devices:
            dev.synchronize()

    def ensure_caches(self, graph: Graph) -> None:
        """Allocate (zeroed) every cache ``graph`` declares that is not on the devices yet."""
        for name, t in graph.caches.items():
            if name in self.caches:
                continue
            state = t.placement(self.ratios)
            self.caches[name] = [dev.empty(local_shape(t.shape, state, r), t.dtype) for dev, r in self._local()]
            self._specs[name] = t
            for dev, a in zip(self.devices, self.caches[name], strict=True):
                dev.submit(_zero, a)

    def _cache_index(self, name: str, rows: np.ndarray | None) -> tuple[Tensor, State, Any]:
        t = self._specs[name]
        state = t.placement(self.ratios)
        if rows is not None and isinstance(state, Split) and state.axis == 0:
            raise ShapeError(f"cache {name!r} is split along axis 0: it has no rows to pick, only the whole value")
        return t, state, (slice(None) if rows is None else np.asarray(rows))

    def read_cache(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Cache ``name`` on the host, whole along its split axis: rows ``rows`` of axis 0 (a kv or ring cache's
        slots) or, with None, all of it (a recurrent state). Under one process per rank the other ranks' parts
        come through the communicator (every rank must call this)."""
        _, state, index = self._cache_index(name, rows)
        parts = [np.asarray(dev.to_host(a)[index]) for dev, a in zip(self.devices, self.caches[name], strict=True)]
        if not isinstance(state, Split):
            return parts[0]
        if len(self.devices) == self.world_size:
            return np.concatenate(parts, axis=state.axis)
        # allgather concatenates along axis 0: bring the split axis to the front and back again
        moved = [
            dev.from_host(np.ascontiguousarray(np.moveaxis(p, state.axis, 0)))
            for dev, p in zip(self.devices, parts, strict=True)
        ]
        whole = self.comm.allgather(moved)
        return np.moveaxis(self.devices[0].to_host(whole[0]), 0, state.axis)

    def write_cache(self, name: str, values: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Write ``values``, whole along the split axis, into rows ``rows`` of cache ``name`` (None: the whole
        cache); each device takes its own part along the split axis."""
        t, state, index = self._cache_index(name, rows)
        want = t.shape if rows is None else (len(index), *t.shape[1:])
        if tuple(values.shape) != want:
            raise ShapeError(f"cache {name!r}: values of shape {tuple(values.shape)} for {want}")
        for dev, rank, a in zip(self.devices, self.ranks, self.caches[name], strict=True):
            part = list(local_slice(t.shape, state, rank))
            if rows is not None:
                part[0] = slice(None)
            host = np.ascontiguousarray(values[tuple(part)], dtype=t.dtype)
            if rows is not None:
                whole, host = host, np.array(dev.to_host(a))
                host[index] = whole
            dev.from_host(host, out=a)

    def cache_parts(self, names: Iterable[str]) -> dict[str, list[np.ndarray]]:
        """Host copies of this process's device parts of caches ``names``, without communication: a snapshot that
        ``load_cache_parts`` puts back (on the same devices and split)."""
        return {
            n: [np.array(dev.to_host(a)) for dev, a in zip(self.devices, self.caches[n], strict=True)] for n in names
        }

    def load_cache_parts(self, parts: Mapping[str, Sequence[np.ndarray]]) -> None:
        """Put back what ``cache_parts`` copied."""
        for name, hosts in parts.items():
            for dev, a, host in zip(self.devices, self.caches[name], hosts, strict=True):
                dev.from_host(host, out=a)

    def _local(self) -> list[tuple[Device, int]]:
        return list(zip(self.devices, self.ranks, strict=True))

    # --- planning and running -------------------------------------------------------------------------------

    def plan(self, graph: Graph) -> Plan:
        """The plan ``graph`` runs with here (cached with its buffers)."""
        return self._compile(graph).plan

    def _compile(self, graph: Graph) -> _Compiled:
        key = id(graph)
        comp = self._compiled.pop(key, None)
        if comp is None or comp.graph is not graph:
            comp = self._build(graph)
        self._compiled[key] = comp
        while len(self._compiled) > self.max_graphs:
            self._compiled.popitem(last=False)
        return comp

    def _build(self, graph: Graph) -> _Compiled:
        p = plan(graph, self.world_size, self.ratios, self.formats)
        for name, t in graph.weights.items():
            if name not in self.weights:
                raise PlanError(f"weight {name!r} of graph {graph.name!r} is not loaded; call load_weights first")
            if self._specs[name].spec != t.spec:
                raise PlanError(f"weight {name!r} was loaded with another shape/dtype/role than {graph.name!r} uses")
        self.ensure_caches(graph)
        comp = _Compiled(graph, p, [], [], [], [], [], {v.name: v.id for v in p.values if v.kind == "input"})
        ids = {v.name: v.id for v in p.values if v.kind in ("weight", "cache")}
        for j, (dev, rank) in enumerate(self._local()):
            low = lower(p, rank)
            for ins in low.instrs:
                dt = dtypes.name(low.dtypes[ins.out])
                if ins.kind == "op" and not dev.backend.capabilities.supports(ins.op, dt):
                    raise UnsupportedError(f"{dev.name} ({dev.backend.name}) does not support op {ins.op!r} in {dt}")
            arenas = [dev.empty((n // dt.itemsize,), dt) for dt, n in low.arenas.items()]
            tables = (self.weights, self.caches)
            ext = [(ids[n], parts[j]) for table in tables for n, parts in table.items() if n in ids]
            packed = {ids[n]: f for n, f in self.formats.items() if f.quantized and n in ids}
            ctx, views = dev.submit(
                _build_context,
                dev.xp,
                dev.backend.kernels,
                low,
                arenas,
                [i for i, _ in ext],
                [a for _, a in ext],
                packed,
            ).result()
            comp.lowered.append(low)
            comp.contexts.append(ctx)
            comp.arenas.append(arenas)
            comp.exported.append(dict(zip(low.exports, views, strict=True)))
            comp.collectives.append([ins for ins in low.instrs if ins.kind in ("allreduce", "allgather")])
        return comp

    def run(self, graph: Graph, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run ``graph`` with ``feeds`` (input name -> host array); returns the outputs, whole, on the host."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                return self._run(graph, feeds)
            finally:
                self.timings.runs += 1
                self.timings.run_seconds += time.perf_counter() - t0

    def _run(self, graph: Graph, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        comp = self._compile(graph)
        p = comp.plan
        for name, t in graph.inputs.items():
            if name not in feeds:
                raise ShapeError(f"missing input {name!r} ({t.shape} {t.dtype.name}) for graph {graph.name!r}")
            host = np.asarray(feeds[name])
            if host.shape != t.shape:
                raise ShapeError(f"input {name!r} has shape {host.shape}, graph {graph.name!r} expects {t.shape}")
            host = host.astype(t.dtype, copy=False)
            for dev, exp in zip(self.devices, comp.exported, strict=True):
                dev.from_host(host, out=exp[comp.inputs[name]])
        n_coll = len(comp.collectives[0])
        for k in range(n_coll + 1):
            futures = [
                dev.submit(_run_segment, ctx, k, dev.name) for dev, ctx in zip(self.devices, comp.contexts, strict=True)
            ]
            errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
            if k < n_coll:
                self._collective(comp, k)
        dev0, exp0 = self.devices[0], comp.exported[0]
        return {name: dev0.to_host(exp0[vid]) for name, vid in p.outputs.items()}

    def _collective(self, comp: _Compiled, k: int) -> None:
        per_device = [colls[k] for colls in comp.collectives]
        ins = per_device[0]
        t0 = time.perf_counter()
        if ins.kind == "allreduce":
            self.comm.allreduce([exp[i.inputs[0]] for exp, i in zip(comp.exported, per_device, strict=True)])
        else:
            self.comm.allgather(
                [exp[i.inputs[0]] for exp, i in zip(comp.exported, per_device, strict=True)],
                out=[exp[i.out] for exp, i in zip(comp.exported, per_device, strict=True)],
            )
        self.timings.collectives += 1
        self.timings.collective_seconds += time.perf_counter() - t0


def _zero(a: Any) -> None:
    a[...] = 0

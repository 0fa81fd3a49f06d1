"""The ``array-api-strict`` backend: N devices in this process whose memory is ``array_api_strict`` arrays.

Spec: ``array-api-strict[:COUNT][,mem=SIZE][,peer=all|none]`` (COUNT defaults to 1, mem to host RAM, peer to all:
devices of one group may copy directly; ``none`` stages every copy through host memory).

What a backend has to provide, and how this one does it:
- device arrays: ``StrictArray`` wraps a native ``array_api_strict.Array`` and shows tensorweave ``.shape``,
  ``.dtype`` (a numpy dtype: tensorweave's vocabulary) and ``.nbytes``; host code cannot read it directly;
- kernels: ``Backend.xp`` is the ``array_api_strict`` namespace; tensorweave's reference kernels that use only the
  array API run as they are, the others are replaced through ``Backend.kernels`` (see kernels.py);
- numpy only at the host boundary: ``from_host``/``to_host`` convert, and DLPack (the standard's interchange
  protocol) gives a buffer's address so memory accounting can tell a view from a new allocation. Kernels never see
  numpy;
- dtypes: the array API standard has no 16-bit floats, so ``capabilities`` lists float32, float64 and int32 and
  float16/bfloat16 arrays are refused with UnsupportedError (the conformance kit reports them NOT_SUPPORTED);
- execution: each device runs submitted work in order on a worker thread of its own, so devices of a group run
  concurrently; ``synchronize`` waits for that queue.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import numpy as np

from tensorweave.core import dtypes
from tensorweave.core.device import (
    Backend,
    Capabilities,
    Device,
    DeviceSpec,
    DeviceStats,
    MemoryInfo,
    parse_size,
    total_host_memory,
)
from tensorweave.errors import DeviceSpecError, OutOfMemoryError, PlacementError, ShapeError, UnsupportedError

from .kernels import KERNELS

DTYPES = ("float32", "float64", "int32")  # what array_api_strict has of tensorweave's dtypes
MAX_DEVICES = 64


class StrictArray:
    """An array in a device's memory. ``root`` keeps the allocation a view belongs to alive (and counted)."""

    __slots__ = ("__weakref__", "device", "dtype", "native", "root")

    def __init__(self, native: Any, device: StrictDevice, root: Any = None) -> None:
        self.native = native
        self.device = device
        self.dtype = device.backend.numpy_dtype(native.dtype)
        self.root = root

    shape = property(lambda self: tuple(self.native.shape))
    ndim = property(lambda self: self.native.ndim)
    size = property(lambda self: self.native.size)
    nbytes = property(lambda self: self.native.size * self.dtype.itemsize)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise PlacementError(
            f"an array of {self.device.name} was read on the host directly; use {self.device.name}.to_host(array)"
        )

    def __repr__(self) -> str:
        return f"<StrictArray {self.device.name} shape={self.shape} dtype={self.dtype.name}>"


class _Queue:
    """Runs submitted callables one after another on a thread of its own, like a GPU stream's host side."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._last: Future[Any] | None = None
        self._thread: int | None = None

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        if threading.get_ident() == self._thread:  # work submitted by work on this device: queueing would deadlock
            fut: Future[Any] = Future()
            try:
                fut.set_result(job())
            except BaseException as e:
                fut.set_exception(e)
            return fut

        def run() -> Any:
            self._thread = threading.get_ident()
            return job()

        self._last = self._pool.submit(run)
        return self._last

    def drain(self) -> None:
        last = self._last
        if last is not None and threading.get_ident() != self._thread:
            last.exception()  # waits; errors belong to the job's own Future


def _address(native: Any) -> int:
    """Where a native array's first element lives, read through DLPack without copying."""
    return int(np.from_dlpack(native).__array_interface__["data"][0])


class StrictDevice(Device):
    backend: StrictBackend

    def __init__(self, backend: StrictBackend, index: int, capacity: int | None, peers: bool) -> None:
        self.backend = backend
        self.index = index
        self.name = f"{backend.name}:{index}"
        self.stats = DeviceStats()
        self._capacity = capacity
        self._peers = peers
        self._group: list[StrictDevice] = []  # set by the backend once the whole group exists
        self._enabled: set[int] = set()
        self._lock = threading.RLock()  # RLock: finalizers may run while it is held on this thread
        self._starts: list[int] = []  # addresses of live allocations, sorted ...
        self._spans: dict[int, tuple[int, weakref.ref[Any]]] = {}  # ... -> (bytes, the allocation's native array)
        self._used = 0
        self._peak = 0
        self._queue = _Queue(self.name.replace(":", "-"))

    # --- memory ----------------------------------------------------------------------------------------------

    def memory_info(self) -> MemoryInfo:
        with self._lock:
            return MemoryInfo(total=self._total(), used=self._used, peak=self._peak)

    def _total(self) -> int:
        return self._capacity if self._capacity is not None else total_host_memory()

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            free = self._total() - self._used
            if nbytes > free:
                raise OutOfMemoryError(self.name, nbytes, max(free, 0))

    def _owner(self, start: int) -> Any:
        """The live allocation whose bytes contain ``start``, or None."""
        with self._lock:
            i = bisect.bisect_right(self._starts, start) - 1
            if i < 0:
                return None
            base = self._starts[i]
            nbytes, ref = self._spans[base]
            return ref() if start < base + nbytes else None

    def _adopt(self, native: Any, new: bool) -> StrictArray:
        """Wrap a native array as this device's. A new buffer is counted until it is garbage; a view of a counted
        buffer (``new`` False and its address inside one) counts nothing and keeps that buffer alive."""
        nbytes = native.size * self.backend.numpy_dtype(native.dtype).itemsize
        if nbytes == 0:
            return StrictArray(native, self)
        start = _address(native)
        owner = None if new else self._owner(start)
        if owner is not None:
            return StrictArray(native, self, root=owner)
        with self._lock:
            self._reserve(nbytes)
            bisect.insort(self._starts, start)
            self._spans[start] = (nbytes, weakref.ref(native))
            self._used += nbytes
            self._peak = max(self._peak, self._used)
            self.stats.allocations += 1
            self.stats.allocated_bytes += nbytes
        weakref.finalize(native, self._release, start, nbytes)
        return StrictArray(native, self)

    def _release(self, start: int, nbytes: int) -> None:
        with self._lock:
            if self._spans.pop(start, None) is not None:
                self._starts.remove(start)
                self._used -= nbytes

    def empty(self, shape: Sequence[int], dtype: Any) -> StrictArray:
        xdt = self.backend.native_dtype(dtype, f"{self.name}.empty")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"{self.name}.empty: negative dimension in shape {shape}")
        self._reserve(int(np.prod(shape, dtype=np.int64)) * dtypes.to_dtype(dtype).itemsize)
        return self._adopt(self.backend.xp.empty(shape, dtype=xdt), new=True)

    def from_host(self, host: np.ndarray, out: StrictArray | None = None) -> StrictArray:
        if isinstance(host, StrictArray):
            raise PlacementError(f"{self.name}.from_host: got a device array of {host.device.name}; use copy_from")
        host = np.asarray(host)
        self.backend.native_dtype(host.dtype, f"{self.name}.from_host")
        self.synchronize()  # work still queued may read ``out``
        self.stats.from_host_bytes += host.nbytes
        return self._store(self.backend.xp.asarray(host, copy=True if out is None else None), out, "from_host")

    def _store(self, native: Any, out: StrictArray | None, where: str) -> StrictArray:
        """``native`` as a new array of this device (it must be a fresh copy), or copied into ``out``."""
        if out is None:
            return self._adopt(native, new=True)
        dst = self._native(out, where)
        if tuple(dst.shape) != tuple(native.shape) or dst.dtype != native.dtype:
            raise ShapeError(
                f"{self.name}.{where}: out has shape {out.shape} {out.dtype.name}, expected "
                f"{tuple(native.shape)} {self.backend.numpy_dtype(native.dtype).name}"
            )
        dst[...] = native
        return out

    def to_host(self, array: StrictArray) -> np.ndarray:
        native = self._native(array, "to_host")
        self.synchronize()
        host = np.from_dlpack(native).copy()
        self.stats.to_host_bytes += host.nbytes
        return host

    def owns(self, array: Any) -> bool:
        return isinstance(array, StrictArray) and array.device is self

    def _native(self, array: Any, where: str) -> Any:
        if isinstance(array, StrictArray):
            if array.device is self:
                return array.native
            raise PlacementError(
                f"{self.name}.{where}: the array lives on {array.device.name}; "
                f"copy it first with {self.name}.copy_from(array, {array.device.name})"
            )
        if isinstance(array, np.ndarray):
            raise PlacementError(f"{self.name}.{where}: got a host numpy array; upload it with from_host first")
        raise PlacementError(f"{self.name}.{where}: expected an array of {self.name}, got {type(array).__name__}")

    # --- peers -----------------------------------------------------------------------------------------------

    def peer_access(self, other: Device) -> bool:
        return self._peers and other is not self and other in self._group

    def enable_peer_access(self, other: Device) -> None:
        if not self.peer_access(other):
            raise PlacementError(f"{self.name} has no peer access to {other.name} (peer=none, or another group)")
        self._enabled.add(other.index)

    def peer_enabled(self, other: Device) -> bool:
        return other in self._group and other.index in self._enabled

    def copy_from(self, array: StrictArray, src: Device, out: StrictArray | None = None) -> StrictArray:
        if not src.owns(array):
            where = array.device.name if isinstance(array, StrictArray) else type(array).__name__
            raise PlacementError(f"{self.name}.copy_from: the array is not on {src.name} (it is on {where})")
        if not (src is self or self.peer_enabled(src)):
            # Another group, another backend, or no peer access: the only common ground is host memory.
            host = src.to_host(array)
            self.stats.staged_copies += 1
            self.stats.staged_bytes += host.nbytes
            return self.from_host(host, out)
        assert isinstance(array, StrictArray)
        src.synchronize()
        self.synchronize()
        if src is not self:
            self.stats.peer_copies += 1
            self.stats.peer_bytes += array.nbytes
        data = array.native
        return self._store(self.backend.xp.asarray(data, copy=True) if out is None else data, out, "copy_from")

    # --- execution -------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        nargs, nkwargs = _walk(args, self._unwrap), {k: _walk(v, self._unwrap) for k, v in kwargs.items()}
        return self._queue.submit(lambda: _walk(fn(*nargs, **nkwargs), self._wrap))

    def _unwrap(self, value: Any) -> Any:
        return self._native(value, "submit") if isinstance(value, (StrictArray, np.ndarray)) else value

    def _wrap(self, value: Any) -> Any:
        return self._adopt(value, new=False) if _namespace(value) is self.backend.xp else value

    def synchronize(self) -> None:
        self._queue.drain()


def _namespace(value: Any) -> Any:
    """The array namespace of an array-API array (the standard's ``__array_namespace__``), else None."""
    get = getattr(value, "__array_namespace__", None)
    return get() if get is not None else None


def _walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every item of (nested) lists and tuples, keeping their types."""
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, leaf) for v in value)
    return leaf(value)


class StrictBackend(Backend):
    name = "array-api-strict"
    capabilities = Capabilities(dtypes=frozenset(DTYPES))
    kernels = MappingProxyType(KERNELS)
    default_communicator = "peer"  # built from copy_from and array-API kernels only: works for any backend
    description = "devices holding array_api_strict arrays (out-of-tree example plugin)"

    def __init__(self) -> None:
        self._xp: Any = None  # imported on first use: listing plugins must not need array_api_strict

    @property
    def xp(self) -> Any:
        if self._xp is None:
            import array_api_strict

            self._xp = array_api_strict
        return self._xp

    def available(self) -> bool:
        try:
            self.xp  # noqa: B018 - the import is the probe
        except ImportError:
            return False
        return True

    def native_dtype(self, dtype: Any, where: str) -> Any:
        """The array_api_strict dtype for a numpy dtype; UnsupportedError for those the standard lacks."""
        dt = dtypes.to_dtype(dtype)
        if dt.name not in DTYPES:
            raise UnsupportedError(
                f"{where}: {self.name} has no {dt.name} (the array API standard has no 16-bit floats); "
                f"supported: {', '.join(DTYPES)}"
            )
        return getattr(self.xp, dt.name)

    def numpy_dtype(self, native: Any) -> np.dtype[Any]:
        for name in DTYPES:
            if native == getattr(self.xp, name):
                return np.dtype(name)
        raise UnsupportedError(f"{self.name}: an array of dtype {native}; supported: {', '.join(DTYPES)}")

    def devices(self, spec: DeviceSpec) -> list[Device]:
        where = f"device spec {self.name}:{','.join(spec.args)}"
        if len(spec.args) > 1:
            raise DeviceSpecError(f"{where}: {self.name} takes one device count, e.g. {self.name}:2")
        try:
            n = int(spec.args[0]) if spec.args else 1
        except ValueError:
            raise DeviceSpecError(f"{where}: device count {spec.args[0]!r} is not an integer") from None
        if not 0 < n <= MAX_DEVICES:
            raise DeviceSpecError(f"{where}: device count must be between 1 and {MAX_DEVICES}, got {n}")
        unknown = set(spec.options) - {"mem", "peer"}
        if unknown:
            raise DeviceSpecError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}; known: mem, peer")
        peer = spec.options.get("peer", "all")
        if peer not in ("all", "none"):
            raise DeviceSpecError(f"{where}: peer must be all or none, not {peer!r}")
        capacity = parse_size(spec.options["mem"]) if "mem" in spec.options else None
        group = [StrictDevice(self, i, capacity, peer == "all") for i in range(n)]
        for d in group:
            d._group = group
        return list(group)

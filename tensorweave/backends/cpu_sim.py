"""cpu-sim: N simulated devices in one process over numpy: the reference every other backend is held to.

It behaves like a strict GPU so placement bugs show up in CI instead of on someone's cluster:
- device memory is not host memory: ``SimArray`` refuses ``np.asarray``; read it with ``to_host``;
- an array used on a device it does not live on raises PlacementError (kernels, copies, collectives);
- capacity (``mem=256MiB``) is enforced with live and peak accounting; OOM names device, requested and free bytes;
- peer topology (``peer=all|none|ring|0-1,2-3``): copies between devices without enabled peer access are staged
  through host memory and counted in ``Device.stats``;
- each device runs submitted work on a worker thread of its own, so devices progress concurrently;
- weights held as float16, bfloat16 or any GGUF quant format it holds (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K)
  multiply through compiled kernels (``cpu_kernels``, numba) that use the same per-device thread count as BLAS;
  float32 and float64 weights go to BLAS through core's reference kernels;
- attention over a float16 or bfloat16 KV cache (``tw.load(cache_dtype=...)``) widens keys and values through the
  same compiled row conversion and runs core's kernel; over a float32 cache, a compiled decode step (both in
  ``cpu_kernels``);
- the devices share this machine's cores: in a group of N > 1 devices, each device's worker runs BLAS with
  cores // N threads (``threads=K`` overrides; ``threads=0`` leaves BLAS alone), so N concurrent BLAS pools do
  not oversubscribe the cores: OpenBLAS threads spin while they wait, and on a loaded 2-core machine a decode step
  with 2-thread BLAS took 426 ms against 36 ms with 1 thread. On a quiet machine it makes little difference
  (TP=2 decode 37-40 ms per step either way; measured with benchmarks/executor.py's model).

Spec: ``cpu-sim[:COUNT][,mem=SIZE][,peer=TOPOLOGY][,threads=K]`` (COUNT defaults to 1, peer to all, mem to host
RAM, threads to cores // COUNT when COUNT > 1, BLAS's default for one device).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import MappingProxyType
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.device import (
    Backend,
    Capabilities,
    Device,
    DeviceSpec,
    DeviceStats,
    MemoryInfo,
    parse_size,
    total_host_memory,
)
from ..core.hookspecs import hookimpl
from ..errors import DeviceSpecError, OutOfMemoryError, PlacementError, ShapeError
from . import cpu_kernels
from ._worker import SerialWorker, walk

MAX_DEVICES = 256


class SimArray:
    """An array in a simulated device's memory. Opaque to host code: use the device's methods to read it."""

    __slots__ = ("__weakref__", "_data", "device")

    def __init__(self, data: np.ndarray, device: SimDevice) -> None:
        self._data = data
        self.device = device

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    nbytes = property(lambda self: self._data.nbytes)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise PlacementError(
            f"an array of {self.device.name} was read on the host directly; use {self.device.name}.to_host(array)"
        )

    def __repr__(self) -> str:
        return f"<SimArray {self.device.name} shape={self.shape} dtype={self.dtype.name}>"


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class SimDevice(Device):
    def __init__(self, backend: CpuSimBackend, index: int, capacity: int | None, peers: frozenset[int]) -> None:
        self.backend = backend
        self.index = index
        self.name = f"{backend.name}:{index}"
        self.stats = DeviceStats()
        self._capacity = capacity
        self._blas_threads: int | None = None  # set by the backend for the whole group
        self._peers = peers  # indices this device can reach directly
        self._group: list[SimDevice] = []  # set by the backend once the whole group exists
        self._enabled: set[int] = set()
        self._lock = threading.RLock()  # RLock: GC finalizers may run while it is held on this thread
        self._live: dict[int, int] = {}  # id(root buffer) -> bytes
        self._used = 0
        self._peak = 0
        self._worker = SerialWorker(self.name.replace(":", "-"))

    # --- memory ----------------------------------------------------------------------------------------------------

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

    def _adopt(self, data: np.ndarray) -> SimArray:
        """Wrap a numpy array as this device's; count its buffer once, however many views share it."""
        root = _root(data)
        key = id(root)
        with self._lock:
            if key not in self._live:
                self._reserve(root.nbytes)
                self._live[key] = root.nbytes
                self._used += root.nbytes
                self._peak = max(self._peak, self._used)
                self.stats.allocations += 1
                self.stats.allocated_bytes += root.nbytes
                weakref.finalize(root, self._release, key)
        return SimArray(data, self)

    def _release(self, key: int) -> None:
        with self._lock:
            self._used -= self._live.pop(key, 0)

    def empty(self, shape: Sequence[int], dtype: Any) -> SimArray:
        dt = dtypes.to_dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"{self.name}.empty: negative dimension in shape {shape}")
        self._reserve(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
        return self._adopt(np.empty(shape, dt))

    def from_host(self, host: np.ndarray, out: SimArray | None = None) -> SimArray:
        if isinstance(host, SimArray):
            raise PlacementError(f"{self.name}.from_host: got a device array of {host.device.name}; use copy_from")
        host = np.asarray(host)
        dtypes.check_storage(host.dtype)
        self.synchronize()
        self.stats.from_host_bytes += host.nbytes
        return self._store(host, out, "from_host")

    def _store(self, data: np.ndarray, out: SimArray | None, where: str) -> SimArray:
        """Copy ``data`` into a new array of this device, or into ``out`` (same shape and dtype)."""
        if out is None:
            self._reserve(data.nbytes)
            return self._adopt(data.copy())
        self._check_out(out, data.shape, data.dtype, where)
        np.copyto(out._data, data)
        return out

    def to_host(self, array: SimArray) -> np.ndarray:
        data = self._native(array, "to_host")
        self.synchronize()
        self.stats.to_host_bytes += data.nbytes
        return data.copy()

    def owns(self, array: Any) -> bool:
        return isinstance(array, SimArray) and array.device is self

    def _native(self, array: Any, where: str) -> np.ndarray:
        if isinstance(array, SimArray):
            if array.device is self:
                return array._data
            raise PlacementError(
                f"{self.name}.{where}: the array lives on {array.device.name}; "
                f"copy it first with {self.name}.copy_from(array, {array.device.name})"
            )
        if isinstance(array, np.ndarray):
            raise PlacementError(f"{self.name}.{where}: got a host numpy array; upload it with from_host first")
        raise PlacementError(f"{self.name}.{where}: expected an array of {self.name}, got {type(array).__name__}")

    def _check_out(self, out: SimArray, shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> None:
        data = self._native(out, where)
        if data.shape != tuple(shape) or data.dtype != dtype:
            raise ShapeError(
                f"{self.name}.{where}: out has shape {data.shape} {data.dtype.name}, "
                f"expected {tuple(shape)} {np.dtype(dtype).name}"
            )

    # --- peers -----------------------------------------------------------------------------------------------------

    def peer_access(self, other: Device) -> bool:
        return isinstance(other, SimDevice) and other in self._group and other.index in self._peers

    def enable_peer_access(self, other: Device) -> None:
        if not self.peer_access(other):
            raise PlacementError(f"{self.name} has no peer access to {other.name} (topology of this device group)")
        assert isinstance(other, SimDevice)
        self._enabled.add(other.index)

    def peer_enabled(self, other: Device) -> bool:
        return isinstance(other, SimDevice) and other in self._group and other.index in self._enabled

    def copy_from(self, array: SimArray, src: Device, out: SimArray | None = None) -> SimArray:
        if not src.owns(array):
            where = array.device.name if isinstance(array, SimArray) else type(array).__name__
            raise PlacementError(f"{self.name}.copy_from: the array is not on {src.name} (it is on {where})")
        if not isinstance(src, SimDevice):
            # Another backend's device: the only common ground is host memory.
            host = src.to_host(array)
            self.stats.staged_copies += 1
            self.stats.staged_bytes += host.nbytes
            return self.from_host(host, out)
        data = array._data
        src.synchronize()
        self.synchronize()
        if src is not self:
            direct = self.peer_enabled(src)
            self.stats.peer_copies += direct
            self.stats.peer_bytes += data.nbytes * direct
            self.stats.staged_copies += not direct
            self.stats.staged_bytes += data.nbytes * (not direct)
        return self._store(data, out, "copy_from")

    # --- execution -------------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        nargs, nkwargs = walk(args, self._unwrap), {k: walk(v, self._unwrap) for k, v in kwargs.items()}

        def job() -> Any:
            use_blas_threads(self._blas_threads)
            cpu_kernels.set_threads(self._blas_threads)
            return walk(fn(*nargs, **nkwargs), self._wrap)

        return self._worker.submit(job)

    def _unwrap(self, value: Any) -> Any:
        return self._native(value, "submit") if isinstance(value, (SimArray, np.ndarray)) else value

    def _wrap(self, value: Any) -> Any:
        return self._adopt(value) if isinstance(value, np.ndarray) else value

    def synchronize(self) -> None:
        self._worker.drain()


# compiled kernels for 16-bit and quantized weights, a decode step's small ops and attention (also over 16-bit KV
# caches); all need numba: without it every op runs core's reference
KERNELS: dict[str, Callable[..., Any]] = cpu_kernels.KERNELS


class CpuSimBackend(Backend):
    name = "cpu-sim"
    xp = np
    capabilities = Capabilities(dtypes=frozenset(dtypes.DTYPES), weight_formats=frozenset(dtypes.FORMATS))
    kernels = MappingProxyType(KERNELS)
    default_communicator = "local"
    description = "simulated devices in this process (numpy); the reference backend"
    shares_host_memory = True

    def available(self) -> bool:
        return True

    def devices(self, spec: DeviceSpec) -> list[Device]:
        where = f"device spec {self.name}:{','.join(spec.args)}"
        if len(spec.args) > 1:
            raise DeviceSpecError(f"{where}: cpu-sim takes one device count, e.g. cpu-sim:4")
        try:
            n = int(spec.args[0]) if spec.args else 1
        except ValueError:
            raise DeviceSpecError(f"{where}: device count {spec.args[0]!r} is not an integer") from None
        if not 0 < n <= MAX_DEVICES:
            raise DeviceSpecError(f"{where}: device count must be between 1 and {MAX_DEVICES}, got {n}")
        unknown = set(spec.options) - {"mem", "peer", "threads"}
        if unknown:
            raise DeviceSpecError(
                f"{where}: unknown option(s) {', '.join(sorted(unknown))}; cpu-sim knows mem, peer, threads"
            )
        threads = spec.options.get("threads", "auto")
        if threads != "auto" and not threads.isdigit():
            raise DeviceSpecError(f"{where}: threads must be a count (0 = leave BLAS alone) or auto, not {threads!r}")
        blas = blas_threads_for(n, threads)
        capacity = parse_size(spec.options["mem"]) if "mem" in spec.options else None
        peers = parse_topology(spec.options.get("peer", "all"), n)
        group = [SimDevice(self, i, capacity, peers[i]) for i in range(n)]
        for d in group:
            d._group = group
            d._blas_threads = blas
        return list(group)


def blas_threads_for(devices: int, threads: str) -> int | None:
    """BLAS threads per call for a group of ``devices``: ``threads`` "auto" = cores // devices, "0" = leave BLAS
    alone (None)."""
    if threads == "auto":
        if devices == 1:
            return None  # a lone device: BLAS's own default (every core)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // devices)
    return int(threads) or None


_blas: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS libraries, found once


def use_blas_threads(threads: int | None) -> None:
    """Set the BLAS thread count for work on this thread (recent OpenBLAS keeps it per thread, older versions
    process-wide); one ctypes call per library, cheap enough before every submitted job, so whichever device
    group is running gets its own setting. Always set, never compared: a get can disagree with per-thread state."""
    global _blas
    if threads is None:
        return
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    for c in _blas:
        c.set_num_threads(threads)


def parse_topology(text: str, n: int) -> list[frozenset[int]]:
    """'all' | 'none' | 'ring' | 'a-b,c-d' (symmetric pairs) -> the peers each device can reach directly."""
    text = text.strip().lower()
    pairs: set[tuple[int, int]] = set()
    if text == "all":
        pairs = {(i, j) for i in range(n) for j in range(n) if i != j}
    elif text == "ring":
        pairs = {(i, (i + d) % n) for i in range(n) for d in (1, -1) if n > 1 and (i + d) % n != i}
    elif text != "none":
        for item in text.split(","):
            a, sep, b = item.partition("-")
            try:
                i, j = int(a), int(b)
            except ValueError:
                i = j = -1
            if not sep or not (0 <= i < n and 0 <= j < n) or i == j:
                raise DeviceSpecError(
                    f"peer topology item {item!r} must be a pair of distinct device indices 0..{n - 1} like 0-1 "
                    "(or use all, none, ring)"
                )
            pairs |= {(i, j), (j, i)}
    return [frozenset(j for i, j in pairs if i == k) for k in range(n)]


@hookimpl
def tensorweave_register_backends(register: Callable[[Backend], None]) -> None:
    register(CpuSimBackend())

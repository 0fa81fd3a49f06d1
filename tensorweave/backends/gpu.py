"""What the CuPy backends (``cuda``, ``rocm``) share: GPU devices with a stream each, behind the Device contract.

CuPy is imported on first use, never at plugin load: without CuPy, or without a GPU, ``available()`` is False and
nothing else runs. Install with ``pip install 'tensorweave[cuda12]'`` / ``[cuda13]`` / ``[rocm]``.

Spec: ``cuda`` (every GPU), ``cuda:0,1`` (those ordinals), ``cuda:0,0,0`` (three logical devices on GPU 0: own
streams and accounting, same memory; use the ``peer`` communicator for them, NCCL needs distinct GPUs);
options ``mem=SIZE`` (a capacity per logical device, enforced like cpu-sim's) and ``peer_access=auto|on|off``:
``auto`` enables direct access for every pair that reports the capability and then verifies it with a copy
probe (a pair failing the probe falls back to host-staged copies, with a warning); ``on`` requires it for every
pair; ``off`` stages every copy through host memory. llama.cpp learned that enabling peer access everywhere can
exhaust peer-mapping resources on big rigs, hence the switch.

Execution: each device has a worker thread and a non-blocking stream. ``submit(fn, *args)`` runs ``fn`` on the
worker with the GPU current and the stream active, so CuPy kernels queue on that stream; the Future resolves
once they are *enqueued* (the GPU runs them asynchronously, in stream order). ``synchronize``, ``to_host`` and
cross-device copies wait for the stream (copies through an event, so no host round trip when direct).

bfloat16: CuPy (14.x) has no bfloat16 dtype, so a bfloat16 device array is stored as its uint16 bit patterns
(``GpuArray.dtype`` still says bfloat16); kernels receive those bits (see ``core.dtypes.bf16_bits_to_float32``
and ``float32_to_bf16_bits``) and NCCL/RCCL reduce them natively. The backend's compute capabilities therefore
list float32, float16, float64 and int32; bfloat16 is supported for storage, transfers and collectives.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import MappingProxyType
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.device import Backend, Capabilities, Device, DeviceSpec, DeviceStats, MemoryInfo, parse_size
from ..errors import BackendUnavailableError, DeviceSpecError, OutOfMemoryError, PlacementError, ShapeError
from ._worker import SerialWorker, walk

PEER_MODES = ("auto", "on", "off")
PEER_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled (hipErrorPeerAccessAlreadyEnabled has the same)


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailableError(
            f"the GPU backends need CuPy ({e}): pip install 'tensorweave[cuda12]' (or [cuda13], [rocm])"
        ) from None
    return cupy


class GpuArray:
    """An array in GPU memory. Opaque to host code: read it with ``device.to_host``."""

    __slots__ = ("__weakref__", "data", "device", "dtype")

    def __init__(self, data: Any, device: GpuDevice, dtype: np.dtype[Any]) -> None:
        self.data = data  # the CuPy array (uint16 bits for bfloat16)
        self.device = device
        self.dtype = dtype

    shape = property(lambda self: tuple(self.data.shape))
    nbytes = property(lambda self: int(self.data.nbytes))
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise PlacementError(f"an array of {self.device.name} was read on the host directly; use .to_host(array)")

    def __repr__(self) -> str:
        return f"<GpuArray {self.device.name} shape={self.shape} dtype={self.dtype.name}>"


def _storage(dt: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(np.uint16) if dt == dtypes.bfloat16 else dt


class GpuDevice(Device):
    """One logical device on one GPU (see the module docstring). Also the ``NcclDevice`` protocol of nccl.py."""

    backend: GpuBackend

    def __init__(self, backend: GpuBackend, index: int, ordinal: int, slot: int, capacity: int | None) -> None:
        self.backend, self.index, self.ordinal = backend, index, ordinal
        self.name = f"{backend.name}:{ordinal}" + (f"/{slot}" if slot else "")
        self.stats = DeviceStats()
        self.cp = backend.cupy
        self._capacity = capacity
        self._enabled: set[str] = set()
        self._lock = threading.RLock()
        self._used = self._peak = 0
        with self.activate():
            self._stream = self.cp.cuda.Stream(non_blocking=True)
        self._worker = SerialWorker(self.name.replace(":", "-").replace("/", "-"))

    # --- the NcclDevice protocol ------------------------------------------------------------------------------

    @property
    def stream_ptr(self) -> int:
        return int(self._stream.ptr)

    def activate(self) -> Any:
        return self.cp.cuda.Device(self.ordinal)

    def drain(self) -> None:
        self._worker.drain()

    def stream_done(self) -> bool:
        return bool(self._stream.done)

    def pointer(self, array: GpuArray) -> int:
        return int(self._native(array, "pointer").data.ptr)

    # --- memory ---------------------------------------------------------------------------------------------------

    def memory_info(self) -> MemoryInfo:
        with self.activate():
            total = self.cp.cuda.runtime.memGetInfo()[1]
        with self._lock:
            return MemoryInfo(total=self._capacity or int(total), used=self._used, peak=self._peak)

    def _free(self) -> int:
        with self.activate():
            gpu_free = int(self.cp.cuda.runtime.memGetInfo()[0])
        if self._capacity is None:
            return gpu_free
        return min(gpu_free, self._capacity - self._used)

    def _allocate(self, shape: tuple[int, ...], dt: np.dtype[Any]) -> GpuArray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if self._capacity is not None and nbytes > self._capacity - self._used:
            raise OutOfMemoryError(self.name, nbytes, max(self._capacity - self._used, 0))
        try:
            with self.activate():
                data = self.cp.empty(shape, _storage(dt))
        except self.cp.cuda.memory.OutOfMemoryError:
            raise OutOfMemoryError(self.name, nbytes, self._free()) from None
        return self._adopt(data, dt)

    def _adopt(self, data: Any, dt: np.dtype[Any]) -> GpuArray:
        """Wrap a CuPy array; count the memory it owns (views count nothing) until it is freed."""
        if data.base is None:
            with self._lock:
                self._used += data.nbytes
                self._peak = max(self._peak, self._used)
                self.stats.allocations += 1
                self.stats.allocated_bytes += data.nbytes
            weakref.finalize(data, self._release, data.nbytes)
        return GpuArray(data, self, dt)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def empty(self, shape: Sequence[int], dtype: Any) -> GpuArray:
        dt = dtypes.to_dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"{self.name}.empty: negative dimension in shape {shape}")
        return self._allocate(shape, dt)

    def from_host(self, host: np.ndarray, out: GpuArray | None = None) -> GpuArray:
        if isinstance(host, GpuArray):
            raise PlacementError(f"{self.name}.from_host: got a device array of {host.device.name}; use copy_from")
        host = np.asarray(host, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
        dt = dtypes.to_dtype(host.dtype)
        if out is None:
            out = self._allocate(host.shape, dt)
        elif out.shape != host.shape or out.dtype != dt:
            raise ShapeError(f"{self.name}.from_host: out is {out.shape} {out.dtype.name}, data {host.shape} {dt.name}")
        self._native(out, "from_host")
        self.drain()
        with self.activate():
            out.data.set(host.view(_storage(dt)), stream=self._stream)
        self.stats.from_host_bytes += host.nbytes
        return out

    def to_host(self, array: GpuArray) -> np.ndarray:
        data = self._native(array, "to_host")
        self.synchronize()
        with self.activate():
            host = data.get(stream=self._stream)
        self._stream.synchronize()
        self.stats.to_host_bytes += host.nbytes
        return np.asarray(host).view(array.dtype)

    def owns(self, array: Any) -> bool:
        return isinstance(array, GpuArray) and array.device is self

    def _native(self, array: Any, where: str) -> Any:
        if isinstance(array, GpuArray) and array.device is self:
            return array.data
        if isinstance(array, GpuArray):
            raise PlacementError(
                f"{self.name}.{where}: the array lives on {array.device.name}; copy it first with copy_from"
            )
        raise PlacementError(f"{self.name}.{where}: expected an array of {self.name}, got {type(array).__name__}")

    # --- peers ----------------------------------------------------------------------------------------------------

    def peer_access(self, other: Device) -> bool:
        if not isinstance(other, GpuDevice) or other.backend is not self.backend or other is self:
            return False
        return other.ordinal == self.ordinal or self.backend.can_access_peer(self.ordinal, other.ordinal)

    def enable_peer_access(self, other: Device) -> None:
        if not self.peer_access(other):
            raise PlacementError(f"{self.name} has no peer access to {other.name}")
        assert isinstance(other, GpuDevice)
        if other.ordinal != self.ordinal:
            self.backend.enable_peer(self.ordinal, other.ordinal)
        self._enabled.add(other.name)

    def peer_enabled(self, other: Device) -> bool:
        return isinstance(other, GpuDevice) and other.backend is self.backend and other.name in self._enabled

    def disable_peer_access(self, other: GpuDevice) -> None:
        self._enabled.discard(other.name)

    def copy_from(self, array: GpuArray, src: Device, out: GpuArray | None = None) -> GpuArray:
        if not src.owns(array):
            raise PlacementError(f"{self.name}.copy_from: the array is not on {src.name}")
        if not (isinstance(src, GpuDevice) and (src is self or self.peer_enabled(src))):
            host = src.to_host(array)  # no direct path: through host memory
            self.stats.staged_copies += 1
            self.stats.staged_bytes += host.nbytes
            return self.from_host(host, out)
        if out is None:
            out = self._allocate(array.shape, array.dtype)
        elif out.shape != array.shape or out.dtype != array.dtype:
            raise ShapeError(f"{self.name}.copy_from: out is {out.shape} {out.dtype.name}, array {array.shape}")
        src.drain()
        self.drain()
        runtime = self.cp.cuda.runtime
        with src.activate():
            ready = self.cp.cuda.Event(disable_timing=True)
            ready.record(src._stream)
        with self.activate():
            self._stream.wait_event(ready)  # the source's pending writes land first, without a host wait
            runtime.memcpyPeerAsync(
                out.data.data.ptr, self.ordinal, array.data.data.ptr, src.ordinal, array.nbytes, self._stream.ptr
            )
        if src is not self:
            self.stats.peer_copies += 1
            self.stats.peer_bytes += array.nbytes
        return out

    # --- execution ------------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        nargs, nkwargs = walk(args, self._unwrap), {k: walk(v, self._unwrap) for k, v in kwargs.items()}

        def job() -> Any:
            with self.activate(), self._stream:  # CuPy kernels queue on this device's stream
                return walk(fn(*nargs, **nkwargs), self._wrap)

        return self._worker.submit(job)

    def _unwrap(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            raise PlacementError(f"{self.name}.submit: got a host numpy array; upload it with from_host first")
        if isinstance(value, GpuArray) or isinstance(getattr(value, "device", None), Device):
            return self._native(value, "submit")  # raises for another device's array, of any backend
        return value

    def _wrap(self, value: Any) -> Any:
        if not isinstance(value, self.cp.ndarray):
            return value
        # uint16 is no tensorweave dtype: a uint16 CuPy array is bfloat16 bits (see the module docstring)
        return self._adopt(value, dtypes.bfloat16 if value.dtype == np.uint16 else np.dtype(value.dtype))

    def synchronize(self) -> None:
        self.drain()
        self._stream.synchronize()


def _cast(xp: Any, out: Any, x: Any, *, dtype: str = "") -> None:
    """``cast`` where either side may be bfloat16, which CuPy holds as uint16 bits (no other dtype here is uint16):
    from bfloat16 exactly through float32; to bfloat16 rounding once, as the reference does."""
    if x.dtype == xp.uint16:
        x = dtypes.bf16_bits_to_float32(xp, x)
    if out.dtype != xp.uint16:
        out[...] = x
        return
    if x.dtype == dtypes.float64:
        x = dtypes.float64_to_float32_round_odd(xp, x)
    out[...] = dtypes.float32_to_bf16_bits(xp, x.astype(dtypes.float32))


class GpuBackend(Backend):
    """CuPy devices of one vendor; subclasses set ``name``, ``hip`` (ROCm) and ``description``."""

    hip: bool = False
    # bfloat16 is storage only (see the module docstring), but casting to and from it runs on the GPU
    # weights: float16 runs through the reference kernels' chunked float32 conversion; bfloat16 (uint16 bits here)
    # and GGUF quantization blocks have no GPU kernels yet, so such weights are converted to float32 at load
    capabilities = Capabilities(
        dtypes=frozenset({"float32", "float16", "float64", "int32"}),
        op_dtypes=frozenset({("cast", "bfloat16")}),
        weight_formats=frozenset({"f32", "f64", "f16"}),
    )
    kernels = MappingProxyType({"cast": _cast})

    def __init__(self) -> None:
        self._cupy: Any = None
        self._peer_probe: dict[tuple[int, int], bool] = {}

    @property
    def cupy(self) -> Any:
        if self._cupy is None:
            self._cupy = import_cupy()
        return self._cupy

    @property
    def xp(self) -> Any:
        return self.cupy

    def available(self) -> bool:
        try:
            cp = self.cupy
            return bool(cp.cuda.runtime.is_hip) == self.hip and cp.cuda.runtime.getDeviceCount() > 0
        except Exception:  # no CuPy, no driver, a broken install: simply not available here
            return False

    def device_count(self) -> int:
        return int(self.cupy.cuda.runtime.getDeviceCount())

    def can_access_peer(self, a: int, b: int) -> bool:
        return bool(self.cupy.cuda.runtime.deviceCanAccessPeer(a, b))

    def enable_peer(self, a: int, b: int) -> None:
        """Let GPU ``a`` access GPU ``b`` directly (idempotent)."""
        cp = self.cupy
        with cp.cuda.Device(a):
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(b)
            except cp.cuda.runtime.CUDARuntimeError as e:
                if getattr(e, "status", None) != PEER_ALREADY_ENABLED:
                    raise PlacementError(f"{self.name}: enabling peer access {a} -> {b} failed: {e}") from None

    def describe(self, ordinal: int) -> str:
        """One line about a GPU for listings (overridden by ROCm with its architecture table)."""
        props = self.cupy.cuda.runtime.getDeviceProperties(ordinal)
        name = props.get("name", b"?")
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)

    def devices(self, spec: DeviceSpec) -> list[Device]:
        where = f"device spec {self.name}{':' + ','.join(spec.args) if spec.args else ''}"
        unknown = set(spec.options) - {"mem", "peer_access"}
        if unknown:
            raise DeviceSpecError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}; known: mem, peer_access")
        mode = spec.options.get("peer_access", "auto")
        if mode not in PEER_MODES:
            raise DeviceSpecError(f"{where}: peer_access must be auto, on or off, not {mode!r}")
        count = self.device_count()
        try:
            ordinals = [int(a) for a in spec.args] if spec.args else list(range(count))
        except ValueError:
            raise DeviceSpecError(f"{where}: GPU ordinals must be integers, e.g. {self.name}:0,1") from None
        bad = [o for o in ordinals if not 0 <= o < count]
        if bad:
            raise DeviceSpecError(f"{where}: no GPU {bad[0]}; this machine has {count} (0..{count - 1})")
        capacity = parse_size(spec.options["mem"]) if "mem" in spec.options else None
        seen: dict[int, int] = {}
        group = []
        for i, o in enumerate(ordinals):
            group.append(GpuDevice(self, i, o, seen.get(o, 0), capacity))
            seen[o] = seen.get(o, 0) + 1
        self._set_up_peers(group, mode, where)
        return list(group)

    def _set_up_peers(self, group: list[GpuDevice], mode: str, where: str) -> None:
        if mode == "off":
            return
        for a in group:
            for b in group:
                if a is b:
                    continue
                if not a.peer_access(b):
                    if mode == "on":
                        raise PlacementError(f"{where}: peer_access=on but {a.name} cannot access {b.name}")
                    continue
                a.enable_peer_access(b)
                if a.ordinal != b.ordinal and not self._probe(a, b):
                    a.disable_peer_access(b)
                    if mode == "on":
                        raise PlacementError(f"{where}: peer copies {b.name} -> {a.name} return wrong data")
                    warnings.warn(
                        f"{self.name}: peer copies {b.name} -> {a.name} failed the probe; using host-staged copies",
                        stacklevel=3,
                    )

    def _probe(self, dst: GpuDevice, src: GpuDevice) -> bool:
        """Copy a known pattern directly from ``src`` to ``dst`` and compare (once per GPU pair)."""
        key = (dst.ordinal, src.ordinal)
        if key not in self._peer_probe:
            pattern = np.arange(4096, dtype=np.float32)
            try:
                got = dst.to_host(dst.copy_from(src.from_host(pattern), src))
                self._peer_probe[key] = bool(np.array_equal(got, pattern))
            except Exception:
                self._peer_probe[key] = False
        return self._peer_probe[key]

"""nccl / rccl: GPU collectives through NCCL (NVIDIA) and RCCL (AMD), by ONE ctypes binding.

RCCL keeps NCCL's symbol names and enum values, so one symbol table serves both; only the library differs
(``Flavor``). Library discovery, first hit wins: ``TENSORWEAVE_NCCL_LIBRARY`` / ``TENSORWEAVE_RCCL_LIBRARY`` (a
path; if set it must work), the ``nvidia-nccl-cu12`` / ``-cu13`` wheels (``nvidia/nccl/lib/libnccl.so.2``), ROCm's
directory for RCCL (``$ROCM_PATH/lib``, ``/opt/rocm/lib``), then the system loader; the error lists every place
tried. Nothing is loaded at import or plugin registration, so all of this works without a GPU or a library.
Every call is checked: a failure raises CommunicationLibraryError with ncclGetErrorString, ncclGetLastError and
what to do.

Worlds, the same contract as every communicator (one buffer per local rank):

- one process, several GPUs: ``tw.communicator(tw.devices("cuda:0,1,2,3"), "nccl")``: ncclCommInitAll, and every
  collective is one call per GPU between ncclGroupStart and ncclGroupEnd;
- one process per GPU: options ``rank``/``world_size`` (or the SPMD environment); rank 0's ncclUniqueId reaches the
  others through MPI when running under mpiexec (``bootstrap="mpi"``) or the TCP store of ``_store``
  (``bootstrap="store"``, address ``store=`` or ``TENSORWEAVE_STORE``, which ``tensorweave launch`` sets).

Devices must follow the small protocol of ``NcclDevice`` (the cuda and rocm backends do): a device ordinal, its
stream handle, a way to make it current, its pending host work drained, and raw pointers of its arrays.

16-bit floats (``reduce16`` option), after llama.cpp: buffers below a per-world-size element threshold are widened
to float32, reduced, and rounded once (exact like ``local``, up to summation order); larger ones are reduced in
their own type (NCCL rounds at each step) to halve the traffic. Thresholds (``float32_below``, "2:32768,3:131072,
4:262144" by default, the last one for every larger world) were tuned by llama.cpp on 4x RTX 4090 over PCIe.
``reduce16="float32"`` always widens, ``"native"`` never does. Sums are not bitwise identical to ``local``:
NCCL picks its own reduction order (ring/tree), deterministic for a fixed topology and NCCL version only.

Hang safety: after enqueueing, the streams are polled (with ncclCommGetAsyncError) against the timeout (option
``timeout``, env ``TENSORWEAVE_TIMEOUT``, default 300 s); on expiry every communicator is aborted
(ncclCommAbort) and CollectiveTimeoutError raised. With the TCP store, survivors first report to the store for a
grace period, so the error names the ranks that did not arrive. Calls are made in NCCL's default blocking mode,
so a peer missing during NCCL's lazy connection setup can still block inside ncclGroupEnd: set
``NCCL_TIMEOUT``-style safeguards at the launcher level for that case.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata as md
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..core import dtypes
from ..core.communicator import Communicator, CommunicatorCapabilities
from ..core.device import Device, DeviceArray
from ..core.hookspecs import hookimpl
from ..core.spmd import SpmdEnv, resolve_rank, timeout_from
from ..errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    CommunicationLibraryError,
    UnsupportedError,
)
from ._process import Backoff
from ._store import ENV_STORE, TcpStore

# --- the library ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavor:
    """Where one vendor's build of the library lives, and how to get it."""

    name: str  # nccl | rccl
    env: str
    soname: str
    wheels: tuple[str, ...]  # distributions shipping it, and the file inside them
    wheel_file: str
    dirs: tuple[str, ...]  # directories to try before the system loader
    install: str


NCCL = Flavor(
    "nccl",
    "TENSORWEAVE_NCCL_LIBRARY",
    "libnccl.so.2",
    ("nvidia-nccl-cu12", "nvidia-nccl-cu13"),
    "nvidia/nccl/lib/libnccl.so.2",
    (),
    "pip install nvidia-nccl-cu12 (or -cu13), or set TENSORWEAVE_NCCL_LIBRARY=/path/to/libnccl.so.2",
)
RCCL = Flavor(
    "rccl",
    "TENSORWEAVE_RCCL_LIBRARY",
    "librccl.so.1",
    (),
    "",
    (os.path.join(os.environ.get("ROCM_PATH", "/opt/rocm"), "lib"), "/opt/rocm/lib"),
    "install ROCm's rccl package, or set TENSORWEAVE_RCCL_LIBRARY=/path/to/librccl.so.1",
)

# Enums (identical in RCCL). ncclDataType_t and ncclRedOp_t:
DTYPE_CODES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9, "int32": 2}
OP_CODES = {"sum": 0, "max": 2, "min": 3}
RESULTS = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
}
HINTS = {
    1: "a CUDA/HIP call failed: check the driver (nvidia-smi / rocm-smi), that the visible devices exist, and that "
    "the runtime matches the driver",
    2: "a system call failed (sockets, /dev/shm size, ulimit -l): rerun with NCCL_DEBUG=INFO for the details",
    3: "the library failed internally: rerun with NCCL_DEBUG=INFO and report it with that log",
    4: "an argument was rejected: buffers or counts differ between ranks, or a tensorweave bug",
    5: "all ranks must call the same collectives in the same order with the same counts",
    6: "a remote rank failed or the network broke: look at the other ranks' output first",
}


class UniqueId(ctypes.Structure):
    """ncclUniqueId: 128 opaque bytes, passed BY VALUE to ncclCommInitRank."""

    _fields_ = [("internal", ctypes.c_char * 128)]


_vp, _int, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_collective = [_vp, _vp, _size, _int, _int, _vp, _vp]  # send, recv, count, dtype, op|root, comm, stream
SYMBOLS: dict[str, tuple[Any, list[Any]]] = {
    "ncclGetVersion": (_int, [ctypes.POINTER(_int)]),
    "ncclGetErrorString": (ctypes.c_char_p, [_int]),
    "ncclGetLastError": (ctypes.c_char_p, [_vp]),  # NCCL >= 2.13
    "ncclGetUniqueId": (_int, [ctypes.POINTER(UniqueId)]),
    "ncclCommInitRank": (_int, [ctypes.POINTER(_vp), _int, UniqueId, _int]),
    "ncclCommInitAll": (_int, [ctypes.POINTER(_vp), _int, ctypes.POINTER(_int)]),
    "ncclCommDestroy": (_int, [_vp]),
    "ncclCommAbort": (_int, [_vp]),
    "ncclCommGetAsyncError": (_int, [_vp, ctypes.POINTER(_int)]),
    "ncclAllReduce": (_int, _collective),
    "ncclReduceScatter": (_int, _collective),
    "ncclBroadcast": (_int, _collective),
    "ncclAllGather": (_int, [_vp, _vp, _size, _int, _vp, _vp]),
    "ncclSend": (_int, [_vp, _size, _int, _int, _vp, _vp]),  # buffer, count, dtype, peer, comm, stream
    "ncclRecv": (_int, [_vp, _size, _int, _int, _vp, _vp]),
    "ncclGroupStart": (_int, []),
    "ncclGroupEnd": (_int, []),
}
OPTIONAL = {"ncclGetLastError"}


def decode_version(code: int) -> tuple[int, int, int]:
    """NCCL_VERSION_CODE -> (major, minor, patch): 23203 -> (2, 32, 3); before 2.9 the code was X*1000+Y*100+Z."""
    if code >= 10000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100


def find_library(flavor: Flavor) -> str:
    """The library path (or soname) to load; BackendUnavailableError listing every place tried."""
    tried: list[str] = []
    explicit = os.environ.get(flavor.env)
    if explicit:
        if Path(explicit).is_file():
            return explicit
        raise BackendUnavailableError(f"{flavor.env}={explicit} does not name a file; {flavor.install}")
    tried.append(f"{flavor.env} (unset)")
    for dist in flavor.wheels:
        try:
            path = Path(str(md.distribution(dist).locate_file(flavor.wheel_file)))
        except md.PackageNotFoundError:
            tried.append(f"wheel {dist} (not installed)")
            continue
        if path.is_file():
            return str(path)
        tried.append(f"wheel {dist} (no {flavor.wheel_file})")
    if flavor.wheels:  # a wheel installed some other way (a --target dir on sys.path)
        spec = importlib.util.find_spec("nvidia")
        for root in spec.submodule_search_locations or [] if spec else []:
            path = Path(root).parent / flavor.wheel_file
            if path.is_file():
                return str(path)
    for d in dict.fromkeys(flavor.dirs):
        path = Path(d) / flavor.soname
        if path.is_file():
            return str(path)
        tried.append(f"{path} (missing)")
    try:
        ctypes.CDLL(flavor.soname)
        return flavor.soname
    except OSError as e:
        tried.append(f"system loader ({e})")
    raise BackendUnavailableError(
        f"{flavor.name.upper()} library not found; looked in: {'; '.join(tried)}. {flavor.install}"
    )


class Library:
    """The loaded library with typed functions; ``call`` checks every result."""

    def __init__(self, path: str, flavor: Flavor) -> None:
        self.path, self.flavor = path, flavor
        try:
            self.cdll = ctypes.CDLL(path)
        except OSError as e:
            raise BackendUnavailableError(f"cannot load {flavor.name.upper()} from {path}: {e}") from None
        self.fn: dict[str, Any] = {}
        for name, (restype, argtypes) in SYMBOLS.items():
            f = getattr(self.cdll, name, None)
            if f is None:
                if name in OPTIONAL:
                    continue
                raise BackendUnavailableError(f"{path} lacks {name}: not a usable {flavor.name.upper()} library")
            f.restype, f.argtypes = restype, argtypes
            self.fn[name] = f

    def call(self, name: str, *args: Any, comm: int | None = None, context: str = "") -> None:
        rc = int(self.fn[name](*args))
        if rc not in (0, 7):  # 7: ncclInProgress, only in nonblocking mode, which we do not use
            raise self.error(name, rc, comm, context)

    def error(self, name: str, rc: int, comm: int | None, context: str = "") -> CommunicationLibraryError:
        text = self.fn["ncclGetErrorString"](rc)
        last = self.fn["ncclGetLastError"](comm) if "ncclGetLastError" in self.fn else None
        words = (text or b"").decode(errors="replace")
        if last:
            words += f"; {last.decode(errors='replace')}"
        return CommunicationLibraryError(
            f"{self.flavor.name}{context}: {name} failed with {RESULTS.get(rc, 'error')} ({rc}): {words}; "
            f"{HINTS.get(rc, 'rerun with NCCL_DEBUG=INFO for the details')}"
        )

    def version(self) -> tuple[int, int, int]:
        code = _int()
        self.call("ncclGetVersion", ctypes.byref(code))
        return decode_version(code.value)

    def unique_id(self) -> bytes:
        uid = UniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return ctypes.string_at(ctypes.addressof(uid), 128)  # not uid.internal: c_char arrays stop at the first NUL

    def init_rank(self, world_size: int, uid: bytes, rank: int) -> int:
        """ncclCommInitRank; the caller has made the rank's device current."""
        handle, arg = _vp(), UniqueId()
        ctypes.memmove(ctypes.addressof(arg), uid, 128)
        self.call("ncclCommInitRank", ctypes.byref(handle), world_size, arg, rank, context=f" rank {rank}")
        return int(handle.value or 0)

    def init_all(self, ordinals: Sequence[int]) -> list[int]:
        handles = (_vp * len(ordinals))()
        devlist = (_int * len(ordinals))(*ordinals)
        self.call("ncclCommInitAll", handles, len(ordinals), devlist)
        return [int(h or 0) for h in handles]

    def async_error(self, comm: int) -> int:
        rc = _int()
        self.call("ncclCommGetAsyncError", _vp(comm), ctypes.byref(rc), comm=comm)
        return rc.value


@functools.cache
def load(flavor: Flavor = NCCL) -> Library:
    """Find and load the library once per process."""
    return Library(find_library(flavor), flavor)


# --- the communicator -----------------------------------------------------------------------------------------


@runtime_checkable
class NcclDevice(Protocol):
    """What the communicator needs of a device (the cuda and rocm backends provide it)."""

    ordinal: int  # the GPU's runtime index

    @property
    def stream_ptr(self) -> int: ...  # cudaStream_t / hipStream_t of the device's work queue
    def activate(self) -> AbstractContextManager[Any]: ...  # make this GPU current
    def drain(self) -> None: ...  # wait until submitted work has been enqueued on the stream
    def stream_done(self) -> bool: ...  # whether everything enqueued so far has finished
    def pointer(self, array: DeviceArray) -> int: ...  # device address of an array's first element


def parse_float32_below(spec: str | dict[int, int] | None) -> dict[int, int]:
    """Element thresholds under which 16-bit buffers are reduced in float32, by world size."""
    if spec is None:
        spec = os.environ.get("TENSORWEAVE_NCCL_FLOAT32_BELOW", "2:32768,3:131072,4:262144")
    if isinstance(spec, dict):
        return {int(k): int(v) for k, v in spec.items()}
    try:
        return {int(w): int(n) for w, n in (item.split(":") for item in spec.split(","))}
    except ValueError:
        raise CollectiveError(f"nccl: float32_below {spec!r} must look like '2:32768,3:131072,4:262144'") from None


def reduce_in_float32(elements: int, world: int, policy: str, thresholds: dict[int, int]) -> bool:
    """llama.cpp's policy for 16-bit buffers: widen small ones (by world size), reduce large ones natively."""
    if policy != "auto":
        return policy == "float32"
    sizes = sorted(thresholds)
    key = max((w for w in sizes if w <= world), default=sizes[0])
    return elements < thresholds[key]


class NcclCommunicator(Communicator):
    """NCCL over CUDA devices (see the module docstring). Options: ``rank``, ``world_size``, ``bootstrap``
    ("auto" | "mpi" | "store"), ``store``, ``timeout``, ``reduce16`` ("auto" | "float32" | "native"),
    ``float32_below``."""

    name = "nccl"
    flavor = NCCL
    capabilities = CommunicatorCapabilities(
        in_process=True, multi_process=True, deterministic=False, backends=frozenset({"cuda"})
    )

    def __init__(
        self,
        devices: Sequence[Device],
        rank: int | None = None,
        world_size: int | None = None,
        bootstrap: str = "auto",
        store: str | None = None,
        timeout: float | str | None = None,
        reduce16: str = "auto",
        float32_below: str | dict[int, int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(devices, **options)
        who = self.name
        if reduce16 not in ("auto", "float32", "native"):
            raise CollectiveError(f"{who}: reduce16 must be auto, float32 or native, not {reduce16!r}")
        self.reduce16, self.thresholds = reduce16, parse_float32_below(float32_below)
        self.timeout = timeout_from(timeout, who)
        for d in self.devices:
            if not isinstance(d, NcclDevice):
                raise UnsupportedError(f"{who}: {d.name} does not expose the GPU stream protocol NCCL needs")
        ordinals = [d.ordinal for d in self.devices]  # type: ignore[attr-defined]
        if len(set(ordinals)) != len(ordinals):
            raise CollectiveError(
                f"{who}: {', '.join(d.name for d in self.devices)} share a GPU; {who.upper()} needs one GPU per "
                "rank. For several logical devices on one GPU use the 'peer' communicator"
            )
        self.lib = load(self.flavor)
        self._store: TcpStore | None = None
        self._seq = 0
        self._scratch: dict[tuple[int, str, int], DeviceArray] = {}
        multi = rank is not None or world_size is not None or (SpmdEnv.detect() is not None and len(devices) == 1)
        if not multi:
            self.comms = self.lib.init_all(ordinals)
            return
        r, w = resolve_rank(rank, world_size, who)
        if len(self.devices) != 1:
            raise CollectiveError(f"{who}: one process per rank passes one device, got {len(self.devices)}")
        uid = self._share_unique_id(r, w, bootstrap, store)
        with self.dev(0).activate():
            self.comms = [self.lib.init_rank(w, uid, r)]
        self.world_size, self.local_ranks = w, [r]

    def dev(self, i: int) -> NcclDevice:
        return self.devices[i]  # type: ignore[return-value]

    def _share_unique_id(self, rank: int, world: int, bootstrap: str, store: str | None) -> bytes:
        """Rank 0 creates the ncclUniqueId; MPI or the TCP store brings it to the others."""
        address = store or os.environ.get(ENV_STORE)
        if bootstrap == "auto":
            bootstrap = "store" if address else "mpi"
        if bootstrap == "mpi":
            from .mpi import import_mpi

            comm = import_mpi().COMM_WORLD
            if comm.Get_size() != world:
                raise CollectiveError(
                    f"{self.name}: bootstrap over MPI, but MPI has {comm.Get_size()} ranks and world_size={world}; "
                    f"start with mpiexec -n {world}, or pass store=HOST:PORT"
                )
            return bytes(comm.bcast(self.lib.unique_id() if rank == 0 else None, root=0))
        if bootstrap != "store":
            raise CollectiveError(f"{self.name}: bootstrap must be auto, mpi or store, not {bootstrap!r}")
        if not address:
            raise CollectiveError(f"{self.name}: bootstrap='store' needs store=HOST:PORT or {ENV_STORE}")
        self._store = TcpStore(address, serve=rank == 0, timeout=self.timeout)
        if rank == 0:
            self._store.set("nccl/unique-id", self.lib.unique_id())
        return self._store.get("nccl/unique-id")

    def close(self) -> None:
        for c in getattr(self, "comms", []):
            self.lib.call("ncclCommDestroy", _vp(c), comm=c)
        self.comms = []
        self._scratch.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- running a collective -----------------------------------------------------------------------------------

    def _group(self, kind: str, enqueue: Callable[[int, NcclDevice, int], None]) -> None:
        """One call per local rank between ncclGroupStart/End, then wait (with the timeout) for the streams."""
        self._seq += 1
        for i in range(len(self.devices)):
            self.dev(i).drain()  # earlier kernels are on the streams before NCCL's
        self.lib.call("ncclGroupStart")
        try:
            for i, c in enumerate(self.comms):
                with self.dev(i).activate():
                    enqueue(i, self.dev(i), c)
        finally:
            self.lib.call("ncclGroupEnd", context=f" {kind} #{self._seq}")
        self._wait(kind)

    def _wait(self, kind: str) -> None:
        backoff: Backoff | None = None
        while not all(self.dev(i).stream_done() for i in range(len(self.devices))):
            for c in self.comms:
                rc = self.lib.async_error(c)
                if rc not in (0, 7):
                    self._abort()
                    raise self.lib.error("ncclCommGetAsyncError", rc, c, f" {kind} #{self._seq}")
            backoff = backoff or Backoff(self.timeout)
            if not backoff.pause():
                missing = self._report_timeout()
                self._abort()
                raise CollectiveTimeoutError(
                    f"{self.name} {kind} #{self._seq} (ranks {self.local_ranks} of {self.world_size}): not complete "
                    f"after {self.timeout:g} s; {missing}; the communicator was aborted, open a new one"
                )

    def _report_timeout(self) -> str:
        """Name the ranks that never arrived when the store can tell (survivors report there for a grace period)."""
        if self._store is None:
            return "NCCL cannot tell which rank is missing (check the other processes' output)"
        grace = min(max(0.5, self.timeout / 10), 10.0)
        self._store.set(f"timeout/{self._seq}/{self.local_ranks[0]}", b"1")
        missing, deadline = [], time.monotonic() + grace
        for r in range(self.world_size):
            try:
                self._store.get(f"timeout/{self._seq}/{r}", timeout=max(0.01, deadline - time.monotonic()))
            except CollectiveTimeoutError:
                missing.append(r)
        if not missing:
            return "every rank reached it, so the GPUs or the network are stuck"
        return f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} did not arrive"

    def _abort(self) -> None:
        for c in self.comms:
            self.lib.fn["ncclCommAbort"](_vp(c))  # best effort: we are already failing
        self.comms = []

    def _scratch_buf(self, i: int, tag: str, n: int, dtype: Any) -> DeviceArray:
        key = (i, tag, n)
        buf = self._scratch.get(key)
        if buf is None or np.dtype(buf.dtype) != np.dtype(dtype):
            buf = self._scratch[key] = self.devices[i].empty((n,), dtype)
        return buf

    # --- collectives --------------------------------------------------------------------------------------------

    def _allreduce(self, buffers: list[DeviceArray], op: str) -> None:
        dt = np.dtype(buffers[0].dtype)
        count = int(np.prod(buffers[0].shape, dtype=np.int64))
        wide = dt in (dtypes.float16, dtypes.bfloat16) and reduce_in_float32(
            count, self.world_size, self.reduce16, self.thresholds
        )
        work = buffers
        if wide:  # widen to float32, reduce, round once
            work = [self._scratch_buf(i, "f32", count, dtypes.float32) for i in range(len(buffers))]
            self._convert(buffers, work, dt)
        code = DTYPE_CODES[dtypes.name(np.float32 if wide else dt)]

        def enqueue(i: int, d: NcclDevice, c: int) -> None:
            p = d.pointer(work[i])
            self.lib.call("ncclAllReduce", p, p, count, code, OP_CODES[op], _vp(c), _vp(d.stream_ptr), comm=c)

        self._group("allreduce", enqueue)
        if wide:
            self._convert(work, buffers, dt)

    def _convert(self, src: list[DeviceArray], dst: list[DeviceArray], dt: np.dtype[Any]) -> None:
        """Cast between a 16-bit buffer and its float32 scratch on every device (bf16 is stored as uint16 bits)."""
        to_wide = np.dtype(dst[0].dtype) == dtypes.float32
        for dev, s, d in zip(self.devices, src, dst, strict=True):
            if dt == dtypes.bfloat16:
                dev.submit(functools.partial(_widen_bf16 if to_wide else _narrow_bf16, dev.xp), s, d).result()
            else:
                dev.submit(_assign_flat, d, s).result()

    def _reduce_scatter(self, buffers: list[DeviceArray], sizes: list[int], op: str) -> list[DeviceArray]:
        shape = tuple(buffers[0].shape)
        row = int(np.prod(shape[1:], dtype=np.int64))
        if len(set(sizes)) != 1:  # NCCL needs equal parts: reduce all, keep the own rows
            self._allreduce(buffers, op)
            starts = np.cumsum([0, *sizes]).tolist()
            dt = np.dtype(buffers[0].dtype)
            outs = []
            for d, r, buf in zip(self.devices, self.local_ranks, buffers, strict=True):
                outs.append(d.empty((sizes[r], *shape[1:]), dt))
                d.submit(_copy_rows, outs[-1], buf, 0, sizes[r], starts[r]).result()
            return outs
        dt = np.dtype(buffers[0].dtype)
        outs = [d.empty((sizes[0], *shape[1:]), dt) for d in self.devices]

        def enqueue(i: int, d: NcclDevice, c: int) -> None:
            self.lib.call(
                "ncclReduceScatter",
                d.pointer(buffers[i]),
                d.pointer(outs[i]),
                sizes[0] * row,
                DTYPE_CODES[dtypes.name(dt)],
                OP_CODES[op],
                _vp(c),
                _vp(d.stream_ptr),
                comm=c,
            )

        self._group("reduce_scatter", enqueue)
        return outs

    def _allgather(self, buffers: list[DeviceArray], out: list[DeviceArray] | None) -> list[DeviceArray]:
        """Unequal sizes: every rank sends its part to every rank (ncclSend/ncclRecv in one group)."""
        rows = self._rows_of_every_rank(buffers)
        shape = tuple(buffers[0].shape)
        row = int(np.prod(shape[1:], dtype=np.int64))
        dt = np.dtype(buffers[0].dtype)
        itemsize = dt.itemsize
        if out is None:
            out = [d.empty((sum(rows), *shape[1:]), dt) for d in self.devices]
        starts = np.cumsum([0, *rows]).tolist()
        code = DTYPE_CODES[dtypes.name(dt)]

        def enqueue(i: int, d: NcclDevice, c: int) -> None:
            me, base, stream = self.local_ranks[i], d.pointer(out[i]), _vp(d.stream_ptr)
            for peer in range(self.world_size):
                if rows[me] and peer != me:
                    self.lib.call("ncclSend", d.pointer(buffers[i]), rows[me] * row, code, peer, _vp(c), stream, comm=c)
                if rows[peer] and peer != me:
                    dst = base + starts[peer] * row * itemsize
                    self.lib.call("ncclRecv", dst, rows[peer] * row, code, peer, _vp(c), stream, comm=c)

        self._group("allgather", enqueue)
        for i, (d, r) in enumerate(zip(self.devices, self.local_ranks, strict=True)):  # the own part, locally
            d.submit(_copy_rows, out[i], buffers[i], starts[r], starts[r + 1]).result()
        return out

    def _rows_of_every_rank(self, buffers: list[DeviceArray]) -> list[int]:
        mine = [int(b.shape[0]) for b in buffers]
        if len(self.devices) == self.world_size:
            return mine
        # One rank per process: learn the others' row counts with a tiny allreduce (each fills its own slot).
        own = np.zeros(self.world_size, np.float64)
        own[self.local_ranks[0]] = mine[0]
        counts = [self.devices[0].from_host(own)]
        self._allreduce(counts, "sum")
        return [int(v) for v in self.devices[0].to_host(counts[0])]

    def _broadcast(self, buffers: list[DeviceArray], root: int) -> None:
        dt = np.dtype(buffers[0].dtype)
        count = int(np.prod(buffers[0].shape, dtype=np.int64))

        def enqueue(i: int, d: NcclDevice, c: int) -> None:
            p = d.pointer(buffers[i])
            self.lib.call(
                "ncclBroadcast", p, p, count, DTYPE_CODES[dtypes.name(dt)], root, _vp(c), _vp(d.stream_ptr), comm=c
            )

        self._group("broadcast", enqueue)

    def _barrier(self) -> None:
        bufs = [self._scratch_buf(i, "barrier", 1, dtypes.float32) for i in range(len(self.devices))]
        self._allreduce(bufs, "sum")


class RcclCommunicator(NcclCommunicator):
    """RCCL over ROCm devices: the same binding and behaviour, librccl.so.1 instead of libnccl.so.2."""

    name = "rccl"
    flavor = RCCL
    capabilities = CommunicatorCapabilities(
        in_process=True, multi_process=True, deterministic=False, backends=frozenset({"rocm"})
    )


# --- device kernels (run through Device.submit on native arrays; bfloat16 is stored as uint16 bits) -----------


def _assign_flat(dst: Any, src: Any) -> None:
    dst.reshape(-1)[...] = src.reshape(-1)  # casts (float16 <-> float32) on the way


def _widen_bf16(xp: Any, bits: Any, wide: Any) -> None:
    _assign_flat(wide, dtypes.bf16_bits_to_float32(xp, bits.reshape(-1)))


def _narrow_bf16(xp: Any, wide: Any, bits: Any) -> None:
    _assign_flat(bits, dtypes.float32_to_bf16_bits(xp, wide.reshape(-1)))


def _copy_rows(dst: Any, src: Any, start: int, stop: int, src_start: int = 0) -> None:
    dst[start:stop] = src[src_start : src_start + stop - start]


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(NcclCommunicator)
    register(RcclCommunicator)

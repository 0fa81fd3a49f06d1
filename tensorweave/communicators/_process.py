"""What the one-process-per-rank communicators (shm, mpi) share: host groups, staging, headers, waiting.

A *host group* runs collectives on host numpy arrays, one array per process. ``ProcessGroupCommunicator`` puts
it behind the Communicator contract: one device per process, ``world_size`` = all ranks, ``local_ranks`` = [this
rank]. Device buffers reach the group either as the device's own numpy memory (through ``Device.submit``, no copy;
used for large buffers on numpy backends) or staged through host memory (small buffers, where a hop to the
device's worker thread costs more than the copy, and non-numpy devices).

Before moving data every collective publishes a *header* (sequence number, kind, dtype, op, count, a checksum of
the rest) and checks everyone's after the first rendezvous, so ranks calling different collectives, or the same
one with different shapes, all raise the same CollectiveError instead of hanging or corrupting memory.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ..core import dtypes
from ..core.communicator import REDUCE_OPS, Communicator, CommunicatorCapabilities
from ..core.device import Device, DeviceArray
from ..core.spmd import resolve_rank, timeout_from
from ..errors import CollectiveError

P = TypeVar("P")

STAGE_BYTES = 4 << 20  # at or below: copy through host; above: work on the device's own memory (numpy backends)
# (measured: handing a 1 MiB collective to the device thread cost 3.3 ms, copying it through host 0.6 ms; at 64 MiB
# the device thread wins, 20 ms against 54 ms)

KINDS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "barrier", "init")
DTYPE_CODES = list(dtypes.DTYPES)  # header code = index; the same on every rank
OP_CODES = list(REDUCE_OPS)
HEADER_WORDS = 6  # seq, kind, dtype, op, count, aux


class HostGroup(Protocol):
    """Collectives over host numpy arrays, one per process; ``x`` is C-contiguous."""

    rank: int
    world_size: int

    def allreduce(self, x: np.ndarray, op: str) -> None: ...
    def allgather(self, x: np.ndarray, out: np.ndarray | None) -> np.ndarray: ...
    def reduce_scatter(self, x: np.ndarray, sizes: Sequence[int], op: str) -> np.ndarray: ...
    def broadcast(self, x: np.ndarray, root: int) -> None: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def header(
    seq: int, kind: str, x: np.ndarray | None = None, op: str | None = None, count: int = 0, aux: int = 0
) -> list[int]:
    """The words a rank publishes before a collective (see the module docstring)."""
    dt = -1 if x is None else DTYPE_CODES.index(dtypes.name(x.dtype))
    return [seq, KINDS.index(kind), dt, -1 if op is None else OP_CODES.index(op), count, aux]


def checksum(*values: object) -> int:
    """A small stable checksum (shapes, size lists) that fits a header word on every platform."""
    return zlib.crc32(repr(values).encode())


def verify_headers(who: str, rank: int, rows: Sequence[Sequence[int]], ignore_count: bool = False) -> None:
    """Raise the same CollectiveError on every rank when the ranks' headers disagree."""
    ref = list(rows[0])
    for other, row in enumerate(rows):
        row = list(row)
        if ignore_count:
            row[4] = ref[4]
        if row == ref:
            continue
        seq, kind, dt, op, count, _ = (int(v) for v in rows[other])
        rseq, rkind, rdt, rop, rcount, _ = (int(v) for v in rows[0])
        if (seq, kind) != (rseq, rkind):
            what = f"rank {other} is in {_kind(kind)} #{seq} while rank 0 is in {_kind(rkind)} #{rseq}"
        elif dt != rdt:
            what = f"rank {other} passes {_dtype(dt)} while rank 0 passes {_dtype(rdt)}"
        elif op != rop:
            what = f"rank {other} asks for op {_op(op)} while rank 0 asks for {_op(rop)}"
        elif count != rcount:
            what = f"rank {other} passes {count} elements while rank 0 passes {rcount}"
        else:
            what = f"rank {other} disagrees with rank 0 on the shape, sizes or root"
        raise CollectiveError(f"{who} (rank {rank}): ranks called mismatched collectives: {what}")


def _kind(code: int) -> str:
    return KINDS[code] if 0 <= code < len(KINDS) else f"kind {code}"


def _dtype(code: int) -> str:
    return DTYPE_CODES[code] if 0 <= code < len(DTYPE_CODES) else "no buffer"


def _op(code: int) -> str:
    return OP_CODES[code] if 0 <= code < len(OP_CODES) else "none"


def reduce_into(out: np.ndarray, parts: Sequence[np.ndarray], op: str, scratch: Callable[[int], np.ndarray]) -> None:
    """``out = parts[0] (op) parts[1] (op) ...`` in list order, accumulating 16-bit floats in float32.

    The same operations in the same order as the ``local`` communicator's reduce_in_order, so results are
    bitwise identical to it. ``scratch(i)`` hands out reusable float32 buffers of len(out) (i = 0, 1).
    """
    combine = getattr(np, REDUCE_OPS[op])
    if dtypes.accumulator(out.dtype) == out.dtype:
        if len(parts) == 1:
            np.copyto(out, parts[0])
            return
        combine(parts[0], parts[1], out=out)
        for p in parts[2:]:
            combine(out, p, out=out)
        return
    acc, tmp = scratch(0), scratch(1)
    np.copyto(acc, parts[0], casting="unsafe")
    for p in parts[1:]:
        np.copyto(tmp, p, casting="unsafe")
        combine(acc, tmp, out=acc)
    np.copyto(out, acc, casting="unsafe")  # the one rounding


def gather_target(out: np.ndarray | None, want: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Where an allgather writes: ``out`` when it fits, else a temporary. A rank whose ``out`` does not fit still
    takes part in the exchange (the others would wait for it until the timeout) and raises after: refuse_out."""
    return out if out is not None and out.shape == want and out.dtype == dtype else np.empty(want, dtype)


def refuse_out(who: str, out: np.ndarray | None, target: np.ndarray) -> None:
    if out is not None and target is not out:
        raise CollectiveError(
            f"{who}: out has shape {out.shape} {out.dtype.name}, expected {target.shape} {target.dtype.name}"
        )


class PlanCache(Generic[P]):
    """Small-allreduce plans by (dtype, op, element count), built once each: the hot path then allocates nothing.
    Cleared when ``limit`` are held, so a caller cycling through many sizes cannot grow it without bound."""

    def __init__(self, build: Callable[[np.dtype[Any], str, int], P], limit: int = 256) -> None:
        self._build, self._limit = build, limit
        self._plans: dict[tuple[np.dtype[Any], str, int], P] = {}

    def get(self, flat: np.ndarray, op: str) -> P:
        key = (flat.dtype, op, flat.size)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self._limit:
                self._plans.clear()
            plan = self._plans[key] = self._build(flat.dtype, op, flat.size)
        return plan

    def clear(self) -> None:
        self._plans.clear()


class Scratch:
    """Reusable float32 accumulators, regrown only when a larger one is asked for."""

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = [np.empty(0, np.float32), np.empty(0, np.float32)]

    def __call__(self, n: int) -> Callable[[int], np.ndarray]:
        for i, b in enumerate(self._bufs):
            if b.size < n:
                self._bufs[i] = np.empty(n, np.float32)
        return lambda i: self._bufs[i][:n]


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a killed child stays a zombie until its parent reaps it)."""
    if pid <= 0:
        return True  # unknown: assume alive, the timeout still applies
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS): existence is all we can learn
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class Backoff:
    """Poll with sched_yield for a while, then sleep with growing pauses; never a pure spin.

    Yielding costs ~1 us when nobody else wants the core, and hands it over at once when CI oversubscribes 2
    cores (a pure spin would starve the very rank being waited for). Past ``yield_s`` the wait is long anyway, so
    sleeping (up to 1 ms per pause) frees the core entirely. MPI uses a longer yield window: it only progresses
    while being polled.
    """

    MAX_SLEEP_S = 1e-3

    def __init__(self, timeout: float, yield_s: float = 2e-3) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.yield_s = yield_s
        self._sleep = 0.0

    def pause(self) -> bool:
        """Wait a little; False once the deadline has passed."""
        now = time.monotonic()
        if now > self.deadline:
            return False
        if now - self.start < self.yield_s:
            os.sched_yield()
        else:
            self._sleep = min(max(self._sleep * 2, 20e-6), self.MAX_SLEEP_S)
            time.sleep(self._sleep)
        return True


class ProcessGroupCommunicator(Communicator):
    """A Communicator over a HostGroup: one device per process. Subclasses set ``group`` in ``__init__``."""

    group: HostGroup
    capabilities = CommunicatorCapabilities(in_process=False, multi_process=True, deterministic=True)

    def __init__(self, devices: Sequence[Device], stage_bytes: int = STAGE_BYTES, **options: Any) -> None:
        super().__init__(devices, **options)
        if len(self.devices) != 1:
            raise CollectiveError(
                f"communicator {self.name!r} runs one process per rank, each passing ONE device; got "
                f"{len(self.devices)} devices. One process driving several devices uses 'local', 'peer' or 'nccl'"
            )
        self.stage_bytes = int(stage_bytes)
        self._numpy_device = self.devices[0].xp is np  # may work on the device's own memory (see _host)

    def _join(self, group: HostGroup) -> None:
        self.group = group
        self.world_size = group.world_size
        self.local_ranks = [group.rank]

    @staticmethod
    def rank_options(
        who: str, rank: int | None, world_size: int | None, timeout: float | str | None
    ) -> tuple[int, int, float]:
        """Rank, world size and timeout from options or the SPMD environment."""
        r, w = resolve_rank(rank, world_size, who)
        return r, w, timeout_from(timeout, who)

    def close(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.close()

    def _host(self, fn: Callable[..., Any], *arrays: DeviceArray, writeback: int | None = None) -> Any:
        """Run ``fn`` on host numpy versions of ``arrays``; ``writeback``: index of an array ``fn`` changes in place.

        A numpy array ``fn`` returns becomes a device array of this rank's device.
        """
        dev = self.devices[0]

        def on_device(*xs: np.ndarray) -> Any:
            flat = [x if x.flags.c_contiguous else x.copy(order="C") for x in xs]  # groups work on flat memory
            result = fn(*flat)
            if writeback is not None and flat[writeback] is not xs[writeback]:
                xs[writeback][...] = flat[writeback]
            return result

        if self._numpy_device and sum(int(a.nbytes) for a in arrays) > self.stage_bytes:
            return dev.submit(on_device, *arrays).result()
        hosts = [dev.to_host(a) for a in arrays]
        result = fn(*hosts)
        if writeback is not None:
            dev.from_host(hosts[writeback], out=arrays[writeback])
        return dev.from_host(result) if isinstance(result, np.ndarray) else result

    def _allreduce(self, buffers: list[DeviceArray], op: str) -> None:
        buf = buffers[0]
        if buf.nbytes <= self.stage_bytes or not self._numpy_device:  # _host's staging, minus its generality:
            dev = self.devices[0]  # this is the latency path of small collectives
            host = dev.to_host(buf)
            self.group.allreduce(host, op)
            dev.from_host(host, out=buf)
            return
        self._host(lambda x: self.group.allreduce(x, op), buf, writeback=0)

    def _allgather(self, buffers: list[DeviceArray], out: list[DeviceArray] | None) -> list[DeviceArray]:
        if out is None:
            return [self._host(lambda x: self.group.allgather(x, None), buffers[0])]

        def into(x: np.ndarray, o: np.ndarray) -> None:
            self.group.allgather(x, o)

        self._host(into, buffers[0], out[0], writeback=1)
        return out

    def _reduce_scatter(self, buffers: list[DeviceArray], sizes: list[int], op: str) -> list[DeviceArray]:
        return [self._host(lambda x: self.group.reduce_scatter(x, sizes, op), buffers[0])]

    def _broadcast(self, buffers: list[DeviceArray], root: int) -> None:
        self._host(lambda x: self.group.broadcast(x, root), buffers[0], writeback=0)

    def _barrier(self) -> None:
        self.devices[0].synchronize()
        self.group.barrier()

"""shm: collectives between the processes of one host through one POSIX shared-memory segment.

Rendezvous: every rank names the same segment (option ``shm_name``, env ``TENSORWEAVE_SHM_NAME``; ``tensorweave
launch`` sets it). Rank 0 creates it, the others attach, and once all have arrived rank 0 unlinks the name, so a
crash can never leak it. Layout: a control block (per rank, on a cache line of its own: an arrival counter, its
pid, a double-buffered collective header and tag) followed by two *pieces* per rank (``piece_bytes``, default
4 MiB). Rank 0's ``piece_bytes``, ``chunked_min_bytes`` and ``small_max_bytes`` are the group's: the others adopt
them, so every rank takes the same path through every collective.

A collective moves data in rounds of one piece: each rank copies its piece into its own slot and *arrives* (one
store of its arrival counter), then reads what it needs from the others' slots:

- allreduce, small buffers (``small_max_bytes``, 64 KiB): one round, one arrival, everything precomputed per
  (dtype, op, size): the header words, the slot views, the accumulators, so the hot path allocates nothing and
  checks the headers with one word per rank (a *tag*: sequence number and an exact code of kind, dtype, op and
  count; a differing tag falls back to the full comparison, which names the disagreement);
- allreduce up to ``chunked_min_bytes`` (256 KiB): each rank reduces the whole piece itself in rank order;
  larger buffers: each rank publishes only the slices the others reduce, reduces its own 1/n slice (its own part
  read from private memory) straight into its buffer, publishes the result and, after a second arrival, copies
  the others' reduced slices: ~3 buffer sizes of memory traffic instead of 5;
- reduce_scatter: each rank reduces only the rows it keeps; allgather and broadcast: plain copies.

Rounds alternate between a rank's two slots (and collectives between its two headers), so what a rank published
stays valid until every rank has arrived at the *next* round: a rank only reuses a slot after seeing everyone's
arrival for the round in between, which each rank makes only after it finished reading. One arrival per round
suffices. Guarantee: reductions run in rank order 0..n-1 in the accumulator dtype (float32 for 16-bit floats)
and round once, exactly like the ``local`` communicator, so every result is bitwise identical to ``local``'s for
every dtype, op and world size.

Memory ordering. The protocol needs two orderings: *release* (a rank's slot and header stores, and its loads of
the previous round's slots, happen before its arrival store is seen) and *acquire* (a rank's loads of slots and
headers, and its next stores into its slots, happen after it saw everyone's arrival). Arrival counters and header
words are aligned 8-byte words, read and written whole (single-copy atomic on every 64-bit CPU); CPython makes
each access in an opaque C call, so the compiler cannot move them across one another. On x86-64 (and i386) the
hardware is TSO: stores become visible in program order and loads are not reordered with older loads or with
later stores, which is exactly release on every store and acquire on every load, so no instruction is needed.
Elsewhere (ARM, POWER, RISC-V reorder freely) the arrival store is made while holding a lock shared by the group
(an exclusive ``flock`` on the segment), and a rank takes and drops that lock once after it saw every arrival:
a rank that observed another's arrival can only get the lock after that rank released it, so the lock's release
and acquire (which the kernel implements with release/acquire on the lock's state; a release orders every earlier
access of the CPU, user-mode ones included) order the data around the arrival. ``ordering="lock"`` forces that
path on x86 too (the tests run it). The lock is taken without blocking, under the deadline, so a rank stopped
while holding it becomes a timeout, never a hang, and the kernel drops it when its holder dies.

Waiting polls with sched_yield (about 0.3 us when the core is free, and the core goes at once to a rank that
needs it), then sleeps with growing pauses; an optional pure spin first (``spin_us``, timed with perf_counter_ns,
default off: see SPIN_US) is bounded in time, never unbounded: CI runs 2+ ranks on 2 cores. Every wait has a
deadline (option ``timeout``, env ``TENSORWEAVE_TIMEOUT``, default 300 s) and also notices a waited-for rank whose
process has died; the first rank to give up marks the segment aborted, and every surviving rank raises
CollectiveTimeoutError naming the ranks that did not arrive and the collective's number. After that the group is
unusable (each later call raises the same error): open a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.communicator import REDUCE_OPS, Communicator, even_sizes
from ..core.device import Device
from ..core.hookspecs import hookimpl
from ..core.spmd import ENV_SHM_NAME
from ..errors import CollectiveError, CollectiveTimeoutError, format_bytes
from ._process import (
    DTYPE_CODES,
    HEADER_WORDS,
    KINDS,
    OP_CODES,
    Backoff,
    PlanCache,
    ProcessGroupCommunicator,
    Scratch,
    checksum,
    gather_target,
    header,
    pid_alive,
    reduce_into,
    refuse_out,
    verify_headers,
)

DEFAULT_PIECE_BYTES = 4 << 20
CHUNKED_MIN_BYTES = 256 << 10  # buffers at least this large: each rank reduces 1/n (see the module docstring)
SMALL_MAX_BYTES = 64 << 10  # allreduce of at most this many bytes: the one-arrival path with precomputed plans
SPIN_US = 0.0  # pure polling before yielding; measured: no gain on free cores (sched_yield returns in ~0.3 us),
# and each waiting rank burns the whole budget per collective when ranks outnumber cores (4 ranks on 2 cores:
# 21-25 us per 4 KiB allreduce at 0, 57-59 us at 20, 83-101 us at 50). An option for hosts with slow syscalls.
MAGIC = 0x7477_7368_6D02  # "twshm", layout 2
LINE = 16  # int64 words per control line: 128 bytes, so ranks never write the same cache line
G_MAGIC, G_WORLD, G_PIECE, G_ABORT_RANK, G_ABORT_SEQ, G_CHUNKED, G_SMALL = range(7)  # line 0: the group
ARRIVE, PID, HDR = 0, 1, 2  # line r + 1: rank r (HDR: two headers of HEADER_WORDS, by sequence parity)
TAG = HDR + 2 * HEADER_WORDS  # then two tags, by sequence parity (see _tag_code)
LIVENESS_EVERY_S = 0.05
MAX_PLANS = 256  # small-allreduce plans kept (one per dtype, op, size); cleared when full
TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
ORDERINGS = ("auto", "tso", "lock")
_NO_TAG = -1  # the tag of collectives that are not small allreduces: never equal to a small one's


def _tag_code(dt: np.dtype[Any], op: str, count: int) -> int:
    """An exact code of (allreduce, dtype, op, count) below 2**32 (count < 2**22: small buffers only)."""
    return (
        (KINDS.index("allreduce") << 29)
        | (DTYPE_CODES.index(dtypes.name(dt)) << 25)
        | (OP_CODES.index(op) << 22)
        | count
    )


def _open_segment(
    name: str, create: bool, size: int = 0, keep_fd: bool = False
) -> tuple[shared_memory.SharedMemory, mmap.mmap, int]:
    """Create or attach ``name`` and map it with a mapping of our own; with ``keep_fd``, also a descriptor of
    it (for the group lock), else -1.

    Our own mapping, because SharedMemory.close() raises BufferError while numpy views exist (a traceback can
    keep one alive) and its finalizer then prints noise at exit; an mmap simply lives until its last view goes.
    The resource tracker's claim on attached segments is dropped: it would unlink them when this process exits.
    """
    try:
        shm = shared_memory.SharedMemory(name, create=create, size=size, track=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # Python < 3.13: no track=; undo the registration the constructor made
        shm = shared_memory.SharedMemory(name, create=create, size=size)
        if not create:
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        mapping = mmap.mmap(shm._fd, shm.size)  # type: ignore[attr-defined]
        return shm, mapping, os.dup(shm._fd) if keep_fd else -1  # type: ignore[attr-defined]
    finally:
        shm.close()


class _SmallPlan:
    """What a small allreduce of one (dtype, op, size) needs, computed once (see the module docstring)."""

    __slots__ = ("acc", "code", "combine", "mine", "parts", "tail", "tmp", "widen")

    def __init__(self, group: ShmGroup, dt: np.dtype[Any], op: str, n: int) -> None:
        self.code = _tag_code(dt, op, n)
        self.tail = header(0, "allreduce", np.empty(0, dt), op, n)[1:]  # the header but its sequence number
        self.combine = getattr(np, REDUCE_OPS[op])
        self.parts = [[group._slot(r, half, dt)[:n] for r in range(group.world_size)] for half in (0, 1)]
        self.mine = [parts[group.rank] for parts in self.parts]
        self.widen = dtypes.accumulator(dt) != dt
        self.acc, self.tmp = group._small_acc[0][:n], group._small_acc[1][:n]


class ShmGroup:
    """Collectives over host numpy arrays between ``world_size`` processes of one host (see the module doc)."""

    def __init__(
        self,
        name: str,
        rank: int,
        world_size: int,
        timeout: float,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        chunked_min_bytes: int = CHUNKED_MIN_BYTES,
        small_max_bytes: int = SMALL_MAX_BYTES,
        spin_us: float = SPIN_US,
        ordering: str = "auto",
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name):
            raise CollectiveError(f"shm: segment name {name!r} must be 1-200 letters, digits, '.', '_' or '-'")
        if piece_bytes < 4096 or piece_bytes % 4096:
            raise CollectiveError(f"shm: piece_bytes must be a positive multiple of 4096, got {piece_bytes}")
        if small_max_bytes < 0:
            raise CollectiveError(f"shm: small_max_bytes must be >= 0, got {small_max_bytes}")
        small_max_bytes = min(small_max_bytes, piece_bytes, 4 << 20)  # one piece; tag codes count below 2**22
        if ordering not in ORDERINGS:
            raise CollectiveError(f"shm: ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
        self.name, self.rank, self.world_size, self.timeout = name, rank, world_size, timeout
        self.spin_ns = int(spin_us * 1000)
        self.locked = ordering == "lock" or (ordering == "auto" and not TSO)  # see the module docstring
        self._ctrl_bytes = math.ceil((world_size + 1) * LINE * 8 / 4096) * 4096
        self._seq = 0  # collectives started
        self._phase = 0  # arrivals made
        self._round = 0  # data rounds: their parity picks the slot half
        self._broken: CollectiveTimeoutError | None = None
        self._views: dict[np.dtype[Any], list[list[np.ndarray]]] = {}
        self._scratch = Scratch()
        self._plans = PlanCache(lambda dt, op, n: _SmallPlan(self, dt, op, n), MAX_PLANS)
        self._tails: list[list[int] | None] = [None, None]  # the header words (but seq) last written, by parity
        self._unlinked = False
        self._fd = -1
        self._shm, self._map, self._fd = (
            self._create(piece_bytes, chunked_min_bytes, small_max_bytes) if rank == 0 else self._attach()
        )
        self._ctrl = memoryview(self._map).cast("q")
        self._piece = int(self._ctrl[G_PIECE])
        self.chunked_min_bytes = int(self._ctrl[G_CHUNKED])
        self.small_max_bytes = int(self._ctrl[G_SMALL])
        self._small_acc = [np.empty(self.small_max_bytes // 2, np.float32) for _ in (0, 1)]
        # allreduces of at most this many bytes take the small path (0 disables it; one rank needs no path at all)
        self._small_limit = self.small_max_bytes if self.small_max_bytes > 0 and world_size > 1 else -1
        if self._ctrl[G_WORLD] != world_size:
            self.close()
            raise CollectiveError(
                f"shm: segment {name!r} was created for {self._ctrl[G_WORLD]} ranks, but this rank was told "
                f"world_size={world_size}"
            )
        self._line = (rank + 1) * LINE
        self._arrive_at = [(r + 1) * LINE + ARRIVE for r in range(world_size)]
        self._others_arrive = [i for r, i in enumerate(self._arrive_at) if r != rank]
        self._hdr_at = [self._line + HDR + h * HEADER_WORDS for h in (0, 1)]  # this rank's headers, by parity
        self._tag_at = [self._line + TAG + h for h in (0, 1)]
        self._others_tag = [[(r + 1) * LINE + TAG + h for r in range(world_size) if r != rank] for h in (0, 1)]
        self._ctrl[self._line + PID] = os.getpid()
        try:
            self._begin("init")
            self._wait_all("init")
            self._check_headers("init")
        finally:
            if rank == 0:  # everyone has attached (or given up): the name is no longer needed
                self._unlink()

    # --- rendezvous ---------------------------------------------------------------------------------------------

    def _create(
        self, piece_bytes: int, chunked_min_bytes: int, small_max_bytes: int
    ) -> tuple[shared_memory.SharedMemory, mmap.mmap, int]:
        size = self._ctrl_bytes + self.world_size * 2 * piece_bytes
        try:
            st = os.statvfs("/dev/shm")
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = size
        if free < size:  # touching pages beyond the tmpfs size kills the process with SIGBUS: refuse up front
            raise CollectiveError(
                f"shm: /dev/shm has {format_bytes(free)} free but the group needs {format_bytes(size)}: lower "
                "piece_bytes or enlarge /dev/shm (docker run --shm-size=1g)"
            )
        try:
            shm, mapping, fd = _open_segment(self.name, True, size, keep_fd=self.locked)
        except FileExistsError:
            raise CollectiveError(
                f"shm: segment {self.name!r} already exists: another group uses that name, or a crashed run left "
                f"/dev/shm/{self.name} behind (remove it, or choose another {ENV_SHM_NAME})"
            ) from None
        self._fd = fd
        ctrl = memoryview(mapping).cast("q")
        ctrl[G_WORLD], ctrl[G_PIECE] = self.world_size, piece_bytes
        ctrl[G_CHUNKED], ctrl[G_SMALL] = chunked_min_bytes, small_max_bytes
        self._release_store(ctrl, G_MAGIC, MAGIC)  # last: attaching ranks wait for it
        ctrl.release()
        return shm, mapping, fd

    def _attach(self) -> tuple[shared_memory.SharedMemory, mmap.mmap, int]:
        backoff = Backoff(self.timeout)
        while True:
            try:
                shm, mapping, fd = _open_segment(self.name, False, keep_fd=self.locked)
                ctrl = memoryview(mapping).cast("q")
                ready = ctrl[G_MAGIC] == MAGIC
                ctrl.release()
                if ready:
                    self._fd = fd
                    self._acquire()
                    return shm, mapping, fd
                mapping.close()
                if fd >= 0:
                    os.close(fd)
            except (FileNotFoundError, ValueError, TypeError):  # not there yet, or created but not yet sized
                pass
            if not backoff.pause():
                raise CollectiveTimeoutError(
                    f"shm rank {self.rank}: rank 0 did not create segment {self.name!r} within {self.timeout:g} s "
                    "(is rank 0 running, with the same segment name?)"
                )

    def _unlink(self) -> None:
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

    def close(self) -> None:
        """Unmap the segment. Idempotent; never waits for other ranks."""
        if getattr(self, "_map", None) is None:
            return
        self._views.clear()
        self._plans.clear()
        self._ctrl.release()
        if self.rank == 0:
            self._unlink()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(BufferError):  # a view still alive somewhere (a traceback's frame): unmapped with it
            self._map.close()
        self._map = None  # type: ignore[assignment]

    # --- memory ordering (see the module docstring) -------------------------------------------------------------

    def _lock(self) -> None:
        """Take the group lock (``locked`` ordering only) without ever blocking past the deadline."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        backoff = Backoff(self.timeout)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not backoff.pause():
                    self._broken = CollectiveTimeoutError(
                        f"shm #{self._seq} (rank {self.rank} of {self.world_size}): the segment lock stayed taken "
                        f"for {self.timeout:g} s (a rank stopped while holding it?); this group is unusable now"
                    )
                    raise self._broken from None

    def _release_store(self, ctrl: memoryview, index: int, value: int) -> None:
        """``ctrl[index] = value``, seen by others only after every earlier load and store of this rank."""
        if not self.locked:  # TSO: program order is the order others see
            ctrl[index] = value
            return
        self._lock()
        ctrl[index] = value
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self) -> None:
        """After seeing others' release stores: make this rank's later loads and stores come after them."""
        if self.locked:
            self._lock()
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # --- synchronization ----------------------------------------------------------------------------------------

    def _begin(
        self, kind: str, x: np.ndarray | None = None, op: str | None = None, count: int = 0, aux: int = 0
    ) -> int:
        if self._broken is not None:
            raise CollectiveTimeoutError(str(self._broken))
        if self._map is None:
            raise CollectiveError(f"shm: {kind} on a closed group")
        self._seq += 1
        parity = self._seq & 1
        base = self._hdr_at[parity]
        for i, w in enumerate(header(self._seq, kind, x, op, count, aux)):
            self._ctrl[base + i] = w
        self._ctrl[self._tag_at[parity]] = _NO_TAG
        self._tails[parity] = None
        return self._seq

    def _check_headers(self, kind: str, ignore_count: bool = False) -> None:
        base = HDR + (self._seq & 1) * HEADER_WORDS
        rows = [[self._ctrl[(r + 1) * LINE + base + i] for i in range(HEADER_WORDS)] for r in range(self.world_size)]
        verify_headers(f"shm {kind} #{self._seq}", self.rank, rows, ignore_count)

    def _wait_all(self, kind: str) -> None:
        """Arrive at the next round and wait for every rank (or fail: timeout, dead rank, another's abort)."""
        self._phase += 1
        target, ctrl = self._phase, self._ctrl
        self._release_store(ctrl, self._line + ARRIVE, target)
        for i in self._others_arrive:  # already there? (the common case when the others were first)
            if ctrl[i] < target:
                break
        else:
            self._acquire()
            return
        self._await(kind, target)

    def _await(self, kind: str, target: int) -> None:
        """Wait until every rank's arrival counter reaches ``target``: poll, then yield, then sleep."""
        ctrl = self._ctrl
        if self.spin_ns:
            spin_until = time.perf_counter_ns() + self.spin_ns
            while time.perf_counter_ns() < spin_until:  # poll without a syscall (see SPIN_US)
                for i in self._others_arrive:
                    if ctrl[i] < target:
                        break
                else:
                    self._acquire()
                    return
        backoff = Backoff(self.timeout)
        next_liveness = backoff.start + LIVENESS_EVERY_S
        while True:
            missing = [r for r, i in enumerate(self._arrive_at) if ctrl[i] < target]
            if not missing:
                self._acquire()
                return
            if ctrl[G_ABORT_RANK]:
                who, at = ctrl[G_ABORT_RANK] - 1, ctrl[G_ABORT_SEQ]
                self._fail(kind, missing, f"rank {who} gave up waiting for them in collective #{at}")
            if not backoff.pause():
                self._fail(kind, missing, f"no sign of them within the {self.timeout:g} s timeout")
            if time.monotonic() > next_liveness:
                next_liveness += LIVENESS_EVERY_S
                dead = [r for r in missing if not pid_alive(ctrl[(r + 1) * LINE + PID])]
                if dead:
                    pids = ", ".join(f"rank {r} (pid {ctrl[(r + 1) * LINE + PID]})" for r in dead)
                    self._fail(kind, missing, f"the process of {pids} has exited")

    def _fail(self, kind: str, missing: list[int], why: str) -> None:
        ctrl = self._ctrl
        if not ctrl[G_ABORT_RANK]:  # plain stores even where ordering is weak: they only feed the message
            ctrl[G_ABORT_SEQ] = self._seq
            ctrl[G_ABORT_RANK] = self.rank + 1
        ranks = ", ".join(map(str, missing))
        self._broken = CollectiveTimeoutError(
            f"shm {kind} #{self._seq} (rank {self.rank} of {self.world_size}): rank{'s' * (len(missing) > 1)} "
            f"{ranks} did not arrive: {why}; this group is unusable now"
        )
        raise self._broken

    # --- data ---------------------------------------------------------------------------------------------------

    def _slot(self, rank: int, half: int, dtype: np.dtype[Any]) -> np.ndarray:
        views = self._views.get(dtype)
        if views is None:
            count = self._piece // dtype.itemsize
            views = [
                [np.frombuffer(self._map, dtype, count, self._ctrl_bytes + (2 * r + h) * self._piece) for h in (0, 1)]
                for r in range(self.world_size)
            ]
            self._views[dtype] = views
        return views[rank][half]

    def _rounds(self, n: int, itemsize: int) -> range:
        """Element offsets of the pieces of an n-element buffer; one round even when n == 0 (headers travel)."""
        return range(0, max(n, 1), self._piece // itemsize)

    def _publish(
        self,
        kind: str,
        piece: np.ndarray | None,
        dtype: np.dtype[Any],
        first: bool,
        skip: tuple[int, int] | None = None,
        **hdr: Any,
    ) -> int:
        """Start a round: copy ``piece`` (but its ``skip`` range) into this rank's slot, meet everyone, check
        headers on the first round."""
        self._round += 1
        half = self._round & 1
        if piece is not None:
            slot = self._slot(self.rank, half, dtype)
            lo, hi = skip or (piece.size, piece.size)
            np.copyto(slot[:lo], piece[:lo])
            np.copyto(slot[hi : piece.size], piece[hi:])
        self._wait_all(kind)
        if first:
            self._check_headers(kind, **hdr)
        return half

    def allreduce(self, x: np.ndarray, op: str) -> None:
        if x.nbytes <= self._small_limit and self._broken is None and self._map is not None:
            self._allreduce_small(x if x.ndim == 1 else x.reshape(-1), op)
            return
        flat, dt, n = x.reshape(-1), x.dtype, self.world_size
        self._begin("allreduce", x, op, flat.size)
        if n == 1:
            return
        step = self._piece // dt.itemsize
        chunked = flat.nbytes >= self.chunked_min_bytes
        # The own slice may be read from private memory unless an in-place fold would overwrite it before its
        # turn (ranks >= 2 when the dtype is its own accumulator).
        private = self.rank < 2 or dtypes.accumulator(dt) != dt
        for a in self._rounds(flat.size, dt.itemsize):
            b = min(a + step, flat.size)
            if not chunked:
                half = self._publish("allreduce", flat[a:b], dt, a == 0)
                parts = [self._slot(r, half, dt)[: b - a] for r in range(n)]
                reduce_into(flat[a:b], parts, op, self._scratch(b - a))
                continue
            bounds = np.cumsum([0, *even_sizes(b - a, n)]).tolist()
            lo, hi = bounds[self.rank], bounds[self.rank + 1]
            half = self._publish("allreduce", flat[a:b], dt, a == 0, skip=(lo, hi) if private else None)
            parts = [self._slot(r, half, dt)[: b - a] for r in range(n)]
            if private:
                parts[self.rank] = flat[a:b]
            mine = flat[a + lo : a + hi]
            reduce_into(mine, [p[lo:hi] for p in parts], op, self._scratch(hi - lo))
            np.copyto(self._slot(self.rank, half, dt)[lo:hi], mine)  # publish the reduced slice
            self._wait_all("allreduce")
            for r in range(n):
                if r != self.rank:
                    np.copyto(flat[a + bounds[r] : a + bounds[r + 1]], parts[r][bounds[r] : bounds[r + 1]])

    def _allreduce_small(self, flat: np.ndarray, op: str) -> None:
        """One round, one arrival; no allocation, no header building (see the module docstring)."""
        plan = self._plans.get(flat, op)
        ctrl = self._ctrl
        seq = self._seq = self._seq + 1
        parity = seq & 1
        self._round += 1
        half = self._round & 1
        plan.mine[half][...] = flat  # (cheaper than np.copyto's dispatch)
        base = self._hdr_at[parity]
        ctrl[base] = seq
        if self._tails[parity] is not plan.tail:  # the same collective as two calls ago: those words are there
            for i, w in enumerate(plan.tail, 1):
                ctrl[base + i] = w
            self._tails[parity] = plan.tail
        tag = ((seq & 0x7FFF_FFFF) << 32) | plan.code
        ctrl[self._tag_at[parity]] = tag
        if self.locked:
            self._wait_all("allreduce")
        else:  # _wait_all, inlined: this is the whole latency of a small allreduce
            target = self._phase = self._phase + 1
            ctrl[self._line + ARRIVE] = target
            for i in self._others_arrive:
                if ctrl[i] < target:
                    self._await("allreduce", target)
                    break
        for i in self._others_tag[parity]:
            if ctrl[i] != tag:  # another rank is elsewhere, or passes other arguments: the full check names it
                self._check_headers("allreduce")
                break
        parts, combine = plan.parts[half], plan.combine
        if not plan.widen:  # rank order, in place; no part aliases flat
            combine(parts[0], parts[1], out=flat)
            for p in parts[2:]:
                combine(flat, p, out=flat)
            return
        acc, tmp = plan.acc, plan.tmp
        np.copyto(acc, parts[0], casting="unsafe")
        for p in parts[1:]:
            np.copyto(tmp, p, casting="unsafe")
            combine(acc, tmp, out=acc)
        np.copyto(flat, acc, casting="unsafe")  # the one rounding

    def reduce_scatter(self, x: np.ndarray, sizes: Sequence[int], op: str) -> np.ndarray:
        flat, dt = x.reshape(-1), x.dtype
        row = math.prod(x.shape[1:])
        self._begin("reduce_scatter", x, op, flat.size, checksum(x.shape[1:], tuple(sizes)))
        starts = np.cumsum([0, *sizes]) * row
        ra, rb = int(starts[self.rank]), int(starts[self.rank + 1])
        result = np.empty((sizes[self.rank], *x.shape[1:]), dt)
        if self.world_size == 1:
            np.copyto(result, x)
            return result
        rflat, step = result.reshape(-1), self._piece // dt.itemsize
        for a in self._rounds(flat.size, dt.itemsize):
            b = min(a + step, flat.size)
            half = self._publish("reduce_scatter", flat[a:b], dt, a == 0)
            lo, hi = max(a, ra), min(b, rb)
            if hi > lo:
                parts = [self._slot(r, half, dt)[lo - a : hi - a] for r in range(self.world_size)]
                reduce_into(rflat[lo - ra : hi - ra], parts, op, self._scratch(hi - lo))
        return result

    def allgather(self, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        flat, dt, trailing = x.reshape(-1), x.dtype, x.shape[1:]
        self._begin("allgather", x, None, x.shape[0], checksum(trailing))
        step = self._piece // dt.itemsize
        half = self._publish("allgather", flat[:step], dt, True, ignore_count=True)
        rows = [
            int(self._ctrl[(r + 1) * LINE + HDR + (self._seq & 1) * HEADER_WORDS + 4]) for r in range(self.world_size)
        ]
        want = (sum(rows), *trailing)
        target = gather_target(out, want, dt)
        tflat, row = target.reshape(-1), math.prod(trailing)
        offsets = np.cumsum([0, *rows]) * row
        counts = [r * row for r in rows]
        for a in range(0, max(max(counts), 1), step):
            if a:
                half = self._publish("allgather", flat[a : a + step], dt, False)
            for r, c in enumerate(counts):
                if c > a:
                    b = min(a + step, c)
                    np.copyto(tflat[offsets[r] + a : offsets[r] + b], self._slot(r, half, dt)[: b - a])
        refuse_out(f"shm allgather #{self._seq} (rank {self.rank})", out, target)
        return target

    def broadcast(self, x: np.ndarray, root: int) -> None:
        flat, dt = x.reshape(-1), x.dtype
        self._begin("broadcast", x, None, flat.size, root)
        if self.world_size == 1:
            return
        step = self._piece // dt.itemsize
        for a in self._rounds(flat.size, dt.itemsize):
            b = min(a + step, flat.size)
            half = self._publish("broadcast", flat[a:b] if self.rank == root else None, dt, a == 0)
            if self.rank != root:
                np.copyto(flat[a:b], self._slot(root, half, dt)[: b - a])

    def barrier(self) -> None:
        self._begin("barrier")
        self._wait_all("barrier")
        self._check_headers("barrier")


class ShmCommunicator(ProcessGroupCommunicator):
    """Processes of one host over shared memory (see the module docstring). One device per process.

    Options: ``rank``, ``world_size`` (default: ``TENSORWEAVE_RANK``/``TENSORWEAVE_WORLD_SIZE``), ``shm_name``
    (default ``TENSORWEAVE_SHM_NAME``), ``timeout`` seconds (default ``TENSORWEAVE_TIMEOUT`` or 300),
    ``piece_bytes``, ``chunked_min_bytes``, ``small_max_bytes``, ``spin_us``, ``ordering`` (auto, tso, lock),
    ``stage_bytes``.
    """

    name = "shm"

    def __init__(
        self,
        devices: Sequence[Device],
        rank: int | None = None,
        world_size: int | None = None,
        shm_name: str | None = None,
        timeout: float | str | None = None,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        chunked_min_bytes: int = CHUNKED_MIN_BYTES,
        small_max_bytes: int = SMALL_MAX_BYTES,
        spin_us: float = SPIN_US,
        ordering: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__(devices, **options)
        r, w, t = self.rank_options("shm", rank, world_size, timeout)
        segment = shm_name or os.environ.get(ENV_SHM_NAME)
        if not segment:
            raise CollectiveError(
                f"shm: no rendezvous name: pass shm_name= or set {ENV_SHM_NAME} (`tensorweave launch` sets it)"
            )
        group = ShmGroup(
            segment, r, w, t, int(piece_bytes), int(chunked_min_bytes), int(small_max_bytes), float(spin_us), ordering
        )
        self._join(group)


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(ShmCommunicator)

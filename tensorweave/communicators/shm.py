"""shm: collectives between the processes of one host through one POSIX shared-memory segment.

Rendezvous: every rank names the same segment (option ``shm_name``, env ``TENSORWEAVE_SHM_NAME``; ``tensorweave
launch`` sets it). Rank 0 creates it, the others attach, and once all have arrived rank 0 unlinks the name, so a
crash can never leak it. Layout: a control block (per rank, on a cache line of its own: an arrival counter, its
pid and a double-buffered collective header) followed by two *pieces* per rank (``piece_bytes``, default 4 MiB).

A collective moves data in rounds of one piece: each rank copies its piece into its own slot and arrives at a
barrier, then reads what it needs from the others' slots:

- allreduce, small buffers: each rank reduces the whole piece itself in rank order (one barrier per round);
  large buffers (``chunked_min_bytes``, 256 KiB): each rank publishes only the slices the others reduce, reduces
  its own 1/n slice (its own part read from private memory) straight into its buffer, publishes the result and,
  after a second barrier, copies the others' reduced slices: ~3 buffer sizes of memory traffic instead of 5;
- reduce_scatter: each rank reduces only the rows it keeps; allgather and broadcast: plain copies.

Rounds alternate between a rank's two slots, so a round's data stays valid until every rank has passed the next
round's barrier: one barrier per round suffices. Guarantee: reductions run in rank order 0..n-1 in the
accumulator dtype (float32 for 16-bit floats) and round once, exactly like the ``local`` communicator, so every
result is bitwise identical to ``local``'s for every dtype, op and world size.

Waiting spins for ~20 us, then yields, then sleeps with growing pauses (never a pure spin: CI runs 2+ ranks on
2 cores). Every wait has a deadline (option ``timeout``, env ``TENSORWEAVE_TIMEOUT``, default 300 s) and also
notices a waited-for rank whose process has died; the first rank to give up marks the segment aborted, and every
surviving rank raises CollectiveTimeoutError naming the ranks that did not arrive and the collective's number.
After that the group is unusable (each later call raises the same error): open a new one.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.communicator import Communicator, even_sizes
from ..core.device import Device
from ..core.hookspecs import hookimpl
from ..core.spmd import ENV_SHM_NAME
from ..errors import CollectiveError, CollectiveTimeoutError, format_bytes
from ._process import (
    HEADER_WORDS,
    Backoff,
    ProcessGroupCommunicator,
    Scratch,
    checksum,
    header,
    pid_alive,
    reduce_into,
    verify_headers,
)

DEFAULT_PIECE_BYTES = 4 << 20
CHUNKED_MIN_BYTES = 256 << 10  # buffers at least this large: each rank reduces 1/n (see the module docstring)
MAGIC = 0x7477_7368_6D01  # "twshm", layout 1
LINE = 16  # int64 words per control line: 128 bytes, so ranks never write the same cache line
G_MAGIC, G_WORLD, G_PIECE, G_ABORT_RANK, G_ABORT_SEQ = 0, 1, 2, 3, 4  # line 0: the group
ARRIVE, PID, HDR = 0, 1, 2  # line r + 1: rank r (HDR: two headers of HEADER_WORDS, by sequence parity)
LIVENESS_EVERY_S = 0.05

_fence_lock = threading.Lock()


def fence() -> None:
    """Keep earlier stores before later ones (and later loads after earlier ones) as other processes see them.

    x86 does so anyway; on weaker memory models the lock's atomic instructions are the barrier.
    """
    with _fence_lock:
        pass


def _open_segment(name: str, create: bool, size: int = 0) -> tuple[shared_memory.SharedMemory, mmap.mmap]:
    """Create or attach ``name`` and map it with a mapping of our own.

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
        return shm, mmap.mmap(shm._fd, shm.size)  # type: ignore[attr-defined]
    finally:
        shm.close()


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
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name):
            raise CollectiveError(f"shm: segment name {name!r} must be 1-200 letters, digits, '.', '_' or '-'")
        if piece_bytes < 4096 or piece_bytes % 4096:
            raise CollectiveError(f"shm: piece_bytes must be a positive multiple of 4096, got {piece_bytes}")
        self.name, self.rank, self.world_size, self.timeout = name, rank, world_size, timeout
        self.chunked_min_bytes = chunked_min_bytes
        self._ctrl_bytes = math.ceil((world_size + 1) * LINE * 8 / 4096) * 4096
        self._seq = 0  # collectives started
        self._phase = 0  # barriers passed
        self._round = 0  # data rounds: their parity picks the slot half
        self._broken: CollectiveTimeoutError | None = None
        self._views: dict[np.dtype[Any], list[list[np.ndarray]]] = {}
        self._scratch = Scratch()
        self._unlinked = False
        self._shm, self._map = self._create(piece_bytes) if rank == 0 else self._attach()
        self._ctrl = memoryview(self._map).cast("q")
        self._piece = int(self._ctrl[G_PIECE])
        if self._ctrl[G_WORLD] != world_size:
            self.close()
            raise CollectiveError(
                f"shm: segment {name!r} was created for {self._ctrl[G_WORLD]} ranks, but this rank was told "
                f"world_size={world_size}"
            )
        self._line = (rank + 1) * LINE
        self._arrive_at = [(r + 1) * LINE + ARRIVE for r in range(world_size)]
        self._ctrl[self._line + PID] = os.getpid()
        try:
            self._begin("init")
            self._wait_all("init")
            self._check_headers("init")
        finally:
            if rank == 0:  # everyone has attached (or given up): the name is no longer needed
                self._unlink()

    # --- rendezvous ---------------------------------------------------------------------------------------------

    def _create(self, piece_bytes: int) -> tuple[shared_memory.SharedMemory, mmap.mmap]:
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
            shm, mapping = _open_segment(self.name, True, size)
        except FileExistsError:
            raise CollectiveError(
                f"shm: segment {self.name!r} already exists: another group uses that name, or a crashed run left "
                f"/dev/shm/{self.name} behind (remove it, or choose another {ENV_SHM_NAME})"
            ) from None
        ctrl = memoryview(mapping).cast("q")
        ctrl[G_WORLD], ctrl[G_PIECE] = self.world_size, piece_bytes
        fence()
        ctrl[G_MAGIC] = MAGIC  # last: attaching ranks wait for it
        ctrl.release()
        return shm, mapping

    def _attach(self) -> tuple[shared_memory.SharedMemory, mmap.mmap]:
        backoff = Backoff(self.timeout)
        while True:
            try:
                shm, mapping = _open_segment(self.name, False)
                ctrl = memoryview(mapping).cast("q")
                ready = ctrl[G_MAGIC] == MAGIC
                ctrl.release()
                if ready:
                    fence()
                    return shm, mapping
                mapping.close()
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
        self._ctrl.release()
        if self.rank == 0:
            self._unlink()
        with contextlib.suppress(BufferError):  # a view still alive somewhere (a traceback's frame): unmapped with it
            self._map.close()
        self._map = None  # type: ignore[assignment]

    # --- synchronization ----------------------------------------------------------------------------------------

    def _begin(
        self, kind: str, x: np.ndarray | None = None, op: str | None = None, count: int = 0, aux: int = 0
    ) -> int:
        if self._broken is not None:
            raise CollectiveTimeoutError(str(self._broken))
        if self._map is None:
            raise CollectiveError(f"shm: {kind} on a closed group")
        self._seq += 1
        base = self._line + HDR + (self._seq & 1) * HEADER_WORDS
        for i, w in enumerate(header(self._seq, kind, x, op, count, aux)):
            self._ctrl[base + i] = w
        return self._seq

    def _check_headers(self, kind: str, ignore_count: bool = False) -> None:
        base = HDR + (self._seq & 1) * HEADER_WORDS
        rows = [[self._ctrl[(r + 1) * LINE + base + i] for i in range(HEADER_WORDS)] for r in range(self.world_size)]
        verify_headers(f"shm {kind} #{self._seq}", self.rank, rows, ignore_count)

    def _wait_all(self, kind: str) -> None:
        """Arrive at the next barrier and wait for every rank (or fail: timeout, dead rank, another's abort)."""
        self._phase += 1
        target, ctrl = self._phase, self._ctrl
        fence()
        ctrl[self._line + ARRIVE] = target
        backoff: Backoff | None = None
        next_liveness = 0.0
        while True:
            missing = [r for r, i in enumerate(self._arrive_at) if ctrl[i] < target]
            if not missing:
                fence()
                return
            if ctrl[G_ABORT_RANK]:
                who, at = ctrl[G_ABORT_RANK] - 1, ctrl[G_ABORT_SEQ]
                self._fail(kind, missing, f"rank {who} gave up waiting for them in collective #{at}")
            if backoff is None:
                backoff = Backoff(self.timeout)
                next_liveness = backoff.start + LIVENESS_EVERY_S
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
        if not ctrl[G_ABORT_RANK]:
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
        target = out if out is not None and out.shape == want and out.dtype == dt else np.empty(want, dt)
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
        if out is not None and target is not out:
            raise CollectiveError(
                f"shm allgather #{self._seq} (rank {self.rank}): out has shape {out.shape} {out.dtype.name}, "
                f"expected {want} {dt.name}"
            )
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
    ``piece_bytes``, ``chunked_min_bytes``, ``stage_bytes``.
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
        **options: Any,
    ) -> None:
        super().__init__(devices, **options)
        r, w, t = self.rank_options("shm", rank, world_size, timeout)
        segment = shm_name or os.environ.get(ENV_SHM_NAME)
        if not segment:
            raise CollectiveError(
                f"shm: no rendezvous name: pass shm_name= or set {ENV_SHM_NAME} (`tensorweave launch` sets it)"
            )
        self._join(ShmGroup(segment, r, w, t, int(piece_bytes), int(chunked_min_bytes)))


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(ShmCommunicator)

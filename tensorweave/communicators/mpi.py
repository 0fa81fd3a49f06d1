"""mpi: collectives over MPI through mpi4py; one process per rank, rank and size from the MPI world.

Install with ``pip install 'tensorweave[mpi]'`` (mpi4py and the MPICH wheel: a working ``mpiexec`` with pip alone)
and start the ranks with ``mpiexec -n N ...``. mpi4py is imported when the communicator is opened, never at
plugin load, so ``tensorweave plugins`` works without it.

Algorithms (option ``algorithm``):

- ``"ordered"`` (default): allreduce = alltoallv of 1/n slices + a reduction in rank order 0..n-1 in the
  accumulator dtype (float32 for 16-bit floats, rounded once) + allgatherv; reduce_scatter is its first half.
  Guarantee: results are bitwise identical to the ``local`` communicator's for every dtype, op and world size,
  and the same on every rank. Data travels as bytes, so bfloat16 needs no MPI type.
- ``"native"``: MPI_Iallreduce with MPI's own algorithms. float32/float64/int32 use MPI types; float16 and bfloat16
  (MPI has neither) travel as uint16 with a user-defined op that widens to float32, combines, and rounds back,
  so a 16-bit sum is rounded at each of MPI's combining steps: within tolerance of ``local``, not bitwise.

Small allreduces (``"ordered"``, at most ``SMALL_MAX_BYTES``, 64 KiB) take one round trip instead of three: each
rank sends its header and its whole buffer to every other rank point to point (one message per peer, into receive
buffers allocated once), then every rank reduces all of them itself, in rank order in the accumulator dtype: the
same operations as ``local``, so still bitwise identical. Send buffers, header words and views are precomputed
per (dtype, op, size), so the hot path allocates nothing and checks each peer's header with one bytes comparison.

Every collective first exchanges a small header (sequence number, kind, dtype, count; option ``validate``), so
ranks calling mismatched collectives get one CollectiveError each instead of MPI undefined behaviour. The header
travels by the same point-to-point messages as the small allreduce's (receives sized for the largest small
message), so a rank on the small path and one on the general path still meet, and fail with that error. All calls
are nonblocking and polled (spin, yield, then sleep with backoff) against the timeout (option ``timeout``, env
``TENSORWEAVE_TIMEOUT``, default 300 s). On timeout the survivors exchange point-to-point messages on a private
communicator for a grace period: ranks that do not answer are named as not arrived, ranks stuck in another
collective are named with it, and each survivor raises CollectiveTimeoutError. MPI cannot cancel a started
collective, so the MPI world is unusable afterwards, and an ordinary exit would hang in MPI_Finalize waiting for
the missing rank (``mpiexec`` would sit there until a stopped rank is continued). So a timeout also arms an exit
hook (option ``abort``, default True): when the process exits, whatever the program did with the error, it writes
the error line to stderr and calls ``MPI.COMM_WORLD.Abort``, which makes ``mpiexec`` end every rank of the job,
the stopped one included.
"""

from __future__ import annotations

import atexit
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..core import dtypes
from ..core.communicator import REDUCE_OPS, Communicator, even_sizes
from ..core.device import Device
from ..core.hookspecs import hookimpl
from ..core.spmd import timeout_from
from ..errors import BackendUnavailableError, CollectiveError, CollectiveTimeoutError, CommunicationLibraryError
from ._process import (
    HEADER_WORDS,
    KINDS,
    Backoff,
    PlanCache,
    ProcessGroupCommunicator,
    Scratch,
    checksum,
    gather_target,
    header,
    reduce_into,
    refuse_out,
    verify_headers,
)

ALGORITHMS = ("ordered", "native")
# MPI progresses only while polled (a 64 MiB message moves in many small cells, each needing a poll on both
# sides), so keep polling with yields for 50 ms plus the time the bytes take at a slow 200 MB/s before sleeping.
MPI_YIELD_S = 0.05
MPI_YIELD_BYTES_PER_S = 2e8
DIAG_TAG = 0x7477  # tag of the timeout diagnosis messages (on a communicator of their own)
EXCHANGE_TAG = 0x7478  # tag of the header (+ small payload) messages, on the group's private communicator
SMALL_MAX_BYTES = 64 << 10  # ordered allreduces of at most this many bytes: one exchange (see the module doc)
# (measured on 2 ranks, 4 KiB: header Iallgather 13 us + Ialltoallv 30 us + Iallgatherv ~35 us, against one
# Isend/Irecv pair at 6 us; all-to-all of whole buffers moves n-1 times more bytes, cheap while messages are small)
HEADER_BYTES = HEADER_WORDS * 8
MAX_PLANS = 256  # small-allreduce plans kept (one per dtype, op, size); cleared when full
NATIVE_TYPES = {"float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T"}
NATIVE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
ABORT_CODE = 70  # exit status MPI_Abort asks mpiexec for after a collective timeout (EX_SOFTWARE)
_abort_armed: list[CollectiveTimeoutError] = []  # the first timeout of this process, once its exit hook is armed


def abort_at_exit(MPI: Any, error: CollectiveTimeoutError, linger: float) -> None:
    """Arm (once per process) an exit hook that reports ``error`` and aborts the MPI job: after a collective
    timed out, MPI_Finalize would wait forever for the rank that never came. Registered after mpi4py's own
    finalizer, so it runs first (atexit is last in, first out). It lingers ``linger`` seconds first: the other
    survivors time out at about the same moment, and the abort kills them, so they get that long to report."""
    if _abort_armed:
        return
    _abort_armed.append(error)

    def abort() -> None:
        sys.stdout.flush()
        print(f"tensorweave: {error}; aborting the MPI job", file=sys.stderr, flush=True)
        time.sleep(linger)
        MPI.COMM_WORLD.Abort(ABORT_CODE)

    atexit.register(abort)


def import_mpi() -> Any:
    """mpi4py's MPI module (initializing MPI), or BackendUnavailableError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise BackendUnavailableError(
            f"the mpi communicator needs mpi4py and an MPI library ({e}): pip install 'tensorweave[mpi]'"
        ) from None
    return MPI


class _SmallPlan:
    """What a small allreduce of one (dtype, op, size) needs, computed once (see the module docstring)."""

    __slots__ = ("acc", "combine", "mine", "parts", "peer_headers", "send", "widen", "words")

    def __init__(self, group: MpiGroup, dt: np.dtype[Any], op: str, n: int) -> None:
        nbytes = n * dt.itemsize
        self.send = np.empty(HEADER_BYTES + nbytes, np.uint8)
        self.words = self.send[:HEADER_BYTES].view(np.int64)  # word 0, the sequence number, is set per call
        self.words[:] = header(0, "allreduce", np.empty(0, dt), op, n)
        self.mine = self.send[HEADER_BYTES:].view(dt)  # a copy of the input: no part aliases the output
        self.parts = [
            self.mine if r == group.rank else group._recv[r][HEADER_BYTES : HEADER_BYTES + nbytes].view(dt)
            for r in range(group.world_size)
        ]
        self.peer_headers = [group._recv[r][:HEADER_BYTES] for r in group._peers]
        self.combine = getattr(np, REDUCE_OPS[op])
        self.widen = dtypes.accumulator(dt) != dt
        self.acc = (np.empty(n, np.float32), np.empty(n, np.float32)) if self.widen else None


class MpiGroup:
    """Collectives over host numpy arrays between the ranks of an MPI communicator (see the module doc)."""

    def __init__(
        self, comm: Any, timeout: float, algorithm: str = "ordered", validate: bool = True, abort: bool = True
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise CollectiveError(f"mpi: algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
        self.MPI = MPI = import_mpi()
        base = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = int(base.Get_rank()), int(base.Get_size())
        self.timeout, self.algorithm, self.validate, self.abort = timeout, algorithm, validate, abort
        self._seq = 0
        self._kind = "init"
        self._broken: CollectiveTimeoutError | None = None
        self._scratch = Scratch()
        self._ops: dict[tuple[str, str], Any] = {}
        self._plans = PlanCache(lambda dt, op, n: _SmallPlan(self, dt, op, n), MAX_PLANS)
        self._peers = [p for p in range(self.world_size) if p != self.rank]
        # One receive buffer per peer, large enough for a header plus the largest small payload.
        self._recv = {p: np.empty(HEADER_BYTES + SMALL_MAX_BYTES, np.uint8) for p in self._peers}
        self._recv_specs = [(p, [self._recv[p], MPI.BYTE]) for p in self._peers]
        self._header = np.empty(HEADER_WORDS, np.int64)
        self._header_spec = [self._header, MPI.BYTE]
        with self._mpi_errors():
            # Private contexts, so our messages never match the program's; Idup so a missing rank cannot hang us.
            self.comm, req = base.Idup()
            self._wait([req])
            self.diag, req = base.Idup()
            self._wait([req])
        self._seq = 1  # like shm, creating the group is collective #1

    def close(self) -> None:
        for op in self._ops.values():
            op.Free()
        self._ops.clear()
        if self._broken is None:  # freeing a communicator with a collective still pending is not allowed
            for c in ("comm", "diag"):
                if getattr(self, c, None) is not None:
                    getattr(self, c).Free()
                    setattr(self, c, None)

    # --- plumbing -----------------------------------------------------------------------------------------------

    @contextmanager
    def _mpi_errors(self) -> Iterator[None]:
        try:
            yield
        except self.MPI.Exception as e:
            raise CommunicationLibraryError(
                f"mpi {self._kind} #{self._seq} (rank {self.rank}): MPI error: {e.Get_error_string()}; check every "
                "rank's output for the first failure, and that all ranks run the same program"
            ) from None

    def _wait(self, reqs: list[Any], nbytes: int = 0) -> None:
        test = self.MPI.Request.Testall
        if test(reqs):
            return
        backoff = Backoff(self.timeout, yield_s=MPI_YIELD_S + nbytes / MPI_YIELD_BYTES_PER_S)
        while not test(reqs):
            if not backoff.pause():
                self._diagnose()

    def _begin(
        self,
        kind: str,
        x: np.ndarray | None = None,
        op: str | None = None,
        count: int = 0,
        aux: int = 0,
        always: bool = False,
    ) -> np.ndarray | None:
        """Start a collective: exchange and check headers (``always``: also when validate is off). All headers."""
        if self._broken is not None:
            raise CollectiveTimeoutError(str(self._broken))
        if self.comm is None:
            raise CollectiveError(f"mpi: {kind} on a closed communicator")
        self._seq += 1
        self._kind = kind
        if not (self.validate or always) or (self.world_size == 1 and not always):
            return None
        self._header[:] = header(self._seq, kind, x, op, count, aux)
        self._exchange(self._header_spec)
        rows = self._header_rows(self._header)
        verify_headers(f"mpi {kind} #{self._seq}", self.rank, rows.tolist(), ignore_count=kind == "allgather")
        return rows

    def _exchange(self, send: list[Any], nbytes: int = 0) -> None:
        """Send ``send`` to every other rank and receive each one's message into its receive buffer."""
        comm = self.comm
        with self._mpi_errors():
            reqs = [comm.Irecv(spec, source=p, tag=EXCHANGE_TAG) for p, spec in self._recv_specs]
            reqs += [comm.Isend(send, dest=p, tag=EXCHANGE_TAG) for p in self._peers]
            self._wait(reqs, nbytes)

    def _header_rows(self, mine: np.ndarray) -> np.ndarray:
        """Every rank's header words, in rank order, after an exchange (``mine``: this rank's)."""
        rows = np.empty((self.world_size, HEADER_WORDS), np.int64)
        rows[self.rank] = mine
        for p in self._peers:
            rows[p] = self._recv[p][:HEADER_BYTES].view(np.int64)
        return rows

    def _diagnose(self) -> None:
        """After a timeout: ask every rank where it is, name those that do not answer, raise."""
        MPI, me, n = self.MPI, self.rank, self.world_size
        grace = min(max(0.5, self.timeout / 10), 10.0)
        msg = np.array([self._seq, KINDS.index(self._kind)], np.int64)
        peers = [p for p in range(n) if p != me]
        answers = {p: np.full(2, -1, np.int64) for p in peers}
        sends = [self.diag.Isend([msg, MPI.INT64_T], dest=p, tag=DIAG_TAG) for p in peers]
        recvs = {p: self.diag.Irecv([answers[p], MPI.INT64_T], source=p, tag=DIAG_TAG) for p in peers}
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not MPI.Request.Testall(list(recvs.values())):
            time.sleep(1e-3)
        done = {p for p, r in recvs.items() if r.Test()}
        for p, r in recvs.items():
            if p not in done:
                r.Cancel()
        del sends  # to ranks that never answer they stay pending; the world is broken anyway
        missing = [p for p in peers if p not in done]
        elsewhere = [
            f"rank {p} is in {KINDS[int(answers[p][1])]} #{int(answers[p][0])}"
            for p in sorted(done)
            if int(answers[p][0]) != self._seq or KINDS[int(answers[p][1])] != self._kind
        ]
        if missing:
            who = f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}"
            why = f"{who} did not arrive (no answer in {grace:g} s)"
        else:
            why = "every rank answered, so MPI itself is stuck (network or MPI library problem)"
        self._broken = CollectiveTimeoutError(
            f"mpi {self._kind} #{self._seq} (rank {me} of {n}): timed out after {self.timeout:g} s: {why}"
            + (f"; {'; '.join(elsewhere)}" if elsewhere else "")
            + (
                "; the MPI world is unusable now: the job is aborted when this process exits"
                if self.abort
                else "; the MPI world is unusable now: exit, or call MPI.COMM_WORLD.Abort()"
            )
        )
        if self.abort:
            abort_at_exit(MPI, self._broken, linger=grace + 1.0)
        raise self._broken

    def _bytes(self, x: np.ndarray) -> list[Any]:
        return [x.reshape(-1).view(np.uint8), self.MPI.BYTE]

    # --- collectives --------------------------------------------------------------------------------------------

    def _scatter_reduce(self, flat: np.ndarray, counts: Sequence[int], op: str, out: np.ndarray) -> None:
        """Rank r receives slice r of every rank's ``flat`` (sizes ``counts``) and reduces them in rank order."""
        n, me, isz = self.world_size, self.rank, flat.dtype.itemsize
        starts = np.cumsum([0, *counts]).tolist()
        recv = np.empty((n, counts[me]), flat.dtype)
        send_spec = ([c * isz for c in counts], [s * isz for s in starts[:-1]])
        recv_spec = ([counts[me] * isz] * n, [i * counts[me] * isz for i in range(n)])
        with self._mpi_errors():
            self._wait(
                [
                    self.comm.Ialltoallv(
                        [flat.view(np.uint8), send_spec, self.MPI.BYTE], [recv.view(np.uint8), recv_spec, self.MPI.BYTE]
                    )
                ],
                flat.nbytes,
            )
        reduce_into(out, list(recv), op, self._scratch(counts[me]))

    def allreduce(self, x: np.ndarray, op: str) -> None:
        flat = x.reshape(-1)
        if (
            x.nbytes <= SMALL_MAX_BYTES
            and self.algorithm == "ordered"
            and self.world_size > 1
            and self._broken is None
            and self.comm is not None
        ):
            self._allreduce_small(flat, op)
            return
        self._begin("allreduce", x, op, flat.size)
        if self.world_size == 1:
            return
        if self.algorithm == "native":
            self._native_allreduce(flat, op)
            return
        counts = even_sizes(flat.size, self.world_size)
        starts = np.cumsum([0, *counts]).tolist()
        mine = flat[starts[self.rank] : starts[self.rank + 1]]
        self._scatter_reduce(flat, counts, op, mine)
        isz = flat.dtype.itemsize
        spec = ([c * isz for c in counts], [s * isz for s in starts[:-1]])
        with self._mpi_errors():
            self._wait(
                [self.comm.Iallgatherv(self.MPI.IN_PLACE, [flat.view(np.uint8), spec, self.MPI.BYTE])], flat.nbytes
            )

    def _allreduce_small(self, flat: np.ndarray, op: str) -> None:
        """One exchange of header + buffer, then a reduction in rank order (see the module docstring)."""
        plan = self._plans.get(flat, op)
        seq = self._seq = self._seq + 1
        self._kind = "allreduce"
        plan.words[0] = seq
        plan.mine[...] = flat
        self._exchange([plan.send, self.MPI.BYTE], plan.send.nbytes)
        mine = plan.send[:HEADER_BYTES].tobytes()
        for h in plan.peer_headers:
            if h.tobytes() != mine:  # another rank is elsewhere, or passes other arguments: name it, everywhere
                verify_headers(f"mpi allreduce #{seq}", self.rank, self._header_rows(plan.words).tolist())
        parts, combine = plan.parts, plan.combine
        if plan.acc is None:  # rank order, in place; no part aliases flat
            combine(parts[0], parts[1], out=flat)
            for p in parts[2:]:
                combine(flat, p, out=flat)
            return
        acc, tmp = plan.acc
        np.copyto(acc, parts[0], casting="unsafe")
        for p in parts[1:]:
            np.copyto(tmp, p, casting="unsafe")
            combine(acc, tmp, out=acc)
        np.copyto(flat, acc, casting="unsafe")  # the one rounding

    def _native_allreduce(self, flat: np.ndarray, op: str) -> None:
        MPI, name = self.MPI, dtypes.name(flat.dtype)
        if name in NATIVE_TYPES:
            buf, mpi_op = [flat, getattr(MPI, NATIVE_TYPES[name])], getattr(MPI, NATIVE_OPS[op])
        else:
            buf, mpi_op = [flat.view(np.uint16), MPI.UINT16_T], self._user_op(flat.dtype, op)
        with self._mpi_errors():
            self._wait([self.comm.Iallreduce(MPI.IN_PLACE, buf, mpi_op)], flat.nbytes)

    def _user_op(self, dtype: np.dtype[Any], op: str) -> Any:
        """An MPI op over uint16 buffers holding ``dtype`` (float16/bfloat16): widen, combine, round back."""
        key = (dtypes.name(dtype), op)
        if key not in self._ops:
            combine = getattr(np, REDUCE_OPS[op])

            def fn(inbuf: Any, inoutbuf: Any, _datatype: Any) -> None:
                a = np.frombuffer(inbuf, np.uint16).view(dtype)
                b = np.frombuffer(inoutbuf, np.uint16).view(dtype)
                b[...] = combine(a.astype(np.float32), b.astype(np.float32))

            self._ops[key] = self.MPI.Op.Create(fn, commute=True)
        return self._ops[key]

    def reduce_scatter(self, x: np.ndarray, sizes: Sequence[int], op: str) -> np.ndarray:
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        self._begin("reduce_scatter", x, op, x.size, checksum(x.shape[1:], tuple(sizes)))
        result = np.empty((sizes[self.rank], *x.shape[1:]), x.dtype)
        if self.world_size == 1:
            np.copyto(result, x)
            return result
        self._scatter_reduce(x.reshape(-1), [s * row for s in sizes], op, result.reshape(-1))
        return result

    def allgather(self, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        trailing = x.shape[1:]
        headers = self._begin("allgather", x, None, x.shape[0], checksum(trailing), always=True)
        assert headers is not None
        rows = headers[:, 4].tolist()
        want = (sum(rows), *trailing)
        target = gather_target(out, want, x.dtype)
        row_bytes = int(np.prod(trailing, dtype=np.int64)) * x.dtype.itemsize
        starts = np.cumsum([0, *rows]).tolist()
        spec = ([r * row_bytes for r in rows], [s * row_bytes for s in starts[:-1]])
        with self._mpi_errors():
            self._wait(
                [self.comm.Iallgatherv(self._bytes(x), [target.reshape(-1).view(np.uint8), spec, self.MPI.BYTE])],
                target.nbytes,
            )
        refuse_out(f"mpi allgather #{self._seq} (rank {self.rank})", out, target)
        return target

    def broadcast(self, x: np.ndarray, root: int) -> None:
        self._begin("broadcast", x, None, x.size, root)
        if self.world_size > 1:
            with self._mpi_errors():
                self._wait([self.comm.Ibcast(self._bytes(x), root=root)], x.nbytes)

    def barrier(self) -> None:
        self._begin("barrier")
        with self._mpi_errors():
            self._wait([self.comm.Ibarrier()])


class MpiCommunicator(ProcessGroupCommunicator):
    """MPI ranks (see the module docstring). One device per process.

    Options: ``comm`` (an mpi4py communicator; default COMM_WORLD), ``timeout`` seconds (default
    ``TENSORWEAVE_TIMEOUT`` or 300), ``algorithm`` ("ordered" | "native"), ``validate`` (exchange headers,
    default True), ``abort`` (abort the MPI job at exit after a collective timed out, default True),
    ``stage_bytes``; ``rank``/``world_size``, when given, must match MPI's.
    """

    name = "mpi"

    def __init__(
        self,
        devices: Sequence[Device],
        comm: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float | str | None = None,
        algorithm: str = "ordered",
        validate: bool = True,
        abort: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(devices, **options)
        group = MpiGroup(comm, timeout_from(timeout, "mpi"), algorithm, validate, bool(abort))
        for what, given, actual in (("rank", rank, group.rank), ("world_size", world_size, group.world_size)):
            if given is not None and int(given) != actual:
                group.close()
                raise CollectiveError(f"mpi: {what}={given} was passed, but MPI says this process has {what} {actual}")
        self._join(group)


@hookimpl
def tensorweave_register_communicators(register: Callable[[type[Communicator]], None]) -> None:
    register(MpiCommunicator)

"""Request scheduling for the server: parallel slots over one model, a bounded queue, and every rank in step.

A *slot* is one sequence the server runs at a time: a replica of the model (``Model.replica``: the same weights,
KV caches of its own) and a session on it; ``--parallel N`` makes N of them. A request waits in a bounded queue
until a slot is free, then takes the free slot whose context shares the longest prefix with its prompt and
evaluates only the rest (llama-server's prompt cache; ``Session.reuse``). One worker thread runs every step:
each round advances every busy slot by one piece of text (``Session.generate``'s stream), round robin, so the
streams progress together. The slots' steps run one after another on the devices; batching the running
sequences' decode steps into one graph step would need attention over several caches per step, not built yet.
A request whose client went away is dropped before its slot's next step; its slot keeps the evaluated context
for the next prompt that shares it.

Ranks: under ``tensorweave launch``/mpiexec every rank holds its shard and must run the same steps in the same
order. Rank 0 decides (which request, which slot, the sampling seed) and broadcasts each decision through the
model's communicator before acting on it (``Link``); the other ranks ``follow`` and do the same on their slots,
so the executors' collectives line up and, since every rank gets the whole logits and samples with the same
seed, every rank picks the same tokens. While idle, rank 0 broadcasts a heartbeat every ``HEARTBEAT_S`` seconds:
a rank that died is noticed by the communicator (which names it) and a follower never waits out the collective
timeout. A communicator failure is fatal: every request gets it, and ``on_failure`` is called with its message.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CollectiveError, CollectiveTimeoutError, CommunicationLibraryError
from ..runtime.sampling import SamplingParams
from ..runtime.session import TextStream

if TYPE_CHECKING:
    from ..runtime.model import Model

HEARTBEAT_S = 1.0
AHEAD = 8  # pieces a request may run ahead of its client: a slow or gone client pauses its slot, not the server
NOOP, START, STEP, DROP, STOP = range(5)  # what rank 0 tells the others
FATAL = (CollectiveError, CollectiveTimeoutError, CommunicationLibraryError)  # the ranks are out of step: give up
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # Generation's -> OpenAI's


class Unavailable(Exception):
    """A request the engine cannot take now (full queue, failed ranks): the server answers 503."""


@dataclass
class Finished:
    """The end of a request: OpenAI's finish_reason and the token counts of its usage."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the slot already held (not evaluated again)


@dataclass
class Job:
    """One request as the engine runs it. ``emit`` is called from the worker thread with ("piece", str) for each
    piece of text, then ("done", Finished) or ("error", exception); set ``cancelled`` to drop it."""

    ids: list[int]
    params: SamplingParams  # with a seed: every rank must draw the same numbers
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    emit: Callable[[str, Any], None]
    cancelled: bool = False
    sent: int = 0  # events emitted (the engine's count) ...
    taken: int = 0  # ... and taken by the client's side (its own count): no lock needed

    @property
    def ahead(self) -> int:
        return self.sent - self.taken

    def spec(self) -> bytes:
        """What a rank needs to start this request on a slot (START's payload)."""
        spec = {"ids": self.ids, "params": asdict(self.params), "max_tokens": self.max_tokens}
        return json.dumps({**spec, "stop": self.stop, "ignore_eos": self.ignore_eos}).encode()


class Slot:
    """One sequence at a time on a model replica: its session keeps the KV cache of the last request."""

    def __init__(self, index: int, model: Model) -> None:
        self.index, self.model = index, model
        self.session = model.session()
        self.stream: TextStream | None = None
        self.pieces: Iterator[str] | None = None
        self.job: Job | None = None  # rank 0 only: the request it runs
        self.prompt_tokens = self.cached_tokens = 0
        self.requests = self.cancelled = 0
        self.last_used = 0  # rank 0 only: round of its last request, so ties go to the least recently used

    def start(self, spec: dict[str, Any]) -> None:
        ids = [int(t) for t in spec["ids"]]
        self.prompt_tokens, self.cached_tokens = len(ids), self.session.reuse(ids)
        self.stream = self.session.generate(
            ids[self.cached_tokens :],
            int(spec["max_tokens"]),
            sampling=SamplingParams(**spec["params"]),
            stop=spec["stop"],
            ignore_eos=bool(spec["ignore_eos"]),
            stream=True,
            snapshot=True,
        )  # type: ignore[assignment]
        self.pieces = iter(self.stream)  # type: ignore[arg-type]
        self.requests += 1

    def step(self) -> tuple[str, Any]:
        """The next piece of text, or the request's end."""
        assert self.pieces is not None and self.stream is not None
        piece = next(self.pieces, None)
        if piece is not None:
            return "piece", piece
        g = self.stream.result
        self.stream = self.pieces = None
        return "done", Finished(FINISH[g.finish_reason], self.prompt_tokens, len(g.tokens), self.cached_tokens)

    def drop(self) -> None:
        self.stream = self.pieces = None
        self.cancelled += 1

    def act(self, op: int, payload: bytes) -> tuple[str, Any] | None:
        """Do one of rank 0's decisions on this slot (the same on every rank); the request's event, if any. An
        error ends the request and forgets the slot's context; a communicator failure is raised."""
        try:
            if op == START:
                self.start(json.loads(payload))
            elif op == STEP:
                return self.step()
            elif op == DROP:
                self.drop()
            return None
        except FATAL:
            raise
        except Exception as e:  # the request failed, not the server: it answers and keeps serving
            self.stream = self.pieces = None
            self.session = self.model.session()
            return "error", e

    def info(self) -> dict[str, Any]:
        return {
            "id": self.index,
            "n_ctx": self.model.config.ctx,
            "is_processing": self.job is not None,
            "n_past": self.session.n_past,
            "requests": self.requests,
            "cancelled": self.cancelled,
        }


def make_slots(model: Model, parallel: int) -> list[Slot]:
    return [Slot(i, model if i == 0 else model.replica()) for i in range(parallel)]


class Link:
    """Rank 0's decisions, broadcast to the other ranks through the model's own communicator: a header (op, slot,
    payload bytes), then the payload packed into int32 words."""

    def __init__(self, model: Model) -> None:
        self.device, self.comm = model.executor.devices[0], model.executor.comm

    def send(self, op: int, slot: int = 0, payload: bytes = b"") -> None:
        self._cast(op, slot, payload)

    def recv(self) -> tuple[int, int, bytes]:
        return self._cast(NOOP, 0, None)

    def _cast(self, op: int, slot: int, payload: bytes | None) -> tuple[int, int, bytes]:
        op, slot, n = (int(v) for v in self._broadcast(np.array([op, slot, len(payload or b"")], np.int32)))
        if not n:
            return op, slot, b""
        words = np.zeros((n + 3) // 4, np.int32)
        if payload:
            words.view(np.uint8)[:n] = np.frombuffer(payload, np.uint8)
        return op, slot, self._broadcast(words).view(np.uint8)[:n].tobytes()

    def _broadcast(self, host: np.ndarray) -> np.ndarray:
        buf = self.device.from_host(host)
        self.comm.broadcast([buf], root=0)
        return np.asarray(self.device.to_host(buf))


def follow(model: Model, parallel: int, link: Link) -> None:
    """A rank other than 0: do what rank 0 broadcasts, on slots of its own, until it says stop."""
    slots = make_slots(model, parallel)
    while True:
        op, index, payload = link.recv()
        if op == STOP:
            return
        if op != NOOP:
            slots[index].act(op, payload)


class Engine:
    """Rank 0's scheduler (or the only process's): ``submit`` jobs from any thread; a worker thread runs them."""

    def __init__(
        self,
        model: Model,
        parallel: int = 1,
        queue: int = 16,
        link: Link | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.link, self.queue, self.on_failure = model, link, queue, on_failure
        self.slots = make_slots(model, parallel)
        self.waiting: deque[Job] = deque()
        self.failed: str | None = None
        self._closing = False
        self._round = 0
        self._told = time.monotonic()  # when the other ranks last heard from this one
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tensorweave-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``Unavailable`` when the queue is full or the ranks failed."""
        with self._cond:
            if self.failed is not None:
                raise Unavailable(self.failed)
            if self._closing:
                raise Unavailable("the server is shutting down")
            if len(self.waiting) >= self.queue + sum(s.job is None for s in self.slots):
                raise Unavailable(
                    f"the server is busy: {len(self.slots)} slot(s) busy and {len(self.waiting)} request(s) queued "
                    f"(--parallel {len(self.slots)}, --queue {self.queue}); retry later"
                )
            self.waiting.append(job)
            self._cond.notify()

    def info(self) -> dict[str, Any]:
        with self._cond:
            busy = sum(s.job is not None for s in self.slots)
            return {
                "slots_idle": len(self.slots) - busy,
                "slots_processing": busy,
                "requests_waiting": len(self.waiting),
            }

    def close(self) -> None:
        """Finish the step under way, stop the worker and the other ranks (again: a no-op)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _assign(self) -> list[Slot]:
        """Give waiting jobs free slots (the longest shared prefix, then the least recently used); the busy slots."""
        while self.waiting and any(s.job is None for s in self.slots):
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            free = [s for s in self.slots if s.job is None]
            slot = max(free, key=lambda s: (_shared(s.session.context, job.ids), -s.last_used))
            slot.job, slot.last_used = job, self._round
        return [s for s in self.slots if s.job is not None]

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    busy = [] if self._closing else self._assign()
                    if not busy and not self._closing and not self._cond.wait(HEARTBEAT_S):
                        self._tell(NOOP)
                    if self._closing:
                        break
                self._round += 1
                ready = [s for s in busy if s.job is not None and (s.job.ahead < AHEAD or s.job.cancelled)]
                for slot in ready:
                    self._advance(slot)
                if busy and not ready:  # every client is behind: let the event loop catch up (and see who left)
                    time.sleep(0.001)
                    if time.monotonic() - self._told > HEARTBEAT_S:
                        self._tell(NOOP)
            self._tell(STOP)
        except FATAL as e:
            self._fail(str(e))
        except BaseException as e:  # a bug in the scheduler: fail loudly rather than hang every client
            self._fail(f"the scheduler failed: {type(e).__name__}: {e}")
            raise

    def _advance(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None
        if job.cancelled:
            self._act(slot, DROP)
            slot.job = None
            return
        event = self._act(slot, START, job.spec()) if slot.stream is None else None
        event = event or self._act(slot, STEP)
        assert event is not None
        if event[0] != "piece":
            slot.job = None
        job.sent += 1
        job.emit(*event)

    def _act(self, slot: Slot, op: int, payload: bytes = b"") -> tuple[str, Any] | None:
        self._tell(op, slot.index, payload)
        return slot.act(op, payload)

    def _tell(self, op: int, slot: int = 0, payload: bytes = b"") -> None:
        """Broadcast a decision to the other ranks (if any)."""
        if self.link:
            self.link.send(op, slot, payload)
            self._told = time.monotonic()

    def _fail(self, message: str) -> None:
        with self._cond:
            self.failed = message
            jobs = [s.job for s in self.slots if s.job is not None] + list(self.waiting)
            self.waiting.clear()
            for s in self.slots:
                s.job = None
        for job in jobs:
            job.emit("error", Unavailable(message))
        if self.on_failure:
            self.on_failure(message)


def _shared(context: list[int], ids: list[int]) -> int:
    """The length of the prefix two token lists share."""
    n = 0
    while n < min(len(context), len(ids)) and context[n] == ids[n]:
        n += 1
    return n

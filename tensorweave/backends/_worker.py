"""A serial work queue for a device: one thread runs submitted callables in order, like a GPU stream's host side.

``drain()`` waits until everything submitted has run; a submit from the queue's own thread (work that submits
more work to its device) runs inline, since queueing it would wait on itself. cpu-sim and the GPU backends use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class SerialWorker:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._thread: int | None = None
        self._pending = 0  # submitted, not finished: lets drain() return at once on an idle device
        self._idle = threading.Condition()

    def on_worker(self) -> bool:
        return self._thread == threading.get_ident()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        with self._idle:
            self._pending += 1

        def run() -> Any:
            self._thread = threading.get_ident()
            try:
                return job()
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()

        if not self.on_worker():
            return self._pool.submit(run)
        fut: Future[Any] = Future()
        try:
            fut.set_result(run())
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def drain(self) -> None:
        """Wait until every submitted job has run (returns at once when idle or when called from a job)."""
        if self._pending and not self.on_worker():
            with self._idle:
                self._idle.wait_for(lambda: not self._pending)


def walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every item of (nested) lists and tuples, keeping their types."""
    if isinstance(value, (list, tuple)):
        return type(value)(walk(v, leaf) for v in value)
    return leaf(value)

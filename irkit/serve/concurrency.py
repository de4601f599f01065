"""Concurrency primitives of the service: a readers-writer lock and a bounded inference pool.

Searches read the index while adds and removals change it; a readers-writer lock lets any number
of searches run together and gives a writer exclusive access only for the short in-memory update
(the model runs outside the lock). Model inference is CPU/GPU bound, so it runs in a fixed pool of
threads with a bounded queue: when the queue is full the request is refused at once (503) rather
than piling up and timing out.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

from irkit.serve.errors import Busy

T = TypeVar("T")


class RWLock:
    """Many readers or one writer; writers are preferred so a stream of searches cannot starve an add."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class InferencePool:
    """``workers`` threads run jobs; at most ``queue`` more wait; beyond that ``run`` raises Busy (503)."""

    def __init__(self, workers: int = 2, queue: int = 16) -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be >= 1 and queue >= 0")
        self.workers = workers
        self.queue = queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="irkit-infer")
        self._lock = threading.Lock()
        self._pending = 0
        self.rejected = 0

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    def _admit(self) -> None:
        with self._lock:
            if self._pending >= self.workers + self.queue:
                self.rejected += 1
                raise Busy(f"server busy: {self._pending} inference jobs running or queued "
                           f"(limit {self.workers + self.queue}); retry shortly")
            self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the pool and await it, or raise Busy at once when the queue is full."""
        self._admit()
        try:
            fut = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        # released when the job ends, not when the caller stops waiting (a client may disconnect)
        fut.add_done_callback(lambda _f: self._release())
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

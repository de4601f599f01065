"""Concurrency primitives of the service: a readers-writer lock and a bounded inference pool.

Searches read the index while adds and removals change it; a readers-writer lock lets any number
of searches run together and gives a writer exclusive access only for the short in-memory update
(the model runs outside the lock). Model inference is CPU/GPU bound, so it runs in a fixed pool of
threads. A burst of requests waits in one FIFO queue (searches and adds alike, so neither starves
the other) for at most ``queue_timeout`` seconds; only a request that finds the queue full, or that
is still waiting at its deadline, is refused (503 with ``Retry-After``). A waiting client that
disconnects leaves the queue at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterator, TypeVar

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


class ClientGone(Exception):
    """The client disconnected while its request waited for a slot (nobody is left to answer)."""


class _Waiter:
    """One request in the queue: the event loop to wake it on, its future, and whether it got a slot."""

    __slots__ = ("loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class InferencePool:
    """``workers`` threads run jobs; up to ``queue`` more requests wait, FIFO, at most ``queue_timeout`` s.

    A request that finds ``queue`` others waiting, or that waited ``queue_timeout`` seconds without
    a slot, gets :class:`Busy` (503) whose ``retry_after`` estimates when a slot frees. Slots are
    handed from a finishing job straight to the oldest waiter, so arrival order is service order.
    """

    def __init__(self, workers: int = 2, queue: int = 16, queue_timeout: float = 5.0) -> None:
        if workers < 1 or queue < 0 or not queue_timeout >= 0:
            raise ValueError("workers must be >= 1, queue >= 0 and queue_timeout >= 0")
        self.workers = workers
        self.queue = queue
        self.queue_timeout = float(queue_timeout)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="irkit-infer")
        self._lock = threading.Lock()
        self._running = 0                       # slots held: jobs submitted and not yet finished
        self._waiters: deque[_Waiter] = deque()
        self._job_s = 0.05                      # moving average of a job's duration (for Retry-After)
        self.rejected = 0                       # refused because the queue was full
        self.timed_out = 0                      # refused because the deadline passed while waiting
        self.abandoned = 0                      # left the queue because the client disconnected
        self.completed = 0

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._running + len(self._waiters)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def stats(self) -> dict[str, Any]:
        """Configuration and counters for /stats."""
        return {"workers": self.workers, "queue": self.queue, "queue_timeout_s": self.queue_timeout,
                "running": self._running, "waiting": len(self._waiters), "pending": self.pending,
                "completed": self.completed, "rejected": self.rejected, "timed_out": self.timed_out,
                "abandoned": self.abandoned, "mean_job_ms": round(self._job_s * 1000, 1)}

    def retry_after(self) -> int:
        """Seconds until the queue ahead of a new request should have drained (1..60)."""
        return min(60, max(1, math.ceil(self._job_s * (len(self._waiters) + 1) / self.workers)))

    # ------------------------------------------------------------------ slots
    async def _acquire(self, gone: Callable[[], Awaitable[Any]] | None) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._running < self.workers and not self._waiters:
                self._running += 1
                return
            if len(self._waiters) >= self.queue:
                self.rejected += 1
                raise Busy(f"server busy: the queue is full ({len(self._waiters)} requests waiting for "
                           f"{self.workers} inference workers); retry after the Retry-After delay",
                           retry_after=self.retry_after())
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
        t0 = time.monotonic()
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        outcome = "cancelled"
        try:
            waits: set[asyncio.Future[Any]] = {waiter.future} | ({watch} if watch else set())
            done, _ = await asyncio.wait(waits, timeout=self.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
            outcome = "granted" if waiter.future in done else ("gone" if done else "timeout")
        finally:
            if watch is not None:
                watch.cancel()
            with self._lock:
                if waiter.granted and outcome != "granted":
                    if outcome == "timeout":       # the slot came at the deadline: use it
                        outcome = "granted"
                    else:
                        self._release_locked()     # pass the slot on; nobody will use it here
                elif not waiter.granted:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                if outcome == "timeout":
                    self.timed_out += 1
                elif outcome == "gone":
                    self.abandoned += 1
        if outcome == "timeout":
            raise Busy(f"server busy: no inference worker became free within the {self.queue_timeout:g} s "
                       f"queue deadline (waited {time.monotonic() - t0:.1f} s); retry after the Retry-After delay",
                       retry_after=self.retry_after())
        if outcome == "gone":
            raise ClientGone()

    def _release_locked(self) -> None:
        """Hand the slot to the oldest live waiter, or free it (caller holds ``_lock``)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                return
            except RuntimeError:                   # its event loop is closed: skip it
                waiter.granted = False
        self._running -= 1

    def _release(self) -> None:
        with self._lock:
            self._release_locked()

    # ------------------------------------------------------------------ running
    async def run(self, fn: Callable[..., T], *args: Any, gone: Callable[[], Awaitable[Any]] | None = None) -> T:
        """Wait (FIFO, up to the deadline) for a slot, run ``fn(*args)`` in a worker thread, return its result.

        ``gone``: an awaitable factory that completes when the client disconnects; while waiting it
        makes the request leave the queue (:class:`ClientGone`). Once running, a job always finishes
        (threads cannot be interrupted) and frees its slot when it ends, not when the caller stops
        waiting."""
        await self._acquire(gone)

        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._job_s = 0.8 * self._job_s + 0.2 * (time.perf_counter() - t0)

        try:
            fut = self._executor.submit(timed)
        except BaseException:
            self._release()
            raise

        def done(_f: Any) -> None:
            with self._lock:
                self.completed += 1
                self._release_locked()

        fut.add_done_callback(done)
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

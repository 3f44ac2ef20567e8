"""The API's only door to the workers: "work was submitted", and "wait for a job" (with its token stream).

Jobs themselves travel through the database (see `api/db/jobs.py`); this interface only moves *signals*, so the
long-poll of `retrieve_future` can answer the moment a job finishes instead of on the next database poll.

- `PollingQueue` is for separately started `loom worker` processes: it has no signal path, so waiters re-check
  the database every `poll_interval` seconds.
- `EmbeddedQueue` (`api/embedded_queue.py`, the `loom serve` default) runs the worker consumers in threads of
  this process and gets completion callbacks and per-token stream events directly.
- `CeleryQueue` (`api/celery_queue.py`) sends wake-ups through Celery on Redis to scaled-out workers and hears
  completions and token streams back over Redis pub/sub.

Limits: signals are best-effort; correctness never depends on them (waiters always re-read the database).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from contract.broker import TokenEvent


class Waiters:
    """Key (a job id; a sampling session id in `api/sampler_completions.py`) -> asyncio events of the requests
    long-polling it, woken from any thread."""

    def __init__(self) -> None:
        self._events: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._lock = threading.Lock()

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` finishes; register it BEFORE reading the job, so no wake-up is lost."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._events[job_id].add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._events[job_id].discard(entry)
                if not self._events[job_id]:
                    del self._events[job_id]

    def wake(self, job_ids: list[str]) -> None:
        with self._lock:
            entries = [e for job_id in job_ids for e in self._events.get(job_id, ())]
        for loop, event in entries:
            loop.call_soon_threadsafe(event.set)


class StreamHub:
    """Per-job token events from worker threads to SSE responses, buffered from the first event.

    Events are kept until a subscriber has read them (or for `keep_seconds` after the job finished if nobody
    subscribes), so a stream opened just after the worker started emitting loses nothing.
    """

    def __init__(self, keep_seconds: float = 120.0) -> None:
        self._events: dict[str, list[TokenEvent]] = defaultdict(list)
        self._finished: dict[str, float] = {}
        self._signals: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._lock = threading.Lock()
        self.keep_seconds = keep_seconds

    def _signal(self, job_id: str) -> None:
        for loop, event in list(self._signals.get(job_id, ())):
            loop.call_soon_threadsafe(event.set)

    def publish(self, job_id: str, events: list[TokenEvent]) -> None:
        with self._lock:
            self._events[job_id].extend(events)
            self._signal(job_id)

    def finish(self, job_ids: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for job_id in job_ids:
                self._finished[job_id] = now
                self._signal(job_id)
            for job_id, at in list(self._finished.items()):
                if now - at > self.keep_seconds and job_id not in self._signals:
                    self._events.pop(job_id, None)
                    del self._finished[job_id]

    async def subscribe(self, job_id: str, idle_seconds: float = 2.0):
        """Yield lists of events until the job finishes, and an empty list after each `idle_seconds` without
        news: the finish signal travels like the events (over Redis when scaled out), so the caller checks the
        database then, and stops on its own once the job is final."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._signals[job_id].add(entry)
        seen = 0
        try:
            while True:
                with self._lock:
                    events = self._events.get(job_id, [])[seen:]
                    seen += len(events)
                    done = job_id in self._finished
                    entry[1].clear()
                if events:
                    yield events
                if done:
                    return
                try:
                    await asyncio.wait_for(entry[1].wait(), idle_seconds)
                except TimeoutError:
                    yield []
        finally:
            with self._lock:
                self._signals[job_id].discard(entry)
                if not self._signals[job_id]:
                    del self._signals[job_id]
                if job_id in self._finished:
                    self._events.pop(job_id, None)
                    self._finished.pop(job_id, None)


class PollingQueue:
    streams: StreamHub | None = None
    """Token streams, where the workers can deliver them to this process (None: streams arrive whole)."""

    def __init__(self, poll_interval: float = 0.25) -> None:
        self.poll_interval = poll_interval

    def prepare(self) -> None:
        """Before serving: load what the queue needs (the embedded queue loads its base models), so that a model
        that cannot be served ends start-up with its reason instead of failing inside the server's lifespan."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submitted(self, base_model: str, placed_on: str | None = None, sampling: bool = False) -> None:
        """A job for `base_model` was committed: a training op (of a run placed on worker `placed_on`, if it
        is placed) or a sample job."""

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` finishes, where this queue can tell (never, here: waiters poll)."""
        yield asyncio.Event()

    async def wait(self, woken: asyncio.Event, timeout: float) -> None:
        """Sleep until `woken` is set or `timeout` passes, at most `poll_interval` (then the caller re-reads)."""
        try:
            await asyncio.wait_for(woken.wait(), min(timeout, self.poll_interval))
        except TimeoutError:
            pass


class SignalledQueue(PollingQueue):
    """A queue that hears completions and token streams from its workers, so waiters wake at once; the database
    poll every `poll_interval` is only a safety net for a lost signal."""

    def __init__(self, poll_interval: float) -> None:
        super().__init__(poll_interval)
        self._waiters = Waiters()
        self.streams = StreamHub()

    def finished(self, job_ids: list[str]) -> None:
        """Workers recorded these jobs' results: end their streams and wake their waiters."""
        self.streams.finish(job_ids)
        self._waiters.wake(job_ids)

    def watch(self, job_id: str):
        return self._waiters.watch(job_id)

"""The API's only door to the workers: what models exist, "work was submitted", and "wait for a job".

Jobs themselves travel through the database (see `api/db/jobs.py`); this interface only moves *signals*, so the
long-poll of `retrieve_future` can answer the moment a job finishes instead of on the next database poll.

- `EmbeddedQueue` (the `loom serve` default) runs the worker consumers in threads of this process and gets
  completion callbacks and per-token stream events directly.
- `PollingQueue` is for separately started `loom worker` processes: it has no signal path, so waiters re-check
  the database every `poll_interval` seconds.
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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import release_expired_leases
from api.db.types import utcnow
from worker.models.registry import BUILTIN_MODELS, BaseModelSpec, model_cache_dir, resolve_spec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    vocab_size: int
    max_context_length: int
    max_lora_rank: int
    tokenizer_id: str


def model_info(spec: BaseModelSpec) -> ModelInfo:
    return ModelInfo(
        name=spec.name,
        arch=spec.arch,
        vocab_size=spec.vocab_size,
        max_context_length=spec.max_context_length,
        max_lora_rank=spec.max_lora_rank,
        tokenizer_id=str(model_cache_dir() / spec.cache_name),
    )


def served_specs(names: list[str] | None) -> list[BaseModelSpec]:
    if not names:
        return list(BUILTIN_MODELS.values())
    specs = []
    for name in names:
        spec = resolve_spec(name)
        if spec is None:
            raise ValueError(f"unknown base model {name!r}; built-in: {sorted(BUILTIN_MODELS)}")
        specs.append(spec)
    return specs


class _Waiters:
    """Job id -> asyncio events of the requests long-polling it, woken from any thread."""

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
        self._events: dict[str, list[dict]] = defaultdict(list)
        self._finished: dict[str, float] = {}
        self._signals: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._lock = threading.Lock()
        self.keep_seconds = keep_seconds

    def _signal(self, job_id: str) -> None:
        for loop, event in list(self._signals.get(job_id, ())):
            loop.call_soon_threadsafe(event.set)

    def publish(self, job_id: str, events: list[dict]) -> None:
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

    def __init__(self, specs: list[BaseModelSpec], poll_interval: float = 0.25) -> None:
        self.models = {spec.name: model_info(spec) for spec in specs}
        self._aliases = {alias: spec.name for spec in specs for alias in (spec.name, *spec.aliases)}
        self.poll_interval = poll_interval

    def resolve(self, base_model: str) -> ModelInfo | None:
        name = self._aliases.get(base_model)
        return None if name is None else self.models[name]

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

    def delete_checkpoint_files(self, storage_uri: str) -> None:
        from worker.checkpoint_store import delete_checkpoint_uri

        delete_checkpoint_uri(storage_uri)


class SignalledQueue(PollingQueue):
    """A queue that hears completions and token streams from its workers, so waiters wake at once; the database
    poll every `poll_interval` is only a safety net for a lost signal."""

    def __init__(self, specs: list[BaseModelSpec], poll_interval: float) -> None:
        super().__init__(specs, poll_interval)
        self._waiters = _Waiters()
        self.streams = StreamHub()

    def finished(self, job_ids: list[str]) -> None:
        """Workers recorded these jobs' results: end their streams and wake their waiters."""
        self.streams.finish(job_ids)
        self._waiters.wake(job_ids)

    def watch(self, job_id: str):
        return self._waiters.watch(job_id)


class EmbeddedQueue(SignalledQueue):
    def __init__(
        self, specs: list[BaseModelSpec], session_factory: sessionmaker[Session], checkpoint_root: Path, progress=print
    ) -> None:
        super().__init__(specs, poll_interval=5.0)
        self.specs = specs
        self.session_factory = session_factory
        self.checkpoint_root = checkpoint_root
        self.progress = progress
        self._handles: dict = {}

    def start(self) -> None:
        from worker.service import start_workers  # the embedded queue is the one place the API runs worker code

        with self.session_factory.begin() as session:
            # In embedded mode no other worker exists: leases left by a previous process are dead.
            requeued = release_expired_leases(session, utcnow() + timedelta(days=365))
        if requeued:
            self.progress(f"requeued {requeued} request(s) left running by a previous server process")
        self._handles = start_workers(
            self.specs,
            self.session_factory,
            self.checkpoint_root,
            self.finished,
            self.progress,
            on_stream=self.streams.publish,
        )

    def stop(self) -> None:
        for handle in self._handles.values():
            handle.shutdown()

    def submitted(self, base_model: str, placed_on: str | None = None, sampling: bool = False) -> None:
        handle = self._handles.get(base_model)
        if handle is not None:
            handle.wake()

"""A scaled-out worker process (`loom worker` with `LOOM_QUEUE=celery`): Celery wake-ups in, events out.

Start-up order matters: the process registers itself in the `workers` table (so the reconciler can reap it if
it dies) before its consumers may claim and pin any run, then loads its base models, then consumes its
Celery queues: its private queue (wake-ups for runs placed on it) and the shared training and/or sampling
queue of each base model it serves (`--role train|sample|all`).

A wake-up task only sets the consumer's wake event and returns; the consumer thread claims from the database
whatever is ready for this worker, so duplicated, redelivered or stale messages are no-ops. Celery runs with
`acks_late`, prefetch 1 and `reject_on_worker_lost`, so a message a worker took but could not act on is
redelivered; lost messages are re-sent by the API's reconciler.

A heartbeat thread refreshes the registry row and renews this worker's leases every `dead_after / 5`
seconds (a long step never loses its lease while the worker is alive; a dead worker's leases are released by
the reaper), and touches the `heartbeat_file` setting's file for container liveness probes. Finished job ids and token-stream
events are published on the Redis channel the API listens to.

Limits: one Celery consumer thread per process (wake-ups are tiny); a worker paused longer than the
dead-after interval is reaped, after which its late results are refused by the lease fencing tokens.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import renew_leases
from api.db.workers import deregister_worker, heartbeat, register_worker
from contract.broker import (
    EVENTS_CHANNEL,
    WAKE_TASK,
    TokenEvent,
    finished_message,
    shared_queue,
    stream_message,
    worker_queue,
)
from contract.catalogue import BaseModelEntry
from contract.settings import Settings
from worker.engine import Engine
from worker.service import start_workers

log = logging.getLogger(__name__)


class EventPublisher:
    """Publishes finished job ids and stream events for the API; a Redis outage only costs latency."""

    def __init__(self, broker_url: str) -> None:
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)

    def _publish(self, message: str) -> None:
        try:
            self.redis.publish(EVENTS_CHANNEL, message)
        except redis.RedisError as exc:  # waiters re-read the database on their own
            log.warning("event not published (%s)", exc)

    def finished(self, job_ids: list[str]) -> None:
        if job_ids:
            self._publish(finished_message(job_ids))

    def stream(self, job_id: str, events: list[TokenEvent]) -> None:
        self._publish(stream_message(job_id, events))


class Membership:
    """Registers this worker, keeps its heartbeat and leases fresh, and deregisters it on a clean exit."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        worker_id: str,
        role: str,
        base_models: list[str],
        dead_after: float,
        lease_seconds: float,
        heartbeat_file: Path | None,
    ) -> None:
        self.sessions, self.worker_id, self.role, self.base_models = sessions, worker_id, role, base_models
        self.interval = dead_after / 5
        self.lease_seconds = lease_seconds
        self.heartbeat_file = heartbeat_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name="loom-heartbeat", daemon=True)

    def _register(self, session: Session) -> None:
        register_worker(session, self.worker_id, self.role, self.base_models, worker_queue(self.worker_id))

    def start(self) -> None:
        with self.sessions.begin() as session:
            self._register(session)
        self._touch()
        self._thread.start()

    def beat(self) -> None:
        with self.sessions.begin() as session:
            if not heartbeat(session, self.worker_id):
                log.warning("worker %s was reaped while alive; registering again", self.worker_id)
                self._register(session)
            renew_leases(session, self.worker_id, self.lease_seconds)
        self._touch()

    def _touch(self) -> None:
        if self.heartbeat_file is not None:
            self.heartbeat_file.touch()

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the database may be briefly away: the next beat tries again
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self.sessions.begin() as session:
            deregister_worker(session, self.worker_id)


def make_celery(broker_url: str, visibility_timeout: float) -> Celery:
    app = Celery("loom-worker", broker=broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis restarts
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def queues_for(worker_id: str, role: str, entries: list[BaseModelEntry]) -> list[str]:
    queues = [worker_queue(worker_id)]
    for entry in entries:
        if role != "sample":
            queues.append(shared_queue(entry.name, sampling=False))
        if role != "train":
            queues.append(shared_queue(entry.name, sampling=True))
    return queues


def run_worker(
    entries: list[BaseModelEntry],
    sessions: sessionmaker[Session],
    settings: Settings,
    role: str,
    *,
    progress: Callable[[str], None] = log.info,
    engines: dict[str, Engine] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (Celery's warm shutdown), then hand leases and runs back."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    membership = Membership(
        sessions,
        worker_id,
        role,
        [entry.name for entry in entries],
        settings.worker_dead_seconds,
        settings.lease_seconds,
        settings.heartbeat_file,
    )
    membership.start()
    events = EventPublisher(settings.broker_url)
    handles = start_workers(
        entries,
        sessions,
        settings,
        on_finished=events.finished,
        progress=progress,
        idle_wait=1.0,
        on_stream=events.stream,
        worker_id=worker_id,
        role=role,
        sticky=True,
        engines=engines,
    )
    app = make_celery(settings.broker_url, settings.visibility_timeout)

    @app.task(name=WAKE_TASK)
    def wake(base_model: str) -> None:
        handle = handles.get(base_model)
        if handle is not None:
            handle.wake()

    queues = queues_for(worker_id, role, entries)
    for name in ("worker", "api"):  # Celery sets the root logger to WARNING; keep Loom's own INFO lines
        logging.getLogger(name).setLevel(logging.INFO)
    progress(f"worker {worker_id} ({role}) consuming {', '.join(queues)}")
    try:
        app.Worker(
            hostname=f"{worker_id}@loom",
            queues=queues,
            pool="solo",
            concurrency=1,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
        ).start()
    finally:
        for handle in handles.values():
            handle.shutdown()
        membership.stop()
        progress(f"worker {worker_id} stopped; its runs and leases were handed back")

"""The API's side of a scaled-out deployment: Celery wake-ups out, completion and token events back in.

The database owns every job; a Celery message (task `loom.wake`, on Redis) only tells a worker "look at the
database now". After a submission commits, `submitted` sends one wake-up — to the private queue of the worker
a training run is placed on, or to the base model's shared training/sampling queue — and never inside an open
transaction. A lost message (Redis restarted, a worker died holding it) costs latency, not work: the
reconciler thread here, every `reconcile_seconds`, reaps workers whose heartbeat stopped (their leases are
requeued or, for a request that already took down `max_attempts` workers, failed; their runs unplaced),
expires overdue leases, and re-sends a wake-up for every destination with work queued longer than
`resend_after` seconds.

Workers publish finished job ids and token-stream events on the Redis channel `loom:events`; a listener thread
feeds them to the same long-poll waiters and `StreamHub` the embedded queue uses, so `retrieve_future`
answers the moment a result is recorded. Waiters still re-read the database every `poll_interval`, so a lost
event delays an answer and never loses it.

Token events lost while Redis is down are made up from the stored result when the job ends (the OpenAI
router notices the end in the database), so such a stream stalls and then catches up; it is never cut short.

Limits: the text that catches up carries no per-token logprobs; wake-up messages expire after `message_ttl`
seconds (the reconciler re-sends what is still queued).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import release_expired_leases
from api.db.types import utcnow
from api.db.workers import queued_work, reap_dead_workers
from api.queue import SignalledQueue
from contract.broker import EVENTS_CHANNEL, WAKE_TASK, parse_event, shared_queue, worker_queue

log = logging.getLogger(__name__)


class CeleryQueue(SignalledQueue):
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        broker_url: str,
        dead_after: float = 15.0,
        reconcile_seconds: float = 2.0,
        resend_after: float = 2.0,
        message_ttl: float = 300.0,
        max_attempts: int = 3,
    ) -> None:
        super().__init__(poll_interval=1.0)
        self.session_factory = session_factory
        self.broker_url = broker_url
        self.dead_after = dead_after
        self.max_attempts = max_attempts
        self.reconcile_seconds = reconcile_seconds
        self.resend_after = resend_after
        self.message_ttl = message_ttl
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.celery = Celery("loom-api", broker=broker_url)
        self.celery.conf.broker_connection_retry_on_startup = True
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> None:
        for target, name in ((self._listen, "loom-events"), (self._reconcile_forever, "loom-reconciler")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    # -- wake-ups ------------------------------------------------------------------------------------------

    def submitted(self, base_model: str, placed_on: str | None = None, sampling: bool = False) -> None:
        # A run placed on a worker that has just died gets its wake-up from the reconciler once it is reaped.
        queue = worker_queue(placed_on) if placed_on is not None and not sampling else None
        self.wake(queue or shared_queue(base_model, sampling), base_model)

    def wake(self, queue: str, base_model: str) -> None:
        """Send one wake-up; a broker failure is logged and left to the reconciler."""
        try:
            self.celery.send_task(WAKE_TASK, args=[base_model], queue=queue, retry=False, expires=self.message_ttl)
        except Exception as exc:  # the job is committed; the reconciler re-sends once the broker is back
            log.warning("wake-up for %s not sent (%s); the reconciler will retry", queue, exc)

    # -- reconciliation ------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """One pass: reap dead workers, expire leases, re-send wake-ups for work that has waited."""
        now = utcnow()
        with self.session_factory.begin() as session:
            dead = reap_dead_workers(session, now, self.dead_after, self.max_attempts)
            release_expired_leases(session, now, max_attempts=self.max_attempts)
            waiting = queued_work(session, now - timedelta(seconds=self.resend_after))
        if dead:
            log.warning("reaped silent worker(s) %s; their runs move to other workers", ", ".join(dead))
            self.redis.delete(*(worker_queue(worker_id) for worker_id in dead))  # nobody will read these
        for entry in waiting:
            self.wake(entry.worker_queue or shared_queue(entry.base_model, entry.sampling), entry.base_model)

    def _reconcile_forever(self) -> None:
        while not self._stop.wait(self.reconcile_seconds):
            try:
                self.reconcile()
            except Exception:  # the database or broker may be briefly away; try again next pass
                log.exception("reconcile pass failed")

    # -- events from workers -------------------------------------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(EVENTS_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message["data"])
            except Exception as exc:  # Redis restarting: waiters fall back to polling the database meanwhile
                log.warning("event listener lost Redis (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def _dispatch(self, data: bytes) -> None:
        event = parse_event(data)
        if event.stream_job_id is not None:
            self.streams.publish(event.stream_job_id, event.tokens)
        if event.finished:
            self.finished(event.finished)

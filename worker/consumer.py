"""The worker's job loop: lease ready jobs from the database, run them through the engine, record outcomes.

One `Consumer` serves one base model. Each tick claims every ready job (up to `batch_limit` jobs and, with
`tick_tokens`, up to that many tokens of forward passes; the rest waits for the next tick) in one short
transaction, executes them (outside any transaction), then records all results, checkpoint rows and failures
in a second transaction guarded by the lease fencing tokens, and finally calls `on_finished` with the ids so
waiting long-polls wake at once. Leases outlive a tick comfortably; expired leases of a crashed worker are
requeued by `release_expired_leases` on every idle pass, and idle passes also delete checkpoints whose TTL passed
(`sweep_expired_checkpoints`: every deployment runs this loop, so expired checkpoints leave the store without an
operator running `loom gc`).

The same loop runs in a thread of the embedded server (`loom serve`) and in a standalone `loom worker`
process; a Celery task can call `tick()` unchanged.

Before executing a run's chain, a run whose state is absent or stale on this worker is rebuilt from the
database's op log (`worker/run_recovery.py`), so a run can move between workers (or survive a restart). A
starting checkpoint that fails verification is skipped for an older one; a run that cannot be rebuilt at all (its
log was unloaded, or the checkpoint it was loaded from is corrupt) gets clear errors for its requests.

Poison requests: a job whose earlier lease was lost (its worker crashed, was killed or timed out) is retried in a
tick of its own (`claim_ready_jobs(retries=...)`), so a request that kills its worker takes only itself down; after
`max_attempts` such losses it is failed with a clear error instead of being retried. Recording is per outcome: one
that the database refuses fails that job alone, never the tick.

Placement: with `sticky` (scaled-out deployments), a worker takes a run's ops only if the run is placed on it
or unplaced (then it becomes placed here); `role` picks training work, sampling work or both.

Limits: without `sticky`, all training runs of a base model must be served by one consumer (one worker per
base model), or runs would be rebuilt back and forth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from api.db.checkpoints import CheckpointNameTaken, record_checkpoint, sweep_expired_checkpoints
from api.db.jobs import (
    claim_ready_jobs,
    complete_job,
    fail_job,
    release_expired_leases,
    requeue_leases_not_held,
)
from api.db.models import ErrorCategory
from api.db.session import database_unavailable
from api.db.types import utcnow
from contract.checkpoint_store import CheckpointCorrupt, discard_checkpoint_uris
from contract.jobs import ClaimedJob, JobKind, result_json
from worker.checkpoint_io import CheckpointFormatError
from worker.engine import Engine
from worker.outcomes import Outcome
from worker.run_recovery import RunNotRestorable, UnusableCheckpoint, restore_plan

ROLES = ("all", "train", "sample")

log = logging.getLogger(__name__)


@dataclass
class Recorded:
    written: list[str] = field(default_factory=list)
    """Ids of the jobs whose result or failure took effect (the lease was still ours)."""
    retired_uris: list[str] = field(default_factory=list)
    """Stored checkpoints no row names after this write (replaced, superseded, or written by a job that could not
    be recorded as done); delete their files once it commits."""


def record_outcomes(session: Session, outcomes: Sequence[Outcome]) -> Recorded:
    """Write results, failures and the checkpoints of jobs that completed, in the caller's transaction.

    Each outcome is written in a savepoint of its own: one that cannot be recorded (a value the database refuses, a
    checkpoint name another save took first) fails that job alone and never the others. Errors of the database
    connection itself propagate, so the caller retries the whole write."""
    recorded = Recorded()
    for outcome in outcomes:
        job = outcome.job
        try:
            with session.begin_nested():
                ok, retired = _record_one(session, outcome)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            if outcome.checkpoint is not None:
                recorded.retired_uris.append(outcome.checkpoint.storage_uri)
            category = ErrorCategory.USER if isinstance(exc, CheckpointNameTaken) else ErrorCategory.SERVER
            if category is ErrorCategory.SERVER:
                log.exception("the outcome of %s could not be recorded", job.id)
            message = str(exc) if category is ErrorCategory.USER else f"its result could not be recorded: {exc!r}"
            with session.begin_nested():
                ok = fail_job(session, job.id, job.fencing_token, message, category)
            retired = []
        recorded.retired_uris += retired
        if ok:
            recorded.written.append(job.id)
        else:
            log.warning("lease on %s was lost before its result could be written", job.id)
    return recorded


def _record_one(session: Session, outcome: Outcome) -> tuple[bool, list[str]]:
    """Write one outcome; returns whether the lease was still ours, and the storage URIs its checkpoint retired."""
    job = outcome.job
    if outcome.result is None:
        category = outcome.category or ErrorCategory.UNKNOWN
        return fail_job(session, job.id, job.fencing_token, outcome.error or "failed", category), []
    ok = complete_job(session, job.id, job.fencing_token, result_json(outcome.result))
    if not ok:
        return False, [] if outcome.checkpoint is None else [outcome.checkpoint.storage_uri]
    return True, [] if outcome.checkpoint is None else record_checkpoint(session, outcome.checkpoint)


class Consumer:
    def __init__(
        self,
        engine: Engine,
        session_factory: sessionmaker[Session],
        worker_id: str,
        on_finished: Callable[[list[str]], None] = lambda ids: None,
        *,
        lease_seconds: float,
        max_attempts: int = 3,
        tick_tokens: int | None = None,
        batch_limit: int = 256,
        role: str = "all",
        sticky: bool = False,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, not {role!r}")
        self.role = role
        self.sticky = sticky
        self.engine = engine
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.on_finished = on_finished
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.tick_tokens = tick_tokens
        self.batch_limit = batch_limit
        self.wake = threading.Event()
        self._unsure_claim = False

    @property
    def base_model(self) -> str:
        return self.engine.lm.spec.name

    def tick(self) -> int:
        """Claim, execute and record one batch; returns how many jobs it handled."""
        if self._unsure_claim:
            self._requeue_unknown_leases()
        try:
            jobs = self._claim()
        except Exception:
            self._unsure_claim = True  # its commit may have landed: jobs leased to us that we never saw
            raise
        if not jobs and not self.engine.busy:
            return 0
        unrestored = self._restore_stale_runs(jobs)
        if unrestored:  # e.g. the database went away mid-restore: hand these runs' jobs back next tick
            jobs = [job for job in jobs if job.model_id not in unrestored]
            self._unsure_claim = True
        outcomes = self.engine.execute(jobs)
        self.on_finished(self._record(outcomes))
        return len(jobs) + int(self.engine.busy)

    def _claim(self) -> list[ClaimedJob]:
        with self.session_factory.begin() as session:
            return claim_ready_jobs(
                session,
                base_models=[self.base_model],
                worker_id=self.worker_id,
                lease_seconds=self.lease_seconds,
                limit=self.batch_limit,
                training=self.role != "sample",
                sampling=self.role != "train",
                sticky=self.sticky,
                retries="drain" if self.engine.busy else "alone",
                token_budget=self.tick_tokens,
            )

    def _requeue_unknown_leases(self) -> None:
        """Give back jobs leased to this worker for this model that the engine does not hold (a claim whose
        commit landed although the database connection failed before it answered)."""
        with self.session_factory.begin() as session:
            held = self.engine.in_flight()
            requeue_leases_not_held(session, self.worker_id, self.base_model, held, self.max_attempts)
        self._unsure_claim = False

    def _record(self, outcomes: Sequence[Outcome]) -> list[str]:
        """Write the outcomes, retrying while the database is unavailable: they exist only in this process, and
        the fencing tokens make a retry after a commit that did apply a no-op."""
        delay, deadline = 0.5, time.monotonic() + self.lease_seconds
        while True:
            try:
                with self.session_factory.begin() as session:
                    recorded = record_outcomes(session, outcomes)
                discard_checkpoint_uris(recorded.retired_uris)
                return recorded.written
            except Exception:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("recording %d outcome(s) failed; retrying in %.1fs", len(outcomes), delay, exc_info=True)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _restore_stale_runs(self, jobs: Sequence[ClaimedJob]) -> set[str]:
        """Rebuild every run whose chain would start on absent or stale state; returns the runs that could not
        be rebuilt for a reason other than their own history (their jobs must not run now)."""
        unrestored: set[str] = set()
        heads: dict[str, ClaimedJob] = {}
        for job in jobs:
            if job.model_id is not None and job.seq_id is not None and job.kind is not JobKind.SAMPLE:
                head = heads.get(job.model_id)
                if head is None or job.seq_id < head.seq_id:
                    heads[job.model_id] = job
        for head in heads.values():
            if not self.engine.needs_restore(head):
                continue
            try:
                self._rebuild(head)
            except RunNotRestorable as exc:
                log.info("%s", exc)
            except (CheckpointCorrupt, CheckpointFormatError) as exc:  # a checkpoint the run was loaded from
                log.error("%s cannot be rebuilt: %s", head.model_id, exc)
                self.engine.drop_run(head.model_id)  # its requests fail as "not resident", never loop
            except Exception:  # the database or checkpoint store failed: try again on a later tick
                log.exception("restoring %s failed; its requests wait", head.model_id)
                self.engine.drop_run(head.model_id)
                unrestored.add(head.model_id)
        return unrestored

    def _rebuild(self, head: ClaimedJob) -> None:
        unusable: set[str] = set()
        while True:
            with self.session_factory.begin() as session:
                plan = restore_plan(session, head.model_id, head.seq_id, frozenset(unusable))
            log.info("restoring %s: %s + %d op(s)", head.model_id, plan.checkpoint_uri or "log", len(plan.ops))
            try:
                self.engine.restore(plan)
                return
            except UnusableCheckpoint as exc:
                log.error("restoring %s: skipping %s", head.model_id, exc)
                unusable.add(exc.uri)

    def recover(self) -> int:
        with self.session_factory.begin() as session:
            return release_expired_leases(session, utcnow(), max_attempts=self.max_attempts)

    def run_forever(
        self, stop: threading.Event, idle_wait: float = 1.0, recover_every: float = 5.0, sweep_every: float = 60.0
    ) -> None:
        """Tick until `stop` is set; between empty ticks sleep until `wake` is set or `idle_wait` passes. Expired
        leases are recovered on an idle pass at most every `recover_every` seconds (a write transaction each time,
        which would otherwise contend with submissions for SQLite's write lock after every job), and checkpoints
        whose TTL passed are deleted (rows and files) on an idle pass at most every `sweep_every` seconds."""
        log.info("worker %s serving %s", self.worker_id, self.base_model)
        next_recovery = next_sweep = 0.0
        while not stop.is_set():
            self.wake.clear()
            try:
                handled = self.tick()
                if handled == 0 and time.monotonic() >= next_recovery:
                    self.recover()
                    next_recovery = time.monotonic() + recover_every
                if handled == 0 and time.monotonic() >= next_sweep:
                    swept = sweep_expired_checkpoints(self.session_factory)
                    if swept:
                        log.info("deleted %d expired checkpoint(s)", swept)
                    next_sweep = time.monotonic() + sweep_every
            except Exception:  # the database may be briefly unavailable; never let the loop die
                log.exception("worker tick failed")
                handled = 0
            if handled == 0:
                self.wake.wait(idle_wait)

"""The worker registry and the reconciler's database half: heartbeats, dead workers, work that needs a wake-up.

Workers of a scaled-out deployment register a row (`register_worker`) and refresh `heartbeat_at` every few
seconds. `reap_dead_workers` treats a worker silent for longer than `dead_after` as gone: it releases its
leases (requeued, or failed once a job has been tried `max_attempts` times — a poison request), unpins its
training runs so the next claimer restores them, and deletes its row. `queued_work` lists where queued jobs are
waiting, so the reconciler can re-send wake-ups whose messages were lost.

Like the job store, every function works inside the caller's transaction and never commits. The broker's queue
and channel names are in `contract/broker.py`.

Limits: liveness is judged by wall-clock heartbeats; a worker paused longer than `dead_after` is treated as dead
and its late writes are refused by the lease fencing tokens.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from api.db.jobs import requeue_leased
from api.db.models import TRAINING_LANE, Job, JobState, TrainingRun, Worker
from api.db.types import utcnow
from contract.jobs import JobKind


def register_worker(session: Session, worker_id: str, role: str, base_models: Sequence[str], queue: str) -> None:
    session.merge(Worker(id=worker_id, role=role, base_models=list(base_models), queue=queue, heartbeat_at=utcnow()))
    session.flush()


def heartbeat(session: Session, worker_id: str) -> bool:
    """Refresh the worker's heartbeat; False if it was reaped meanwhile (it must register again)."""
    return session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow())).rowcount == 1


def deregister_worker(session: Session, worker_id: str) -> None:
    """A clean shutdown: give back leases and placements at once instead of waiting to be reaped."""
    _release(session, [worker_id], max_attempts=1 << 30)


def reap_dead_workers(session: Session, now: datetime, dead_after: float, max_attempts: int = 3) -> list[str]:
    """Release everything held by workers silent since `now - dead_after`; returns their ids."""
    dead = list(
        session.scalars(
            select(Worker.id).where(Worker.heartbeat_at < now - timedelta(seconds=dead_after)).with_for_update()
        )
    )
    if dead:
        _release(session, dead, max_attempts)
    return dead


def _release(session: Session, worker_ids: list[str], max_attempts: int) -> None:
    requeue_leased(session, Job.lease_owner.in_(worker_ids), max_attempts=max_attempts)
    session.execute(update(TrainingRun).where(TrainingRun.worker_id.in_(worker_ids)).values(worker_id=None))
    session.execute(delete(Worker).where(Worker.id.in_(worker_ids)))
    session.flush()


@dataclass(frozen=True)
class Waiting:
    """Queued work of one kind for one base model: sampling or training, and the worker it is pinned to."""

    base_model: str
    sampling: bool
    worker_queue: str | None


def queued_work(session: Session, older_than: datetime) -> set[Waiting]:
    """Where jobs queued before `older_than` are waiting (one entry per distinct destination)."""
    rows = session.execute(
        select(Job.base_model, Job.kind, Job.lane, Worker.queue)
        .outerjoin(TrainingRun, TrainingRun.id == Job.model_id)
        .outerjoin(Worker, Worker.id == TrainingRun.worker_id)
        .where(Job.state == JobState.QUEUED.value, Job.created_at < older_than)
        .distinct()
    ).all()
    return {
        Waiting(base_model, kind == JobKind.SAMPLE.value, queue if lane == TRAINING_LANE else None)
        for base_model, kind, lane, queue in rows
    }

"""`GET /api/v1/queue`: the caller's pending and running requests, the live workers and the served base models.

Each of the caller's queued requests says how many queued requests of its base model (any tenant's: a count, never
their ids) were submitted before it. Workers are the registered ones heard from within `LOOM_WORKER_DEAD_SECONDS`
(scaled-out `celery` workers), or, with the embedded queue, one `embedded` worker per served base model inside
the API process.

Limits: separately started workers of the `external` queue do not register, so they are not listed; at most
`limit` requests (default 100, oldest first).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from api.db.models import Job, JobState, Worker
from api.db.types import utcnow
from api.deps import State, Tenant
from loom.types import QueuedRequest, QueueResponse, WorkerInfo
from loom.types.limits import MAX_PAGE_SIZE

router = APIRouter(prefix="/api/v1")
PENDING = (JobState.QUEUED.value, JobState.LEASED.value)


@router.get("/queue")
def get_queue(
    state: State, owner: Tenant, limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100
) -> dict[str, Any]:
    settings = state.settings
    with state.reading() as session:
        jobs = session.scalars(
            select(Job).where(Job.owner == owner, Job.state.in_(PENDING)).order_by(Job.created_at).limit(limit)
        ).all()
        requests = [
            QueuedRequest(
                request_id=job.id,
                kind=job.kind,
                model_id=job.model_id,
                base_model=job.base_model,
                state=job.state,
                created_at=job.created_at,
                started_at=job.started_at,
                attempt=job.attempt,
                ahead=0
                if job.state == JobState.LEASED.value
                else session.scalar(
                    select(func.count(Job.id)).where(
                        Job.state == JobState.QUEUED.value,
                        Job.base_model == job.base_model,
                        Job.created_at < job.created_at,
                    )
                ),
            )
            for job in jobs
        ]
        alive_since = utcnow() - timedelta(seconds=settings.worker_dead_seconds)
        workers = [
            WorkerInfo(
                id=w.id, role=w.role, base_models=w.base_models, started_at=w.started_at, heartbeat_at=w.heartbeat_at
            )
            for w in session.scalars(select(Worker).where(Worker.heartbeat_at >= alive_since).order_by(Worker.id))
        ]
    served = sorted(state.catalogue.names)
    if settings.queue == "embedded":
        workers += [WorkerInfo(id=f"embedded:{name}", role="all", base_models=[name]) for name in served]
    return QueueResponse(requests=requests, workers=workers, base_models=served).to_wire()

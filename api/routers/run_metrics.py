"""A training run's metric history: `GET /api/v1/training_runs/{run_id}/metrics`, what the web console plots.

The points come from the results the server already stores: the run's finished forward_backward and optim_step
requests, in the order the run applied them (its `seq_id`s). Requests after the n-th finished optim_step belong to
step n (the first step is 0), and so does the optim_step that ends it; a point holds each metric's mean over the
step's requests that reported it (`loss:sum`, a custom loss's metrics, the optimizer's). Failed and unfinished
requests count nothing. Only the run's owner sees it: another tenant's run answers 404 exactly like a missing one.

Limits: every finished request of the run is read on each call (the metrics only, not the per-token outputs);
forward-only requests (evaluations) are not plotted.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from api.db.models import Job, JobState
from api.deps import State, Tenant, owned_run
from contract.jobs import JobKind
from loom.types import TrainingRunMetricsPoint, TrainingRunMetricsResponse

router = APIRouter(prefix="/api/v1")


def metric_points(rows: list[tuple[str, datetime, dict[str, Any] | None]]) -> list[TrainingRunMetricsPoint]:
    """Steps of `rows` — (kind, finished_at, metrics) of finished requests in the run's order — averaged per step."""
    times: list[datetime] = []
    values: list[dict[str, list[float]]] = []
    step_ended = True
    for kind, finished_at, metrics in rows:
        if step_ended:
            values.append(defaultdict(list))
            times.append(finished_at)
        times[-1] = finished_at
        for name, value in (metrics or {}).items():
            values[-1][name].append(float(value))
        step_ended = kind == JobKind.OPTIM_STEP
    return [
        TrainingRunMetricsPoint(step=step, time=at, metrics={name: sum(vs) / len(vs) for name, vs in reported.items()})
        for step, (at, reported) in enumerate(zip(times, values, strict=True))
    ]


@router.get("/training_runs/{run_id}/metrics")
def training_run_metrics(run_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    kinds = [JobKind.FORWARD_BACKWARD.value, JobKind.OPTIM_STEP.value]
    with state.reading() as session:
        owned_run(session, owner, run_id)
        rows = session.execute(
            select(Job.kind, Job.finished_at, Job.result["metrics"])
            .where(
                Job.model_id == run_id,
                Job.owner == owner,
                Job.state == JobState.DONE.value,
                Job.kind.in_(kinds),
            )
            .order_by(Job.seq_id)
        ).all()
    points = metric_points([(kind, finished_at, metrics) for kind, finished_at, metrics in rows])
    return TrainingRunMetricsResponse(training_run_id=run_id, points=points).to_wire()

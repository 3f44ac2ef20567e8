"""A training run's metric history, as `GET /api/v1/training_runs/{run_id}/metrics` answers it (the web console
plots it): one point per optimizer step with the loss and every metric the run's requests reported."""

from __future__ import annotations

from datetime import datetime

from ._base import WireModel


class TrainingRunMetricsPoint(WireModel):
    """What the finished forward_backward and optim_step requests of one step reported."""

    step: int
    """Optimizer steps the run had applied before this step's requests (0 for the first step); the step's own
    optim_step, once finished, is counted in this point too."""
    time: datetime
    """When the last of the step's finished requests finished."""
    metrics: dict[str, float]
    """Each metric's mean over the step's requests that reported it (e.g. `loss:sum`, a custom loss's metrics, the
    optimizer's); a metric reported once is that value."""


class TrainingRunMetricsResponse(WireModel):
    training_run_id: str
    points: list[TrainingRunMetricsPoint]
    """Oldest step first; steps whose requests have not finished yet are absent."""

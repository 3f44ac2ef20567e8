"""The queue as a tenant sees it (`GET /api/v1/queue`): its own pending and running requests, the live workers and
the base models they serve. Other tenants' requests appear only as a count ahead of each of the caller's."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from ._base import WireModel


class QueuedRequest(WireModel):
    request_id: str
    kind: str
    model_id: str | None = None
    """The training run or sampling session it belongs to."""
    base_model: str
    state: Literal["queued", "leased"]
    """`leased`: a worker is running it."""
    created_at: datetime
    started_at: datetime | None = None
    attempt: int
    """How many workers have taken it (more than one after a worker died)."""
    ahead: int
    """Queued requests of the same base model (every tenant's) submitted before it; 0 once running."""


class WorkerInfo(WireModel):
    id: str
    role: Literal["train", "sample", "all"]
    base_models: list[str]
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    """Absent for the workers inside the API process (`embedded`), which live as long as it does."""


class QueueResponse(WireModel):
    requests: list[QueuedRequest]
    """Oldest first, at most `limit`."""
    workers: list[WorkerInfo]
    base_models: list[str]
    """What this deployment serves."""

"""Usage wire types: billing usage events and current checkpoint storage (Tinker's admin usage routes).

Role: ``GET /api/v1/billing/usage/events?starting_on=&ending_before=`` answers :class:`BillingUsageResponse`
(hourly buckets; the kind of usage and its quantity in ``event_info``, discriminated on ``type``) and
``GET /api/v1/billing/usage/checkpoints/current[?project_id=]`` answers
:class:`CurrentCheckpointStorageUsageResponse`. Loom's own ``GET /api/v1/billing/usage/runs`` (same window as the
events) answers :class:`RunUsageResponse`: the window's figures per training run of the caller.

Cost and rate fields exist because tinker's types carry them; a server without prices (Loom) leaves them ``None``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from ._base import WireModel


class GetBillingUsageRequest(WireModel):
    """The query of the usage-events route: a window of whole UTC hours, at most 14 days long."""

    starting_on: datetime
    """Inclusive start, on a UTC hour boundary, not in the future."""
    ending_before: datetime
    """Exclusive end, on a UTC hour boundary, at most 14 days after ``starting_on``."""


class TrainingBillingEvent(WireModel):
    type: Literal["training"] = "training"
    token_count: int


class SamplingPrefillBillingEvent(WireModel):
    type: Literal["sampling_prefill"] = "sampling_prefill"
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(WireModel):
    type: Literal["sampling_sample"] = "sampling_sample"
    token_count: int


class CheckpointBillingEvent(WireModel):
    type: Literal["checkpoint"] = "checkpoint"
    count: int


class StorageBillingEvent(WireModel):
    type: Literal["storage"] = "storage"
    free: bool = False
    gigabyte_hours: float


BillingEventInfo = Annotated[
    TrainingBillingEvent
    | SamplingPrefillBillingEvent
    | SamplingSampleBillingEvent
    | CheckpointBillingEvent
    | StorageBillingEvent,
    Field(discriminator="type"),
]


class BillingUsageEvent(WireModel):
    """One hour of one kind of usage, for one (base model, session)."""

    bucket_start: datetime
    bucket_end: datetime
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    estimated_cost_usd: float | None = None
    effective_rate_usd_per_million_tokens: float | None = None
    effective_rate_usd_per_gigabyte_month: float | None = None
    event_info: BillingEventInfo


class BillingUsageSession(WireModel):
    user_metadata: dict[str, str] | None = None


class BillingUsageResponse(WireModel):
    data: list[BillingUsageEvent] = Field(default_factory=list)
    sessions: dict[str, BillingUsageSession] = Field(default_factory=dict)
    """session_id -> its attributes, for every session appearing in ``data``."""
    cost_data_through: datetime | None = None


class CurrentCheckpointStorageUsageItem(WireModel):
    """The live checkpoints of one (project, owner)."""

    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: float | None = None


class CurrentCheckpointStorageUsageResponse(WireModel):
    effective_rate_usd_per_gigabyte_month: float | None = None
    data: list[CurrentCheckpointStorageUsageItem] = Field(default_factory=list)


class RunUsage(WireModel):
    """One of the caller's training runs: what it used in the window, and what its checkpoints store now."""

    training_run_id: str
    base_model: str
    session_id: str | None = None
    training_tokens: int = 0
    """Tokens of the run's finished forward_backward and forward requests."""
    sampling_prefill_tokens: int = 0
    """Prompt tokens of finished samples from the run's checkpoints (any sampler, OpenAI requests included), less
    the cached ones."""
    sampling_prefill_cached_tokens: int = 0
    sampling_sample_tokens: int = 0
    """Tokens those samples generated."""
    checkpoints_saved: int = 0
    stored_bytes: int = 0
    """Bytes of the run's listed checkpoints now (whatever the window)."""


class RunUsageResponse(WireModel):
    runs: list[RunUsage] = Field(default_factory=list)
    """Runs with any figure above zero, most training tokens first."""

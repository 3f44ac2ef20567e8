"""REST management wire types (runs, checkpoints, sessions, samplers).

Role: responses of ``GET /api/v1/training_runs[/{id}]``,
``GET /api/v1/training_runs/{id}/checkpoints``, ``GET /api/v1/checkpoints``,
``POST /api/v1/weights_info``, ``GET /api/v1/samplers/{id}``,
``GET /api/v1/sessions[/{id}]``, the checkpoint TTL endpoint and
``GET …/checkpoints/external_weights/{name}/external_weights_urls`` and
``POST /api/v1/copy_weights``.

Checkpoint paths: ``tinker://<training_run_id>/weights/<name>`` (training
state), ``…/sampler_weights/<name>`` (sampler weights), ``…/external_weights/…``.
:class:`ParsedCheckpointTinkerPath` splits them; its ``checkpoint_id`` keeps
the kind segment (``"weights/<name>"``), as tinker puts it in REST URLs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from ._base import WireModel
from .bounded import Count64, TtlSeconds
from .sessions import SessionStatus
from .training import OptimizerConfig

CheckpointType = Literal["training", "sampler", "external"]

_SEGMENT_TO_TYPE: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


class Checkpoint(WireModel):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class ParsedCheckpointTinkerPath(WireModel):
    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> "ParsedCheckpointTinkerPath":
        """Split ``tinker://<run>/<kind>/<name>``; ``ValueError`` if malformed."""
        prefix = "tinker://"
        if not tinker_path.startswith(prefix):
            raise ValueError(f"not a tinker:// path: {tinker_path!r}")
        parts = tinker_path[len(prefix) :].split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in _SEGMENT_TO_TYPE:
            raise ValueError(f"malformed tinker path: {tinker_path!r}")
        return cls(
            tinker_path=tinker_path,
            training_run_id=parts[0],
            checkpoint_type=_SEGMENT_TO_TYPE[parts[1]],
            checkpoint_id=f"{parts[1]}/{parts[2]}",
        )


class Cursor(WireModel):
    offset: int
    limit: int
    total_count: int


class TrainingRun(WireModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(WireModel):
    training_runs: list[TrainingRun] = Field(default_factory=list)
    cursor: Cursor


class CheckpointsListResponse(WireModel):
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    cursor: Cursor | None = None


class WeightsInfoRequest(WireModel):
    tinker_path: str


class WeightsInfoResponse(WireModel):
    base_model: str
    optimizer_config: OptimizerConfig | None = None
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    train_vision: bool | None = None
    """Loom's extension: the run also trains the vision tower (`LoraConfig.train_vision`)."""


class GetSamplerResponse(WireModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class GetSessionResponse(WireModel):
    training_run_ids: list[str] = Field(default_factory=list)
    sampler_ids: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None
    # Loom's additions (the official SDK keeps them as extra fields):
    project_id: str | None = None
    created_at: datetime | None = None
    status: SessionStatus | None = None
    """None when the session neither finished nor heartbeated lately."""


class ListSessionsResponse(WireModel):
    sessions: list[str] = Field(default_factory=list)
    """Session ids, newest first."""
    cursor: Cursor | None = None


class SetCheckpointTtlRequest(WireModel):
    ttl_seconds: TtlSeconds | None = None
    """``None`` = never expires."""


class ExternalWeightsUrlsResponse(WireModel):
    urls: dict[str, str]
    """A signed download URL per file, keyed by the file's path relative to the checkpoint root."""
    expires: datetime
    """When the URLs stop working (ask again for fresh ones)."""


class CopyWeightsRequest(WireModel):
    """Copy ``source_path`` into a new checkpoint of the caller: in a new session of project
    ``destination_project_id``, or as run ``<session_id>:train:<model_seq_id>`` of one of the caller's sessions."""

    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None
    model_seq_id: Count64 | None = None
    ttl_seconds: TtlSeconds | None = None
    """The copy's time-to-live (the source's expiry is not inherited); ``None`` = never expires."""
    weights_access_token: str | None = None


class CopyWeightsResponse(WireModel):
    tinker_path: str

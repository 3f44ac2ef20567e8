"""Service-level wire types: sessions, capabilities, health, client config, telemetry.

Role: bodies of ``/api/v1/create_session``, ``session_heartbeat``,
``get_server_capabilities``, ``healthz``, ``client/config``,
``client/dynamic_config``, ``telemetry`` and ``auth/token``.

``ClientConfigResponse`` carries the server's feature flags. Its defaults are
the SDK's defaults, so a server that returns ``{}`` keeps tinker 0.38 on the
basic path; the gated extensions (batched polling, server-side custom losses,
zstd bodies, join_sampling_session) stay off unless the server turns them on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import WireModel
from .bounded import JsonObject


class CreateSessionRequest(WireModel):
    tags: list[str] = Field(default_factory=list)
    user_metadata: JsonObject | None = None
    sdk_version: str = "unknown"
    project_id: str | None = None
    display_name: str | None = None
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(WireModel):
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(WireModel):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(WireModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SupportedModel(WireModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None
    # Loom's admission limits (the official SDK keeps them as extra fields):
    max_train_sequence_tokens: int | None = None
    """The longest sequence a forward_backward datum may hold (one training pass)."""
    train_pass_tokens: int | None = None
    """Padded tokens (rows × longest row) a worker trains in one pass."""
    max_train_request_tokens: int | None = None
    """The most tokens one forward_backward request may carry."""
    estimated_train_pass_bytes: int | None = None
    """Estimated activation memory of one full training pass."""
    sample_batch_tokens: int | None = None
    """KV-cache tokens one decode batch holds: a sample request's samples × (prompt + max_tokens) must fit."""
    # What the deployment's model catalogue says of the model:
    aliases: list[str] | None = None
    """Other names clients may pass as `base_model`."""
    architecture: str | None = None
    """The transformers causal-LM class the weights load into."""
    total_params: int | None = None
    active_params: int | None = None
    """Parameters used per token (a MoE's shared part plus its routed top-k experts)."""
    max_lora_rank: int | None = None
    dtype: str | None = None
    """What the workers compute in."""


class GetServerCapabilitiesResponse(WireModel):
    supported_models: list[SupportedModel] = Field(default_factory=list)


class HealthResponse(WireModel):
    status: Literal["ok"] = "ok"


class ClientConfigRequest(WireModel):
    sdk_version: str = "unknown"


class ClientConfigResponse(WireModel):
    """Feature flags; unknown flags are ignored by the SDK."""

    pjwt_auth_enabled: bool = False
    credential_default_source: str = "api_key"
    sample_dispatch_bytes_semaphore_size: int = 10 * 1024 * 1024
    inflight_response_bytes_semaphore_size: int = 50 * 1024 * 1024
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False
    fwdbwd_max_chunk_len: int = 1024
    fwdbwd_max_chunk_bytes_count: int = 5_000_000
    fwdbwd_dispatch_bytes_semaphore_size: int = 50_000_000
    billing_exception_max_pause_duration_sec: int = 3600
    sample_no_retries: bool = False
    sample_enable_stuck_detection: bool = True
    sample_max_concurrent_requests: int = 2000
    use_pyqwest_transport: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False
    create_model_via_load_weights: bool = False
    proto_write_fwdbwd: bool = False
    """SDK 0.18–0.24 only: send forward_backward as protobuf."""
    fwd_via_fwdbwd: bool = False
    """SDK 0.18–0.24 only: run forward via forward_backward(forward_only)."""


class ClientDynamicConfigResponse(WireModel):
    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class TelemetrySendRequest(WireModel):
    """A batch of client telemetry events (kept as raw dicts)."""

    events: list[JsonObject] = Field(default_factory=list)
    platform: str | None = None
    sdk_version: str | None = None
    session_id: str | None = None
    process_uuid: str | None = None


class TelemetryResponse(WireModel):
    status: Literal["accepted"] = "accepted"


class AuthTokenRequest(WireModel):
    """The SDK's JWT exchange sends an empty object."""


class AuthTokenResponse(WireModel):
    jwt: str

"""Session and discovery endpoints: client/config, client/dynamic_config, create_session, session_heartbeat,
get_server_capabilities, healthz, telemetry.

`client/config` answers with the feature flags this server implements: protobuf forward_backward (SDK >= 0.25
always sends it), no zstd request bodies, batched sampling completions (`retrieve_futures`) and server-allocated
clone ids for unpickled sampling clients (`join_sampling_session`); `client/dynamic_config` turns on explicit
`cancel_future` for abandoned samples. A heartbeat of a finished session answers 410, which stops the SDK's
heartbeat loop. Server-side custom losses (`create_custom_loss`) are on.

Limits: telemetry is accepted and dropped.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import update

from api.admission import WorkerBudget
from api.db.models import ClientSession
from api.db.types import utcnow
from api.deps import State, Tenant, live_session
from loom.types import (
    ClientConfigRequest,
    ClientConfigResponse,
    ClientDynamicConfigResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    GetServerCapabilitiesResponse,
    HealthResponse,
    SessionHeartbeatRequest,
    SessionHeartbeatResponse,
    TelemetryResponse,
    TelemetrySendRequest,
)

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
def client_config(owner: Tenant, _: ClientConfigRequest | None = None) -> dict[str, Any]:
    return ClientConfigResponse(
        proto_compress_fwdbwd=False,
        sample_use_retrieve_futures=True,
        sample_join_sampling_session=True,
        custom_loss_server_side=True,
    ).to_wire()


@router.post("/client/dynamic_config")
def client_dynamic_config(owner: Tenant, _: ClientConfigRequest | None = None) -> dict[str, Any]:
    return ClientDynamicConfigResponse(sample_cancel_enabled=True).to_wire()


@router.post("/create_session")
def create_session(body: CreateSessionRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        record = ClientSession(
            owner=owner,
            tags=body.tags,
            user_metadata=body.user_metadata or {},
            sdk_version=body.sdk_version,
            project_id=body.project_id,
            display_name=body.display_name,
        )
        session.add(record)
        session.flush()
        session_id = record.id
    return CreateSessionResponse(session_id=session_id).to_wire()


@router.post("/session_heartbeat")
def session_heartbeat(body: SessionHeartbeatRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        live_session(session, owner, body.session_id)
        session.execute(
            update(ClientSession).where(ClientSession.id == body.session_id).values(last_heartbeat_at=utcnow())
        )
    return SessionHeartbeatResponse().to_wire()


@router.get("/get_server_capabilities")
def get_server_capabilities(state: State, owner: Tenant) -> dict[str, Any]:
    models = [WorkerBudget.of(m, state.settings).capabilities() for m in state.catalogue.entries.values()]
    return GetServerCapabilitiesResponse(supported_models=models).to_wire()


@router.get("/healthz")
def healthz() -> dict[str, Any]:
    return HealthResponse().to_wire()


@router.post("/telemetry")
def telemetry(_: TelemetrySendRequest | None = None) -> dict[str, Any]:
    return TelemetryResponse().to_wire()

"""What every router needs: the app state, the caller's tenant, short database transactions, and enqueueing.

`Tenant` resolves the `X-API-Key` header (the official SDK's header; `Authorization: Bearer` is accepted too)
to the owner of that key, and records it on the request for the request log; every lookup below filters by that
owner, so another tenant's ids answer 404 exactly like ids that do not exist. It also counts the request against
the tenant's rate limits (`api/rate_limits.py`; `enqueue` counts a job's tokens). `Operator` admits only an
operator tenant's keys (403 otherwise). `live_session` also refuses (410) new work in a session its client finished.

Limits: handlers that touch the database are plain `def` functions (FastAPI runs them in its thread pool), and
must keep each `transaction()` short: on SQLite a transaction holds the write lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.db.jobs import JobConflict, submit_job
from api.db.keys import authenticate
from api.db.models import ApiKey, ClientSession, TrainingRun
from api.db.tenants import is_operator
from api.errors import APIError, ErrorCode, not_found
from api.queue import PollingQueue
from api.rate_limits import RateLimiter, submitted_tokens
from contract.catalogue import BaseModelEntry, Catalogue
from contract.checkpoint_store import CheckpointStore, configured_checkpoint_store
from contract.jobs import JobPayload
from contract.settings import Settings


@dataclass
class AppState:
    settings: Settings
    catalogue: Catalogue
    sessions: sessionmaker[Session]
    queue: PollingQueue
    readers: sessionmaker[Session] | None = None
    """Sessions for read-only paths (never take SQLite's write lock); defaults to `sessions`."""

    @cached_property
    def store(self) -> CheckpointStore:
        """The deployment's checkpoint store, opened on first use (published tokenizers are read from it)."""
        return configured_checkpoint_store(self.settings)

    @cached_property
    def rate_limiter(self) -> RateLimiter:
        """The tenants' rate limits and quotas, with this deployment's counters (`api/rate_limits.py`)."""
        return RateLimiter(self.settings)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with (self.readers or self.sessions)() as session:
            yield session

    def model(self, base_model: str | None) -> BaseModelEntry:
        entry = self.catalogue.resolve(base_model or "")
        if entry is None:
            raise APIError(
                400,
                ErrorCode.UNKNOWN_MODEL,
                f"unknown base_model {base_model!r}; this server serves {sorted(self.catalogue.names)}",
                "base_model",
            )
        return entry


def app_state(request: Request) -> AppState:
    return request.app.state.loom


State = Annotated[AppState, Depends(app_state)]


def api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def tenant(request: Request, state: State) -> str:
    key = api_key(request)
    if not key:
        raise APIError(401, ErrorCode.UNAUTHENTICATED, "missing API key: send it in the X-API-Key header")
    with state.reading() as session:
        record = authenticate(session, key)
        limits = None if record is None else state.rate_limiter.limits(session, record.owner)
    if record is None or limits is None:
        raise APIError(401, ErrorCode.UNAUTHENTICATED, "invalid or revoked API key")
    request.state.tenant = record.owner  # for the request log (`api/middleware.py::RequestLog`)
    request.state.tenant_limits = limits  # for `enqueue` and the quota checks
    request.state.api_key_id = record.id  # jobs record the key that submitted them (usage per key)
    state.rate_limiter.admit_request(request, record.owner, limits)
    return record.owner


Tenant = Annotated[str, Depends(tenant)]


def operator(state: State, owner: Tenant) -> str:
    """The caller's tenant, if it is an operator (its keys manage tenants); 403 otherwise."""
    with state.reading() as session:
        allowed = is_operator(session, owner)
    if not allowed:
        raise APIError(
            403, ErrorCode.FORBIDDEN, "this route is for operators: your tenant's keys cannot manage tenants"
        )
    return owner


Operator = Annotated[str, Depends(operator)]


def caller_key(request: Request, state: State, _: Tenant) -> ApiKey:
    """The live API key the request authenticated with (for routes about the key itself, or that sign links)."""
    with state.reading() as session:
        record = authenticate(session, api_key(request) or "")
    if record is None:  # revoked between the two reads
        raise APIError(401, ErrorCode.UNAUTHENTICATED, "invalid or revoked API key")
    return record


CallerKey = Annotated[ApiKey, Depends(caller_key)]


def owned_run(session: Session, owner: str, model_id: str) -> TrainingRun:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == model_id, TrainingRun.owner == owner))
    if run is None:
        raise not_found(f"training run {model_id!r} not found")
    return run


def owned_session(session: Session, owner: str, session_id: str) -> ClientSession:
    found = session.scalar(select(ClientSession).where(ClientSession.id == session_id, ClientSession.owner == owner))
    if found is None:
        raise not_found(f"session {session_id!r} not found")
    return found


def live_session(session: Session, owner: str, session_id: str) -> ClientSession:
    """The caller's session, if it still takes work: a finished one (`POST /sessions/{id}/finish`) answers 410."""
    found = owned_session(session, owner, session_id)
    if found.finished_at is not None:
        raise APIError(
            410,
            ErrorCode.SESSION_FINISHED,
            f"session {session_id} was finished at {found.finished_at.isoformat()} and takes no new requests "
            "(its earlier requests still complete); start a new ServiceClient",
            "session_id",
        )
    return found


def enqueue(
    session: Session,
    request: Request,
    *,
    owner: str,
    base_model: str,
    model_id: str | None,
    seq_id: int | None,
    payload: JobPayload,
) -> str:
    """Queue a job (or find the identical one already queued) and return its request id; its tokens count
    against the tenant's tokens/minute first."""
    app_state(request).rate_limiter.admit_tokens(request, owner, request.state.tenant_limits, submitted_tokens(payload))
    try:
        job, _ = submit_job(
            session,
            owner=owner,
            base_model=base_model,
            model_id=model_id,
            seq_id=seq_id,
            payload=payload,
            idempotency_key=request.headers.get("x-idempotency-key"),
            api_key_id=request.state.api_key_id,
        )
    except JobConflict as exc:
        raise APIError(409, ErrorCode.CONFLICT, str(exc), "seq_id") from exc
    return job.id

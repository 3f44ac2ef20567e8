"""Client sessions as the SDK's RestClient and `ServiceClient.close()` see them.

- `GET /sessions` (ids, newest first, offset/limit) and `GET /sessions/{id}` (its training runs and samplers);
- `POST /sessions/search` (filters, newest first, cursor pages);
- `PUT /sessions/{id}/project` (moves the session, and so its runs and samplers, into a project; a move to another
  project is a `project_assign` in the audit log);
- `POST /sessions/{id}/finish` (what `close()` sends; idempotent, the first reason wins): the session then takes no
  new requests (410) and its heartbeat answers 410, but every request it made still completes and stays
  retrievable;
- `GET /sessions/{id}/trace_export` answers `ready` at once with a link (signed, expiring in `TRACE_LINK_LIFETIME`,
  no API key needed) to `GET /sessions/{id}/trace`, the session's timeline built at download time
  (`api/session_trace.py`).

Every session is the caller's own: another tenant's answers 404, and `access_scope=accessible` sees the same
sessions as `owned` (a Loom tenant shares sessions with no one).

Limits: see `api/session_records.py` (status, search) and `api/signed_links.py` (links).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select

from api.db import audit
from api.db.models import ClientSession
from api.deps import CallerKey, State, Tenant, owned_session
from api.errors import APIError, ErrorCode, not_found
from api.routers.rest import PageOffset, PageSize
from api.session_records import finish, search, session_details, summaries
from api.session_trace import build_trace
from api.signed_links import SignedLink, sign, verify
from loom.types import (
    AssignSessionProjectRequest,
    ClientSessionFinished,
    Cursor,
    ListSessionsResponse,
    SessionFinishRequest,
    SessionFinishResponse,
    SessionSearchRequest,
    SessionTraceExportResponse,
)

router = APIRouter(prefix="/api/v1")

TRACE_LINK_LIFETIME = timedelta(hours=1)


@router.get("/sessions")
def list_sessions(state: State, owner: Tenant, limit: PageSize = 20, offset: PageOffset = 0) -> dict[str, Any]:
    with state.reading() as session:
        total = session.scalar(select(func.count()).select_from(ClientSession).where(ClientSession.owner == owner))
        ids = session.scalars(
            select(ClientSession.id)
            .where(ClientSession.owner == owner)
            .order_by(ClientSession.created_at.desc(), ClientSession.id.desc())
            .offset(offset)
            .limit(limit)
        ).all()
    return ListSessionsResponse(
        sessions=list(ids), cursor=Cursor(offset=offset, limit=limit, total_count=total or 0)
    ).to_wire()


@router.post("/sessions/search")
def search_sessions(body: SessionSearchRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        return search(session, owner, body).to_wire()


@router.get("/sessions/{session_id}")
def get_session(session_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        return session_details(session, owned_session(session, owner, session_id)).to_wire()


@router.put("/sessions/{session_id}/project")
def assign_session_project(
    session_id: str, body: AssignSessionProjectRequest, state: State, owner: Tenant
) -> dict[str, Any]:
    with state.transaction() as session:
        record = owned_session(session, owner, session_id)
        moved = {"session_id": record.id, "project_id": body.project_id, "previous_project_id": record.project_id}
        if record.project_id != body.project_id:
            audit.record(session, owner=owner, actor=owner, event=audit.Event.PROJECT_ASSIGN, **moved)
        record.project_id = body.project_id
        session.flush()
        return summaries(session, [record])[0].to_wire()


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: SessionFinishRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        record = owned_session(session, owner, session_id)
        kept = finish(record, ClientSessionFinished(reason=body.reason, detail=body.detail))
        session.flush()
        return SessionFinishResponse(session_id=record.id, finished_at=record.finished_at, status=kept).to_wire()


@router.get("/sessions/{session_id}/trace_export")
def export_session_trace(session_id: str, request: Request, state: State, key: CallerKey) -> dict[str, Any]:
    with state.reading() as session:
        owned_session(session, key.owner, session_id)
    link = sign(key, f"session-trace:{session_id}", TRACE_LINK_LIFETIME)
    url = request.url_for("download_session_trace", session_id=session_id).include_query_params(**link.query())
    return SessionTraceExportResponse(status="ready", url=str(url), expires=link.expires).to_wire()


@router.get("/sessions/{session_id}/trace", name="download_session_trace")
def download_session_trace(session_id: str, state: State, key: str, expires: int, signature: str) -> Response:
    with state.reading() as session:
        signer = verify(session, f"session-trace:{session_id}", SignedLink(key, expires, signature))
        if signer is None:
            raise APIError(403, ErrorCode.FORBIDDEN, "this trace link is invalid or has expired; export it again")
        record = session.get(ClientSession, session_id)
        if record is None or record.owner != signer.owner:
            raise not_found(f"session {session_id!r} not found")
        trace = build_trace(session, record)
    return Response(
        trace,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'},
    )

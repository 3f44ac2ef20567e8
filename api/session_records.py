"""What the API tells about client sessions: their status, details, summaries and search, and their finish.

A session is `active` while its client heartbeats (the SDK beats every 10 s; `STALE_AFTER` without a beat and the
session is no longer known to be running, so it has no status), and `client_finished` once its client finished it
(`ServiceClient.close()`): the first finish wins and later ones change nothing. Loom never cancels or fails a
session itself, so a search for those statuses matches nothing. A session with no project is in
`DEFAULT_PROJECT`.

Limits: search filters on metadata and status run in
Python over the tenant's sessions, newest first, so a search scans at most the tenant's sessions once per page.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from api.db.models import Checkpoint, ClientSession, SamplingSession, TrainingRun
from api.db.types import utcnow
from loom.types import (
    ClientSessionFinished,
    GetSessionResponse,
    SessionActive,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionStatus,
    SessionSummary,
)
from loom.types.sessions import UserSearchOwner

STALE_AFTER = timedelta(minutes=2)
"""A session not heard from for this long is no longer `active` (the SDK warns its user after the same time)."""
DEFAULT_PROJECT = "default"
SCAN_BATCH = 256


def finish_of(record: ClientSession) -> ClientSessionFinished | None:
    """The client's finish of the session, if it was finished."""
    if record.finished_at is None or record.finish_status is None:
        return None
    return ClientSessionFinished.model_validate(record.finish_status)


def finish(record: ClientSession, finished: ClientSessionFinished) -> ClientSessionFinished:
    """Finish the session with `finished` unless it is finished already; returns the finish that holds."""
    kept = finish_of(record)
    if kept is not None:
        return kept
    record.finished_at = utcnow()
    record.finish_status = finished.to_wire()
    return finished


def status_of(record: ClientSession, now: datetime) -> SessionStatus | None:
    finished = finish_of(record)
    if finished is not None:
        return finished
    return SessionActive() if now - record.last_heartbeat_at <= STALE_AFTER else None


def _metadata(record: ClientSession) -> dict[str, str]:
    return {key: str(value) for key, value in (record.user_metadata or {}).items()}


def session_details(session: Session, record: ClientSession) -> GetSessionResponse:
    runs = session.scalars(
        select(TrainingRun.id).where(TrainingRun.session_id == record.id).order_by(TrainingRun.model_seq_id)
    )
    samplers = session.scalars(
        select(SamplingSession.id)
        .where(SamplingSession.session_id == record.id)
        .order_by(SamplingSession.created_at, SamplingSession.id)
    )
    return GetSessionResponse(
        training_run_ids=list(runs),
        sampler_ids=list(samplers),
        user_metadata=_metadata(record),
        display_name=record.display_name,
        project_id=record.project_id or DEFAULT_PROJECT,
        created_at=record.created_at,
        status=status_of(record, utcnow()),
    )


def summaries(session: Session, records: list[ClientSession]) -> list[SessionSummary]:
    """Summaries of `records` (one query for all their checkpoint counts and sizes)."""
    stored = session.execute(
        select(TrainingRun.session_id, func.count(Checkpoint.id), func.coalesce(func.sum(Checkpoint.size_bytes), 0))
        .join(Checkpoint, Checkpoint.run_id == TrainingRun.id)
        .where(TrainingRun.session_id.in_([r.id for r in records]), Checkpoint.ephemeral.is_(False))
        .group_by(TrainingRun.session_id)
    ).all()
    counts = {session_id: (count, size) for session_id, count, size in stored}
    now = utcnow()
    return [
        SessionSummary(
            session_id=r.id,
            created_at=r.created_at,
            owner=r.owner,
            project_id=r.project_id or DEFAULT_PROJECT,
            status=status_of(r, now),
            checkpoints_count=counts.get(r.id, (0, 0))[0],
            checkpoint_storage_bytes=int(counts.get(r.id, (0, 0))[1]),
            display_name=r.display_name,
            user_metadata=_metadata(r),
        )
        for r in records
    ]


def in_projects(project_ids: list[str]) -> ColumnElement[bool]:
    """Sessions in one of `project_ids` (`DEFAULT_PROJECT` holds the sessions given no project)."""
    projects = [ClientSession.project_id.in_(project_ids)]
    if DEFAULT_PROJECT in project_ids:
        projects.append(ClientSession.project_id.is_(None))
    return or_(*projects)


def _where(query: Select, owner: str, request: SessionSearchRequest) -> Select:
    """The filters of `request` that SQL can apply: tenant, cursor, id / display name, projects."""
    query = query.where(ClientSession.owner == owner)
    if request.cursor is not None:
        last_at, last_id = request.cursor.last_created_at, request.cursor.last_session_id
        query = query.where(
            or_(
                ClientSession.created_at < last_at,
                and_(ClientSession.created_at == last_at, ClientSession.id < last_id),
            )
        )
    matches = []
    if request.session_id is not None:
        matches.append(ClientSession.id == request.session_id)
    if request.display_name is not None:
        name = func.lower(func.coalesce(ClientSession.display_name, ""))
        matches.append(and_(*(name.contains(word, autoescape=True) for word in request.display_name.lower().split())))
    if matches:
        query = query.where(or_(*matches))
    if request.project_ids is not None:
        query = query.where(in_projects(request.project_ids))
    return query


def _status_matches(status: SessionStatus | None, request: SessionSearchRequest) -> bool:
    if request.statuses is None:
        return True
    for wanted in request.statuses:
        if wanted.type == "active" and isinstance(status, SessionActive):
            return True
        if wanted.type == "client_finished" and isinstance(status, ClientSessionFinished):
            if wanted.reasons is None or status.reason.type in wanted.reasons:
                return True
    return False


def _scan(session: Session, query: Select) -> Iterator[ClientSession]:
    yield from session.scalars(
        query.order_by(ClientSession.created_at.desc(), ClientSession.id.desc()).execution_options(yield_per=SCAN_BATCH)
    )


def _matching(records: Iterable[ClientSession], request: SessionSearchRequest) -> Iterator[ClientSession]:
    now = utcnow()
    for record in records:
        metadata = _metadata(record)
        if any(metadata.get(key) != value for key, value in request.user_metadata.items()):
            continue
        if _status_matches(status_of(record, now), request):
            yield record


def search(session: Session, owner: str, request: SessionSearchRequest) -> SessionSearchResponse:
    """One page of the caller's sessions matching `request`, newest first."""
    if isinstance(request.owner, UserSearchOwner) and owner not in request.owner.owner_urns:
        return SessionSearchResponse()  # a tenant sees no one else's sessions
    page: list[ClientSession] = []
    more = False
    for record in _matching(_scan(session, _where(select(ClientSession), owner, request)), request):
        if len(page) == request.limit:
            more = True
            break
        page.append(record)
    next_cursor = None
    if more:
        next_cursor = SessionSearchCursor(last_created_at=page[-1].created_at, last_session_id=page[-1].id)
    return SessionSearchResponse(sessions=summaries(session, page), next_cursor=next_cursor)

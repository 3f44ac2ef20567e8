"""The audit log's store: who created, read, changed or removed which of a tenant's objects, and when.

`record` adds one event inside the caller's transaction, so an event is stored exactly when the change it
describes commits (a refused or rolled-back request leaves none); `checkpoint_event` and `checkpoint_read` are the
same for an event about a checkpoint row. An event belongs to `owner`, the tenant whose object it is, and names
`actor`, who acted: the owner, another tenant reading a published checkpoint (the event still goes to the owner's
log, never the reader's), or `SERVER` for what Loom itself does (the TTL sweep, an operator's `loom keys revoke`).
`day_page` reads one tenant's events of one UTC day, oldest first, one page at a time.

Events (`<resource>_<action>`, `Event`) and the `event_type` that selects them (`EVENT_PREFIXES`):
- checkpoints: `checkpoint_create` (a save the worker committed), `checkpoint_copy` (a copy_weights copy, in the
  copier's log), `checkpoint_read` (`purpose`: `ReadPurpose`), `checkpoint_publish`, `checkpoint_unpublish`,
  `checkpoint_ttl_set`, `checkpoint_delete`, `checkpoint_expire` (the TTL sweep removed it);
- projects: `project_assign` (a session moved into another project);
- organizations: `apikey_revoke` (a tenant is its own organisation);
- teams: none (Loom has no teams).

Limits: plain listings and lookups record nothing; hidden checkpoints (a sampling session's snapshot, recovery
checkpoints) are not audited; events are kept until an operator deletes them (nothing prunes the table).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from api.db.models import AuditEvent, Checkpoint
from api.db.types import utcnow

SERVER = "loom"
"""The actor of what Loom does by itself or on its operator's command, not at a tenant's request."""


class Event(StrEnum):
    CHECKPOINT_CREATE = "checkpoint_create"
    CHECKPOINT_COPY = "checkpoint_copy"
    CHECKPOINT_READ = "checkpoint_read"
    CHECKPOINT_PUBLISH = "checkpoint_publish"
    CHECKPOINT_UNPUBLISH = "checkpoint_unpublish"
    CHECKPOINT_TTL_SET = "checkpoint_ttl_set"
    CHECKPOINT_DELETE = "checkpoint_delete"
    CHECKPOINT_EXPIRE = "checkpoint_expire"
    PROJECT_ASSIGN = "project_assign"
    APIKEY_CREATE = "apikey_create"
    APIKEY_REVOKE = "apikey_revoke"


class ReadPurpose(StrEnum):
    """Why a checkpoint was read (`checkpoint_read`'s `purpose`)."""

    WEIGHTS_INFO = "weights_info"
    SAMPLING = "sampling"
    """A sampling session made on it, a sample naming it directly, or an OpenAI-compatible completion."""
    LOAD_WEIGHTS = "load_weights"
    """`load_weights`, or a training run created from it."""
    DOWNLOAD = "download"
    """Download links handed out (`external_weights_urls`)."""
    COPY = "copy"


EVENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoint_",),
    "projects": ("project_",),
    "teams": ("team_",),
    "organizations": ("organization_", "apikey_"),
}
"""The event-name prefixes each `event_type` but `all` selects."""


def record(
    session: Session,
    *,
    owner: str,
    actor: str,
    event: Event,
    model_id: str | None = None,
    tinker_path: str | None = None,
    **details: Any,
) -> None:
    """Add `event` on `owner`'s object, done by `actor`, to the caller's transaction (JSON-ready `details`)."""
    session.add(
        AuditEvent(
            owner=owner,
            actor=actor,
            at=utcnow(),
            event=event.value,
            details=details,
            model_id=model_id,
            tinker_path=tinker_path,
        )
    )


def checkpoint_event(session: Session, checkpoint: Checkpoint, event: Event, actor: str, **details: Any) -> None:
    """`record` an event about `checkpoint` (nothing for a hidden one)."""
    if checkpoint.ephemeral:
        return
    path, run_id = checkpoint.tinker_path, checkpoint.run_id
    record(session, owner=checkpoint.owner, actor=actor, event=event, model_id=run_id, tinker_path=path, **details)


def checkpoint_read(session: Session, checkpoint: Checkpoint, reader: str, purpose: ReadPurpose) -> None:
    """`reader` read `checkpoint` (their own, or a published one) for `purpose`."""
    checkpoint_event(session, checkpoint, Event.CHECKPOINT_READ, reader, purpose=purpose.value)


def day_page(
    session: Session, owner: str, day: date, event_type: str, offset: int, limit: int
) -> tuple[Sequence[AuditEvent], int]:
    """`owner`'s events of `event_type` on the UTC `day`, oldest first: (the page at `offset`, how many in all)."""
    start = datetime.combine(day, time.min, UTC)
    end = start + timedelta(days=1)
    where = [AuditEvent.owner == owner, AuditEvent.at >= start, AuditEvent.at < end]
    if event_type != "all":
        prefixes = EVENT_PREFIXES[event_type]
        where.append(or_(*(AuditEvent.event.startswith(prefix, autoescape=True) for prefix in prefixes)))
    total = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    page = session.scalars(
        select(AuditEvent).where(*where).order_by(AuditEvent.at, AuditEvent.id).offset(offset).limit(limit)
    ).all()
    return page, total

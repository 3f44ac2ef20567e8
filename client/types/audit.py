"""Audit log wire types (Tinker's ``AdminClient.get_audit_log``).

Role: ``GET /api/v1/audit?event_type=&day=[&offset=&limit=]`` takes :class:`GetAuditLogRequest` and answers
:class:`AuditLogResponse`: the caller's audit entries of one UTC day, oldest first. ``event`` is
``<resource>_<action>`` (``checkpoint_read``, ``project_assign``, ``apikey_revoke``, ...); ``event_details`` says
who acted (``actor``) and what the event was about. ``model_id``, ``tinker_path`` and ``purpose`` repeat, for
checkpoint events, what ``event_details`` holds (tinker keeps them, deprecated, for older clients).

``offset``/``limit`` and ``cursor`` are Loom's paging of a busy day (tinker's SDK sends neither and reads the first
page; ``cursor.total_count`` says how many entries the day holds).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import Field

from ._base import WireModel
from .bounded import Count64
from .limits import MAX_PAGE_SIZE
from .rest import Cursor

AuditEventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]
"""Which resources' events a query returns (tinker's ``event_type``)."""


class GetAuditLogRequest(WireModel):
    """The query of the audit route: one UTC day of one kind of events, a page at a time."""

    event_type: AuditEventType = "all"
    day: date | None = None
    """The UTC day (midnight to midnight) to list; today when left out."""
    offset: Count64 = 0
    limit: int = Field(MAX_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)


class AuditLogEntry(WireModel):
    timestamp: datetime
    event: str
    event_details: dict[str, Any] = Field(default_factory=dict)
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogResponse(WireModel):
    entries: list[AuditLogEntry] = Field(default_factory=list)
    """Sorted by timestamp, oldest first."""
    cursor: Cursor | None = None

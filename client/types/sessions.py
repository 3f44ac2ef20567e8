"""Session lifecycle and identity wire types (tinker SDK 0.38).

Role: bodies of ``POST /api/v1/sessions/{id}/finish`` (``ServiceClient.close()``),
``POST /api/v1/sessions/search``, ``PUT /api/v1/sessions/{id}/project``,
``GET /api/v1/sessions/{id}/trace_export``, ``POST /api/v1/cancel_future``'s
answer and ``GET /api/v1/auth/apikey/me`` (``tinker auth login``).

A session's status is ``active`` (heartbeating, not finished), ``client_finished``
(its client called ``close()``; the first reason wins) or absent (neither finished
nor heard from lately). Loom never cancels or fails a session itself, but a search
may still ask for those statuses (they match nothing).

Limits: a search page holds 1 to 200 sessions; the display-name filter is at
least one character long.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from ._base import WireModel
from .futures import RequestID

ClientSessionFinishReasonType = Literal["success", "errored", "interrupted"]

MAX_FINISH_DETAIL = 2000
"""The longest ``detail`` a session finish may carry (characters)."""

MAX_SEARCH_PAGE = 200
"""The most sessions one search page holds (the SDK's own bound)."""


class ClientSessionFinishReason(WireModel):
    type: ClientSessionFinishReasonType


class SessionFinishRequest(WireModel):
    """What ``ServiceClient.close(status, detail)`` sends; a session's first finish reason is kept."""

    reason: ClientSessionFinishReason
    detail: Annotated[str, Field(max_length=MAX_FINISH_DETAIL)] | None = None


class SessionActive(WireModel):
    type: Literal["active"] = "active"


class ClientSessionFinished(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reason: ClientSessionFinishReason
    detail: str | None = None


SessionStatus = Annotated[SessionActive | ClientSessionFinished, Field(discriminator="type")]


class SessionFinishResponse(WireModel):
    """The session as its finish left it (the SDK ignores the body)."""

    session_id: str
    finished_at: datetime
    status: ClientSessionFinished


class ActiveSessionStatusQuery(WireModel):
    type: Literal["active"] = "active"


class CancelledSessionStatusQuery(WireModel):
    type: Literal["cancelled"] = "cancelled"


class FailedSessionStatusQuery(WireModel):
    type: Literal["failed"] = "failed"


class ClientFinishedSessionStatusQuery(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reasons: Annotated[list[ClientSessionFinishReasonType], Field(min_length=1)] | None = None


SessionStatusQuery = Annotated[
    ActiveSessionStatusQuery
    | CancelledSessionStatusQuery
    | FailedSessionStatusQuery
    | ClientFinishedSessionStatusQuery,
    Field(discriminator="type"),
]


class OwnSearchOwner(WireModel):
    type: Literal["own"] = "own"


class AccessibleSearchOwner(WireModel):
    """Every owner whose sessions the caller may see: in Loom, a tenant sees only its own."""

    type: Literal["accessible"] = "accessible"


class UserSearchOwner(WireModel):
    type: Literal["user"] = "user"
    owner_urns: Annotated[list[str], Field(min_length=1, max_length=10)]


SearchOwner = Annotated[OwnSearchOwner | AccessibleSearchOwner | UserSearchOwner, Field(discriminator="type")]


class SessionSearchCursor(WireModel):
    """Where the next page starts (newest first); pass a response's ``next_cursor`` back unchanged."""

    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearchRequest(WireModel):
    session_id: str | None = None
    """Exact id; with ``display_name``, a session matching either one matches."""
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    """Every pair must be in the session's metadata."""
    display_name: Annotated[str, Field(min_length=1)] | None = None
    """Case-insensitive; every word must appear in the session's display name."""
    owner: SearchOwner = Field(default_factory=OwnSearchOwner)
    statuses: Annotated[list[SessionStatusQuery], Field(min_length=1)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_SEARCH_PAGE)] = 50
    cursor: SessionSearchCursor | None = None


class SessionSummary(WireModel):
    session_id: str
    created_at: datetime
    owner: str
    """The tenant that owns the session."""
    project_id: str
    status: SessionStatus | None = None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(WireModel):
    sessions: list[SessionSummary] = Field(default_factory=list)
    next_cursor: SessionSearchCursor | None = None


class AssignSessionProjectRequest(WireModel):
    project_id: Annotated[str, Field(min_length=1, max_length=256)]


class SessionTraceExportResponse(WireModel):
    """``ready`` with a signed ``url`` (plain GET, no API key) to the session's trace, which ui.perfetto.dev opens."""

    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None
    expires: datetime | None = None


class CancelFutureResponse(WireModel):
    """What ``cancel_future`` did: only a queued request is cancelled (its future then fails); a running or
    finished one is left alone and ``message`` says so."""

    request_id: RequestID
    cancelled: bool
    state: Literal["queued", "running", "done", "failed"]
    message: str


class ApiKeyOrgDetails(WireModel):
    name: str


class ApiKeyUserDetails(WireModel):
    email: str


class ApiKeyDetails(WireModel):
    org_details: ApiKeyOrgDetails
    user_details: ApiKeyUserDetails


class ApiKeySelfResponse(WireModel):
    """The calling API key's public metadata (never the key or its hash), as ``tinker auth login`` reads it.

    Loom has no users or e-mail addresses: the tenant id stands in for both the organisation and the user."""

    key_id: int
    """The key's id (``loom keys``' hexadecimal id, read as a number)."""
    name: str
    note: str = ""
    details: ApiKeyDetails
    tenant: str
    prefix: str
    """The key's first characters, to tell keys apart."""
    created_at: datetime

"""Usage and audit routes (Tinker's AdminClient surface): billing usage events, current checkpoint storage, audit log.

A tenant is its own organisation: every figure is the caller's own (`api/usage.py` says what counts, and that Loom
has no prices). `GET /api/v1/audit` answers 400 `unsupported`: Loom records no audit trail (publishing,
unpublishing, TTL changes, deletions and reads of checkpoints leave no history in its database), and serving the
part the job history holds as an audit log would hide exactly the events an audit looks for.

Limits: the usage window is whole UTC hours, starts no later than now and spans at most 14 days, as in Tinker;
anything else is a 400 naming the parameter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import State, Tenant
from api.errors import APIError, ErrorCode, invalid
from api.usage import billing_usage, checkpoint_storage, hour_of
from loom.types import GetBillingUsageRequest

router = APIRouter(prefix="/api/v1")

MAX_WINDOW = timedelta(days=14)


def _utc_hour(moment: datetime, param: str) -> datetime:
    """`moment` in UTC (a time without an offset is taken as UTC), checked to be a whole hour."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment != hour_of(moment):
        raise invalid(f"{param} must be on a UTC hour boundary (e.g. 2026-07-13T00:00:00Z)", param)
    return moment


@router.get("/billing/usage/events")
def billing_usage_events(
    query: Annotated[GetBillingUsageRequest, Query()], state: State, owner: Tenant
) -> dict[str, Any]:
    start = _utc_hour(query.starting_on, "starting_on")
    end = _utc_hour(query.ending_before, "ending_before")
    if start > datetime.now(UTC):
        raise invalid("starting_on must not be in the future", "starting_on")
    if not start < end <= start + MAX_WINDOW:
        raise invalid("ending_before must be after starting_on, by at most 14 days", "ending_before")
    with state.reading() as session:
        return billing_usage(session, owner, start, end).to_wire()


@router.get("/billing/usage/checkpoints/current")
def current_checkpoint_storage(state: State, owner: Tenant, project_id: str | None = None) -> dict[str, Any]:
    with state.reading() as session:
        return checkpoint_storage(session, owner, project_id).to_wire()


@router.get("/audit")
def audit_log(owner: Tenant) -> dict[str, Any]:
    raise APIError(
        400,
        ErrorCode.UNSUPPORTED,
        "Loom keeps no audit log: who published, unpublished, re-timed, deleted or read a checkpoint is not "
        "recorded, so no complete audit trail can be served (the server's access log has every request)",
    )

"""Usage and audit routes (Tinker's AdminClient surface): billing usage events, current checkpoint storage, audit log;
and Loom's own: usage per training run (`GET /api/v1/billing/usage/runs`, same window as the events) and the usage
report per hour, key and run (`GET /api/v1/usage/report?start=&end=[&format=csv]`, `api/usage_report.py`).

A tenant is its own organisation: every figure and entry is the caller's own (`api/usage.py` says what counts, and
that Loom has no prices). `GET /api/v1/audit` lists the events on the caller's objects of one UTC day (`day`,
default today), oldest first, those of one resource if `event_type` says so; what is recorded, and when, is in
`api/db/audit.py`. Each entry's `event_details` names the `actor` with the event's facts (and, for a checkpoint,
its `model_id` and `tinker_path`, which the entry repeats in tinker's deprecated fields with a read's `purpose`).

Limits: the usage window is whole UTC hours, starts no later than now and spans at most 14 days, as in Tinker (the
report's, at most 31 days); an
audit page holds at most `MAX_PAGE_SIZE` entries (`offset`/`limit`, with a `cursor` giving the day's total).
Anything else is a 400 naming the parameter.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response

from api.db.audit import day_page
from api.db.models import AuditEvent
from api.deps import State, Tenant
from api.errors import invalid
from api.run_usage import run_usage
from api.usage import billing_usage, checkpoint_storage, hour_of
from api.usage_report import usage_report
from loom.types import (
    USAGE_REPORT_COLUMNS,
    AuditLogEntry,
    AuditLogResponse,
    Cursor,
    GetAuditLogRequest,
    GetBillingUsageRequest,
)

router = APIRouter(prefix="/api/v1")

MAX_WINDOW = timedelta(days=14)
MAX_REPORT_WINDOW = timedelta(days=31)


def _utc_hour(moment: datetime, param: str) -> datetime:
    """`moment` in UTC (a time without an offset is taken as UTC), checked to be a whole hour."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment != hour_of(moment):
        raise invalid(f"{param} must be on a UTC hour boundary (e.g. 2026-07-13T00:00:00Z)", param)
    return moment


def _window(start: datetime, end: datetime, names: tuple[str, str], longest: timedelta) -> tuple[datetime, datetime]:
    """The checked [start, end) window: whole UTC hours, starting no later than now, at most `longest` long."""
    start, end = _utc_hour(start, names[0]), _utc_hour(end, names[1])
    if start > datetime.now(UTC):
        raise invalid(f"{names[0]} must not be in the future", names[0])
    if not start < end <= start + longest:
        raise invalid(f"{names[1]} must be after {names[0]}, by at most {longest.days} days", names[1])
    return start, end


def _billing_window(query: Annotated[GetBillingUsageRequest, Query()]) -> tuple[datetime, datetime]:
    return _window(query.starting_on, query.ending_before, ("starting_on", "ending_before"), MAX_WINDOW)


BillingWindow = Annotated[tuple[datetime, datetime], Depends(_billing_window)]


@router.get("/billing/usage/events")
def billing_usage_events(window: BillingWindow, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        return billing_usage(session, owner, *window).to_wire()


@router.get("/billing/usage/runs")
def billing_usage_runs(window: BillingWindow, state: State, owner: Tenant) -> dict[str, Any]:
    """Loom's own: the window's usage per training run of the caller (`api/run_usage.py`)."""
    with state.reading() as session:
        return run_usage(session, owner, *window).to_wire()


@router.get("/usage/report", response_model=None)
def get_usage_report(
    start: datetime,
    end: datetime,
    state: State,
    owner: Tenant,
    format: Literal["json", "csv"] = "json",
    per: Literal["hour", "window"] = "hour",
) -> dict[str, Any] | Response:
    """Rows per hour, key and run; `per=window`: one bucket for the whole window (totals per key and run)."""
    start, end = _window(start, end, ("start", "end"), MAX_REPORT_WINDOW)
    with state.reading() as session:
        report = usage_report(session, owner, start, end, hourly=per == "hour")
    if format == "json":
        return report.to_wire()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_REPORT_COLUMNS)
    for row in report.rows:
        writer.writerow(["" if value is None else value for value in row.model_dump(mode="json").values()])
    name = f"loom-usage-{start:%Y%m%dT%H}-{end:%Y%m%dT%H}.csv"
    return Response(
        out.getvalue(), media_type="text/csv", headers={"content-disposition": f'attachment; filename="{name}"'}
    )


@router.get("/billing/usage/checkpoints/current")
def current_checkpoint_storage(state: State, owner: Tenant, project_id: str | None = None) -> dict[str, Any]:
    with state.reading() as session:
        return checkpoint_storage(session, owner, project_id).to_wire()


def _entry(event: AuditEvent) -> AuditLogEntry:
    about = {"model_id": event.model_id, "tinker_path": event.tinker_path}
    details = {"actor": event.actor, **{k: v for k, v in about.items() if v is not None}, **event.details}
    return AuditLogEntry(
        timestamp=event.at, event=event.event, event_details=details, **about, purpose=event.details.get("purpose")
    )


@router.get("/audit")
def audit_log(query: Annotated[GetAuditLogRequest, Query()], state: State, owner: Tenant) -> dict[str, Any]:
    day = query.day or datetime.now(UTC).date()
    with state.reading() as session:
        events, total = day_page(session, owner, day, query.event_type, query.offset, query.limit)
        entries = [_entry(event) for event in events]
    cursor = Cursor(offset=query.offset, limit=query.limit, total_count=total)
    return AuditLogResponse(entries=entries, cursor=cursor).to_wire()

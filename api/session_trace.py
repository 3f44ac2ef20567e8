"""A session's timeline as a trace that ui.perfetto.dev opens: every request its training runs and samplers made.

The trace is in the Chrome JSON trace-event format, which Perfetto imports as it is (the file the `tinker` CLI saves
as `<session>.pftrace` holds this JSON). Each training run and sampler of the session is a process; each request is
an async slice from its submission to its end (or to the export, if it has not ended), with a nested `running` slice
while a worker held it, and its request id, seq_id, state, error and token cost as arguments. Instant events mark
the session's creation, its last heartbeat and its finish.

Limits: built from the jobs table at download time, so it reflects the requests Loom still keeps; the whole trace
is built in memory (about 400 bytes per request).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ClientSession, Job, SamplingSession, TrainingRun
from api.db.types import utcnow
from api.session_records import finish_of

SESSION_PID = 0


def _us(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _slice(pid: int, request_id: str, name: str, start: datetime, end: datetime, args: dict[str, Any]) -> list[dict]:
    common = {"cat": "request", "id": request_id, "pid": pid, "tid": pid, "name": name}
    return [{**common, "ph": "b", "ts": _us(start), "args": args}, {**common, "ph": "e", "ts": _us(end)}]


def _job_events(pid: int, job: Any, now: datetime) -> list[dict]:
    end = job.finished_at or now
    args = {"request_id": job.id, "seq_id": job.seq_id, "state": job.state, "cost_tokens": job.cost_tokens}
    if job.error:
        args |= {"error": job.error, "category": job.error_category}
    events = _slice(pid, job.id, job.kind, job.created_at, end, args)
    if job.started_at is not None:
        events[1:1] = _slice(pid, job.id, "running", job.started_at, end, {})
    return events


def _instant(name: str, at: datetime, args: dict[str, Any] | None = None) -> dict:
    return {
        "ph": "i",
        "s": "g",
        "pid": SESSION_PID,
        "tid": SESSION_PID,
        "name": name,
        "ts": _us(at),
        "args": args or {},
    }


def _name(pid: int, name: str) -> dict:
    return {"ph": "M", "pid": pid, "tid": pid, "name": "process_name", "args": {"name": name}}


def build_trace(session: Session, record: ClientSession) -> bytes:
    """The trace of session `record` (see the module docstring), as JSON bytes."""
    now = utcnow()
    runs = session.scalars(
        select(TrainingRun.id).where(TrainingRun.session_id == record.id).order_by(TrainingRun.model_seq_id)
    ).all()
    samplers = session.scalars(
        select(SamplingSession.id)
        .where(SamplingSession.session_id == record.id)
        .order_by(SamplingSession.created_at, SamplingSession.id)
    ).all()
    pids = {model_id: pid for pid, model_id in enumerate([*runs, *samplers], start=1)}
    title = f"session {record.id}" + (f" ({record.display_name})" if record.display_name else "")
    events = [_name(SESSION_PID, title)]
    events += [
        _name(pid, f"{'training run' if model_id in runs else 'sampler'} {model_id}") for model_id, pid in pids.items()
    ]
    events.append(_instant("session created", record.created_at, {"sdk_version": record.sdk_version}))
    events.append(_instant("last heartbeat", record.last_heartbeat_at))
    finished = finish_of(record)
    if finished is not None and record.finished_at is not None:
        events.append(_instant("session finished", record.finished_at, finished.to_wire()))
    if pids:
        jobs = session.execute(
            select(
                Job.id,
                Job.kind,
                Job.model_id,
                Job.seq_id,
                Job.state,
                Job.error,
                Job.error_category,
                Job.cost_tokens,
                Job.created_at,
                Job.started_at,
                Job.finished_at,
            )
            .where(Job.model_id.in_(list(pids)))
            .order_by(Job.created_at, Job.id)
        )
        for job in jobs:
            events += _job_events(pids[job.model_id], job, now)
    trace = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"session_id": record.id, "exported_at": now.isoformat(), "source": "loom"},
    }
    return json.dumps(trace, separators=(",", ":")).encode()

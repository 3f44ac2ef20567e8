"""A tenant's usage, computed from the job and checkpoint history: the figures behind Tinker's billing routes.

`billing_usage` buckets a window of whole UTC hours into `BillingUsageEvent`s, one per (hour, kind of usage, base
model, session, cached flag):
- `training`: tokens of the finished forward_backward and forward requests (`Job.cost_tokens`: every token of
  every datum's model_input);
- `sampling_prefill`: prompt tokens of finished sample requests, once per request; `cached` ones are the prompt
  tokens the worker's prefix cache served (`prompt_cache_hit_tokens` of Tinker samples; OpenAI-compatible requests
  report no hits);
- `sampling_sample`: the tokens of every sequence a finished sample request returned;
- `checkpoint`: finished save_weights / save_weights_for_sampler requests (sampling snapshots included);
- `storage`: gigabyte-hours (1 GB = 10^9 bytes) of the tenant's stored checkpoints (not the hidden sampling snapshots
  or recovery checkpoints, which listings leave out too), from creation to expiry or now, hour by hour.
A request counts in the hour it finished, for the session its training run or sampling session belongs to (none
for OpenAI-compatible requests) and that session's project; storage has no session, as in Tinker.
`checkpoint_storage` sums the tenant's listed checkpoints now, per project.

Limits: Loom has no prices, so every cost and rate is left empty (None) and no storage is marked free. A deleted
checkpoint's row is gone, so storage covers only checkpoints still stored (the job history keeps the rest).
Failed requests count nothing. Every finished request of the tenant in the window is read (at most 14 days).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Checkpoint, ClientSession, Job, JobState, SamplingSession, TrainingRun
from api.db.types import utcnow
from api.paths import listed_checkpoint
from contract.jobs import JobKind, SampleJob, TinkerPrompt, parse_payload
from loom.types import (
    BillingEventInfo,
    BillingUsageEvent,
    BillingUsageResponse,
    BillingUsageSession,
    CheckpointBillingEvent,
    CurrentCheckpointStorageUsageItem,
    CurrentCheckpointStorageUsageResponse,
    SamplingPrefillBillingEvent,
    SamplingSampleBillingEvent,
    StorageBillingEvent,
    TrainingBillingEvent,
)

HOUR = timedelta(hours=1)
GIGABYTE = 10**9
TRAINING_KINDS = (JobKind.FORWARD_BACKWARD, JobKind.FORWARD)
CHECKPOINT_KINDS = (JobKind.SAVE_WEIGHTS, JobKind.SAVE_WEIGHTS_FOR_SAMPLER, JobKind.SAVE_WEIGHTS_EXTERNAL)

# (bucket start, event type, base model, session id, cached) -> quantity
Totals = dict[tuple[datetime, str, str | None, str | None, bool], float]


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _finished(session: Session, owner: str, start: datetime, end: datetime, kinds: Iterable[JobKind], *columns):
    """(finished_at, base_model, session id, *columns) of the tenant's jobs of `kinds` that finished in the window."""
    session_id = func.coalesce(TrainingRun.session_id, SamplingSession.session_id)
    return session.execute(
        select(Job.finished_at, Job.base_model, session_id, *columns)
        .outerjoin(TrainingRun, TrainingRun.id == Job.model_id)
        .outerjoin(SamplingSession, SamplingSession.id == Job.model_id)
        .where(
            Job.owner == owner,
            Job.state == JobState.DONE.value,
            Job.kind.in_([kind.value for kind in kinds]),
            Job.finished_at >= start,
            Job.finished_at < end,
        )
        .execution_options(yield_per=500)
    )


def sample_tokens(kind: str, payload: dict[str, Any], result: dict[str, Any]) -> tuple[int, int, int]:
    """(uncached prompt tokens, cached prompt tokens, generated tokens) of one finished sample request."""
    job = parse_payload(kind, payload)
    if isinstance(job, SampleJob) and isinstance(job.prompt, TinkerPrompt):
        cached = int(result.get("prompt_cache_hit_tokens") or 0)
        generated = sum(len(sequence["tokens"]) for sequence in result["sequences"])
        return job.prompt.model_input.length - cached, cached, generated
    return int(result["prompt_tokens"]), 0, sum(len(choice["tokens"]) for choice in result["choices"])


def _job_totals(session: Session, owner: str, start: datetime, end: datetime) -> Totals:
    totals: Totals = defaultdict(float)
    for finished_at, base_model, session_id, tokens in _finished(
        session, owner, start, end, TRAINING_KINDS, Job.cost_tokens
    ):
        totals[hour_of(finished_at), "training", base_model, session_id, False] += tokens
    for finished_at, base_model, session_id in _finished(session, owner, start, end, CHECKPOINT_KINDS):
        totals[hour_of(finished_at), "checkpoint", base_model, session_id, False] += 1
    samples = _finished(session, owner, start, end, (JobKind.SAMPLE,), Job.kind, Job.payload, Job.result)
    for finished_at, base_model, session_id, kind, payload, result in samples:
        fresh, cached, generated = sample_tokens(kind, payload, result)
        bucket = hour_of(finished_at)
        totals[bucket, "sampling_prefill", base_model, session_id, False] += fresh
        totals[bucket, "sampling_prefill", base_model, session_id, True] += cached
        totals[bucket, "sampling_sample", base_model, session_id, False] += generated
    return totals


def storage_hours(
    session: Session, owner: str, start: datetime, end: datetime, hourly: bool = True
) -> dict[tuple[datetime, str, str], float]:
    """Gigabyte-hours per (hour, training run, base model) of the tenant's stored checkpoints (hidden ones aside),
    each counted until it expires (also when the sweep has not deleted it yet); not `hourly`: per (start, run, base
    model), the whole window in one bucket."""
    now = utcnow()
    rows = session.execute(
        select(
            Checkpoint.created_at, Checkpoint.expires_at, Checkpoint.size_bytes, TrainingRun.id, TrainingRun.base_model
        )
        .join(TrainingRun, TrainingRun.id == Checkpoint.run_id)
        .where(
            Checkpoint.owner == owner,
            Checkpoint.committed.is_(True),
            Checkpoint.ephemeral.is_(False),
            Checkpoint.created_at < end,
        )
    )
    hours: dict[tuple[datetime, str, str], float] = defaultdict(float)
    for created_at, expires_at, size_bytes, run_id, base_model in rows:
        stored_until = min(end, now, expires_at or now)
        if not hourly:
            seconds = max(0.0, (stored_until - max(created_at, start)).total_seconds())
            hours[start, run_id, base_model] += size_bytes / GIGABYTE * seconds / 3600
            continue
        bucket = hour_of(max(created_at, start))
        while bucket < stored_until:
            seconds = (min(bucket + HOUR, stored_until) - max(bucket, created_at)).total_seconds()
            hours[bucket, run_id, base_model] += size_bytes / GIGABYTE * seconds / 3600
            bucket += HOUR
    return hours


def _storage_totals(session: Session, owner: str, start: datetime, end: datetime) -> Totals:
    totals: Totals = defaultdict(float)
    for (bucket, _, base_model), gigabyte_hours in storage_hours(session, owner, start, end).items():
        totals[bucket, "storage", base_model, None, False] += gigabyte_hours
    return totals


def _event_info(kind: str, cached: bool, quantity: float) -> BillingEventInfo:
    if kind == "training":
        return TrainingBillingEvent(token_count=int(quantity))
    if kind == "sampling_prefill":
        return SamplingPrefillBillingEvent(cached=cached, token_count=int(quantity))
    if kind == "sampling_sample":
        return SamplingSampleBillingEvent(token_count=int(quantity))
    if kind == "checkpoint":
        return CheckpointBillingEvent(count=int(quantity))
    return StorageBillingEvent(gigabyte_hours=quantity)


def billing_usage(session: Session, owner: str, start: datetime, end: datetime) -> BillingUsageResponse:
    """The tenant's usage in [start, end), hour by hour (see the module docstring for what counts)."""
    totals = {**_job_totals(session, owner, start, end), **_storage_totals(session, owner, start, end)}
    used = {key: quantity for key, quantity in totals.items() if quantity > 0}
    session_ids = {key[3] for key in used if key[3] is not None}
    sessions = {
        row.id: row
        for row in session.scalars(
            select(ClientSession).where(ClientSession.id.in_(session_ids), ClientSession.owner == owner)
        )
    }
    events = [
        BillingUsageEvent(
            bucket_start=bucket,
            bucket_end=bucket + HOUR,
            base_model=base_model,
            user_id=owner,
            session_id=session_id,
            project_id=sessions[session_id].project_id if session_id in sessions else None,
            event_info=_event_info(kind, cached, quantity),
        )
        for (bucket, kind, base_model, session_id, cached), quantity in sorted(
            used.items(), key=lambda item: (item[0][0], -item[1])
        )
    ]
    attributes = {
        session_id: BillingUsageSession(
            user_metadata={k: str(v) for k, v in row.user_metadata.items()} if row.user_metadata else None
        )
        for session_id, row in sessions.items()
    }
    return BillingUsageResponse(data=events, sessions=attributes)


def checkpoint_storage(session: Session, owner: str, project_id: str | None) -> CurrentCheckpointStorageUsageResponse:
    """The tenant's listed checkpoints now, counted and summed per project (only `project_id`'s, if given)."""
    query = (
        select(ClientSession.project_id, func.count(Checkpoint.id), func.sum(Checkpoint.size_bytes))
        .select_from(Checkpoint)
        .join(TrainingRun, TrainingRun.id == Checkpoint.run_id)
        .join(ClientSession, ClientSession.id == TrainingRun.session_id)
        .where(Checkpoint.owner == owner, listed_checkpoint())
        .group_by(ClientSession.project_id)
        .order_by(ClientSession.project_id)
    )
    if project_id is not None:
        query = query.where(ClientSession.project_id == project_id)
    items = [
        CurrentCheckpointStorageUsageItem(
            project_id=project,
            org_user_urn=owner,
            checkpoint_count=count,
            size_bytes=int(size),
            size_gigabytes=int(size) / GIGABYTE,
        )
        for project, count, size in session.execute(query)
    ]
    return CurrentCheckpointStorageUsageResponse(data=items)

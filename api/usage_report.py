"""Usage per API key and per training run, hour by hour: `usage_report` for `GET /api/v1/usage/report`.

From the tenant's finished requests in the window (what the workers actually ran: training tokens of each
forward_backward/forward, prompt and generated tokens of each sample from its result, one per saved checkpoint),
keyed by (hour, the key that submitted it, the training run it belongs to), and the gigabyte-hours of the run's
stored checkpoints (`api.usage.storage_hours`, with no key). A sample belongs to the run whose checkpoint it read
(by the stored weights, through any sampling session or the OpenAI-compatible API); a sample of the base model, of
another tenant's published checkpoint or of a checkpoint deleted since, to no run.

Limits: failed requests count nothing; jobs from before keys were recorded have no key; every finished request of
the window is read (the route bounds the window).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, Checkpoint, Job, JobState
from api.usage import CHECKPOINT_KINDS, TRAINING_KINDS, hour_of, sample_tokens, storage_hours
from contract.jobs import JobKind, SampleJob, parse_payload
from loom.types import UsageReportResponse, UsageReportRow

TRAINING = {kind.value for kind in TRAINING_KINDS}
CHECKPOINTS = {kind.value for kind in CHECKPOINT_KINDS}


def _weights_read(kind: str, payload: dict) -> str | None:
    """The stored weights a sample read (None: the base model)."""
    job = parse_payload(kind, payload)
    return job.storage_uri if isinstance(job, SampleJob) else None


def _runs_of_weights(session: Session, owner: str, uris: set[str]) -> dict[str, str]:
    """The tenant's run of each of these stored weights (a URI of another tenant's checkpoint maps to none)."""
    if not uris:
        return {}
    rows = session.execute(
        select(Checkpoint.storage_uri, Checkpoint.run_id).where(
            Checkpoint.owner == owner, Checkpoint.storage_uri.in_(uris)
        )
    )
    return {uri: run for uri, run in rows}


def usage_report(
    session: Session, owner: str, start: datetime, end: datetime, hourly: bool = True, storage: bool = True
) -> UsageReportResponse:
    """The tenant's usage in [start, end) by hour (not `hourly`: the whole window as one bucket), key and run;
    without `storage`, requests only (no gigabyte-hours, which cost a pass over every stored checkpoint)."""
    bucket_of = hour_of if hourly else (lambda _: start)
    use: dict[tuple[datetime, str | None, str | None, str], UsageReportRow] = {}

    def row_of(bucket: datetime, key_id: str | None, run_id: str | None, base_model: str) -> UsageReportRow:
        key = (bucket, key_id, run_id, base_model)
        if key not in use:
            use[key] = UsageReportRow(hour=bucket, api_key_id=key_id, run_id=run_id, base_model=base_model)
        return use[key]

    finished = (Job.owner == owner, Job.state == JobState.DONE.value, Job.finished_at >= start, Job.finished_at < end)
    ops = session.execute(  # no payloads: a training request's data can be large, and its tokens are counted
        select(Job.finished_at, Job.kind, Job.model_id, Job.base_model, Job.api_key_id, Job.cost_tokens).where(
            *finished, Job.kind != JobKind.SAMPLE.value
        )
    )
    for finished_at, kind, model_id, base_model, key_id, cost in ops:
        row = row_of(bucket_of(finished_at), key_id, model_id, base_model)
        row.requests += 1
        if kind in TRAINING:
            row.tokens_trained += cost
        elif kind in CHECKPOINTS:
            row.checkpoints_saved += 1
    samples = session.execute(
        select(Job.finished_at, Job.kind, Job.base_model, Job.api_key_id, Job.payload, Job.result)
        .where(*finished, Job.kind == JobKind.SAMPLE.value)
        .execution_options(yield_per=500)
    )
    sampled = [
        (bucket_of(finished_at), key_id, base_model, _weights_read(kind, payload), sample_tokens(kind, payload, result))
        for finished_at, kind, base_model, key_id, payload, result in samples
    ]
    run_of = _runs_of_weights(session, owner, {uri for _, _, _, uri, _ in sampled if uri is not None})
    for bucket, key_id, base_model, uri, (fresh, cached, generated) in sampled:
        row = row_of(bucket, key_id, run_of.get(uri or ""), base_model)
        row.requests += 1
        row.tokens_prompt += fresh + cached
        row.tokens_prompt_cached += cached
        row.tokens_generated += generated
    stored = storage_hours(session, owner, start, end, hourly) if storage else {}
    for (bucket, run_id, base_model), gigabyte_hours in stored.items():
        row_of(bucket, None, run_id, base_model).storage_gigabyte_hours += gigabyte_hours
    key_ids = {key_id for _, key_id, _, _ in use if key_id is not None}
    keys = {k.id: k for k in session.scalars(select(ApiKey).where(ApiKey.owner == owner, ApiKey.id.in_(key_ids)))}
    rows = [use[key] for key in sorted(use, key=lambda k: (k[0], k[1] or "", k[2] or "", k[3]))]
    for row in rows:
        api_key = keys.get(row.api_key_id or "")
        row.api_key_prefix, row.api_key_name = (api_key.prefix, api_key.name) if api_key else (None, None)
        row.storage_gigabyte_hours = round(row.storage_gigabyte_hours, 9)
    return UsageReportResponse(start=start, end=end, rows=rows)

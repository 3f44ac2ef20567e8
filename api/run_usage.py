"""A tenant's usage per training run (`GET /api/v1/billing/usage/runs`): the per-run cost figure, in tokens and
bytes, that the hourly billing events (per session) cannot give.

In a window of whole UTC hours, for each of the tenant's runs: tokens of its finished forward_backward and forward
requests, checkpoints it saved, and the prompt (fresh and cached) and generated tokens of finished samples from
its checkpoints (through any sampling session or the OpenAI-compatible API: a sample is attributed by the stored
weights it read); plus the bytes its listed checkpoints store now. What counts as a token is what
`api/usage.py` counts.

Limits: samples of the base model, of another tenant's published checkpoint, or of a checkpoint deleted since are
in no run's figures; every finished request of the tenant in the window is read (at most 14 days).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Checkpoint, Job, JobState, TrainingRun
from api.paths import listed_checkpoint
from api.usage import CHECKPOINT_KINDS, TRAINING_KINDS, sample_tokens
from contract.jobs import JobKind, SampleJob, parse_payload
from loom.types import RunUsage, RunUsageResponse


def _finished(owner: str, start: datetime, end: datetime, kinds: tuple[JobKind, ...]):
    return (
        Job.owner == owner,
        Job.state == JobState.DONE.value,
        Job.kind.in_([kind.value for kind in kinds]),
        Job.finished_at >= start,
        Job.finished_at < end,
    )


def run_usage(session: Session, owner: str, start: datetime, end: datetime) -> RunUsageResponse:
    """The tenant's usage in [start, end) per training run (see the module docstring for what counts)."""
    figures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    work = session.execute(
        select(Job.model_id, Job.kind, Job.cost_tokens).where(
            *_finished(owner, start, end, TRAINING_KINDS + CHECKPOINT_KINDS)
        )
    )
    for model_id, kind, tokens in work:
        if JobKind(kind) in TRAINING_KINDS:
            figures[model_id]["training_tokens"] += tokens
        else:
            figures[model_id]["checkpoints_saved"] += 1
    uris = session.execute(select(Checkpoint.storage_uri, Checkpoint.run_id).where(Checkpoint.owner == owner))
    run_of = {uri: run_id for uri, run_id in uris}
    samples = session.execute(
        select(Job.kind, Job.payload, Job.result).where(*_finished(owner, start, end, (JobKind.SAMPLE,)))
    )
    for kind, payload, result in samples.yield_per(500):
        job = parse_payload(kind, payload)
        run_id = run_of.get(job.storage_uri) if isinstance(job, SampleJob) and job.storage_uri else None
        if run_id is not None:
            fresh, cached, generated = sample_tokens(kind, payload, result)
            figures[run_id]["sampling_prefill_tokens"] += fresh
            figures[run_id]["sampling_prefill_cached_tokens"] += cached
            figures[run_id]["sampling_sample_tokens"] += generated
    stored = session.execute(
        select(Checkpoint.run_id, func.sum(Checkpoint.size_bytes))
        .where(Checkpoint.owner == owner, listed_checkpoint())
        .group_by(Checkpoint.run_id)
    )
    for run_id, size in stored:
        figures[run_id]["stored_bytes"] += int(size)
    runs = session.scalars(select(TrainingRun).where(TrainingRun.owner == owner, TrainingRun.id.in_(list(figures))))
    rows = [
        RunUsage(training_run_id=run.id, base_model=run.base_model, session_id=run.session_id, **figures[run.id])
        for run in runs
        if any(figures[run.id].values())
    ]
    return RunUsageResponse(runs=sorted(rows, key=lambda row: (-row.training_tokens, row.training_run_id)))

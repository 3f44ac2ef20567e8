"""A tenant's usage per training run (`GET /api/v1/billing/usage/runs`): the per-run cost figure, in tokens and
bytes, that the hourly billing events (per session) cannot give.

In a window of whole UTC hours, for each of the tenant's runs: tokens of its finished forward_backward and forward
requests, checkpoints it saved, and the prompt (fresh and cached) and generated tokens of finished samples from
its checkpoints (through any sampling session or the OpenAI-compatible API: a sample is attributed by the stored
weights it read); plus the bytes its listed checkpoints store now. The figures are the usage report's
(`api/usage_report.py`) summed per run; what counts as a token is what `api/usage.py` counts.

Limits: samples of the base model, of another tenant's published checkpoint, or of a checkpoint deleted since are
in no run's figures; every finished request of the tenant in the window is read (at most 14 days).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Checkpoint, TrainingRun
from api.paths import listed_checkpoint
from api.usage_report import usage_report
from loom.types import RunUsage, RunUsageResponse


def run_usage(session: Session, owner: str, start: datetime, end: datetime) -> RunUsageResponse:
    """The tenant's usage in [start, end) per training run: the usage report's rows summed per run (see the module
    docstring for what counts), with the bytes each run's listed checkpoints store now."""
    figures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in usage_report(session, owner, start, end, hourly=False, storage=False).rows:
        if row.run_id is None:
            continue
        run = figures[row.run_id]
        run["training_tokens"] += row.tokens_trained
        run["checkpoints_saved"] += row.checkpoints_saved
        run["sampling_prefill_tokens"] += row.tokens_prompt - row.tokens_prompt_cached
        run["sampling_prefill_cached_tokens"] += row.tokens_prompt_cached
        run["sampling_sample_tokens"] += row.tokens_generated
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

"""What executing a job produced: its typed result or a categorised error, plus any checkpoint it wrote.

The consumer turns each `Outcome` into a database write (`complete_job` / `fail_job`, and a checkpoint row for a
`CheckpointRecord`) in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.db.checkpoints import CheckpointRecord
from api.db.models import ErrorCategory
from contract.jobs import ClaimedJob, JobResult


@dataclass
class Outcome:
    job: ClaimedJob
    result: JobResult | None = None
    error: str | None = None
    category: ErrorCategory | None = None
    checkpoint: CheckpointRecord | None = None

    @classmethod
    def user_error(cls, job: ClaimedJob, exc: Exception | str) -> Outcome:
        return cls(job, error=str(exc), category=ErrorCategory.USER)

    @classmethod
    def server_error(cls, job: ClaimedJob, exc: Exception) -> Outcome:
        return cls(job, error=f"internal error: {type(exc).__name__}: {exc}", category=ErrorCategory.SERVER)

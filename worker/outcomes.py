"""What executing a job produced: a wire-JSON result or a categorised error, plus any checkpoint it wrote.

The consumer turns each `Outcome` into a database write (`complete_job` / `fail_job`, and a `Checkpoint` row for
a `CheckpointRecord`) in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.db.jobs import ClaimedJob


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint the engine wrote; the consumer records it in the database with the job's completion."""

    run_id: str
    owner: str
    checkpoint_id: str
    kind: str
    tinker_path: str
    storage_uri: str
    size_bytes: int
    ttl_seconds: int | None
    ephemeral: bool


@dataclass
class Outcome:
    job: ClaimedJob
    result: dict[str, Any] | None = None
    error: str | None = None
    category: str | None = None
    checkpoint: CheckpointRecord | None = None

    @classmethod
    def user_error(cls, job: ClaimedJob, exc: Exception) -> Outcome:
        return cls(job, error=str(exc), category="user")

    @classmethod
    def server_error(cls, job: ClaimedJob, exc: Exception) -> Outcome:
        return cls(job, error=f"internal error: {type(exc).__name__}: {exc}", category="server")

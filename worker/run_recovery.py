"""Rebuild a training run's adapter and optimizer state on a worker that does not hold it (or holds it stale).

The database is the run's write-ahead log: every op that reached `done` is there with its payload, in seq order.
`restore_plan` walks that log backwards from the op about to run to the newest point that fixes the state on
its own — a committed `save_weights` checkpoint (weights + Adam moments), a `load_weights`, or the run's
`create_model`, or an automatic recovery checkpoint — and returns that starting point plus the state-changing ops
after it (`forward_backward` with gradients, `optim_step`, loads). `Engine.restore` applies them, so a run moved to
another worker after a crash continues from exactly the state the fault-free worker would have had (up to float
summation order).

Recovery checkpoints bound the replay: a worker saves a run's adapter and Adam state every `LOOM_RECOVERY_EVERY`
optimizer steps as a hidden checkpoint `recovery/<seq_id>` (not listed, not addressable by a tinker:// path),
recorded in the same transaction that marks that `optim_step` done, so it is exactly the state after that op.
Only the newest one per run is kept (`superseded_recovery_checkpoints`). A starting checkpoint that fails
verification when loaded is skipped (`UnusableCheckpoint`, then plan again with it in `unusable`): the walk goes
on to an older one, or to the run's start.

Limits: replay costs as much compute as the state-changing ops since the newest saved state; a run whose log
ends in `unload_model` is not restored; failed ops are skipped (a failed op changed nothing, see `Engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from api.db.jobs import ClaimedJob, claimed
from api.db.models import TRAINING_LANE, Checkpoint, CheckpointKind, Job, JobKind, JobState

STARTS = frozenset({JobKind.CREATE_MODEL.value, JobKind.LOAD_WEIGHTS.value})
RECOVERY_PREFIX = "recovery/"


def recovery_checkpoint_id(seq_id: int) -> str:
    """The hidden checkpoint holding a run's state right after its op `seq_id` (an `optim_step`)."""
    return f"{RECOVERY_PREFIX}{seq_id}"


class RunNotRestorable(LookupError):
    """The run's log has no state to rebuild from (it was unloaded, or never created)."""


class UnusableCheckpoint(RuntimeError):
    """The checkpoint a plan starts from fails verification (corrupt, truncated, unreadable): plan again without it."""

    def __init__(self, uri: str, reason: Exception) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri


@dataclass
class RestorePlan:
    model_id: str
    checkpoint_uri: str | None
    """A committed training checkpoint to load (with optimizer) first, or None to start from `ops[0]`."""
    ops: list[ClaimedJob] = field(default_factory=list)
    """Done ops to re-apply in seq order after the checkpoint; their results are discarded."""
    last_seq: int = -1
    """The seq_id of the newest op the restored state includes."""


def changes_state(job: Job) -> bool:
    if job.kind == JobKind.FORWARD_BACKWARD.value:
        return not job.payload.get("forward_only")
    return job.kind in (JobKind.OPTIM_STEP.value, *STARTS)


def restore_plan(
    session: Session, model_id: str, before_seq: int, unusable: frozenset[str] = frozenset()
) -> RestorePlan:
    """How to rebuild `model_id` as it was after every done op with seq_id < `before_seq`, starting from no
    checkpoint whose storage URI is in `unusable` (the walk goes further back past those)."""
    done = session.scalars(
        select(Job)
        .where(
            Job.model_id == model_id,
            Job.lane == TRAINING_LANE,
            Job.seq_id < before_seq,
            Job.state == JobState.DONE.value,
        )
        .order_by(Job.seq_id.desc())
        .execution_options(yield_per=64)
    )
    recovery = {
        cid: uri for cid, uri in _committed_recovery_checkpoints(session, model_id).items() if uri not in unusable
    }
    replay: list[Job] = []
    last_seq = -1
    for job in done:
        last_seq = max(last_seq, job.seq_id)
        if (uri := recovery.get(recovery_checkpoint_id(job.seq_id))) is not None:
            return RestorePlan(model_id, uri, [claimed(j) for j in reversed(replay)], last_seq)
        if job.kind == JobKind.UNLOAD_MODEL.value:
            raise RunNotRestorable(f"training run {model_id} was unloaded; create it again from a checkpoint")
        if job.kind == JobKind.SAVE_WEIGHTS.value:
            uri = _committed_training_checkpoint(session, job)
            if uri is not None and uri not in unusable:
                return RestorePlan(model_id, uri, [claimed(j) for j in reversed(replay)], last_seq)
        if changes_state(job):
            replay.append(job)
        if job.kind in STARTS:
            return RestorePlan(model_id, None, [claimed(j) for j in reversed(replay)], last_seq)
    raise RunNotRestorable(f"training run {model_id} has no completed create_model to rebuild it from")


def _committed_training_checkpoint(session: Session, save: Job) -> str | None:
    path = (save.result or {}).get("path")
    return session.scalar(
        select(Checkpoint.storage_uri).where(
            Checkpoint.tinker_path == path,
            Checkpoint.run_id == save.model_id,
            Checkpoint.kind == CheckpointKind.TRAINING.value,
            Checkpoint.committed.is_(True),
        )
    )


def _recovery_of(model_id: str) -> ColumnElement[bool]:
    return (Checkpoint.run_id == model_id) & Checkpoint.checkpoint_id.startswith(RECOVERY_PREFIX)


def _committed_recovery_checkpoints(session: Session, model_id: str) -> dict[str, str]:
    rows = session.execute(
        select(Checkpoint.checkpoint_id, Checkpoint.storage_uri).where(
            _recovery_of(model_id), Checkpoint.committed.is_(True)
        )
    )
    return {checkpoint_id: uri for checkpoint_id, uri in rows}


def superseded_recovery_checkpoints(session: Session, model_id: str, newest_id: str) -> list[Checkpoint]:
    """The run's recovery checkpoints other than `newest_id` (the caller deletes their rows, then their files)."""
    return list(
        session.scalars(select(Checkpoint).where(_recovery_of(model_id), Checkpoint.checkpoint_id != newest_id))
    )

"""Rebuild a training run's adapter and optimizer state on a worker that does not hold it (or holds it stale).

The database is the run's write-ahead log: every op that reached `done` is there with its typed payload, in seq
order (`api/db/jobs.done_training_ops`; checkpoint rows through `api/db/checkpoints.py`).
`restore_plan` walks that log backwards from the op about to run to the newest point that fixes the state on
its own — a committed `save_weights` checkpoint (weights + Adam moments), a `load_weights`, or the run's
`create_model`, or an automatic recovery checkpoint — and returns that starting point plus the state-changing ops
after it (`forward_backward` with gradients, `optim_step`, loads). `Engine.restore` applies them, so a run moved to
another worker after a crash continues from exactly the state the fault-free worker would have had (up to float
summation order).

Recovery checkpoints bound the replay: a worker saves a run's adapter and Adam state every `recovery_every`
optimizer steps as a hidden checkpoint `recovery/<seq_id>` (not listed, not addressable by a tinker:// path),
recorded in the same transaction that marks that `optim_step` done, so it is exactly the state after that op.
Only the newest one per run is kept (`api/db/checkpoints.record_checkpoint` retires the older ones). A starting checkpoint that fails
verification when loaded is skipped (`UnusableCheckpoint`, then plan again with it in `unusable`): the walk goes
on to an older one, or to the run's start.

Limits: replay costs as much compute as the state-changing ops since the newest saved state; a run whose log
ends in `unload_model`, or whose log holds an op this worker cannot read, is not restored; failed ops are skipped
(a failed op changed nothing, see `Engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from api.db.checkpoints import RECOVERY_PREFIX, committed_recovery_checkpoints, committed_training_checkpoint
from api.db.jobs import done_training_ops
from contract.jobs import (
    ClaimedJob,
    CreateModelJob,
    ForwardBackwardJob,
    ForwardJob,
    JobPayload,
    LoadWeightsJob,
    OptimStepJob,
    SaveWeightsJob,
    UnloadModelJob,
    UnreadablePayload,
)


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


def changes_state(payload: JobPayload) -> bool:
    """Whether an op that completed changed the run's adapter or optimizer state."""
    if isinstance(payload, ForwardBackwardJob):
        return not isinstance(payload, ForwardJob)
    return isinstance(payload, OptimStepJob | CreateModelJob | LoadWeightsJob)


def restore_plan(
    session: Session, model_id: str, before_seq: int, unusable: frozenset[str] = frozenset()
) -> RestorePlan:
    """How to rebuild `model_id` as it was after every done op with seq_id < `before_seq`, starting from no
    checkpoint whose storage URI is in `unusable` (the walk goes further back past those)."""
    recovery = {
        cid: uri for cid, uri in committed_recovery_checkpoints(session, model_id).items() if uri not in unusable
    }
    replay: list[ClaimedJob] = []
    last_seq = -1
    for job in done_training_ops(session, model_id, before_seq):
        last_seq = max(last_seq, job.seq_id)
        if (uri := recovery.get(recovery_checkpoint_id(job.seq_id))) is not None:
            return RestorePlan(model_id, uri, replay[::-1], last_seq)
        match job.payload:
            case UnreadablePayload(error=error):  # its effect, if it had one, cannot be replayed
                raise RunNotRestorable(f"training run {model_id}: op {job.id} cannot be replayed ({error})")
            case UnloadModelJob():
                raise RunNotRestorable(f"training run {model_id} was unloaded; create it again from a checkpoint")
            case SaveWeightsJob(target=target):
                uri = committed_training_checkpoint(session, model_id, target.tinker_path)
                if uri is not None and uri not in unusable:
                    return RestorePlan(model_id, uri, replay[::-1], last_seq)
            case CreateModelJob() | LoadWeightsJob():  # the run's state starts over here
                return RestorePlan(model_id, None, [*replay, job][::-1], last_seq)
            case payload if changes_state(payload):
                replay.append(job)
    raise RunNotRestorable(f"training run {model_id} has no completed create_model to rebuild it from")

"""The checkpoint rows: recording what a worker stored, finding what a run can be rebuilt from, and retiring rows.

A row is written (`record_checkpoint`) in the same transaction that marks the job that wrote it done, with
`committed` true: the files at `storage_uri` are complete by then. Every write stores its files under a location of
its own (`storage_key`: the checkpoint id plus the writing job's seq and lease), so files and row commit together or
not at all: a crash before the commit leaves only files no row names (`loom gc` removes them), and a retried write
never collides with its own leftovers. The row's audit event (`checkpoint_create`, or `checkpoint_copy` for a copy)
is written with it, and the sweep records a `checkpoint_expire` for each row it deletes (`api/db/audit.py`).
Recovery checkpoints (`recovery/<seq_id>`) are hidden rows only workers use (`worker/run_recovery.py`); only the
newest one per run is kept.

Like the job store, every function works inside the caller's transaction and never commits; deleting the stored
files a removed row pointed at is the caller's job, after its commit (`contract/checkpoint_store.py`). The one
exception is `sweep_expired_checkpoints`, the whole periodic sweep of checkpoints whose TTL passed (rows in a
transaction of its own, then their files), which the workers' idle pass and `loom gc` run.
"""

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session, sessionmaker

from api.db.audit import SERVER, Event, checkpoint_event
from api.db.models import Checkpoint, CheckpointKind
from api.db.types import utcnow
from contract.checkpoint_store import discard_checkpoint_uris

RECOVERY_PREFIX = "recovery/"


class CheckpointNameTaken(Exception):
    """Another save recorded a checkpoint of this name first, and this one did not ask to overwrite it."""


def storage_key(checkpoint_id: str, seq_id: int, fencing_token: int) -> str:
    """Where one attempt of the job at `seq_id` stores checkpoint `checkpoint_id` (unique per lease of that job)."""
    return f"{checkpoint_id}~{seq_id}.{fencing_token}"


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint a worker wrote; recorded with the completion of the job that wrote it."""

    run_id: str
    owner: str
    checkpoint_id: str
    kind: CheckpointKind
    tinker_path: str
    storage_uri: str
    size_bytes: int
    ttl_seconds: int | None
    ephemeral: bool
    overwrite: bool = False
    """Replace a checkpoint recorded under the same id (else `record_checkpoint` raises `CheckpointNameTaken`)."""
    user_metadata: dict[str, str] = field(default_factory=dict)
    """What the checkpoint's listing shows about it (a copy names its source)."""
    event: Event = Event.CHECKPOINT_CREATE
    """What the owner's audit log calls this write."""


def record_checkpoint(session: Session, record: CheckpointRecord) -> list[str]:
    """Write (or, for an overwrite, replace) the committed row of `record`. Returns the storage URIs of rows this
    retires (delete their files after commit): a replaced checkpoint's, and for a recovery checkpoint the run's older
    recovery checkpoints. Raises `CheckpointNameTaken` if the id is recorded already and `record` does not overwrite."""
    replaced = session.scalars(
        select(Checkpoint).where(Checkpoint.run_id == record.run_id, Checkpoint.checkpoint_id == record.checkpoint_id)
    ).all()
    if replaced and not record.overwrite:
        raise CheckpointNameTaken(f"checkpoint {record.checkpoint_id} already exists for run {record.run_id}")
    for row in replaced:
        session.delete(row)
    session.flush()
    retired = [row.storage_uri for row in replaced if row.storage_uri != record.storage_uri]
    expires = utcnow() + timedelta(seconds=record.ttl_seconds) if record.ttl_seconds else None
    row = Checkpoint(
        run_id=record.run_id,
        owner=record.owner,
        checkpoint_id=record.checkpoint_id,
        kind=record.kind.value,
        tinker_path=record.tinker_path,
        storage_uri=record.storage_uri,
        size_bytes=record.size_bytes,
        expires_at=expires,
        committed=True,
        ephemeral=record.ephemeral,
        user_metadata=record.user_metadata,
    )
    session.add(row)
    facts = {"checkpoint_type": record.kind.value, "size_bytes": record.size_bytes, "replaced": bool(replaced)}
    checkpoint_event(session, row, record.event, record.owner, **{**facts, **record.user_metadata})
    if not record.checkpoint_id.startswith(RECOVERY_PREFIX):
        return retired
    older = session.scalars(
        select(Checkpoint).where(_recovery_of(record.run_id), Checkpoint.checkpoint_id != record.checkpoint_id)
    ).all()
    for row in older:
        session.delete(row)
    return retired + [row.storage_uri for row in older]


def committed_training_checkpoint(session: Session, run_id: str, tinker_path: str) -> str | None:
    """The storage URI of the run's committed training checkpoint at `tinker_path`, if it still exists."""
    return session.scalar(
        select(Checkpoint.storage_uri).where(
            Checkpoint.tinker_path == tinker_path,
            Checkpoint.run_id == run_id,
            Checkpoint.kind == CheckpointKind.TRAINING.value,
            Checkpoint.committed.is_(True),
        )
    )


def _recovery_of(run_id: str) -> ColumnElement[bool]:
    return (Checkpoint.run_id == run_id) & Checkpoint.checkpoint_id.startswith(RECOVERY_PREFIX)


def committed_recovery_checkpoints(session: Session, run_id: str) -> dict[str, str]:
    """checkpoint id (`recovery/<seq_id>`) -> storage URI of the run's committed recovery checkpoints."""
    rows = session.execute(
        select(Checkpoint.checkpoint_id, Checkpoint.storage_uri).where(
            _recovery_of(run_id), Checkpoint.committed.is_(True)
        )
    )
    return {checkpoint_id: uri for checkpoint_id, uri in rows}


def delete_expired(session: Session) -> list[str]:
    """Delete every checkpoint row whose TTL has passed, each with its `checkpoint_expire` event; returns their
    storage URIs."""
    expired = session.scalars(delete(Checkpoint).where(Checkpoint.expires_at < utcnow()).returning(Checkpoint)).all()
    for row in expired:
        checkpoint_event(session, row, Event.CHECKPOINT_EXPIRE, SERVER, expires_at=row.expires_at.isoformat())
    return [row.storage_uri for row in expired]


def sweep_expired_checkpoints(sessions: sessionmaker[Session]) -> int:
    """Delete every checkpoint whose TTL has passed: the rows in one transaction, then their stored files (best
    effort: files a failure leaves behind have no row, so `loom gc` removes them). Returns how many went."""
    with sessions.begin() as session:
        uris = delete_expired(session)
    discard_checkpoint_uris(uris)
    return len(uris)


def committed_uris(session: Session) -> list[str]:
    """The storage URIs every committed checkpoint row points at (what `gc` must keep)."""
    return list(session.scalars(select(Checkpoint.storage_uri).where(Checkpoint.committed.is_(True))))

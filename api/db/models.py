"""SQLAlchemy models: the tables Loom's control plane and workers share.

Declarations only: behaviour lives in the stores (``jobs.py``, ``keys.py``), and
the schema itself is created by the Alembic migrations, never ``create_all``.
Closed vocabularies (job states, error categories, ...) are ``StrEnum``s whose
values are what the string columns hold; a CHECK constraint guards each column
whose values the stores branch on.

Job lanes
---------
A job's ``seq_id`` is only meaningful inside a sequence space, which we call its
*lane*. All ordered training ops of one training run (create_model at seq 0,
forward_backward, forward, optim_step, save/load weights, unload) share the lane ``"train"``, so their
seq_ids form a single per-run order the worker must follow (``TrainingRun.
next_seq_id``). Every other kind is its own lane named after the kind, so a
sampling session's ``sample`` seq_ids never collide with anything else. The lane
is stored (``Job.lane``, derived from ``kind`` by ``lane_for``) so that "one job
per (model_id, lane, seq_id)" is a plain, portable UNIQUE constraint; rows with a
NULL model_id or seq_id are not constrained (SQL NULLs are distinct).
"""

import secrets
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    MetaData,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from api.db.types import UTCDateTime, utcnow
from contract.jobs import JobKind

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


class JobState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class ErrorCategory(StrEnum):
    USER = "user"
    SERVER = "server"
    UNKNOWN = "unknown"


class RunStatus(StrEnum):
    ACTIVE = "active"
    UNLOADED = "unloaded"


class CheckpointKind(StrEnum):
    TRAINING = "training"
    SAMPLER = "sampler"
    EXTERNAL = "external"


TRAINING_LANE = "train"
TRAINING_OPS = frozenset(
    {
        JobKind.CREATE_MODEL,
        JobKind.FORWARD_BACKWARD,
        JobKind.FORWARD,
        JobKind.OPTIM_STEP,
        JobKind.SAVE_WEIGHTS,
        JobKind.SAVE_WEIGHTS_FOR_SAMPLER,
        JobKind.SAVE_WEIGHTS_EXTERNAL,
        JobKind.LOAD_WEIGHTS,
        JobKind.UNLOAD_MODEL,
    }
)


def lane_for(kind: JobKind) -> str:
    """The sequence space a job of this kind draws its seq_id from (see module docstring)."""
    return TRAINING_LANE if kind in TRAINING_OPS else kind.value


def _one_of(column: str, values: type[StrEnum]) -> str:
    """CHECK expression: ``column`` holds one of the enum's values (NULL passes)."""
    return f"{column} IN ({', '.join(repr(member.value) for member in values)})"


def _short_id() -> str:
    return secrets.token_hex(8)


def _uuid() -> str:
    return str(uuid.uuid4())


class ApiKey(Base):
    """A tenant's API key; only the SHA-256 of the plaintext is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(primary_key=True, default=_short_id)
    owner: Mapped[str] = mapped_column(index=True)
    name: Mapped[str]
    key_hash: Mapped[str] = mapped_column(unique=True)
    prefix: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Tenant(Base):
    """A tenant: the ``owner`` of keys, runs and checkpoints, with its own rate limits and quotas. A limit left NULL
    is the deployment's default (`Settings.tenant_*`); keys made for a new owner create its row. An ``operator``
    tenant's keys are admin keys: they also manage tenants (`/api/v1/admin/...`)."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    operator: Mapped[bool] = mapped_column(default=False, server_default=false())
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    concurrent_runs: Mapped[int | None]
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)


class ClientSession(Base):
    """A client SDK session (Tinker ``create_session``), kept alive by heartbeats."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(primary_key=True, default=_uuid)
    owner: Mapped[str] = mapped_column(index=True)
    tags: Mapped[list[str]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sdk_version: Mapped[str | None]
    display_name: Mapped[str | None]
    project_id: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    """Set by ``POST /sessions/{id}/finish`` (the SDK's ``close()``); its runs' futures still resolve after."""
    finish_status: Mapped[dict[str, Any] | None]
    """The client's finish as it sent it (``ClientSessionFinished`` on the wire: reason, detail)."""


class TrainingRun(Base):
    """A LoRA training run; ``id`` is Tinker's model_id ``<session_id>:train:<model_seq_id>``.

    ``next_seq_id`` is the seq_id of the next training op the worker may execute;
    the job store advances it as each op finishes.
    """

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_one_of("status", RunStatus), name="status"),)

    id: Mapped[str] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"))
    model_seq_id: Mapped[int]
    base_model: Mapped[str]
    lora_rank: Mapped[int]
    train_attn: Mapped[bool]
    train_mlp: Mapped[bool]
    train_unembed: Mapped[bool]
    train_vision: Mapped[bool] = mapped_column(default=False, server_default=false())
    seed: Mapped[int | None]
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_request_time: Mapped[datetime] = mapped_column(default=utcnow)
    next_seq_id: Mapped[int] = mapped_column(default=1)
    status: Mapped[str] = mapped_column(default=RunStatus.ACTIVE.value)
    worker_id: Mapped[str | None] = mapped_column(index=True)
    """The worker holding this run's adapter and optimizer (sticky placement); NULL until a worker claims it
    or after its worker was declared dead."""


class Job(Base):
    """One client request (a Tinker future): queued, leased by a worker, then done or failed.

    ``id`` is the request_id the client polls. ``fencing_token`` grows on every
    lease, so a worker whose lease was taken away cannot write a result.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("model_id", "lane", "seq_id"),
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_jobs_claim", "state", "base_model", "created_at"),
        CheckConstraint(_one_of("state", JobState), name="state"),
        CheckConstraint(_one_of("error_category", ErrorCategory), name="error_category"),
    )

    id: Mapped[str] = mapped_column(primary_key=True)
    owner: Mapped[str]
    kind: Mapped[str]
    lane: Mapped[str]
    base_model: Mapped[str]
    model_id: Mapped[str | None]
    seq_id: Mapped[int | None]
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(default=JobState.QUEUED.value)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None]
    attempt: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None]
    fencing_token: Mapped[int] = mapped_column(default=0)
    cost_tokens: Mapped[int] = mapped_column(default=0, server_default="0")
    """Tokens a worker tick spends on this job (`JobPayload.cost_tokens`); ticks are packed up to a budget."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None]
    api_key_id: Mapped[str | None]
    """The key that submitted it (usage per key); NULL for jobs from before keys were recorded, and refusals."""


class Checkpoint(Base):
    """Saved LoRA weights of a run, addressed as ``tinker://<run_id>/<checkpoint_id>``.

    ``committed`` turns true only once the files at ``storage_uri`` are complete.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("run_id", "checkpoint_id"),
        CheckConstraint(_one_of("kind", CheckpointKind), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"))
    owner: Mapped[str] = mapped_column(index=True)
    checkpoint_id: Mapped[str]
    kind: Mapped[str]
    tinker_path: Mapped[str] = mapped_column(unique=True)
    storage_uri: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    public: Mapped[bool] = mapped_column(default=False)
    committed: Mapped[bool] = mapped_column(default=False)
    ephemeral: Mapped[bool] = mapped_column(default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)


class SamplingSession(Base):
    """A sampler bound to a base model, optionally with LoRA weights from ``model_path``."""

    __tablename__ = "sampling_sessions"

    id: Mapped[str] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(index=True)
    session_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id"))
    base_model: Mapped[str]
    model_path: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    joined_clients: Mapped[int] = mapped_column(default=0, server_default="0")
    """Clients that joined this sampler (``join_sampling_session``); the n-th joiner gets clone id n."""


class CustomLoss(Base):
    """A loss graph stored by ``create_custom_loss`` (a traced torch.fx graph as data, never code), named in
    ``forward_backward`` by ``id``; ``custom_loss_seq_id`` is the client's number for it within its session."""

    __tablename__ = "custom_losses"
    __table_args__ = (UniqueConstraint("session_id", "custom_loss_seq_id"),)

    id: Mapped[str] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"))
    custom_loss_seq_id: Mapped[int]
    name: Mapped[str]
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """One audited action on a tenant's objects (``AdminClient.get_audit_log``): ``event`` is
    ``<resource>_<action>`` (``checkpoint_read``, ``checkpoint_publish``, ``apikey_revoke``, ...), ``owner`` the
    tenant whose object it was, ``actor`` the tenant that acted (another tenant reading a published checkpoint)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_owner_at", "owner", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    owner: Mapped[str]
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str]
    actor: Mapped[str]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_id: Mapped[str | None]
    tinker_path: Mapped[str | None]


class ModelAlias(Base):
    """A tenant's name for a checkpoint path (``tinker://...``), usable as the OpenAI ``model``."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    owner: Mapped[str]
    name: Mapped[str]
    tinker_path: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Worker(Base):
    """A live worker process: what it serves, the queue that reaches it alone, and when it last said so.

    ``role`` is ``train`` (runs training ops, holds runs' adapters), ``sample`` (sampling only) or ``all``.
    A worker whose ``heartbeat_at`` is older than the dead-after interval is reaped by the reconciler: its
    row is deleted, its leases are released and its runs are unpinned so another worker can claim them.
    """

    __tablename__ = "workers"
    __table_args__ = (CheckConstraint("role IN ('train', 'sample', 'all')", name="role"),)

    id: Mapped[str] = mapped_column(primary_key=True)
    role: Mapped[str]
    base_models: Mapped[list[str]]
    queue: Mapped[str]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)

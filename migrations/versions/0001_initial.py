"""Initial schema: API keys, client sessions, training runs, jobs, checkpoints, sampling sessions.

Generated with ``alembic revision --autogenerate`` against an empty PostgreSQL
database and cleaned up by hand: timestamps are written as
``DateTime(timezone=True)`` (the storage type of ``api.db.types.UTCDateTime``),
and indexes are dropped with their tables. Constraint names come from the
naming convention in ``api.db.models`` and are spelled out here, wrapped in
``op.f`` so Alembic does not apply the convention a second time.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("key_hash", sa.String(), nullable=False),
        sa.Column("prefix", sa.String(), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_owner"), "api_keys", ["owner"])

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("sdk_version", sa.String(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("last_heartbeat_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_owner"), "sessions", ["owner"])

    op.create_table(
        "training_runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("model_seq_id", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("lora_rank", sa.Integer(), nullable=False),
        sa.Column("train_attn", sa.Boolean(), nullable=False),
        sa.Column("train_mlp", sa.Boolean(), nullable=False),
        sa.Column("train_unembed", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("last_request_time", nullable=False),
        sa.Column("next_seq_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'unloaded')", name=op.f("ck_training_runs_status")),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name=op.f("fk_training_runs_session_id_sessions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_owner"), "training_runs", ["owner"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("lane", sa.String(), nullable=False),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("model_id", sa.String(), nullable=True),
        sa.Column("seq_id", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        sa.Column("fencing_token", sa.Integer(), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        sa.Column("idempotency_key", sa.String(), nullable=True),
        sa.CheckConstraint("error_category IN ('user', 'server', 'unknown')", name=op.f("ck_jobs_error_category")),
        sa.CheckConstraint("state IN ('queued', 'leased', 'done', 'failed')", name=op.f("ck_jobs_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("model_id", "lane", "seq_id", name=op.f("uq_jobs_model_id_lane_seq_id")),
        sa.UniqueConstraint("owner", "idempotency_key", name=op.f("uq_jobs_owner_idempotency_key")),
    )
    op.create_index(op.f("ix_jobs_claim"), "jobs", ["state", "base_model", "created_at"])

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("checkpoint_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("tinker_path", sa.String(), nullable=False),
        sa.Column("storage_uri", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("expires_at", nullable=True),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("committed", sa.Boolean(), nullable=False),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.CheckConstraint("kind IN ('training', 'sampler')", name=op.f("ck_checkpoints_kind")),
        sa.ForeignKeyConstraint(["run_id"], ["training_runs.id"], name=op.f("fk_checkpoints_run_id_training_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("run_id", "checkpoint_id", name=op.f("uq_checkpoints_run_id_checkpoint_id")),
        sa.UniqueConstraint("tinker_path", name=op.f("uq_checkpoints_tinker_path")),
    )
    op.create_index(op.f("ix_checkpoints_owner"), "checkpoints", ["owner"])

    op.create_table(
        "sampling_sessions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=True),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("model_path", sa.String(), nullable=True),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name=op.f("fk_sampling_sessions_session_id_sessions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sampling_sessions")),
    )
    op.create_index(op.f("ix_sampling_sessions_owner"), "sampling_sessions", ["owner"])


def downgrade() -> None:
    # Children before parents; each table's indexes go with it.
    for table in ("sampling_sessions", "checkpoints", "jobs", "training_runs", "sessions", "api_keys"):
        op.drop_table(table)

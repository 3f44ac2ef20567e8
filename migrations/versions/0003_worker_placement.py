"""Worker registry and sticky placement: a ``workers`` table and ``training_runs.worker_id``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("base_models", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('train', 'sample', 'all')", name=op.f("ck_workers_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(), nullable=True))
        batch.create_index(batch.f("ix_training_runs_worker_id"), ["worker_id"])


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_index(batch.f("ix_training_runs_worker_id"))
        batch.drop_column("worker_id")
    op.drop_table("workers")

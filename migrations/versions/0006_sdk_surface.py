"""The rest of the Tinker SDK 0.38 surface: finished and named sessions, external checkpoints, server-side losses.

- ``sessions`` gains ``display_name`` and ``project_id`` (``ServiceClient(display_name=..., project_id=...)``,
  ``RestClient.assign_session_project``), ``finished_at`` and ``finish_status`` (``POST /sessions/{id}/finish`` on
  ``close()``: when, and the client's reason).
- ``sampling_sessions.joined_clients`` counts the clients that joined it (``join_sampling_session`` clone ids).
- ``checkpoints.kind`` may be ``external``: a PEFT adapter written by ``save_weights_external`` for download.
- ``checkpoints.user_metadata`` holds the metadata Tinker shows per checkpoint (copies note their source).
- ``audit_events``: who read or changed which checkpoint, key or session, and when (``AdminClient.get_audit_log``).
- ``custom_losses``: the traced loss graphs of ``create_custom_loss``, one per (session, custom_loss_seq_id).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("display_name", sa.String(), nullable=True))
        batch.add_column(sa.Column("project_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finish_status", sa.JSON(), nullable=True))
    with op.batch_alter_table("sampling_sessions") as batch:
        batch.add_column(sa.Column("joined_clients", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), "kind IN ('training', 'sampler', 'external')")
        batch.add_column(sa.Column("user_metadata", sa.JSON(), nullable=True))
    op.execute("UPDATE checkpoints SET user_metadata = '{}'")
    with op.batch_alter_table("checkpoints") as batch:
        batch.alter_column("user_metadata", existing_type=sa.JSON(), nullable=False)
    op.create_table(
        "custom_losses",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("custom_loss_seq_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name=op.f("fk_custom_losses_session_id_sessions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_custom_losses")),
        sa.UniqueConstraint(
            "session_id", "custom_loss_seq_id", name=op.f("uq_custom_losses_session_id_custom_loss_seq_id")
        ),
    )
    op.create_index(op.f("ix_custom_losses_owner"), "custom_losses", ["owner"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.String(), nullable=True),
        sa.Column("tinker_path", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_owner_at", "audit_events", ["owner", "at"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_owner_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_custom_losses_owner"), table_name="custom_losses")
    op.drop_table("custom_losses")
    op.execute("DELETE FROM checkpoints WHERE kind = 'external'")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("user_metadata")
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), "kind IN ('training', 'sampler')")
    with op.batch_alter_table("sampling_sessions") as batch:
        batch.drop_column("joined_clients")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("finish_status")
        batch.drop_column("finished_at")
        batch.drop_column("project_id")
        batch.drop_column("display_name")

"""Tenants get a row of their own, with per-tenant rate limits and quotas and the operator role (``tenants``).

Every owner of an existing API key becomes a tenant with no limits of its own (the deployment's defaults apply);
the embedded server's own tenant, ``local``, becomes an operator.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("operator", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("concurrent_runs", sa.Integer(), nullable=True),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )
    op.execute("INSERT INTO tenants (name, created_at) SELECT owner, MIN(created_at) FROM api_keys GROUP BY owner")
    op.execute(sa.text("UPDATE tenants SET operator = :yes WHERE name = 'local'").bindparams(yes=True))


def downgrade() -> None:
    op.drop_table("tenants")

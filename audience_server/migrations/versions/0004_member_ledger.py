"""The member ledger: what each ``primary`` delivery put at a destination, by segment.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from audience_server.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "member_ledgers",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("segment_name", sa.String(255), nullable=False),
        sa.Column("ledger", sa.String(32), nullable=False),
        sa.Column("target", sa.String(128), nullable=True),
        sa.Column("confirmed", sa.Integer, nullable=True),
        sa.Column("latest", sa.Integer, nullable=False),
        sa.Column("delivered_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "destination", "segment_name", name="pk_member_ledgers"),
    )
    op.create_index(
        "ix_member_ledgers_tenant_ledger", "member_ledgers", ["tenant", "ledger"], unique=True
    )
    op.create_table(
        "ledger_members",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("ledger", sa.String(32), nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant", "ledger", "kind", "digest", "generation", name="pk_ledger_members"
        ),
    )


def downgrade() -> None:
    op.drop_table("ledger_members")
    op.drop_index("ix_member_ledgers_tenant_ledger", table_name="member_ledgers")
    op.drop_table("member_ledgers")

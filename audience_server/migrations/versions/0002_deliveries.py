"""Deliveries, their attempts, and what assembly records on sessions and batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from audience_server.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as table:
        table.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        table.add_column(sa.Column("lease_expires_at", UTCDateTime, nullable=True))
        table.add_column(sa.Column("unique_users", sa.BigInteger, nullable=True))
        table.add_column(sa.Column("ended_at", UTCDateTime, nullable=True))
    op.create_index("ix_sessions_state_ended", "sessions", ["state", "ended_at"])
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("canonical_digest", sa.LargeBinary(32), nullable=True))
        table.add_column(sa.Column("duplicates", sa.Text, nullable=True))

    op.create_table(
        "deliveries",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_key", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("segment_name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("budget_from", sa.Integer, nullable=False),
        sa.Column("users_sent", sa.BigInteger, nullable=False),
        sa.Column("invalid_users", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "session_key", "destination", name="pk_deliveries"),
        sa.ForeignKeyConstraint(
            ["tenant", "session_key"],
            ["sessions.tenant", "sessions.session_key"],
            name="fk_deliveries_sessions",
        ),
    )
    op.create_index("ix_deliveries_state_next", "deliveries", ["state", "next_attempt_at"])

    op.create_table(
        "delivery_attempts",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_key", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint(
            "tenant", "session_key", "destination", "number", name="pk_delivery_attempts"
        ),
        sa.ForeignKeyConstraint(
            ["tenant", "session_key", "destination"],
            ["deliveries.tenant", "deliveries.session_key", "deliveries.destination"],
            name="fk_delivery_attempts_deliveries",
        ),
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_table("deliveries")
    with op.batch_alter_table("batches") as table:
        table.drop_column("duplicates")
        table.drop_column("canonical_digest")
    op.drop_index("ix_sessions_state_ended", "sessions")
    with op.batch_alter_table("sessions") as table:
        table.drop_column("ended_at")
        table.drop_column("unique_users")
        table.drop_column("lease_expires_at")
        table.drop_column("lease_owner")

"""Upload sessions, their batches and their event history.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from audience_server.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_key", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("total_batches", sa.Integer, nullable=False),
        sa.Column("total_users", sa.BigInteger, nullable=False),
        sa.Column("sequence_base", sa.SmallInteger, nullable=True),
        sa.Column("received_batches", sa.Integer, nullable=False),
        sa.Column("received_users", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("sync", sa.Boolean, nullable=True),
        sa.Column("disable_prefix", sa.Boolean, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("purged_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("tenant", "session_key", name="pk_sessions"),
    )
    op.create_index(
        "ix_sessions_tenant_updated", "sessions", ["tenant", "updated_at", "session_key"]
    )
    op.create_index("ix_sessions_state_expires", "sessions", ["state", "expires_at"])

    op.create_table(
        "batches",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_key", sa.String(128), nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("user_count", sa.Integer, nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("users", sa.LargeBinary, nullable=True),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "session_key", "sequence", name="pk_batches"),
        sa.ForeignKeyConstraint(
            ["tenant", "session_key"],
            ["sessions.tenant", "sessions.session_key"],
            name="fk_batches_sessions",
        ),
    )

    op.create_table(
        "session_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("session_key", sa.String(128), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_session_events"),
    )
    op.create_index("ix_session_events_session", "session_events", ["tenant", "session_key", "id"])


def downgrade() -> None:
    op.drop_table("session_events")
    op.drop_table("batches")
    op.drop_table("sessions")

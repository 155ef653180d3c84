"""How far assembly has read a session: ``sessions.assembled_users``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: NULL is what a session not yet assembled shows.
    with op.batch_alter_table("sessions") as table:
        table.add_column(sa.Column("assembled_users", sa.BigInteger, nullable=True))
    # A session assembled before this revision read every one of its users.
    op.execute("UPDATE sessions SET assembled_users = total_users WHERE unique_users IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("sessions") as table:
        table.drop_column("assembled_users")

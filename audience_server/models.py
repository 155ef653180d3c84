"""The schema, as SQLAlchemy tables. Alembic migrations are the authority; a test keeps
these in step with them. Every table leads with its tenant so it can be distributed by
tenant; the session tables go on with ``session_key``, the member ledger with its ledger."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

sessions = Table(
    "sessions",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("session_key", String(128), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("type", String(16), nullable=False),
    Column("total_batches", Integer, nullable=False),
    Column("total_users", BigInteger, nullable=False),
    Column("sequence_base", SmallInteger, nullable=True),
    Column("received_batches", Integer, nullable=False),
    Column("received_users", BigInteger, nullable=False),
    Column("state", String(24), nullable=False),
    Column("reason", Text, nullable=True),
    # The flags of the batch that completed the session; delivery reads them.
    Column("sync", Boolean, nullable=True),
    Column("disable_prefix", Boolean, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("purged_at", UTCDateTime, nullable=True),
    # Assembly: who holds the session while finding duplicates, and what it found.
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("unique_users", BigInteger, nullable=True),
    # Users assembly has read so far (NULL until it starts; the total once it ends).
    Column("assembled_users", BigInteger, nullable=True),
    Column(
        "ended_at", UTCDateTime, nullable=True
    ),  # every delivery ended; retention counts from here
    Index("ix_sessions_tenant_updated", "tenant", "updated_at", "session_key"),
    Index("ix_sessions_state_expires", "state", "expires_at"),
    Index("ix_sessions_state_ended", "state", "ended_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("session_key", String(128), primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("user_count", Integer, nullable=False),
    Column("digest", LargeBinary(32), nullable=False),
    Column("meta", Text, nullable=False),  # the batch object as sent, JSON
    Column("users", LargeBinary, nullable=True),  # the users field as sent; NULL once purged
    Column("received_at", UTCDateTime, nullable=False),
    # Set by assembly: sha256 of the users in canonical JSON (recognises a re-send after a
    # purge), and the indexes of users that repeat an earlier user of the session (JSON).
    Column("canonical_digest", LargeBinary(32), nullable=True),
    Column("duplicates", Text, nullable=True),
    ForeignKeyConstraint(["tenant", "session_key"], ["sessions.tenant", "sessions.session_key"]),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("session_key", String(128), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("segment_name", String(255), nullable=False),
    Column("state", String(16), nullable=False),  # pending, running, succeeded, failed
    Column("attempts", Integer, nullable=False),
    Column("budget_from", Integer, nullable=False),  # attempts already spent before a re-queue
    Column("users_sent", BigInteger, nullable=False),
    Column("invalid_users", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    ForeignKeyConstraint(["tenant", "session_key"], ["sessions.tenant", "sessions.session_key"]),
    Index("ix_deliveries_state_next", "state", "next_attempt_at"),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("session_key", String(128), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("worker", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("outcome", String(16), nullable=True),  # succeeded, retry, failed, interrupted
    Column("http_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    ForeignKeyConstraint(
        ["tenant", "session_key", "destination"],
        ["deliveries.tenant", "deliveries.session_key", "deliveries.destination"],
    ),
)

events = Table(
    "session_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("session_key", String(128), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("detail", Text, nullable=True),
    Index("ix_session_events_session", "tenant", "session_key", "id"),
)

# The member ledger (``members.py``): per (tenant, destination, segment name), the digests a
# ``primary`` delivery put at the destination, so that the next one sends the difference.
member_ledgers = Table(
    "member_ledgers",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("segment_name", String(255), primary_key=True),
    Column("ledger", String(32), nullable=False),  # short key of its members' rows
    Column("target", String(128), nullable=True),  # the platform's list the confirmed set is in
    Column("confirmed", Integer, nullable=True),  # generation of the last successful delivery
    Column("latest", Integer, nullable=False),  # generation of the latest attempt begun
    Column("delivered_at", UTCDateTime, nullable=True),  # the last success; purge counts from it
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_member_ledgers_tenant_ledger", "tenant", "ledger", unique=True),
)

ledger_members = Table(
    "ledger_members",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("ledger", String(32), primary_key=True),
    # Digest before generation: pages of leavers walk the key in (kind, digest) order.
    Column("kind", SmallInteger, primary_key=True),  # the id's position in the platform's schema
    Column("digest", LargeBinary(32), primary_key=True),
    Column("generation", Integer, primary_key=True),  # the attempt that staged it
)

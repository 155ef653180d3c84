"""Data functions over sessions, batches and events. They take a connection and never
commit: the caller's transaction decides."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, TypeAlias

import zstandard
from sqlalchemy import Connection, Row, Table, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .models import batches, deliveries, events, sessions

AnyRow: TypeAlias = Row[*tuple[Any, ...]]


def pack_users(users_json: bytes) -> bytes:
    """Stored form of a batch's users: zstd, which costs under a millisecond for 2 MB and
    shrinks what the database writes (and PostgreSQL TOASTs) several times over."""
    return zstandard.ZstdCompressor(level=1).compress(users_json)


def unpack_users(stored: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(stored)


def _session_key(tenant: str, key: str) -> Any:
    return and_(sessions.c.tenant == tenant, sessions.c.session_key == key)


def _batches_of(tenant: str, key: str) -> Any:
    return and_(batches.c.tenant == tenant, batches.c.session_key == key)


def _insert_if_absent(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT (primary key) DO NOTHING; True if the row went in."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    key = [column.name for column in table.primary_key.columns]
    stmt = (
        dialect_insert(table)
        .values(values)
        .on_conflict_do_nothing(index_elements=key)
        .returning(*table.primary_key.columns)
    )
    return conn.execute(stmt).first() is not None


def create_session_if_absent(conn: Connection, values: dict[str, Any]) -> bool:
    """Insert the session unless one with its key exists; True if this call created it."""
    return _insert_if_absent(conn, sessions, values)


def lock_session(conn: Connection, tenant: str, key: str) -> AnyRow | None:
    """The session row, locked until the transaction ends (SQLite: the writer lock does it)."""
    stmt = select(sessions).where(_session_key(tenant, key)).with_for_update()
    return conn.execute(stmt).first()


def get_session(conn: Connection, tenant: str, key: str) -> AnyRow | None:
    return conn.execute(select(sessions).where(_session_key(tenant, key))).first()


def update_session(conn: Connection, tenant: str, key: str, **values: Any) -> None:
    conn.execute(update(sessions).where(_session_key(tenant, key)).values(**values))


def find_batch(conn: Connection, tenant: str, key: str, sequence: int) -> AnyRow | None:
    stmt = select(
        batches.c.user_count, batches.c.digest, batches.c.users, batches.c.canonical_digest
    ).where(_batches_of(tenant, key), batches.c.sequence == sequence)
    return conn.execute(stmt).first()


def insert_batch_if_absent(conn: Connection, **values: Any) -> bool:
    """Store a batch unless its sequence is already there; True if this call stored it."""
    return _insert_if_absent(conn, batches, values)


def sum_users(conn: Connection, tenant: str, key: str) -> int:
    stmt = select(func.coalesce(func.sum(batches.c.user_count), 0)).where(_batches_of(tenant, key))
    return int(conn.execute(stmt).scalar_one())


def received_sequences(conn: Connection, tenant: str, key: str) -> list[int]:
    stmt = select(batches.c.sequence).where(_batches_of(tenant, key)).order_by(batches.c.sequence)
    return list(conn.execute(stmt).scalars())


def purge_users(conn: Connection, tenant: str, key: str) -> None:
    """Forget the users of every batch; digests and counts stay for idempotency and history."""
    conn.execute(
        update(batches)
        .where(_batches_of(tenant, key), batches.c.users.is_not(None))
        .values(users=None)
    )


def add_event(
    conn: Connection, tenant: str, key: str, at: dt.datetime, kind: str, detail: str | None = None
) -> None:
    conn.execute(
        events.insert().values(tenant=tenant, session_key=key, at=at, kind=kind, detail=detail)
    )


def session_events(conn: Connection, tenant: str, key: str) -> Sequence[AnyRow]:
    stmt = (
        select(events.c.at, events.c.kind, events.c.detail)
        .where(events.c.tenant == tenant, events.c.session_key == key)
        .order_by(events.c.id)
    )
    return conn.execute(stmt).all()


def state_filter(state: str, now: dt.datetime) -> Any:
    """Sessions whose state, as a reader sees it at ``now``, is ``state``.

    A receiving session past its ``expires_at`` reads as expired before the sweeper marks it.
    """
    overdue = and_(sessions.c.state == "receiving", sessions.c.expires_at <= now)
    if state == "expired":
        return or_(sessions.c.state == "expired", overdue)
    if state == "receiving":
        return and_(sessions.c.state == "receiving", sessions.c.expires_at > now)
    return sessions.c.state == state


def list_sessions(
    conn: Connection,
    tenant: str,
    *,
    now: dt.datetime,
    limit: int,
    state: str | None = None,
    name: str | None = None,
    after: tuple[dt.datetime, str] | None = None,
) -> Sequence[AnyRow]:
    """Newest activity first; ``after`` is the (updated_at, key) of the last row already seen."""
    stmt = select(sessions).where(sessions.c.tenant == tenant)
    if state is not None:
        stmt = stmt.where(state_filter(state, now))
    if name:
        escaped = name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(func.lower(sessions.c.name).like(f"%{escaped}%", escape="\\"))
    if after is not None:
        updated_at, key = after
        stmt = stmt.where(
            or_(
                sessions.c.updated_at < updated_at,
                and_(sessions.c.updated_at == updated_at, sessions.c.session_key < key),
            )
        )
    stmt = stmt.order_by(sessions.c.updated_at.desc(), sessions.c.session_key.desc()).limit(limit)
    return conn.execute(stmt).all()


def lock_overdue_sessions(conn: Connection, now: dt.datetime, limit: int) -> Sequence[AnyRow]:
    """Receiving sessions past their expiry, locked; other sweepers skip them."""
    stmt = (
        select(sessions.c.tenant, sessions.c.session_key, sessions.c.expires_at)
        .where(sessions.c.state == "receiving", sessions.c.expires_at <= now)
        .order_by(sessions.c.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return conn.execute(stmt).all()


def deliveries_of(conn: Connection, tenant: str, key: str) -> Sequence[AnyRow]:
    stmt = (
        select(deliveries)
        .where(deliveries.c.tenant == tenant, deliveries.c.session_key == key)
        .order_by(deliveries.c.destination)
    )
    return conn.execute(stmt).all()


def deliveries_for(
    conn: Connection, sessions_page: Sequence[AnyRow]
) -> dict[tuple[str, str], list[AnyRow]]:
    """The deliveries of a page of sessions, in one query."""
    found: dict[tuple[str, str], list[AnyRow]] = {}
    if not sessions_page:
        return found
    tenant = sessions_page[0].tenant
    keys = [row.session_key for row in sessions_page]
    stmt = (
        select(deliveries)
        .where(deliveries.c.tenant == tenant, deliveries.c.session_key.in_(keys))
        .order_by(deliveries.c.destination)
    )
    for row in conn.execute(stmt):
        found.setdefault((row.tenant, row.session_key), []).append(row)
    return found

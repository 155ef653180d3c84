"""Data functions over sessions, batches and events, and the typed rows they return.

They take a connection and never commit: the caller (a request, a worker step) owns the
transaction (``db.write_transaction`` / ``db.read_transaction``). The deliveries and their
attempts are stored by ``delivery_store``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import zstandard
from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .models import batches, events, sessions
from .states import DELIVERIES_ENDED, EventKind, SessionState


class SessionKey(NamedTuple):
    tenant: str
    session_key: str


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A ``sessions`` row (see models.py for what each column holds)."""

    tenant: str
    session_key: str
    name: str
    type: str
    total_batches: int
    total_users: int
    sequence_base: int | None
    received_batches: int
    received_users: int
    state: SessionState
    reason: str | None
    sync: bool | None
    disable_prefix: bool | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    completed_at: dt.datetime | None
    purged_at: dt.datetime | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    unique_users: int | None
    ended_at: dt.datetime | None
    assembled_users: int | None


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A ``batches`` row; ``users`` is packed (``unpack_users``), None once purged."""

    tenant: str
    session_key: str
    sequence: int
    user_count: int
    digest: bytes
    meta: str
    users: bytes | None
    received_at: dt.datetime
    canonical_digest: bytes | None
    duplicates: str | None

    @property
    def repeated(self) -> list[int]:
        """Indexes of the users assembly found repeating an earlier user of the session."""
        return orjson.loads(self.duplicates) if self.duplicates else []


@dataclass(frozen=True, slots=True)
class EventRow:
    at: dt.datetime
    kind: EventKind
    detail: str | None


def pack_users(users_json: bytes) -> bytes:
    """Stored form of a batch's users: zstd, which costs under a millisecond for 2 MB and
    shrinks what the database writes (and PostgreSQL TOASTs) several times over."""
    return zstandard.ZstdCompressor(level=1).compress(users_json)


def unpack_users(stored: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(stored)


def _session(row: Row[Any]) -> SessionRow:
    values = dict(row._mapping)
    return SessionRow(**values | {"state": SessionState(values["state"])})


_KEY = (sessions.c.tenant, sessions.c.session_key)


def _is_session(tenant: str, key: str) -> ColumnElement[bool]:
    return and_(sessions.c.tenant == tenant, sessions.c.session_key == key)


def _batches_of(tenant: str, key: str) -> ColumnElement[bool]:
    return and_(batches.c.tenant == tenant, batches.c.session_key == key)


def insert_if_absent(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT (primary key) DO NOTHING; True if the row went in."""
    stmt = _inserts.get((conn.dialect.name, table.name))
    if stmt is None:
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        key = [column.name for column in table.primary_key.columns]
        stmt = _inserts[(conn.dialect.name, table.name)] = (
            dialect_insert(table)
            .on_conflict_do_nothing(index_elements=key)
            .returning(*table.primary_key.columns)
        )
    return conn.execute(stmt, values).first() is not None


_inserts: dict[tuple[str, str], Any] = {}  # (dialect, table) -> its INSERT … ON CONFLICT


# --- sessions --------------------------------------------------------------------------


def create_session_if_absent(
    conn: Connection,
    tenant: str,
    key: str,
    *,
    name: str,
    type: str,
    total_batches: int,
    total_users: int,
    now: dt.datetime,
    expires_at: dt.datetime,
) -> bool:
    """Insert a new receiving session unless one with its key exists; True if this call
    created it."""
    values = {
        "tenant": tenant,
        "session_key": key,
        "name": name,
        "type": type,
        "total_batches": total_batches,
        "total_users": total_users,
        "sequence_base": None,
        "received_batches": 0,
        "received_users": 0,
        "state": SessionState.RECEIVING,
        "created_at": now,
        "updated_at": now,
        "expires_at": expires_at,
    }
    return insert_if_absent(conn, sessions, values)


# Built once: a statement made per call costs more to build and cache-key than to run.
_SESSION_KEY = and_(
    sessions.c.tenant == bindparam("key_tenant"), sessions.c.session_key == bindparam("key_key")
)
_LOCK_SESSION = select(sessions).where(_SESSION_KEY).with_for_update()
_UPDATE_SESSION = update(sessions).where(_SESSION_KEY)


def lock_session(conn: Connection, tenant: str, key: str) -> SessionRow | None:
    """The session row, locked until the transaction ends (SQLite: the writer lock does it)."""
    row = conn.execute(_LOCK_SESSION, {"key_tenant": tenant, "key_key": key}).first()
    return None if row is None else _session(row)


def get_session(conn: Connection, tenant: str, key: str) -> SessionRow | None:
    row = conn.execute(select(sessions).where(_is_session(tenant, key))).first()
    return None if row is None else _session(row)


def update_session(conn: Connection, tenant: str, key: str, **values: Any) -> None:
    conn.execute(_UPDATE_SESSION, {**values, "key_tenant": tenant, "key_key": key})


def record_assembly_progress(
    conn: Connection, tenant: str, key: str, assembled_users: int, now: dt.datetime
) -> None:
    """How many of the session's users assembly has read so far, shown by status and
    followed by ``upload --wait``. ``updated_at`` is left alone: it is the session's last
    change of state or batches, which orders the session list and its cursors, and progress
    written every few seconds would reshuffle pages being read (and rewrite its index each
    time). ``now``, the caller's clock reading, dates nothing here for the same reason."""
    update_session(conn, tenant, key, assembled_users=assembled_users)


def overdue(now: dt.datetime) -> ColumnElement[bool]:
    """Receiving, and past its expiry: the SQL twin of ``states.is_overdue``."""
    return and_(sessions.c.state == SessionState.RECEIVING, sessions.c.expires_at <= now)


def state_filter(state: SessionState, now: dt.datetime) -> ColumnElement[bool]:
    """Sessions whose state, as a reader sees it at ``now`` (``states.effective_state``),
    is ``state``: a receiving session past its expiry reads as expired before the sweeper
    marks it."""
    if state == SessionState.EXPIRED:
        return or_(sessions.c.state == SessionState.EXPIRED, overdue(now))
    if state == SessionState.RECEIVING:
        return and_(sessions.c.state == SessionState.RECEIVING, ~overdue(now))
    return sessions.c.state == state


def list_sessions(
    conn: Connection,
    tenant: str,
    *,
    now: dt.datetime,
    limit: int,
    state: SessionState | None = None,
    name: str | None = None,
    after: tuple[dt.datetime, str] | None = None,
) -> list[SessionRow]:
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
    return [_session(row) for row in conn.execute(stmt)]


def lock_overdue_sessions(conn: Connection, now: dt.datetime, limit: int) -> list[SessionKey]:
    """Receiving sessions past their expiry, locked; other sweepers skip them."""
    stmt = (
        select(*_KEY)
        .where(overdue(now))
        .order_by(sessions.c.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [SessionKey(*row) for row in conn.execute(stmt)]


def lock_retention_due(conn: Connection, ended_before: dt.datetime, limit: int) -> list[SessionKey]:
    """Sessions whose deliveries all ended by ``ended_before`` and whose users are still
    kept, locked; other sweepers skip them."""
    stmt = (
        select(*_KEY)
        .where(
            sessions.c.state.in_(sorted(DELIVERIES_ENDED)),
            sessions.c.ended_at <= ended_before,
            sessions.c.purged_at.is_(None),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [SessionKey(*row) for row in conn.execute(stmt)]


def _assembly_due(now: dt.datetime) -> Select[Any]:
    return (
        select(*_KEY)
        .where(
            sessions.c.state == SessionState.COMPLETE,
            or_(sessions.c.lease_expires_at.is_(None), sessions.c.lease_expires_at < now),
        )
        .order_by(sessions.c.completed_at)
        .limit(1)
    )


def assembly_due(conn: Connection, now: dt.datetime) -> bool:
    """Whether a complete session waits for assembly, looked at without locking."""
    return conn.execute(_assembly_due(now)).first() is not None


def lock_assembly_due(conn: Connection, now: dt.datetime) -> SessionKey | None:
    """The complete session waiting longest whose assembly no live worker holds, locked;
    other workers skip it."""
    row = conn.execute(_assembly_due(now).with_for_update(skip_locked=True)).first()
    return None if row is None else SessionKey(*row)


# --- batches ---------------------------------------------------------------------------


def insert_batch_if_absent(conn: Connection, **values: Any) -> bool:
    """Store a batch unless its sequence is already there; True if this call stored it."""
    return insert_if_absent(conn, batches, values)


def find_batch(conn: Connection, tenant: str, key: str, sequence: int) -> BatchRow | None:
    stmt = select(batches).where(_batches_of(tenant, key), batches.c.sequence == sequence)
    row = conn.execute(stmt).first()
    return None if row is None else BatchRow(**row._mapping)


def sum_users(conn: Connection, tenant: str, key: str) -> int:
    stmt = select(func.coalesce(func.sum(batches.c.user_count), 0)).where(_batches_of(tenant, key))
    return int(conn.execute(stmt).scalar_one())


def received_sequences(conn: Connection, tenant: str, key: str) -> list[int]:
    stmt = select(batches.c.sequence).where(_batches_of(tenant, key)).order_by(batches.c.sequence)
    return list(conn.execute(stmt).scalars())


def record_assembly(
    conn: Connection,
    tenant: str,
    key: str,
    sequence: int,
    *,
    repeated: Sequence[int],
    canonical_digest: bytes,
) -> None:
    """Keep what assembly found in a batch: the indexes of its repeated users and the
    digest of its users in canonical JSON."""
    conn.execute(
        update(batches)
        .where(_batches_of(tenant, key), batches.c.sequence == sequence)
        .values(
            duplicates=orjson.dumps(list(repeated)).decode() if repeated else None,
            canonical_digest=canonical_digest,
        )
    )


def purge_users(conn: Connection, tenant: str, key: str) -> None:
    """Forget the users of every batch; digests and counts stay for idempotency and history."""
    conn.execute(
        update(batches)
        .where(_batches_of(tenant, key), batches.c.users.is_not(None))
        .values(users=None)
    )


# --- events ----------------------------------------------------------------------------


def add_event(
    conn: Connection,
    tenant: str,
    key: str,
    at: dt.datetime,
    kind: EventKind,
    detail: str | None = None,
) -> None:
    conn.execute(
        events.insert().values(tenant=tenant, session_key=key, at=at, kind=kind, detail=detail)
    )


def session_events(conn: Connection, tenant: str, key: str) -> list[EventRow]:
    """The session's events, oldest first."""
    stmt = (
        select(events.c.at, events.c.kind, events.c.detail)
        .where(events.c.tenant == tenant, events.c.session_key == key)
        .order_by(events.c.id)
    )
    return [EventRow(at, EventKind(kind), detail) for at, kind, detail in conn.execute(stmt)]


def renew_assembly_lease(
    conn: Connection, tenant: str, key: str, owner: str, until: dt.datetime
) -> bool:
    """Extend an assembly's lease while ``owner`` still holds it; False when it does not."""
    result = conn.execute(
        update(sessions)
        .where(_is_session(tenant, key), sessions.c.lease_owner == owner)
        .values(lease_expires_at=until)
    )
    return result.rowcount == 1


def release_assembly_leases(conn: Connection, owner: str) -> int:
    """Free the assemblies ``owner`` holds (it is known dead); how many."""
    result = conn.execute(
        update(sessions)
        .where(sessions.c.lease_owner == owner, sessions.c.state == SessionState.COMPLETE)
        .values(lease_owner=None, lease_expires_at=None)
    )
    return result.rowcount

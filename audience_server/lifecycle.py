"""Ending sessions: operator abort and idle expiry, both of which purge stored users."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, select, update

from . import store
from .errors import Conflict, NotFound
from .models import deliveries, sessions
from .store import AnyRow

# States whose users are already gone or were delivered: abort changes nothing but purges.
_KEEPS_STATE = frozenset({"delivered", "expired", "aborted"})


def abort_session(conn: Connection, tenant: str, key: str, now: dt.datetime) -> AnyRow:
    """Purge a session's users; it becomes ``aborted`` unless it had already ended well or
    expired. Returns the session as it now stands."""
    session = store.lock_session(conn, tenant, key)
    if session is None:
        raise NotFound(f"session {key} does not exist.")
    store.purge_users(conn, tenant, key)
    values: dict[str, Any] = {"purged_at": now}
    if session.state == "receiving" and session.expires_at <= now:
        values.update(state="expired", reason="no batch arrived within the session TTL")
        store.add_event(conn, tenant, key, now, "expired")
    elif session.state not in _KEEPS_STATE:
        values.update(state="aborted", reason="aborted by an operator", updated_at=now)
        store.add_event(conn, tenant, key, now, "aborted")
    store.update_session(conn, tenant, key, **values)
    session = store.get_session(conn, tenant, key)
    assert session is not None
    return session


def expire_overdue(conn: Connection, now: dt.datetime, limit: int = 100) -> int:
    """Mark up to ``limit`` overdue receiving sessions expired and purge their users."""
    overdue = store.lock_overdue_sessions(conn, now, limit)
    for row in overdue:
        store.purge_users(conn, row.tenant, row.session_key)
        store.update_session(
            conn,
            row.tenant,
            row.session_key,
            state="expired",
            reason="no batch arrived within the session TTL",
            purged_at=now,
        )
        store.add_event(conn, row.tenant, row.session_key, now, "expired")
    return len(overdue)


def retry_failed(conn: Connection, tenant: str, key: str, now: dt.datetime) -> list[str]:
    """Queue the session's failed deliveries again, each with a fresh attempt budget."""
    session = store.lock_session(conn, tenant, key)
    if session is None:
        raise NotFound(f"session {key} does not exist.")
    failed = [row for row in store.deliveries_of(conn, tenant, key) if row.state == "failed"]
    if not failed:
        raise Conflict(f"session {key} has no failed delivery to retry.")
    if session.state == "aborted" or session.purged_at is not None:
        raise Conflict(
            f"session {key}'s users were purged ({session.state}); it cannot be retried."
        )
    for row in failed:
        conn.execute(
            update(deliveries)
            .where(
                deliveries.c.tenant == tenant,
                deliveries.c.session_key == key,
                deliveries.c.destination == row.destination,
            )
            .values(state="pending", budget_from=row.attempts, next_attempt_at=now, updated_at=now)
        )
    names = [row.destination for row in failed]
    store.update_session(conn, tenant, key, state="delivering", ended_at=None, updated_at=now)
    store.add_event(conn, tenant, key, now, "retry", ", ".join(names))
    return names


def purge_ended(
    conn: Connection, now: dt.datetime, retention: dt.timedelta, limit: int = 100
) -> int:
    """Purge the users of up to ``limit`` sessions whose deliveries ended ``retention`` ago."""
    rows = conn.execute(
        select(sessions.c.tenant, sessions.c.session_key)
        .where(
            sessions.c.state.in_(("delivered", "partially_delivered", "failed")),
            sessions.c.ended_at <= now - retention,
            sessions.c.purged_at.is_(None),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        store.purge_users(conn, row.tenant, row.session_key)
        store.update_session(conn, row.tenant, row.session_key, purged_at=now)
        store.add_event(conn, row.tenant, row.session_key, now, "purged", "retention reached")
    return len(rows)

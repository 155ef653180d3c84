"""Ending sessions: operator abort and idle expiry, both of which purge stored users; an
operator's retry of failed deliveries; the purge once retention is reached."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection

from . import delivery_store, store
from .errors import Conflict, NotFound
from .states import (
    ABORT_KEEPS,
    EXPIRED_REASON,
    DeliveryState,
    EventKind,
    SessionState,
    is_overdue,
)
from .store import SessionRow


def abort_session(conn: Connection, tenant: str, key: str, now: dt.datetime) -> SessionRow:
    """Purge a session's users; it becomes ``aborted`` unless it had already ended well or
    expired. Returns the session as it now stands."""
    session = store.lock_session(conn, tenant, key)
    if session is None:
        raise NotFound(f"session {key} does not exist.")
    store.purge_users(conn, tenant, key)
    values: dict[str, Any] = {"purged_at": now}
    if is_overdue(session.state, session.expires_at, now):
        values.update(state=SessionState.EXPIRED, reason=EXPIRED_REASON)
        store.add_event(conn, tenant, key, now, EventKind.EXPIRED)
    elif session.state not in ABORT_KEEPS:
        values.update(state=SessionState.ABORTED, reason="aborted by an operator", updated_at=now)
        store.add_event(conn, tenant, key, now, EventKind.ABORTED)
    store.update_session(conn, tenant, key, **values)
    session = store.get_session(conn, tenant, key)
    assert session is not None
    return session


def expire_overdue(conn: Connection, now: dt.datetime, limit: int = 100) -> int:
    """Mark up to ``limit`` overdue receiving sessions expired and purge their users."""
    overdue = store.lock_overdue_sessions(conn, now, limit)
    for tenant, key in overdue:
        store.purge_users(conn, tenant, key)
        store.update_session(
            conn, tenant, key, state=SessionState.EXPIRED, reason=EXPIRED_REASON, purged_at=now
        )
        store.add_event(conn, tenant, key, now, EventKind.EXPIRED)
    return len(overdue)


def retry_failed(conn: Connection, tenant: str, key: str, now: dt.datetime) -> list[str]:
    """Queue the session's failed deliveries again, each with a fresh attempt budget."""
    session = store.lock_session(conn, tenant, key)
    if session is None:
        raise NotFound(f"session {key} does not exist.")
    failed = [
        row
        for row in delivery_store.deliveries_of(conn, tenant, key)
        if row.state == DeliveryState.FAILED
    ]
    if not failed:
        raise Conflict(f"session {key} has no failed delivery to retry.")
    if session.state == SessionState.ABORTED or session.purged_at is not None:
        raise Conflict(
            f"session {key}'s users were purged ({session.state}); it cannot be retried."
        )
    for row in failed:
        delivery_store.requeue_delivery(conn, row.key, budget_from=row.attempts, now=now)
    names = [row.destination for row in failed]
    store.update_session(
        conn, tenant, key, state=SessionState.DELIVERING, ended_at=None, updated_at=now
    )
    store.add_event(conn, tenant, key, now, EventKind.RETRY, ", ".join(names))
    return names


def purge_ended(
    conn: Connection, now: dt.datetime, retention: dt.timedelta, limit: int = 100
) -> int:
    """Purge the users of up to ``limit`` sessions whose deliveries ended ``retention`` ago."""
    due = store.lock_retention_due(conn, now - retention, limit)
    for tenant, key in due:
        store.purge_users(conn, tenant, key)
        store.update_session(conn, tenant, key, purged_at=now)
        store.add_event(conn, tenant, key, now, EventKind.PURGED, "retention reached")
    return len(due)

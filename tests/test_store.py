"""The data functions over sessions, batches and events, called directly in a transaction
the test owns, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Connection, Engine

from audience_server import db, store
from audience_server.states import EventKind, SessionState, effective_state, is_overdue
from audience_server.store import SessionKey, SessionRow

TENANT = "acme"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(hours=24)
TICK = dt.timedelta(microseconds=1)


def new_session(conn: Connection, key: str, now: dt.datetime = NOW, **changes: Any) -> bool:
    values: dict[str, Any] = {
        "name": "Seg",
        "type": "custom",
        "total_batches": 2,
        "total_users": 4,
        "now": now,
        "expires_at": now + TTL,
    } | changes
    return store.create_session_if_absent(conn, TENANT, key, **values)


def new_batch(conn: Connection, key: str, sequence: int, users: bytes = b"[{}]") -> bool:
    return store.insert_batch_if_absent(
        conn,
        tenant=TENANT,
        session_key=key,
        sequence=sequence,
        user_count=2,
        digest=bytes(32),
        meta="{}",
        users=store.pack_users(users),
        received_at=NOW,
    )


def test_creating_a_session_if_absent_is_idempotent(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        assert new_session(conn, "s")
        assert not new_session(conn, "s", NOW + TTL, name="Other", total_batches=9)
    with db.read_transaction(engine) as conn:
        session = store.get_session(conn, TENANT, "s")
        assert store.get_session(conn, "other-tenant", "s") is None
    assert session is not None
    assert (session.name, session.total_batches, session.created_at) == ("Seg", 2, NOW)
    assert (session.received_batches, session.received_users, session.sequence_base) == (0, 0, None)


def test_lock_session_returns_a_typed_row(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "typed")
        session = store.lock_session(conn, TENANT, "typed")
        assert store.lock_session(conn, TENANT, "absent") is None
    assert isinstance(session, SessionRow)
    assert session.state is SessionState.RECEIVING
    assert session.expires_at == NOW + TTL and session.expires_at.tzinfo is not None
    assert (session.tenant, session.session_key, session.total_users) == (TENANT, "typed", 4)
    assert session.purged_at is None and session.lease_owner is None


def test_the_overdue_condition_matches_states_is_overdue_at_the_boundary(engine: Engine) -> None:
    expiries = {"before": NOW - TICK, "at": NOW, "after": NOW + TICK}
    with db.write_transaction(engine) as conn:
        for key, expires_at in expiries.items():
            new_session(conn, key, expires_at - TTL)
        new_session(conn, "complete-past", NOW - 2 * TTL)
        store.update_session(conn, TENANT, "complete-past", state=SessionState.COMPLETE)
        new_session(conn, "marked", NOW - 2 * TTL)
        store.update_session(conn, TENANT, "marked", state=SessionState.EXPIRED)
    with db.write_transaction(engine) as conn:
        rows = store.list_sessions(conn, TENANT, now=NOW, limit=10)
        locked = {key for _, key in store.lock_overdue_sessions(conn, NOW, limit=10)}
        seen = {
            state: {
                row.session_key
                for row in store.list_sessions(conn, TENANT, now=NOW, limit=10, state=state)
            }
            for state in (SessionState.EXPIRED, SessionState.RECEIVING)
        }
    assert locked == {row.session_key for row in rows if is_overdue(row.state, row.expires_at, NOW)}
    assert locked == {"before", "at"}  # expiry is inclusive
    for state, keys in seen.items():
        assert keys == {
            row.session_key
            for row in rows
            if effective_state(row.state, row.expires_at, NOW) == state
        }
    assert seen[SessionState.EXPIRED] == {"before", "at", "marked"}
    assert seen[SessionState.RECEIVING] == {"after"}


def test_sessions_are_listed_newest_activity_first_page_by_page(engine: Engine) -> None:
    # two share an updated_at: the key, descending, orders them
    times = {"a": NOW, "b": NOW + TICK, "c": NOW + TICK, "d": NOW + 2 * TICK, "e": NOW - TICK}
    with db.write_transaction(engine) as conn:
        for key, at in times.items():
            new_session(conn, key, at)
        store.create_session_if_absent(  # another tenant's: never listed
            conn,
            "globex",
            "theirs",
            name="Seg",
            type="custom",
            total_batches=1,
            total_users=1,
            now=NOW + TTL,
            expires_at=NOW + 2 * TTL,
        )
    pages: list[list[str]] = []
    after: tuple[dt.datetime, str] | None = None
    with db.read_transaction(engine) as conn:
        while True:
            page = store.list_sessions(conn, TENANT, now=NOW, limit=2, after=after)
            if not page:
                break
            pages.append([row.session_key for row in page])
            after = (page[-1].updated_at, page[-1].session_key)
        named = store.list_sessions(conn, TENANT, now=NOW, limit=10, name="SE")
    assert pages == [["d", "c"], ["b", "a"], ["e"]]
    assert len(named) == 5  # the name filter ignores case


def test_batches_are_stored_once_read_back_typed_and_purged(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "b")
        assert new_batch(conn, "b", 2, b'[{"a": 1}]')
        assert not new_batch(conn, "b", 2, b"[{}]")  # the first one stays
        assert new_batch(conn, "b", 1)
        store.record_assembly(conn, TENANT, "b", 2, repeated=[0, 3], canonical_digest=b"c" * 32)
    with db.write_transaction(engine) as conn:
        assert store.received_sequences(conn, TENANT, "b") == [1, 2]
        assert store.sum_users(conn, TENANT, "b") == 4
        second = store.find_batch(conn, TENANT, "b", 2)
        first = store.find_batch(conn, TENANT, "b", 1)
        assert store.find_batch(conn, TENANT, "b", 3) is None
        store.purge_users(conn, TENANT, "b")
        purged = store.find_batch(conn, TENANT, "b", 2)
    assert second is not None and second.users is not None
    assert store.unpack_users(second.users) == b'[{"a": 1}]'
    assert (second.repeated, second.canonical_digest) == ([0, 3], b"c" * 32)
    assert first is not None and first.repeated == [] and first.canonical_digest is None
    assert purged is not None and purged.users is None
    assert (purged.digest, purged.canonical_digest, purged.user_count) == (bytes(32), b"c" * 32, 2)


def test_events_are_kept_in_order_and_typed(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "e")
        store.add_event(conn, TENANT, "e", NOW, EventKind.CREATED)
        store.add_event(conn, TENANT, "e", NOW, EventKind.RETRY, "crm, files")
        events = store.session_events(conn, TENANT, "e")
    assert [(event.kind, event.detail) for event in events] == [
        (EventKind.CREATED, None),
        (EventKind.RETRY, "crm, files"),
    ]
    assert all(isinstance(event.kind, EventKind) and event.at == NOW for event in events)


def test_assembly_is_due_for_complete_sessions_no_live_lease_holds(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        assert not store.assembly_due(conn, NOW)
        for key, completed in (("late", NOW), ("early", NOW - TTL), ("held", NOW - 2 * TTL)):
            new_session(conn, key)
            store.update_session(
                conn, TENANT, key, state=SessionState.COMPLETE, completed_at=completed
            )
        store.update_session(conn, TENANT, "held", lease_owner="w", lease_expires_at=NOW + TICK)
    with db.write_transaction(engine) as conn:
        assert store.assembly_due(conn, NOW)
        assert store.lock_assembly_due(conn, NOW) == SessionKey(TENANT, "early")
    with db.write_transaction(engine) as conn:  # once the lease lapses, the oldest goes first
        assert store.lock_assembly_due(conn, NOW + 2 * TICK) == SessionKey(TENANT, "held")


@pytest.mark.parametrize("state", [SessionState.DELIVERED, SessionState.FAILED])
def test_retention_is_due_once_deliveries_ended_long_enough_ago(
    engine: Engine, state: SessionState
) -> None:
    with db.write_transaction(engine) as conn:
        for key, ended in (("old", NOW - TTL), ("recent", NOW), ("purged", NOW - TTL)):
            new_session(conn, key)
            store.update_session(conn, TENANT, key, state=state, ended_at=ended)
        store.update_session(conn, TENANT, "purged", purged_at=NOW)
        new_session(conn, "open")
    with db.write_transaction(engine) as conn:
        due = store.lock_retention_due(conn, NOW - TICK, limit=10)
    assert due == [SessionKey(TENANT, "old")]

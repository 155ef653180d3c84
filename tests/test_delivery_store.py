"""The data functions over deliveries and their attempts (claims, leases, outcomes), called
directly in a transaction the test owns, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, Engine

from audience_server import db, delivery_store, store
from audience_server.delivery_store import DeliveryKey, DeliveryRow
from audience_server.states import AttemptOutcome, DeliveryState
from audience_server.store import SessionKey

TENANT = "acme"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=60)
TICK = dt.timedelta(microseconds=1)


def new_session(conn: Connection, key: str, tenant: str = TENANT) -> None:
    """A one-batch session created at NOW (tests/test_db.py uses it too)."""
    store.create_session_if_absent(
        conn,
        tenant,
        key,
        name="Seg",
        type="custom",
        total_batches=1,
        total_users=1,
        now=NOW,
        expires_at=NOW + dt.timedelta(days=1),
    )


def new_delivery(
    conn: Connection, key: str, destination: str, now: dt.datetime = NOW
) -> DeliveryKey:
    delivery = DeliveryKey(TENANT, key, destination)
    delivery_store.create_delivery(
        conn, delivery, kind="webhook", segment_name="blotout_Seg", now=now
    )
    return delivery


def delivery(conn: Connection, key: DeliveryKey) -> DeliveryRow:
    (row,) = [
        d for d in delivery_store.deliveries_of(conn, key.tenant, key.session_key) if d.key == key
    ]
    return row


def test_deliveries_are_created_pending_and_read_back_typed(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "s1")
        new_session(conn, "s2")
        for destination in ("crm", "files"):
            new_delivery(conn, "s1", destination)
        new_delivery(conn, "s2", "crm")
    with db.read_transaction(engine) as conn:
        rows = delivery_store.deliveries_of(conn, TENANT, "s1")
        sessions = store.list_sessions(conn, TENANT, now=NOW, limit=10)
        grouped = delivery_store.deliveries_for(conn, sessions)
        assert delivery_store.deliveries_for(conn, []) == {}
    assert [row.destination for row in rows] == ["crm", "files"]
    first = rows[0]
    assert isinstance(first, DeliveryRow) and first.state is DeliveryState.PENDING
    assert (first.attempts, first.budget_from, first.users_sent, first.next_attempt_at) == (
        0,
        0,
        0,
        NOW,
    )
    assert {key: [row.destination for row in rows] for key, rows in grouped.items()} == {
        SessionKey(TENANT, "s1"): ["crm", "files"],
        SessionKey(TENANT, "s2"): ["crm"],
    }


def test_a_delivery_is_due_when_pending_and_due_or_its_lease_lapsed(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "s")
        later = new_delivery(conn, "s", "later", NOW + TICK)
        running = new_delivery(conn, "s", "running", NOW - LEASE)
        delivery_store.start_attempt(
            conn, running, 1, worker="w1", now=NOW - LEASE, lease_until=NOW
        )
    with db.write_transaction(engine) as conn:
        assert not delivery_store.delivery_due(conn, ["later", "running"], NOW)
        assert delivery_store.lock_delivery_due(conn, ["later", "running"], NOW) is None
    with db.write_transaction(engine) as conn:
        # both due a tick later: the one waiting longest first; only the destinations asked for
        found = delivery_store.lock_delivery_due(conn, ["later", "running"], NOW + TICK)
        assert found is not None and found.key == running and found.state is DeliveryState.RUNNING
        assert delivery_store.delivery_due(conn, ["later"], NOW + TICK)
        assert not delivery_store.delivery_due(conn, ["elsewhere"], NOW + TICK)
    assert later.destination == "later"


def test_an_attempt_holds_the_lease_its_owner_alone_renews_and_finishes(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "s")
        key = new_delivery(conn, "s", "crm")
        delivery_store.start_attempt(conn, key, 1, worker="w1", now=NOW, lease_until=NOW + LEASE)
        started = delivery(conn, key)
        (attempt,) = delivery_store.attempts_of(conn, key)
    assert (started.state, started.attempts, started.lease_owner) == ("running", 1, "w1")
    assert (attempt.worker, attempt.started_at, attempt.outcome) == ("w1", NOW, None)

    later = NOW + LEASE / 3
    with db.write_transaction(engine) as conn:
        assert not delivery_store.renew_lease(
            conn, key, worker="w2", until=later + LEASE, users_sent=9, invalid_users=9, now=later
        )
        assert delivery_store.renew_lease(
            conn, key, worker="w1", until=later + LEASE, users_sent=4, invalid_users=1, now=later
        )
        renewed = delivery(conn, key)
    assert (renewed.lease_expires_at, renewed.users_sent, renewed.invalid_users) == (
        later + LEASE,
        4,
        1,
    )

    with db.write_transaction(engine) as conn:
        for worker in ("w2", "w1"):  # w2's finish writes nothing; w1's is the one
            written = delivery_store.finish_delivery(
                conn,
                key,
                worker=worker,
                state=DeliveryState.SUCCEEDED,
                users_sent=8,
                invalid_users=1,
                error=None,
                next_attempt_at=later,
                now=later,
            )
            assert written is (worker == "w1")
            if worker == "w2":
                assert delivery(conn, key) == renewed
        delivery_store.finish_attempt(
            conn, key, 1, outcome=AttemptOutcome.SUCCEEDED, http_status=200, error=None, now=later
        )
        finished = delivery(conn, key)
        (attempt,) = delivery_store.attempts_of(conn, key)
        # a finished delivery's lease is no one's: renewing it fails
        assert not delivery_store.renew_lease(
            conn, key, worker="w1", until=later, users_sent=0, invalid_users=0, now=later
        )
    assert (finished.state, finished.users_sent, finished.lease_owner) == ("succeeded", 8, None)
    assert finished.lease_expires_at is None
    assert (attempt.outcome, attempt.http_status, attempt.finished_at) == (
        AttemptOutcome.SUCCEEDED,
        200,
        later,
    )


def test_a_taken_over_attempt_is_closed_as_interrupted(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "s")
        key = new_delivery(conn, "s", "crm")
        delivery_store.start_attempt(conn, key, 1, worker="w1", now=NOW, lease_until=NOW + LEASE)
    taken = NOW + 2 * LEASE
    with db.write_transaction(engine) as conn:
        delivery_store.interrupt_attempt(conn, key, taken)
        delivery_store.start_attempt(
            conn, key, 2, worker="w2", now=taken, lease_until=taken + LEASE
        )
        delivery_store.interrupt_attempt(conn, key, taken + LEASE)  # closes the open one only
        first, second = delivery_store.attempts_of(conn, key)
    assert (first.outcome, first.error, first.finished_at) == (
        AttemptOutcome.INTERRUPTED,
        "worker lost its lease",
        taken,
    )
    assert (second.outcome, second.finished_at) == (AttemptOutcome.INTERRUPTED, taken + LEASE)


def test_failed_deliveries_are_requeued_with_a_fresh_budget(engine: Engine) -> None:
    with db.write_transaction(engine) as conn:
        new_session(conn, "s")
        key = new_delivery(conn, "s", "crm")
        delivery_store.start_attempt(conn, key, 1, worker="w1", now=NOW, lease_until=NOW + LEASE)
        delivery_store.fail_delivery(conn, key, "session aborted", NOW)
        failed = delivery(conn, key)
        delivery_store.requeue_delivery(conn, key, budget_from=failed.attempts, now=NOW + LEASE)
        requeued = delivery(conn, key)
    assert (failed.state, failed.last_error) == (DeliveryState.FAILED, "session aborted")
    assert (requeued.state, requeued.budget_from, requeued.next_attempt_at) == (
        DeliveryState.PENDING,
        1,
        NOW + LEASE,
    )

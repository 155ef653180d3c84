"""One delivery attempt: over the real app (retries, Retry-After, permanent failures, the
attempt budget, an abort mid-delivery, a slow chunk keeping its lease), and run alone
against a claim written to the database (the chunk timeout, abort between chunks, a lease
lost mid-call), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any, Self

import orjson
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from audience_server import db, delivery_store, store
from audience_server.app import create_app
from audience_server.attempt import Attempt, Claim, Terms
from audience_server.delivery_store import DeliveryKey
from audience_server.destinations import DestinationConfig
from audience_server.models import deliveries, delivery_attempts
from audience_server.providers.base import Chunk, ChunkResult, Segment
from audience_server.providers.recording import RecordingProvider
from audience_server.retry import RetryPolicy
from audience_server.settings import Settings
from audience_server.states import AttemptOutcome, DeliveryState, SessionState
from tests.conftest import FakeClock, make_users
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import (
    HOOK_SECRET,
    NAME,
    destinations,
    errors,
    eventually,
    form,
    send,
    serve,
    status,
    upload,
)


def test_transient_failures_are_retried_to_one_whole_segment(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    users = make_users(50)
    hook.fail(503, times=2)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    with serve(fast, engine, where) as client:
        assert upload(client, "flaky", users, 25, "?sync=true").status_code == 200
        body = status(client, "flaky")
    assert hook.segment("flaky") == users
    assert hook.attempts("flaky") == 1 and len(hook.rejected) == 2
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        3,
        None,
    )


def test_retry_after_is_honoured(fast: Settings, engine: Engine, hook: WebhookEmulator) -> None:
    hook.fail(429, retry_after="1")
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    with serve(fast, engine, where) as client:
        assert upload(client, "slow", make_users(5), 5, "?sync=true").status_code == 200
    with engine.connect() as conn:
        rows = conn.execute(select(delivery_attempts).order_by(delivery_attempts.c.number)).all()
    assert [(r.outcome, r.http_status) for r in rows] == [("retry", 429), ("succeeded", 200)]
    assert rows[1].started_at - rows[0].finished_at >= dt.timedelta(seconds=1)


def test_permanent_failure_fails_at_once_then_retry_delivers(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    users = make_users(40)
    hook.fail(400, '{"error": "unknown list"}')
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    with serve(fast, engine, where) as client:
        response = upload(client, "bad", users, 20, "?sync=true")
        assert response.status_code == 400
        assert errors(response) == ['crm: HTTP 400: {"error": "unknown list"}']
        body = status(client, "bad")
        assert body["state"] == "failed"
        (delivery,) = body["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
        assert delivery["lastError"] == 'HTTP 400: {"error": "unknown list"}'

        response = client.post("/audience/sessions/bad/retry")
        assert response.status_code == 202
        assert response.json() == {"sessionId": "bad", "retried": ["crm"]}
        hook.wait_for_segment("bad")
        # an identical re-send of the completing batch in sync mode waits and reports
        fields = form("bad", 1, 2, 40, users[:20], name=NAME)
        assert send(client, fields, "?sync=true").status_code == 200
        body = status(client, "bad")
        assert body["state"] == "delivered"
        assert body["deliveries"][0]["attempts"] == 2
        response = client.post("/audience/sessions/bad/retry")
        assert response.status_code == 409
        assert errors(response) == ["session bad has no failed delivery to retry."]
    assert hook.segment("bad") == users


def test_retries_stop_after_max_attempts(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    hook.fail(500, times=10)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    with serve(fast, engine, where) as client:
        response = upload(client, "down", make_users(3), 3, "?sync=true")
        assert response.status_code == 400
        assert errors(response)[0].startswith("crm: HTTP 500")
        assert status(client, "down")["deliveries"][0]["attempts"] == 4
    assert len(hook.rejected) == 4


def test_async_completion_answers_before_delivery_and_abort_stops_it(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    hook.delay(30)  # the receiver sits on the first chunk
    where = destinations(
        ("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET, "chunk_size": 1})
    )
    with serve(fast, engine, where) as client:
        response = upload(client, "quick", make_users(4), 2)
        assert response.status_code == 200
        hook.wait_until(lambda: hook.in_flight("quick") == 1)
        assert status(client, "quick")["state"] == "delivering"
        # an operator aborts: the delivery stops at its next chunk
        assert client.delete("/audience/sessions/quick").json()["state"] == "aborted"
        hook.release()
        hook.wait_until(lambda: hook.in_flight("quick") == 0)
        # the worker records the stop just after the receiver answers
        body = eventually(
            lambda: status(client, "quick"), lambda b: b["deliveries"][0]["state"] != "running"
        )
    assert body["state"] == "aborted"
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["lastError"]) == ("failed", "session aborted")
    assert [c.index for c in hook.requests] == [1]


def test_a_slow_chunk_keeps_its_lease(
    database_url: str, engine: Engine, hook: WebhookEmulator, clock: FakeClock
) -> None:
    """The receiver holds the chunk for 2.5 leases of the worker's clock; the worker's other
    lanes must not take the delivery over (they would, were the lease not renewed during
    the call). The test moves the clock, so no real lease is slept through."""
    lease = dt.timedelta(seconds=60)
    settings = Settings(
        database_url=database_url,
        lease=lease,
        poll_interval=dt.timedelta(milliseconds=20),
        worker_concurrency=4,
    )
    hook.delay(3600)  # held until released
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    app = create_app(settings, engine=engine, clock=clock, sweeper=False, destinations=where)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert upload(client, "long", make_users(3), 3).status_code == 200
        hook.wait_until(lambda: hook.in_flight("long") == 1)

        def held() -> tuple[int, dt.datetime]:
            with engine.connect() as conn:
                row = conn.execute(select(deliveries.c.attempts, deliveries.c.lease_expires_at))
                attempts, expires = row.one()
            return attempts, expires.replace(tzinfo=dt.UTC)

        for _ in range(6):  # 6 x 25 s: 2.5 leases, never more than one without renewal
            clock.advance(seconds=25)
            assert eventually(held, lambda h: h[1] == clock.now + lease) == (1, clock.now + lease)
        hook.release()
        body = eventually(lambda: status(client, "long"), lambda b: b["state"] == "delivered")
    assert body["deliveries"][0]["attempts"] == 1
    assert hook.attempts("long") == 1 and hook.max_in_flight("long") == 1


# --- one attempt, alone ------------------------------------------------------------------

KEY = DeliveryKey("default", "alone", "crm")
LEASE = dt.timedelta(seconds=60)


def claim(engine: Engine, clock: FakeClock, users: int) -> Claim:
    """A delivering session whose delivery ``w1`` has just claimed, as the worker leaves it."""
    now = clock()
    with db.write_transaction(engine) as conn:
        store.create_session_if_absent(
            conn,
            KEY.tenant,
            KEY.session_key,
            name="Alone",
            type="custom",
            total_batches=1,
            total_users=users,
            now=now,
            expires_at=now + dt.timedelta(days=1),
        )
        store.update_session(
            conn, KEY.tenant, KEY.session_key, state=SessionState.DELIVERING, unique_users=users
        )
        delivery_store.create_delivery(conn, KEY, kind="test", segment_name="Alone", now=now)
        delivery_store.start_attempt(conn, KEY, 1, worker="w1", now=now, lease_until=now + LEASE)
    return Claim(KEY, 1, 0, "Alone", "custom", "Alone", users, leased_at=now)


def terms(engine: Engine, clock: FakeClock, chunk_timeout: float = 30.0) -> Terms:
    return Terms(
        engine=engine,
        worker="w1",
        clock=clock,
        lease=LEASE,
        poll_interval=0.01,
        chunk_timeout=chunk_timeout,
        policy=RetryPolicy(base=60.0, cap=60.0, max_attempts=3),
    )


class Scripted(RecordingProvider):
    """The recording provider, running ``during`` on each chunk, then hanging or answering."""

    def __init__(self, during: Callable[[Chunk], object] | None = None, hang: bool = False) -> None:
        super().__init__(chunk_size=2)
        self.script(*[ChunkResult(status=200)] * 10)
        self.during = during
        self.hang = hang
        self.cancelled = False

    @classmethod
    def from_config(cls, config: DestinationConfig) -> Self:
        return cls()

    @property
    def chunks(self) -> list[int]:
        return [sent.chunk.index for sent in self.sent]

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        result = await super().send(segment, chunk)
        if self.during is not None:
            self.during(chunk)
        if self.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return result


def run(attempt: Attempt) -> DeliveryState | None:
    return asyncio.run(attempt.run())


def encoded(users: list[dict[str, Any]]) -> Iterator[list[bytes]]:
    """Users as assembly streams them: batch by batch (here, two), each one's JSON object."""
    half = len(users) // 2
    return iter([[orjson.dumps(user) for user in part] for part in (users[:half], users[half:])])


def recorded(engine: Engine) -> tuple[Any, list[Any]]:
    with db.read_transaction(engine) as conn:
        (delivery,) = delivery_store.deliveries_of(conn, KEY.tenant, KEY.session_key)
        return delivery, delivery_store.attempts_of(conn, KEY)


def test_an_attempt_sends_every_chunk_and_settles_the_session(
    engine: Engine, clock: FakeClock
) -> None:
    provider = Scripted()
    users = encoded(make_users(5))
    state = run(Attempt(terms(engine, clock), claim(engine, clock, 5), provider, "test", users))
    assert state is DeliveryState.SUCCEEDED
    assert provider.chunks == [1, 2, 3]
    delivery, (attempt,) = recorded(engine)
    assert (delivery.state, delivery.users_sent, delivery.lease_owner) == ("succeeded", 5, None)
    assert (attempt.outcome, attempt.http_status) == (AttemptOutcome.SUCCEEDED, 200)
    with db.read_transaction(engine) as conn:
        session = store.get_session(conn, KEY.tenant, KEY.session_key)
    assert session is not None and session.state is SessionState.DELIVERED


def test_a_chunk_over_its_timeout_is_retried_later(engine: Engine, clock: FakeClock) -> None:
    provider = Scripted(hang=True)
    attempt = Attempt(
        terms(engine, clock, chunk_timeout=0.05),
        claim(engine, clock, 3),
        provider,
        "test",
        encoded(make_users(3)),
    )
    assert run(attempt) is DeliveryState.PENDING
    assert provider.cancelled
    delivery, (first,) = recorded(engine)
    assert delivery.last_error == "chunk not done within 0.05 s"
    assert delivery.next_attempt_at >= clock() + dt.timedelta(seconds=30)  # backoff
    assert (first.outcome, first.error) == (AttemptOutcome.RETRY, "chunk not done within 0.05 s")


def test_an_abort_stops_the_attempt_before_its_next_chunk(engine: Engine, clock: FakeClock) -> None:
    def abort(chunk: Chunk) -> None:
        with db.write_transaction(engine) as conn:
            store.update_session(conn, KEY.tenant, KEY.session_key, state=SessionState.ABORTED)

    provider = Scripted(during=abort)
    users = encoded(make_users(6))
    assert run(Attempt(terms(engine, clock), claim(engine, clock, 6), provider, "test", users)) is (
        DeliveryState.FAILED
    )
    assert provider.chunks == [1]
    delivery, (attempt,) = recorded(engine)
    assert (delivery.state, delivery.users_sent, delivery.last_error) == (
        "failed",
        2,
        "session aborted",
    )
    assert attempt.outcome is AttemptOutcome.FAILED
    with db.read_transaction(engine) as conn:
        session = store.get_session(conn, KEY.tenant, KEY.session_key)
    assert session is not None and session.state is SessionState.ABORTED  # not settled


def test_a_lease_lost_mid_call_abandons_the_attempt_to_the_new_owner(
    engine: Engine, clock: FakeClock
) -> None:
    def taken_over(chunk: Chunk) -> None:
        now = clock()
        with db.write_transaction(engine) as conn:  # w1 stalled; w2 claimed the lapsed lease
            delivery_store.start_attempt(conn, KEY, 2, worker="w2", now=now, lease_until=now)
        clock.advance(seconds=LEASE.total_seconds() / 3)  # w1's renewal is due

    provider = Scripted(during=taken_over, hang=True)
    users = encoded(make_users(4))
    assert run(Attempt(terms(engine, clock), claim(engine, clock, 4), provider, "test", users)) is (
        None
    )
    assert provider.cancelled  # the call was abandoned, not waited for
    delivery, (first, second) = recorded(engine)
    assert (delivery.state, delivery.lease_owner, delivery.attempts) == ("running", "w2", 2)
    assert first.finished_at is None and second.finished_at is None  # w1 recorded nothing

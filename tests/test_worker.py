"""The worker: scheduling, assembly and the deliveries it runs, over the real app with its
in-process worker (file and webhook destinations, several at once, sync mode, retention),
and driven by hand with the recording provider (claims, takeover, the doorbell), on SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from audience_server import db, delivery_store, store
from audience_server.app import create_app
from audience_server.delivery_store import DeliveryKey
from audience_server.destinations import DestinationConfig
from audience_server.models import batches
from audience_server.providers.recording import RecordingProvider
from audience_server.runtime import make_worker, sweep_once
from audience_server.settings import Settings
from audience_server.states import AttemptOutcome, DeliveryState, SessionState
from audience_server.worker import Destinations, Doorbell, Worker
from tests.conftest import FakeClock, make_users
from tests.emulators.webhook import WebhookEmulator, verify_signature
from tests.helpers import HOOK_SECRET, NAME, destinations, errors, form, send, serve, status, upload


def test_example_is_delivered_to_the_file_exactly(
    fast: Settings, engine: Engine, tmp_path: Path
) -> None:
    users = make_users(25_000)
    with serve(fast, engine, destinations(("files", "file", {"dir": str(tmp_path)}))) as client:
        response = upload(client, "1708531200", users, 10_000, "?sync=true")
        assert (response.status_code, response.content) == (200, b'{"success": true}')
        body = status(client, "1708531200")
    assert body["state"] == "delivered"
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "files",
        "kind": "file",
        "segmentName": "blotout_High_Value_Customers_Q1",
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 25_000,
        "invalidUsers": 0,
        "lastError": None,
    }
    lines = (tmp_path / "1708531200.ndjson").read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == users
    assert not list(tmp_path.glob(".*"))  # no partial file left behind


def test_exact_duplicates_are_dropped_key_order_ignored(
    fast: Settings, engine: Engine, tmp_path: Path
) -> None:
    users = make_users(30)
    reordered = dict(reversed(list(users[3].items())))
    sent = [*users[:20], users[5], reordered, *users[20:]]  # 32 sent, 2 exact repeats
    near = dict(users[7], email="other@example.com")
    sent.append(near)  # not a duplicate: one field differs
    with serve(fast, engine, destinations(("files", "file", {"dir": str(tmp_path)}))) as client:
        assert upload(client, "dups", sent, 7, "?sync=1").status_code == 200
        body = status(client, "dups")
    assert body["receivedUsers"] == 33
    assert body["deliveries"][0]["usersSent"] == 31
    lines = [json.loads(line) for line in (tmp_path / "dups.ndjson").read_bytes().splitlines()]
    assert lines == [*users[:20], *users[20:], near]


def test_webhook_receiver_verifies_and_reassembles(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    users = make_users(2_500)
    where = destinations(
        ("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET, "chunk_size": 1000})
    )
    with serve(fast, engine, where) as client:
        response = upload(client, "wh", users, 1_000, "?sync=true&disablePrefix=true")
        assert response.status_code == 200, response.text
        body = status(client, "wh")
    assert hook.segment("wh") == users
    chunks = hook.requests
    assert [(c.index, c.last) for c in chunks] == [(1, False), (2, False), (3, True)]
    first = chunks[0]
    assert first.body["segmentName"] == NAME and first.body["name"] == NAME
    assert first.body["type"] == "custom" and first.body["sessionId"] == "wh"
    assert verify_signature(
        HOOK_SECRET.encode(), first.headers["x-audience-signature"], first.raw, first.arrived_at
    )
    assert not verify_signature(
        b"wrong", first.headers["x-audience-signature"], first.raw, first.arrived_at
    )
    assert body["deliveries"][0]["segmentName"] == NAME
    assert hook.max_in_flight("wh") == 1


def test_two_destinations_and_partial_failure(
    fast: Settings, engine: Engine, hook: WebhookEmulator, tmp_path: Path
) -> None:
    users = make_users(10)
    hook.fail(403, "forbidden", times=5)
    where = destinations(
        ("files", "file", {"dir": str(tmp_path)}),
        ("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}),
        ("crm-eu", "webhook", {"url": hook.url, "secret": HOOK_SECRET}),
    )
    with serve(fast, engine, where) as client:
        response = upload(client, "mix", users, 5, "?sync=true")
        body = status(client, "mix")
    assert response.status_code == 400
    assert errors(response) == ["crm: HTTP 403: forbidden", "crm-eu: HTTP 403: forbidden"]
    assert body["state"] == "partially_delivered"
    assert [d["state"] for d in body["deliveries"]] == ["failed", "failed", "succeeded"]
    assert len((tmp_path / "mix.ndjson").read_bytes().splitlines()) == 10


def test_sync_with_no_destination_answers_at_once(fast: Settings, engine: Engine) -> None:
    with serve(fast, engine, {}) as client:
        assert upload(client, "none", make_users(2), 1, "?sync=true").status_code == 200


def test_sync_timeout_is_504_and_delivery_goes_on(
    database_url: str, engine: Engine, hook: WebhookEmulator
) -> None:
    settings = Settings(database_url=database_url, sync_timeout=dt.timedelta(milliseconds=300))
    hook.delay(30)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": HOOK_SECRET}))
    with serve(settings, engine, where) as client:
        response = upload(client, "wait", make_users(2), 1, "?sync=true")
        assert response.status_code == 504
        assert errors(response) == [
            "Delivery of session wait is still running after 0.3 s; it goes on. "
            "Follow it at GET /audience/sessions/wait."
        ]
        hook.release()
        hook.wait_for_segment("wait")


def test_retention_purges_users_and_resend_is_still_recognised(
    fast: Settings, engine: Engine, tmp_path: Path
) -> None:
    users = make_users(6)
    with serve(fast, engine, destinations(("files", "file", {"dir": str(tmp_path)}))) as client:
        assert upload(client, "old", users, 3, "?sync=true").status_code == 200
        now = dt.datetime.now(dt.UTC)
        assert sweep_once(engine, now, dt.timedelta(days=7)) == (0, 0)
        assert sweep_once(engine, now + dt.timedelta(days=7, seconds=1)) == (0, 1)
        with engine.connect() as conn:
            assert conn.execute(select(batches.c.users)).scalars().all() == [None, None]
        # the same batch, written differently, is still known after the purge
        fields = form("old", 2, 2, 6, users[3:], name=NAME)
        fields["users"] = json.dumps([dict(reversed(list(u.items()))) for u in users[3:]])
        assert send(client, fields).status_code == 200
        fields["users"] = json.dumps(make_users(3, 100))
        assert send(client, fields).status_code == 409
        response = client.post("/audience/sessions/old/retry")
        assert response.status_code == 409


def test_segment_prefix_is_configurable(database_url: str, engine: Engine, tmp_path: Path) -> None:
    settings = Settings(database_url=database_url, segment_prefix="acme-")
    with serve(settings, engine, destinations(("f", "file", {"dir": str(tmp_path)}))) as client:
        fields = form("p", 1, 1, 1, make_users(1), name="  Lapsed \t buyers  2026 ")
        assert send(client, fields, "?sync=true").status_code == 200
        assert status(client, "p")["deliveries"][0]["segmentName"] == "acme-Lapsed_buyers_2026"


# --- the worker driven by hand ---------------------------------------------------------


def test_a_doorbell_rung_from_another_thread_wakes_its_waiter_at_once() -> None:
    bell = Doorbell()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ringer = threading.Timer(0.05, bell.ring)
        ringer.start()
        try:
            await bell.wait(30)
        finally:
            ringer.cancel()
        return loop.time() - started

    assert asyncio.run(main()) < 10  # woken by the ring, not by the 30 s timeout


def recording(provider: RecordingProvider) -> Destinations:
    return {"rec": (DestinationConfig("rec", "recording", {}, line=1), provider)}


@pytest.fixture
def idle_app(fast: Settings, engine: Engine, clock: FakeClock) -> Iterator[TestClient]:
    """The app without its worker: the test runs one by hand."""
    app = create_app(fast, engine=engine, clock=clock, sweeper=False, destinations={}, worker=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def provider() -> RecordingProvider:
    return RecordingProvider(chunk_size=2)


@pytest.fixture
def worker(
    fast: Settings, engine: Engine, clock: FakeClock, provider: RecordingProvider, tmp_path: Path
) -> Iterator[Worker]:
    """A worker on the test's clock, delivering to ``provider``; the test runs its steps."""
    settings = dataclasses.replace(fast, scratch_dir=tmp_path / "scratch")
    worker = make_worker(settings, engine, recording(provider), clock)
    yield worker
    asyncio.run(worker.close())


def complete(client: TestClient, key: str, users: list[dict[str, object]]) -> None:
    assert send(client, form(key, 1, 1, len(users), users)).status_code == 200
    assert status(client, key)["state"] == SessionState.COMPLETE


def test_drain_assembles_then_delivers_each_session_once(
    engine: Engine, idle_app: TestClient, provider: RecordingProvider, worker: Worker
) -> None:
    users = make_users(5)
    complete(idle_app, "one", [*users, users[2]])
    complete(idle_app, "two", users)
    asyncio.run(worker.drain())
    assert provider.delivered("one") == users and provider.delivered("two") == users
    assert len(provider.attempts("one")) == len(provider.attempts("two")) == 1
    assert status(idle_app, "one")["state"] == SessionState.DELIVERED
    asyncio.run(worker.drain())  # nothing left to do
    assert len(provider.sent) == 6
    with db.read_transaction(engine) as conn:
        kinds = [event.kind for event in store.session_events(conn, "default", "one")]
    assert kinds == ["created", "complete", "assembled", "delivered"]


def test_a_delivery_of_an_aborted_session_fails_when_claimed(
    idle_app: TestClient, provider: RecordingProvider, worker: Worker
) -> None:
    complete(idle_app, "gone", make_users(3))
    assert asyncio.run(worker.step())  # assembled: its delivery is pending
    assert idle_app.delete("/audience/sessions/gone").json()["state"] == "aborted"
    assert not asyncio.run(worker.step())  # claimed and failed at once: no attempt is made
    (delivery,) = status(idle_app, "gone")["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "failed",
        0,
        "session aborted",
    )
    assert provider.sent == []


def test_a_lapsed_lease_is_taken_over_and_its_attempt_closed_as_interrupted(
    fast: Settings,
    engine: Engine,
    clock: FakeClock,
    idle_app: TestClient,
    provider: RecordingProvider,
    worker: Worker,
) -> None:
    users = make_users(4)
    complete(idle_app, "lapsed", users)
    assert asyncio.run(worker.step())  # assembled
    key = DeliveryKey("default", "lapsed", "rec")
    with db.write_transaction(engine) as conn:  # a worker that died right after its claim
        delivery_store.start_attempt(
            conn, key, 1, worker="dead", now=clock(), lease_until=clock() + fast.lease
        )
    assert not asyncio.run(worker.step())  # its lease still holds: nothing to do
    clock.advance(seconds=fast.lease.total_seconds() + 1)
    assert asyncio.run(worker.step())
    with db.read_transaction(engine) as conn:
        first, second = delivery_store.attempts_of(conn, key)
        (delivery,) = delivery_store.deliveries_of(conn, "default", "lapsed")
    assert (first.worker, first.outcome, first.error) == (
        "dead",
        AttemptOutcome.INTERRUPTED,
        "worker lost its lease",
    )
    assert (second.worker, second.outcome) == (worker.id, AttemptOutcome.SUCCEEDED)
    assert (delivery.state, delivery.attempts, delivery.lease_owner) == (
        DeliveryState.SUCCEEDED,
        2,
        None,
    )
    assert provider.delivered("lapsed") == users

"""Delivery over the real app with its in-process worker, on SQLite and PostgreSQL:
the file and webhook providers, retries, sync mode, retry endpoint, abort and retention."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from audience_server.app import Destinations, create_app
from audience_server.destinations import DestinationConfig
from audience_server.models import batches, deliveries, delivery_attempts
from audience_server.providers import provider_class
from audience_server.runtime import sweep_once
from audience_server.settings import Settings
from tests.conftest import FakeClock, make_users
from tests.emulators.webhook import WebhookEmulator, verify_signature
from tests.helpers import errors, eventually, form, send

SECRET = "whsec-test"
NAME = "High Value Customers Q1"


def destinations(*configs: tuple[str, str, dict[str, Any]]) -> Destinations:
    built = {}
    for index, (destination_id, kind, options) in enumerate(configs):
        config = DestinationConfig(destination_id, kind, options, line=index + 1)
        built[destination_id] = (config, provider_class(kind).from_config(config))
    return built


@pytest.fixture
def hook() -> Iterator[WebhookEmulator]:
    with WebhookEmulator(SECRET) as emulator:
        yield emulator


@pytest.fixture
def fast(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        retry_base=dt.timedelta(milliseconds=20),
        retry_cap=dt.timedelta(milliseconds=100),
        poll_interval=dt.timedelta(milliseconds=50),
        delivery_max_attempts=4,
    )


def serve(settings: Settings, engine: Engine, where: Destinations) -> TestClient:
    app = create_app(settings, engine=engine, sweeper=False, destinations=where, worker=True)
    return TestClient(app, raise_server_exceptions=False)


def upload(
    client: TestClient, key: str, users: list[dict[str, Any]], batches_of: int, query: str = ""
) -> Any:
    """Send ``users`` in batches, the last one alone with ``query``; its response."""
    parts = [users[i : i + batches_of] for i in range(0, len(users), batches_of)]
    order = [*range(2, len(parts) + 1), 1]  # out of order; sequence 1 completes
    response = None
    for sequence in order:
        fields = form(key, sequence, len(parts), len(users), parts[sequence - 1], name=NAME)
        response = send(client, fields, query if sequence == 1 else "")
        if sequence != 1:
            assert response.status_code == 200, response.text
    return response


def status(client: TestClient, key: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/audience/sessions/{key}").json()
    return body


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
        ("crm", "webhook", {"url": hook.url, "secret": SECRET, "chunk_size": 1000})
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
        SECRET.encode(), first.headers["x-audience-signature"], first.raw, first.arrived_at
    )
    assert not verify_signature(
        b"wrong", first.headers["x-audience-signature"], first.raw, first.arrived_at
    )
    assert body["deliveries"][0]["segmentName"] == NAME
    assert hook.max_in_flight("wh") == 1


def test_transient_failures_are_retried_to_one_whole_segment(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    users = make_users(50)
    hook.respond_with(503, times=2)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
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
    hook.respond_with(429, retry_after="1")
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
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
    hook.respond_with(400, body='{"error": "unknown list"}')
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
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
    hook.respond_with(500, times=10)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
    with serve(fast, engine, where) as client:
        response = upload(client, "down", make_users(3), 3, "?sync=true")
        assert response.status_code == 400
        assert errors(response)[0].startswith("crm: HTTP 500")
        assert status(client, "down")["deliveries"][0]["attempts"] == 4
    assert len(hook.rejected) == 4


def test_two_destinations_and_partial_failure(
    fast: Settings, engine: Engine, hook: WebhookEmulator, tmp_path: Path
) -> None:
    users = make_users(10)
    hook.respond_with(403, times=5, body="forbidden")
    where = destinations(
        ("files", "file", {"dir": str(tmp_path)}),
        ("crm", "webhook", {"url": hook.url, "secret": SECRET}),
        ("crm-eu", "webhook", {"url": hook.url, "secret": SECRET}),
    )
    with serve(fast, engine, where) as client:
        response = upload(client, "mix", users, 5, "?sync=true")
        body = status(client, "mix")
    assert response.status_code == 400
    assert errors(response) == ["crm: HTTP 403: forbidden", "crm-eu: HTTP 403: forbidden"]
    assert body["state"] == "partially_delivered"
    assert [d["state"] for d in body["deliveries"]] == ["failed", "failed", "succeeded"]
    assert len((tmp_path / "mix.ndjson").read_bytes().splitlines()) == 10


def test_async_completion_answers_before_delivery_and_abort_stops_it(
    fast: Settings, engine: Engine, hook: WebhookEmulator
) -> None:
    hook.delay(30)  # the receiver sits on the first chunk
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET, "chunk_size": 1}))
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


def test_sync_with_no_destination_answers_at_once(fast: Settings, engine: Engine) -> None:
    with serve(fast, engine, {}) as client:
        assert upload(client, "none", make_users(2), 1, "?sync=true").status_code == 200


def test_sync_timeout_is_504_and_delivery_goes_on(
    database_url: str, engine: Engine, hook: WebhookEmulator
) -> None:
    settings = Settings(database_url=database_url, sync_timeout=dt.timedelta(milliseconds=300))
    hook.delay(30)
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
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
    where = destinations(("crm", "webhook", {"url": hook.url, "secret": SECRET}))
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

"""``GET /metrics``: a scripted run through the real app (a conflict, a failed delivery) read
back with prometheus-client's parser, on SQLite and PostgreSQL; the API-key rule; and a real
``serve`` whose worker child's counters reach the server's scrape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from starlette.testclient import TestClient

from audience_server.app import create_app
from audience_server.settings import Settings
from tests.conftest import FakeClock, make_users
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET, destinations, eventually, form, send
from tests.servers import ServerProcess

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FAMILIES = {
    "audience_batches",
    "audience_users_received",
    "audience_conflicts",
    "audience_sessions",
    "audience_oldest_receiving_session_age_seconds",
    "audience_delivery_attempts",
    "audience_delivery_users_sent",
    "audience_request_duration_seconds",
}


def parse(text: str) -> tuple[set[str], Samples]:
    """The families' names and every sample, keyed by (sample name, labels)."""
    families = list(text_string_to_metric_families(text))
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }
    return {family.name for family in families}, samples


def scrape(client: TestClient, **headers: str) -> tuple[set[str], Samples]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a counter grew: counters are the test process's, shared by every test."""
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def failing_hook() -> Iterator[WebhookEmulator]:
    with WebhookEmulator(HOOK_SECRET) as emulator:
        emulator.fail(400, "unknown list")  # once, permanently: the delivery fails at once
        yield emulator


def test_a_scripted_run_shows_in_every_family(
    fast: Settings,
    engine: Engine,
    clock: FakeClock,
    tmp_path: Path,
    failing_hook: WebhookEmulator,
) -> None:
    where = destinations(
        ("files", "file", {"dir": str(tmp_path)}),
        ("crm", "webhook", {"url": failing_hook.url, "secret": HOOK_SECRET}),
    )
    app = create_app(fast, engine=engine, clock=clock, sweeper=False, destinations=where)
    users = make_users(30)
    parts = [users[0:10], users[10:20], users[20:30]]
    with TestClient(app, raise_server_exceptions=False) as client:
        _, before = scrape(client)
        answers = [
            send(client, form("m1", 2, 3, 30, parts[1])),  # stored
            send(client, form("m1", 2, 3, 30, parts[1])),  # duplicate
            send(client, form("m1", 2, 3, 30, parts[0])),  # conflict: other users
            send(client, form("m1", 3, 3, 30, [])),  # refused: no users
            send(client, form("m1", 3, 3, 30, parts[2])),  # stored
            send(client, form("m2", 1, 2, 9, make_users(5))),  # stored; m2 stays receiving
            send(client, form("m1", 1, 3, 30, parts[0]), "?sync=true"),  # completed
        ]
        assert [a.status_code for a in answers] == [200, 200, 409, 400, 200, 200, 400]
        assert "crm: HTTP 400" in answers[-1].text  # sync: the failed delivery is reported
        assert client.get("/audience/sessions/m1").json()["state"] == "partially_delivered"
        clock.advance(seconds=90)
        names, after = scrape(client)

    assert names >= FAMILIES
    batches = {
        result: grew(before, after, "audience_batches_total", result=result)
        for result in ("stored", "duplicate", "completed", "rejected_4xx", "rejected_5xx")
    }
    assert batches == {
        "stored": 3,
        "duplicate": 1,
        "completed": 1,
        "rejected_4xx": 2,
        "rejected_5xx": 0,
    }
    assert grew(before, after, "audience_users_received_total") == 10 + 10 + 5 + 10
    assert grew(before, after, "audience_conflicts_total") == 1
    # Read from this test's fresh database: absolute values.
    assert value(after, "audience_sessions", state="partially_delivered") == 1
    assert value(after, "audience_sessions", state="receiving") == 1
    assert sum(v for (n, _), v in after.items() if n == "audience_sessions") == 2
    assert value(after, "audience_oldest_receiving_session_age_seconds") == 90
    attempts = "audience_delivery_attempts_total"
    assert grew(before, after, attempts, destination="files", outcome="succeeded") == 1
    assert grew(before, after, attempts, destination="crm", outcome="failed") == 1
    assert grew(before, after, attempts, destination="crm", outcome="succeeded") == 0
    sent = "audience_delivery_users_sent_total"
    assert grew(before, after, sent, destination="files") == 30
    assert grew(before, after, sent, destination="crm") == 0
    duration = "audience_request_duration_seconds_count"
    assert grew(before, after, duration, route="/audience") == 7
    assert grew(before, after, duration, route="/audience/sessions/{session_id}") == 1
    routes = {dict(labels).get("route") for (n, labels), _ in after.items() if n == duration}
    assert not any("m1" in (route or "") for route in routes)  # templates, never raw paths


def test_an_expired_receiving_session_counts_as_expired(
    settings: Settings, engine: Engine, clock: FakeClock
) -> None:
    app = create_app(
        settings, engine=engine, clock=clock, sweeper=False, destinations={}, worker=False
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        assert send(client, form("old", 1, 2, 2, make_users(1))).status_code == 200
        clock.advance(seconds=settings.session_ttl.total_seconds() + 1)  # not yet swept
        _, samples = scrape(client)
    assert value(samples, "audience_sessions", state="expired") == 1
    assert value(samples, "audience_sessions", state="receiving") == 0
    assert value(samples, "audience_oldest_receiving_session_age_seconds") == 0


@pytest.mark.parametrize("public", [False, True])
def test_metrics_follow_the_api_key_rule(database_url: str, engine: Engine, public: bool) -> None:
    settings = Settings(database_url=database_url, api_keys={"k-1": "acme"}, metrics_public=public)
    app = create_app(settings, engine=engine, sweeper=False, destinations={}, worker=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        anonymous = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert anonymous.status_code == wrong.status_code == (200 if public else 401)
        names, _ = scrape(client, Authorization="Bearer k-1")
    assert "audience_sessions" in names


def test_metrics_public_is_a_setting() -> None:
    assert Settings.from_env({"AUDIENCE_METRICS_PUBLIC": "yes"}).metrics_public is True
    assert Settings.from_env({}).metrics_public is False


@pytest.mark.slow
def test_serve_sums_its_worker_childs_counters(tmp_path: Path, sqlite_template: Path) -> None:
    """The delivery runs in serve's worker child; serve's /metrics shows it. The shared
    folder is gone once serve stops."""
    database = tmp_path / "audience.db"
    database.write_bytes(sqlite_template.read_bytes())
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    config = tmp_path / "destinations.toml"
    config.write_text(f'[[destinations]]\nid = "archive"\nkind = "file"\ndir = "{out}"\n')
    server = ServerProcess(
        f"sqlite:///{database}",
        tmp_path / "server.log",
        AUDIENCE_DESTINATIONS=str(config),
        AUDIENCE_WORKER="true",
        AUDIENCE_SCRATCH_DIR=str(scratch),
    ).start()
    try:
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            files = {k: (None, v) for k, v in form("p1", 1, 1, 4, make_users(4)).items()}
            assert http.post("/audience", files=files).status_code == 200

            def read() -> Samples:
                return parse(http.get("/metrics").text)[1]

            attempts = ("audience_delivery_attempts_total", "archive", "succeeded")
            samples = eventually(
                read,
                lambda s: value(s, attempts[0], destination=attempts[1], outcome=attempts[2]) == 1,
            )
        assert value(samples, "audience_delivery_users_sent_total", destination="archive") == 4
        assert value(samples, "audience_batches_total", result="completed") == 1  # serve's own
        assert value(samples, "audience_sessions", state="delivered") == 1
        assert (out / "p1.ndjson").exists()
    finally:
        server.stop()
    assert not scratch.exists() or not any(scratch.glob("worker-*"))

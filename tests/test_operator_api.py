"""Status, listing, abort, expiry sweeper, health and logs, on both databases."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from starlette.testclient import TestClient

from audience_server import db
from audience_server.app import create_app
from audience_server.models import batches
from audience_server.runtime import sweep_once
from audience_server.settings import Settings
from tests.conftest import FakeClock, make_users
from tests.helpers import errors, form, send


def upload(
    client: TestClient, key: str, sequences: list[int], total: int, name: str = "Seg"
) -> None:
    for sequence in sequences:
        response = send(
            client, form(key, sequence, total, total, make_users(1, sequence), name=name)
        )
        assert response.status_code == 200, response.text


def stored_users(engine: Engine, key: str) -> list[bytes | None]:
    with engine.connect() as conn:
        stmt = select(batches.c.users).where(batches.c.session_key == key).order_by("sequence")
        return list(conn.execute(stmt).scalars())


def test_unknown_session_is_404_json(client: TestClient) -> None:
    response = client.get("/audience/sessions/nope")
    assert response.status_code == 404
    assert errors(response) == ["session nope does not exist."]
    assert client.delete("/audience/sessions/nope").status_code == 404


def test_status_shows_progress_and_missing_sequences(client: TestClient) -> None:
    upload(client, "p", [4, 2], 5)
    body = client.get("/audience/sessions/p").json()
    assert body["receivedBatches"] == 2 and body["receivedUsers"] == 2
    assert body["missingSequences"] == [1, 3, 5]
    assert body["sequenceBase"] is None
    assert body["createdAt"] == "2026-11-28T12:00:00Z"
    assert list(body) == [
        "sessionId", "name", "type", "state", "reason", "totalBatches", "totalUsers",
        "receivedBatches", "receivedUsers", "assembledUsers", "uniqueUsers",
        "missingSequences", "sequenceBase", "createdAt", "updatedAt", "expiresAt",
        "deliveries",
    ]  # fmt: skip


def test_listing_is_newest_first_with_cursor_pages(client: TestClient, clock: FakeClock) -> None:
    for i in range(7):
        clock.advance(seconds=1)
        upload(client, f"s{i}", [1], 2, name=f"Segment {i}")
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/audience/sessions{query}").json()
        seen += [s["sessionId"] for s in page["sessions"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [f"s{i}" for i in reversed(range(7))]


def test_listing_filters_by_state_and_name(client: TestClient, clock: FakeClock) -> None:
    upload(client, "done", [1, 2], 2, name="High Value")
    upload(client, "open", [1], 2, name="Low Value")
    upload(client, "old", [1], 2, name="High Old")
    clock.advance(hours=23)
    upload(client, "open", [2], 2, name="Low Value")  # completes "open" too
    upload(client, "fresh", [1], 2, name="high fresh")
    clock.advance(hours=2)  # "old" is now past its expiry, "fresh" is not

    def names(query: str) -> list[str]:
        response = client.get(f"/audience/sessions?{query}")
        assert response.status_code == 200, response.text
        return sorted(s["sessionId"] for s in response.json()["sessions"])

    assert names("state=complete") == ["done", "open"]
    assert names("state=expired") == ["old"]
    assert names("state=receiving") == ["fresh"]
    assert names("name=high") == ["done", "fresh", "old"]
    assert names("name=HIGH&state=receiving") == ["fresh"]
    assert names("name=%25") == []  # a literal %, not a wildcard


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("state=bogus", "state must be one of"),
        ("limit=0", "limit must be an integer from 1 to 500."),
        ("limit=abc", "limit must be an integer from 1 to 500."),
        ("limit=%C2%B2", "limit must be an integer from 1 to 500."),  # "²": a digit to isdigit()
        ("cursor=!!", "cursor is not one this server issued."),
    ],
)
def test_listing_rejects_bad_parameters(client: TestClient, query: str, message: str) -> None:
    response = client.get(f"/audience/sessions?{query}")
    assert response.status_code == 400
    assert errors(response)[0].startswith(message)


def test_abort_purges_users_and_keeps_history(client: TestClient, engine: Engine) -> None:
    upload(client, "a", [1, 2], 3)
    assert all(stored_users(engine, "a"))
    body = client.delete("/audience/sessions/a").json()
    assert (body["state"], body["reason"]) == ("aborted", "aborted by an operator")
    assert body["receivedUsers"] == 2 and body["missingSequences"] == [3]
    assert stored_users(engine, "a") == [None, None]
    assert client.delete("/audience/sessions/a").json()["state"] == "aborted"


def test_abort_of_complete_session_also_aborts(client: TestClient, engine: Engine) -> None:
    upload(client, "c", [1, 2], 2)
    assert client.delete("/audience/sessions/c").json()["state"] == "aborted"
    assert stored_users(engine, "c") == [None, None]
    # an identical re-send after the purge still answers 410, not a duplicate 200
    assert send(client, form("c", 1, 2, 2, make_users(1, 1), name="Seg")).status_code == 410


def test_sweeper_expires_overdue_sessions_and_purges_users(
    client: TestClient, engine: Engine, clock: FakeClock
) -> None:
    upload(client, "idle", [1], 2)
    upload(client, "busy", [1], 3)
    upload(client, "whole", [1, 2], 2)
    clock.advance(hours=12)
    upload(client, "busy", [2], 3)
    clock.advance(hours=12)
    assert sweep_once(engine, clock()) == (1, 0)  # busy has 12 hours left; whole is complete
    assert stored_users(engine, "idle") == [None]
    assert all(stored_users(engine, "busy")) and all(stored_users(engine, "whole"))
    body = client.get("/audience/sessions/idle").json()
    assert (body["state"], body["reason"]) == ("expired", "no batch arrived within the session TTL")
    assert sweep_once(engine, clock()) == (0, 0)


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_reports_a_schema_behind_head(client: TestClient, engine: Engine) -> None:
    head = db.head_revision()
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    try:
        response = client.get("/readyz")
    finally:  # the PostgreSQL database is shared by the whole run
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    assert response.status_code == 503
    assert response.json()["reason"] == "schema is not at the newest revision"


def test_readyz_reports_an_unreachable_database(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    settings = Settings(database_url=f"sqlite:///{folder}/audience.db")
    engine = db.make_engine(settings.database_url)
    # No worker: its polls could open a connection between the dispose and the request,
    # and an open connection keeps reading the removed file.
    app = create_app(settings, engine=engine, sweeper=False, destinations={}, worker=False)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        # the database goes away under the running server: no file can be opened there
        engine.dispose()
        shutil.rmtree(folder)
        response = client.get("/readyz")
    engine.dispose()
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "database unreachable"}


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    response = client.get("/nope")
    assert (response.status_code, errors(response)) == (404, ["No such endpoint."])
    response = client.get("/audience")
    assert (response.status_code, errors(response)) == (
        405,
        ["Method not allowed for this endpoint."],
    )


def test_batch_log_line_has_telemetry_and_no_personal_data(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    users = [
        user | {"firstName": f"Zebulon{i}", "lastName": f"Quackenbush{i}"}
        for i, user in enumerate(make_users(3))
    ]  # names no log line could hold by chance
    with caplog.at_level(logging.INFO, logger="audience_server"):
        assert send(client, form("log", 2, 2, 6, users)).status_code == 200
        assert send(client, form("log", 2, 2, 6, make_users(3, 9))).status_code == 409
    lines = [r for r in caplog.records if r.getMessage() == "batch"]
    assert [(r.result, r.status) for r in lines] == [("stored", 200), ("rejected", 409)]  # type: ignore[attr-defined]
    first = lines[0].__dict__
    assert {k: first[k] for k in ("segment", "sessionId", "sequence", "users", "type")} == {
        "segment": "High Value Customers Q1", "sessionId": "log", "sequence": 2, "users": 3,
        "type": "custom",
    }  # fmt: skip
    text_logged = caplog.text + "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    for user in users:
        for field in ("email", "phone", "firstName", "lastName"):
            assert str(user[field]) not in text_logged, field
    assert "Zebulon" not in text_logged and "Quackenbush" not in text_logged


def test_random_junk_never_gives_500_nor_touches_a_session(
    client: TestClient, engine: Engine
) -> None:
    upload(client, "safe", [1], 2)
    rng = random.Random(20261128)
    valid = form("safe", 2, 2, 2, make_users(1, 5), name="Seg")
    statuses = set()
    for _ in range(300):
        fields: dict[str, Any] = dict(valid)
        victim = rng.choice([*fields, "extra"])
        choice = rng.randrange(6)
        if choice == 0:
            fields.pop(victim, None)
        elif choice == 1:
            fields[victim] = rng.choice(["", "null", "[]", "{}", "1e309", "\x00", "[" * 5000, "é"])
        elif choice == 2:
            raw = fields.get(victim, "")
            cut = rng.randrange(len(raw) + 1)
            fields[victim] = raw[:cut]
        elif choice == 3:
            fields[victim] = json.dumps(
                rng.choice([None, True, -1, 2**70, 1.5, "x", [None], {"a": []}])
            )
        elif choice == 4:
            batch = json.loads(valid["batch"])
            batch[rng.choice(list(batch))] = rng.choice([None, -5, 10**20, "2", [], {}, 0])
            fields["batch"] = json.dumps(batch)
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
            kind = rng.choice(["multipart/form-data; boundary=x", "text/csv", "application/json"])
            response = client.post("/audience", content=body, headers={"content-type": kind})
            statuses.add(response.status_code)
            assert response.status_code < 500, response.text
            continue
        response = send(client, fields)
        statuses.add(response.status_code)
        assert response.status_code < 500, response.text
    assert {400, 409} <= statuses
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(batches).where(batches.c.session_key == "safe")
        ).scalar_one()
    body = client.get("/audience/sessions/safe").json()
    # only the valid second batch (or a harmless variant of it) may have completed it
    assert body["receivedUsers"] == body["receivedBatches"] == count
    assert body["state"] in ("receiving", "complete")

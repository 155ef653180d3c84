"""What status shows of a session's progress (assembly's users read, the unique users,
each delivery's users sent), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine
from starlette.testclient import TestClient

from audience_server import db, store
from audience_server.auth import DEFAULT_TENANT
from audience_server.settings import Settings
from audience_server.states import SessionState
from tests.conftest import FakeClock, make_users
from tests.helpers import destinations, form, send, serve, status, upload


def complete(client: TestClient, key: str, users: int = 4) -> None:
    response = send(client, form(key, 1, 1, users, make_users(users)))
    assert response.status_code == 200, response.text


def listed(client: TestClient) -> list[str]:
    page = client.get("/audience/sessions").json()
    return [session["sessionId"] for session in page["sessions"]]


def test_assembly_progress_shows_without_moving_the_session_in_the_list(
    client: TestClient, engine: Engine, clock: FakeClock
) -> None:
    complete(client, "big")
    clock.advance(seconds=1)
    complete(client, "newer")
    before = status(client, "big")
    assert (before["state"], before["assembledUsers"], before["uniqueUsers"]) == (
        "complete",
        None,  # no worker has started on it
        None,
    )
    assert listed(client) == ["newer", "big"]

    clock.advance(seconds=5)
    with db.write_transaction(engine) as conn:
        store.record_assembly_progress(conn, DEFAULT_TENANT, "big", 3, clock())
    during = status(client, "big")
    assert (during["assembledUsers"], during["uniqueUsers"]) == (3, None)
    assert during["updatedAt"] == before["updatedAt"]  # progress is not a change of state
    assert listed(client) == ["newer", "big"]
    assert status(client, "newer")["assembledUsers"] is None  # only the session named

    with db.write_transaction(engine) as conn:  # as the worker ends an assembly
        store.record_assembly_progress(conn, DEFAULT_TENANT, "big", 4, clock())
        store.update_session(
            conn, DEFAULT_TENANT, "big", state=SessionState.DELIVERING, unique_users=3
        )
    after = status(client, "big")
    assert (after["state"], after["assembledUsers"], after["uniqueUsers"]) == ("delivering", 4, 3)
    with db.read_transaction(engine) as conn:
        row = store.get_session(conn, DEFAULT_TENANT, "big")
    assert row is not None and (row.assembled_users, row.unique_users) == (4, 3)


def test_the_list_shows_the_same_progress_fields(client: TestClient, engine: Engine) -> None:
    complete(client, "s")
    with db.write_transaction(engine) as conn:
        store.record_assembly_progress(conn, DEFAULT_TENANT, "s", 2, dt.datetime.now(dt.UTC))
    (session,) = client.get("/audience/sessions").json()["sessions"]
    assert (session["assembledUsers"], session["uniqueUsers"]) == (2, None)
    assert "missingSequences" not in session


def test_a_delivered_session_shows_its_unique_users_and_each_delivery_the_users_sent(
    fast: Settings, engine: Engine, tmp_path: Path
) -> None:
    users = make_users(40)
    sent = [*users, users[3], users[17]]  # 42 sent, 2 exact repeats
    where = destinations(("files", "file", {"dir": str(tmp_path)}))
    with serve(fast, engine, where) as client:
        assert upload(client, "dups", sent, 10, "?sync=true").status_code == 200
        body = status(client, "dups")
    assert (body["state"], body["receivedUsers"], body["uniqueUsers"]) == ("delivered", 42, 40)
    assert body["assembledUsers"] == 42  # every user read, repeats too
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["usersSent"]) == ("succeeded", 40)

"""POST /audience over the real app, on SQLite and PostgreSQL: EdgeTag bodies, every
400/409/410/413 case of SPEC §2, idempotency and completion."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from audience_server.app import create_app
from audience_server.models import batches, events
from audience_server.settings import Settings
from audience_server.store import unpack_users
from tests.conftest import FakeClock, make_users
from tests.helpers import errors, form, send

EDGE_JSON = "application/json"
EDGE_TEXT = "text/plain; charset=utf-8"


def status(client: TestClient, session_id: object) -> dict[str, Any]:
    response = client.get(f"/audience/sessions/{session_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def completion_events(engine: Engine, key: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(events.c.kind).where(events.c.session_key == key).order_by(events.c.id)
        )
        return list(rows.scalars())


# --- EdgeTag's four documented responses, byte for byte -------------------------------


def test_success_body_is_edgetags(client: TestClient) -> None:
    response = send(client, form(1, 1, 1, 1, make_users(1)))
    assert response.status_code == 200
    assert response.content == b'{"success": true}'
    assert response.headers["content-type"] == EDGE_JSON


@pytest.mark.parametrize(
    ("headers", "body", "details"),
    [
        (
            {"content-type": "application/json"},
            b'{"users": []}',
            "Content-Type is application/json",
        ),
        ({}, b"name=x", "the Content-Type header is missing"),
        ({"content-type": "text/plain"}, b"hello", "Content-Type is text/plain"),
        ({"content-type": "multipart/form-data"}, b"--x\r\n", "Missing boundary in multipart"),
    ],
)
def test_malformed_body_is_edgetags_text(
    client: TestClient, headers: dict[str, str], body: bytes, details: str
) -> None:
    response = client.post("/audience", content=body, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == EDGE_TEXT
    assert response.text.startswith("Malformed request body, must be form data (")
    assert details in response.text and response.text.endswith(")")


def test_broken_multipart_is_malformed(client: TestClient) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="users"\r\n\r\n[{}]\r\n--b\r\nGarbage'
    response = client.post(
        "/audience", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400
    assert response.text.startswith("Malformed request body, must be form data (")


def test_corrupted_payload_is_edgetags_json(client: TestClient) -> None:
    response = send(client, {"name": "x", "batch": "{not json", "users": "[{}]"})
    assert response.status_code == 400
    assert response.headers["content-type"] == EDGE_JSON
    body = response.content.decode()
    prefix = (
        '{"success": false, "errors": ["Payload is corrupted or missing. Please send JSON string. '
    )
    assert body.startswith(prefix) and body.endswith('"]}')
    assert "Field batch is not valid JSON" in body


def test_missing_users_is_corrupted_payload(client: TestClient) -> None:
    response = send(client, {"name": "x", "batch": json.dumps({"sessionId": 1})})
    assert response.status_code == 400
    assert response.content == (
        b'{"success": false, "errors": ["Payload is corrupted or missing. '
        b'Please send JSON string. Field users is missing."]}'
    )


def test_empty_users_is_edgetags_text(client: TestClient) -> None:
    response = send(client, form(1, 1, 1, 1, []))
    assert response.status_code == 400
    assert response.headers["content-type"] == EDGE_TEXT
    assert response.content == b"No users in the segment. Segment cannot be created."


# --- other ways in -----------------------------------------------------------------------


def test_urlencoded_form_is_accepted(client: TestClient) -> None:
    response = client.post("/audience", data=form("url", 1, 1, 2, make_users(2)))
    assert response.status_code == 200, response.text
    assert status(client, "url")["state"] == "complete"


def test_users_as_a_file_part_is_accepted(client: TestClient) -> None:
    fields = form("file", 1, 1, 3, make_users(3))
    users = fields.pop("users")
    files: dict[str, Any] = {k: (None, v) for k, v in fields.items()}
    files["users"] = ("users.json", users.encode(), "application/json")
    response = client.post("/audience", files=files)
    assert response.status_code == 200, response.text
    assert status(client, "file")["receivedUsers"] == 3


# --- 400 field errors ------------------------------------------------------------------


def test_field_errors_are_json_with_one_sentence_each(client: TestClient) -> None:
    users: list[Any] = [*make_users(17), {"email": 17}]
    response = send(client, form(1, 1, 1, 18, users, name=" ", type="other"))
    assert response.status_code == 400
    assert response.headers["content-type"] == EDGE_JSON
    assert errors(response) == [
        "name is required and must not be blank.",
        "type must be custom or primary.",
        "users[17].email must be a string.",
    ]


def test_sequence_outside_zero_to_total_is_400(client: TestClient) -> None:
    response = send(client, form(1, 4, 3, 30, make_users(1)))
    assert response.status_code == 400
    assert errors(response) == ["batch.sequence must be between 0 and totalBatches (3); got 4."]


# --- 413 -------------------------------------------------------------------------------


def test_body_over_limit_is_413(engine: Engine, clock: FakeClock, database_url: str) -> None:
    settings = Settings(database_url=database_url, max_body_bytes=10_000, max_batch_users=5)
    with TestClient(
        create_app(settings, engine=engine, clock=clock, sweeper=False, destinations={})
    ) as client:
        big = form(1, 1, 1, 200, make_users(200))
        response = send(client, big)
        assert response.status_code == 413
        assert errors(response) == ["The request body is over the limit of 10000 bytes."]

        def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            body = json.dumps(big).encode()
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        response = client.post(
            "/audience",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert response.status_code == 413

        response = send(client, form(1, 1, 1, 6, make_users(6)))
        assert response.status_code == 413
        assert errors(response) == ["users has 6 entries; the limit is 5 per batch."]
        # 413 answers before the corrupted batch field does (SPEC §2 order)
        response = send(client, {"batch": "nope", "users": json.dumps(make_users(6))})
        assert response.status_code == 413


# --- completion ------------------------------------------------------------------------


def test_example_upload_out_of_order_completes(client: TestClient, engine: Engine) -> None:
    users = make_users(25_000)
    parts = {1: users[:10_000], 2: users[10_000:20_000], 3: users[20_000:]}
    for sequence in (2, 3, 1):
        response = send(
            client,
            form(1708531200, sequence, 3, 25_000, parts[sequence], pullDate="2026-01-01"),
            "?disablePrefix=false&sync=false",
        )
        assert response.status_code == 200, response.text
        if sequence == 2:
            mid = status(client, 1708531200)
            assert mid["state"] == "receiving"
            assert mid["missingSequences"] == [1, 3]
            assert mid["sequenceBase"] is None
    body = status(client, "1708531200")
    assert body["sessionId"] == "1708531200"
    assert body["name"] == "High Value Customers Q1"
    assert body["state"] == "complete"
    assert body["reason"] is None
    assert (body["totalBatches"], body["receivedBatches"]) == (3, 3)
    assert (body["totalUsers"], body["receivedUsers"]) == (25_000, 25_000)
    assert (body["assembledUsers"], body["uniqueUsers"]) == (None, None)  # no worker here
    assert body["missingSequences"] == []
    assert body["sequenceBase"] == 1
    assert body["expiresAt"] is None
    assert body["deliveries"] == []
    assert completion_events(engine, "1708531200") == ["created", "complete"]
    with engine.connect() as conn:
        stored = conn.execute(select(batches.c.sequence, batches.c.users).order_by("sequence"))
        assert [(seq, json.loads(unpack_users(raw))) for seq, raw in stored] == list(parts.items())


def test_base_zero_session_completes(client: TestClient) -> None:
    for sequence in (1, 0, 2):
        assert (
            send(client, form("zero", sequence, 3, 3, make_users(1, sequence))).status_code == 200
        )
    body = status(client, "zero")
    assert (body["state"], body["sequenceBase"], body["missingSequences"]) == ("complete", 0, [])


def test_integer_and_string_session_ids_are_one_session(client: TestClient) -> None:
    assert send(client, form(42, 1, 2, 2, make_users(1))).status_code == 200
    assert send(client, form("42", 2, 2, 2, make_users(1, 1))).status_code == 200
    assert status(client, 42)["state"] == "complete"


def test_inconsistent_total_is_409_with_reason_and_nothing_queued(
    client: TestClient, engine: Engine
) -> None:
    assert send(client, form("short", 1, 2, 10, make_users(4))).status_code == 200
    response = send(client, form("short", 2, 2, 10, make_users(4, 4)))
    assert response.status_code == 409
    reason = "all 2 batches arrived with 8 users in total, but totalUsers is 10"
    assert errors(response) == [f"session short is inconsistent: {reason}."]
    body = status(client, "short")
    assert (body["state"], body["reason"], body["receivedUsers"]) == ("inconsistent", reason, 8)
    assert completion_events(engine, "short") == ["created", "inconsistent"]
    # the session stays refused, even for a re-send
    assert send(client, form("short", 2, 2, 10, make_users(4, 4))).status_code == 409


# --- idempotency -----------------------------------------------------------------------


def test_identical_resend_changes_nothing_before_and_after_completion(
    client: TestClient, clock: FakeClock
) -> None:
    first = form("idem", 1, 2, 4, make_users(2))
    assert send(client, first).status_code == 200
    before = status(client, "idem")
    clock.advance(minutes=5)
    assert send(client, first).status_code == 200
    assert status(client, "idem") == before
    assert send(client, form("idem", 2, 2, 4, make_users(2, 2))).status_code == 200
    done = status(client, "idem")
    assert done["state"] == "complete"
    assert send(client, first).status_code == 200
    assert status(client, "idem") == done


def test_resend_with_other_spacing_and_key_order_is_identical(client: TestClient) -> None:
    users = make_users(3)
    assert send(client, form("order", 1, 2, 6, users)).status_code == 200
    reordered = [dict(reversed(list(u.items()))) for u in users]
    fields = form("order", 1, 2, 6, users) | {"users": json.dumps(reordered, indent=2)}
    assert send(client, fields).status_code == 200
    assert status(client, "order")["receivedUsers"] == 3


# --- 409 conflicts ---------------------------------------------------------------------


def test_same_sequence_with_other_users_is_409(client: TestClient) -> None:
    assert send(client, form("c", 1, 2, 4, make_users(2))).status_code == 200
    response = send(client, form("c", 1, 2, 4, make_users(2, 100)))
    assert response.status_code == 409
    assert errors(response) == [
        "batch.sequence 1 of session c was already received with different users."
    ]
    assert status(client, "c")["receivedUsers"] == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"total_batches": 3}, "batch.totalBatches is 3 but session c was started with 2."),
        ({"total_users": 5}, "batch.totalUsers is 5 but session c was started with 4."),
        ({"name": "Other"}, "name differs from the name session c was started with."),
        ({"type": "primary"}, "type is primary but session c was started as custom."),
    ],
)
def test_mismatch_with_first_batch_is_409(
    client: TestClient, changes: dict[str, Any], message: str
) -> None:
    assert send(client, form("c", 1, 2, 4, make_users(2))).status_code == 200
    args: dict[str, Any] = {"total_batches": 2, "total_users": 4} | changes
    name = args.pop("name", "High Value Customers Q1")
    segment_type = args.pop("type", "custom")
    fields = form(
        "c",
        2,
        args["total_batches"],
        args["total_users"],
        make_users(2, 2),
        name=name,
        type=segment_type,
    )
    response = send(client, fields)
    assert response.status_code == 409
    assert errors(response) == [message]


def test_name_is_compared_after_trimming(client: TestClient) -> None:
    assert send(client, form("t", 1, 2, 2, make_users(1), name="Q1 ")).status_code == 200
    assert send(client, form("t", 2, 2, 2, make_users(1, 1), name="  Q1")).status_code == 200
    assert status(client, "t")["name"] == "Q1"


def test_user_overflow_is_409(client: TestClient) -> None:
    assert send(client, form("o", 1, 2, 5, make_users(3))).status_code == 200
    response = send(client, form("o", 2, 2, 5, make_users(3, 3)))
    assert response.status_code == 409
    assert errors(response) == [
        "this batch's 3 users would bring session o to 6 users, above totalUsers (5)."
    ]
    assert status(client, "o")["receivedBatches"] == 1


def test_first_batch_over_total_users_is_409_and_creates_nothing(client: TestClient) -> None:
    response = send(client, form("big", 1, 1, 2, make_users(3)))
    assert response.status_code == 409
    assert client.get("/audience/sessions/big").status_code == 404


def test_sequence_outside_settled_base_is_409(client: TestClient) -> None:
    assert send(client, form("b1", 3, 3, 9, make_users(3))).status_code == 200  # base 1
    response = send(client, form("b1", 0, 3, 9, make_users(3, 3)))
    assert response.status_code == 409
    assert errors(response) == [
        "batch.sequence 0 is outside session b1, which numbers its batches from 1 (1..3)."
    ]
    assert send(client, form("b0", 0, 3, 9, make_users(3))).status_code == 200  # base 0
    response = send(client, form("b0", 3, 3, 9, make_users(3, 3)))
    assert response.status_code == 409
    assert "numbers its batches from 0 (0..2)" in errors(response)[0]


# --- 410 and expiry --------------------------------------------------------------------


def test_batch_to_aborted_session_is_410(client: TestClient, engine: Engine) -> None:
    assert send(client, form("ab", 1, 2, 4, make_users(2))).status_code == 200
    response = client.delete("/audience/sessions/ab")
    assert response.status_code == 200
    assert response.json()["state"] == "aborted"
    with engine.connect() as conn:
        assert conn.execute(select(batches.c.users)).scalars().all() == [None]
    response = send(client, form("ab", 2, 2, 4, make_users(2, 2)))
    assert response.status_code == 410
    assert errors(response) == ["session ab was aborted; start a new session to upload again."]
    # 410 answers before a 409 would
    assert send(client, form("ab", 2, 3, 4, make_users(2, 2))).status_code == 410


def test_idle_session_expires_exactly_at_expires_at(client: TestClient, clock: FakeClock) -> None:
    assert send(client, form("ttl", 1, 2, 4, make_users(2))).status_code == 200
    expires_at = status(client, "ttl")["expiresAt"]
    assert expires_at == "2026-11-29T12:00:00Z"
    clock.advance(hours=24, microseconds=-1)
    assert status(client, "ttl")["state"] == "receiving"
    clock.advance(microseconds=1)
    body = status(client, "ttl")
    assert (body["state"], body["expiresAt"]) == ("expired", None)
    response = send(client, form("ttl", 2, 2, 4, make_users(2, 2)))
    assert response.status_code == 410
    assert "session ttl expired at 2026-11-29T12:00:00+00:00" in errors(response)[0]


def test_each_batch_pushes_expiry_forward(client: TestClient, clock: FakeClock) -> None:
    assert send(client, form("slow", 1, 3, 3, make_users(1))).status_code == 200
    clock.advance(hours=23)
    assert send(client, form("slow", 2, 3, 3, make_users(1, 1))).status_code == 200
    clock.advance(hours=23)
    assert send(client, form("slow", 3, 3, 3, make_users(1, 2))).status_code == 200
    assert status(client, "slow")["state"] == "complete"


# --- auth and tenants ------------------------------------------------------------------


def test_api_keys_guard_everything_but_healthz(
    engine: Engine, clock: FakeClock, database_url: str
) -> None:
    settings = Settings(database_url=database_url, api_keys={"k1": "acme", "k2": "globex"})
    with TestClient(
        create_app(settings, engine=engine, clock=clock, sweeper=False, destinations={})
    ) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/audience/sessions", "/audience/sessions/1"):
            assert client.get(path).status_code == 401
        # 401 answers first, even before a body that is too large or malformed
        response = client.post("/audience", content=b"x", headers={"content-type": "text/plain"})
        assert response.status_code == 401
        assert errors(response) == [
            "A valid API key is required: send Authorization: Bearer <key>."
        ]
        wrong = send(
            client, form(1, 1, 1, 1, make_users(1)), headers={"authorization": "Bearer k3"}
        )
        assert wrong.status_code == 401

        acme = {"authorization": "Bearer k1"}
        globex = {"authorization": "Bearer k2"}
        assert send(client, form(7, 1, 2, 2, make_users(1)), headers=acme).status_code == 200
        # the same sessionId is another session for another tenant
        assert (
            send(client, form(7, 1, 3, 3, make_users(1), name="Theirs"), headers=globex).status_code
            == 200
        )
        assert client.get("/audience/sessions/7", headers=acme).json()["totalBatches"] == 2
        assert client.get("/audience/sessions/7", headers=globex).json()["name"] == "Theirs"
        listed = client.get("/audience/sessions", headers=acme).json()["sessions"]
        assert [s["name"] for s in listed] == ["High Value Customers Q1"]
        assert client.delete("/audience/sessions/7", headers=acme).status_code == 200
        assert client.get("/audience/sessions/7", headers=globex).json()["state"] == "receiving"

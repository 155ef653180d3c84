"""The webhook emulator, exercised over real HTTP as the delivery worker will use it, and
through it the call log and failure scripting every emulator shares."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from audience_server.providers.webhook import sign, verify_signature
from tests.emulators.loopback import Incoming
from tests.emulators.webhook import ChunkOrderError, NoCompleteAttempt, WebhookEmulator

SECRET = b"test-secret"
SESSION = "1708531200"


@pytest.fixture
def hook() -> Iterator[WebhookEmulator]:
    with WebhookEmulator(SECRET) as emulator:
        yield emulator


@pytest.fixture
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as client:
        yield client


def chunk_body(
    index: int,
    last: bool,
    users: Any,
    session_id: str = SESSION,
    **overrides: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "segmentName": "blotout_High_Value",
        "name": "High Value",
        "type": "custom",
        "sessionId": session_id,
        "chunk": {"index": index, "last": last},
        "users": users,
    }
    body.update(overrides)
    return body


def post(
    http: httpx2.Client,
    hook: WebhookEmulator,
    body: dict[str, Any] | bytes,
    *,
    secret: bytes = SECRET,
    timestamp: int | None = None,
    content_type: str = "application/json",
    signature: str | None = None,
    timeout: float | None = None,
) -> httpx2.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if signature is None:
        signature = sign(secret, raw, int(time.time()) if timestamp is None else timestamp)
    headers = {"Content-Type": content_type, "X-Audience-Signature": signature}
    if timeout is None:
        return http.post(hook.url, content=raw, headers=headers)
    return http.post(hook.url, content=raw, headers=headers, timeout=timeout)


def send_attempt(
    http: httpx2.Client, hook: WebhookEmulator, chunks: list[list[dict[str, Any]]]
) -> None:
    for position, users in enumerate(chunks, start=1):
        response = post(http, hook, chunk_body(position, position == len(chunks), users))
        assert response.status_code == 200, response.text


USERS = [{"email": f"u{n}@example.com", "purchase": {"total": n}} for n in range(5)]


# -- signature -------------------------------------------------------------------------------


def test_verify_signature_reference_logic() -> None:
    body = b'{"a": 1}'
    now = 1_800_000_000.0
    good = sign(SECRET, body, int(now))
    digest = good.split("v1=")[1]
    other = sign(b"other", body, int(now)).split("v1=")[1]

    assert verify_signature(SECRET, good, body, now)
    assert not verify_signature(SECRET, good, body + b" ", now)
    assert not verify_signature(b"other", good, body, now)
    # several v1 entries (a secret being rotated) and unknown schemes next to them
    assert verify_signature(SECRET, f"t={int(now)},v1={other},v1={digest},v0=zz", body, now)
    assert not verify_signature(SECRET, f"t={int(now)},v1={other}", body, now)
    assert not verify_signature(SECRET, f"t={int(now)},v0={digest}", body, now)
    # exactly one numeric timestamp
    assert not verify_signature(SECRET, f"v1={digest}", body, now)
    assert not verify_signature(SECRET, f"t={int(now)},t={int(now)},v1={digest}", body, now)
    assert not verify_signature(SECRET, f"t=-{int(now)},v1={digest}", body, now)
    assert not verify_signature(SECRET, "", body, now)
    assert not verify_signature(SECRET, f"t={int(now)},v1={digest.upper()}", body, now)
    # freshness, both ways, with the tolerance inclusive
    assert verify_signature(SECRET, good, body, now + 300)
    assert not verify_signature(SECRET, good, body, now + 301)
    assert not verify_signature(SECRET, good, body, now - 301)
    assert verify_signature(SECRET, good, body, now + 1000, tolerance=1000)


def test_signed_chunks_reassemble_in_order(hook: WebhookEmulator, http: httpx2.Client) -> None:
    send_attempt(http, hook, [USERS[:2], USERS[2:4], USERS[4:]])

    assert hook.segment(SESSION) == USERS
    assert hook.segment(SESSION, "blotout_High_Value") == USERS
    assert hook.attempts(SESSION) == 1
    assert [r.index for r in hook.requests] == [1, 2, 3]
    assert [r.last for r in hook.requests] == [False, False, True]
    first = hook.requests[0]
    assert first.headers["x-audience-signature"].startswith("t=")
    assert first.headers["content-type"] == "application/json"
    assert abs(first.arrived_at - time.time()) < 60
    assert hook.invalid == [] and hook.rejected == []
    with pytest.raises(NoCompleteAttempt):
        hook.segment(SESSION, "another_name")
    with pytest.raises(NoCompleteAttempt):
        hook.segment("unknown-session")


def test_bad_signatures_are_401_and_not_recorded(http: httpx2.Client) -> None:
    now = 1_800_000_000  # the receiver's clock, fixed so the tolerance edges are exact
    raw = json.dumps(chunk_body(1, True, USERS)).encode()

    with WebhookEmulator(SECRET, clock=lambda: float(now)) as hook:
        cases = {
            "wrong secret": post(http, hook, raw, secret=b"wrong", timestamp=now),
            "tampered body": post(http, hook, raw + b" ", signature=sign(SECRET, raw, now)),
            "missing": http.post(
                hook.url, content=raw, headers={"Content-Type": "application/json"}
            ),
            "malformed": post(http, hook, raw, signature="sha256=abc"),
            "stale": post(http, hook, raw, timestamp=now - 301),
            "future": post(http, hook, raw, timestamp=now + 301),
        }

        for case, response in cases.items():
            assert response.status_code == 401, case
            assert response.headers["content-type"] == "application/json", case
            assert response.json()["error"], case
        assert "timestamp" in cases["stale"].json()["error"]
        assert "missing" in cases["missing"].json()["error"]
        assert hook.requests == []
        assert [r.status for r in hook.invalid] == [401] * len(cases)
        # inside the tolerance, both ways, still passes
        assert post(http, hook, raw, timestamp=now - 300).status_code == 200
        assert post(http, hook, raw, timestamp=now + 300).status_code == 200


def test_several_signature_headers_are_refused(hook: WebhookEmulator, http: httpx2.Client) -> None:
    raw = json.dumps(chunk_body(1, True, USERS)).encode()
    good = sign(SECRET, raw, int(time.time()))
    headers = [
        ("Content-Type", "application/json"),
        ("X-Audience-Signature", good),
        ("X-Audience-Signature", good),
    ]

    response = http.post(hook.url, content=raw, headers=headers)

    assert response.status_code == 401
    assert "several" in response.json()["error"]


# -- body shape ------------------------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    body = chunk_body(1, True, USERS)
    del body[key]
    return body


MALFORMED: dict[str, tuple[dict[str, Any] | bytes, str]] = {
    "not json": (b"{not json", "JSON"),
    "array": (b"[1, 2]", "object"),
    "nan": (b'{"x": NaN}', "JSON"),
    "duplicate key": (b'{"users": [], "users": []}', "duplicate"),
    "missing users": (_without("users"), "users"),
    "missing chunk": (_without("chunk"), "chunk"),
    "extra key": (chunk_body(1, True, USERS, extra=1), "extra"),
    "empty segmentName": (chunk_body(1, True, USERS, segmentName=""), "segmentName"),
    "integer sessionId": (chunk_body(1, True, USERS, sessionId=1708531200), "sessionId"),
    "bad type": (chunk_body(1, True, USERS, type="secondary"), "type"),
    "index zero": (chunk_body(0, True, USERS), "chunk.index"),
    "index bool": (chunk_body(1, True, USERS, chunk={"index": True, "last": True}), "index"),
    "index string": (chunk_body(1, True, USERS, chunk={"index": "1", "last": True}), "index"),
    "last missing": (chunk_body(1, True, USERS, chunk={"index": 1}), "last"),
    "last not bool": (chunk_body(1, True, USERS, chunk={"index": 1, "last": 1}), "chunk.last"),
    "users not list": (chunk_body(1, True, {"email": "a"}), "users"),
    "user not object": (chunk_body(1, True, [{"email": "a"}, "b@example.com"]), "users[1]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_400_naming_the_problem(
    hook: WebhookEmulator, http: httpx2.Client, case: str
) -> None:
    body, named = MALFORMED[case]

    response = post(http, hook, body)

    assert response.status_code == 400
    assert named in response.json()["error"]
    assert hook.requests == []
    assert [r.status for r in hook.invalid] == [400]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 400),
        ("application/x-www-form-urlencoded", 400),
        ("application/json; charset=latin-1", 400),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
def test_content_type_must_be_json(
    hook: WebhookEmulator, http: httpx2.Client, content_type: str, status: int
) -> None:
    response = post(http, hook, chunk_body(1, True, USERS), content_type=content_type)

    assert response.status_code == status, response.text
    assert len(hook.requests) == (1 if status == 200 else 0)


def test_wrong_path_and_method(hook: WebhookEmulator, http: httpx2.Client) -> None:
    assert http.get(hook.url).status_code == 405
    assert http.post(hook.url + "/other", content=b"{}").status_code == 404
    assert [r.status for r in hook.invalid] == [405, 404]


def test_chunked_transfer_encoding_is_accepted(hook: WebhookEmulator, http: httpx2.Client) -> None:
    raw = json.dumps(chunk_body(1, True, USERS)).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Audience-Signature": sign(SECRET, raw, int(time.time())),
    }

    def pieces() -> Iterator[bytes]:
        yield raw[:7]
        yield raw[7:]

    response = http.post(hook.url, content=pieces(), headers=headers)

    assert response.status_code == 200, response.text
    assert hook.requests[0].headers["transfer-encoding"] == "chunked"
    assert hook.segment(SESSION) == USERS


# -- scripted answers ------------------------------------------------------------------------


def test_scripted_503_twice_then_success(hook: WebhookEmulator, http: httpx2.Client) -> None:
    hook.fail(503, times=2, retry_after="7")
    body = chunk_body(1, True, USERS)

    statuses = [post(http, hook, body) for _ in range(3)]

    assert [r.status_code for r in statuses] == [503, 503, 200]
    assert statuses[0].headers["retry-after"] == "7"
    assert statuses[1].headers["retry-after"] == "7"
    assert "retry-after" not in statuses[2].headers
    assert [r.status for r in hook.rejected] == [503, 503]
    assert len(hook.requests) == 1
    assert hook.attempts(SESSION) == 1
    assert hook.segment(SESSION) == USERS


def test_scripted_400_with_a_text_message(hook: WebhookEmulator, http: httpx2.Client) -> None:
    hook.fail(400, "audience too small")

    response = post(http, hook, chunk_body(1, True, USERS))

    assert response.status_code == 400
    assert response.text == "audience too small"
    assert response.headers["content-type"].startswith("text/plain")
    assert "retry-after" not in response.headers
    assert hook.rejected[0].session_id == SESSION
    with pytest.raises(NoCompleteAttempt):
        hook.segment(SESSION)


def test_scripted_answers_wait_for_a_good_signature(
    hook: WebhookEmulator, http: httpx2.Client
) -> None:
    hook.fail(503)
    body = chunk_body(1, True, USERS)

    assert post(http, hook, body, secret=b"wrong").status_code == 401
    assert post(http, hook, body).status_code == 503
    assert post(http, hook, body).status_code == 200


def test_every_request_is_in_the_call_log(hook: WebhookEmulator, http: httpx2.Client) -> None:
    good = json.dumps(chunk_body(1, True, USERS)).encode()
    hook.fail(503)

    assert post(http, hook, good, secret=b"wrong").status_code == 401
    assert post(http, hook, good).status_code == 503
    assert post(http, hook, good).status_code == 200
    assert http.get(hook.url + "/elsewhere", params={"x": "1"}).status_code == 405

    assert hook.routes() == [("chunk", 401), ("chunk", 503), ("chunk", 200), ("unknown", 405)]
    refused, scripted, accepted, wrong_method = hook.calls
    assert [c.scripted for c in hook.calls] == [False, True, False, False]
    assert refused.body == good and refused.method == "POST" and refused.path == "/hook"
    assert "signature" in refused.answer_json()["error"]
    assert scripted.answer_json() == {"error": "scripted 503 Service Unavailable"}
    assert accepted.json() == chunk_body(1, True, USERS)
    assert accepted.headers["x-audience-signature"].startswith("t=")
    assert accepted.principal is None and accepted.answer_json() == {"received": True}
    assert (wrong_method.query, wrong_method.params) == ("x=1", {"x": "1"})
    assert hook.calls_to("chunk") == [refused, scripted, accepted]
    assert hook.invalid == [refused, wrong_method]


def test_a_scripted_failure_can_let_requests_through_and_pick_its_targets(
    hook: WebhookEmulator, http: httpx2.Client
) -> None:
    def session_b(request: Incoming) -> bool:
        session: str = json.loads(request.body or b"{}")["sessionId"]
        return session == "b"

    hook.fail(500, {"error": "for b"}, times=2, on=session_b, after=1)
    hook.fail(409, on="elsewhere")  # no such route: never used
    answers = [
        post(http, hook, chunk_body(1, True, USERS, session_id=session)).status_code
        for session in ("a", "b", "a", "b", "b", "b")
    ]

    assert answers == [200, 200, 200, 500, 500, 200]
    assert [call.answer_json() for call in hook.calls if call.scripted] == [{"error": "for b"}] * 2
    assert [r.session_id for r in hook.rejected] == ["b", "b"]


def test_client_timeout_on_a_delayed_answer(hook: WebhookEmulator, http: httpx2.Client) -> None:
    hook.delay(30)

    with pytest.raises(httpx2.ReadTimeout):
        post(http, hook, chunk_body(1, True, USERS), timeout=0.2)
    hook.wait_until(lambda: hook.in_flight() == 1)
    hook.release()

    # the slow receiver still processed the chunk, and the next request is not delayed
    assert hook.segment(SESSION) == USERS
    assert post(http, hook, chunk_body(1, True, USERS)).status_code == 200
    hook.wait_until(lambda: hook.in_flight() == 0)


# -- attempts --------------------------------------------------------------------------------


def test_second_attempt_replaces_the_first(hook: WebhookEmulator, http: httpx2.Client) -> None:
    send_attempt(http, hook, [USERS[:1], USERS[1:2]])
    send_attempt(http, hook, [USERS[2:]])

    assert hook.attempts(SESSION) == 2
    assert hook.segment(SESSION) == USERS[2:]


def test_interrupted_attempts_are_not_complete(hook: WebhookEmulator, http: httpx2.Client) -> None:
    assert post(http, hook, chunk_body(1, False, USERS[:2])).status_code == 200
    with pytest.raises(NoCompleteAttempt, match=r"\[\[1\]\]"):
        hook.segment(SESSION)

    send_attempt(http, hook, [USERS[:2], USERS[2:]])
    assert post(http, hook, chunk_body(1, False, USERS[:1])).status_code == 200

    # the last complete attempt, not the unfinished one after it
    assert hook.attempts(SESSION) == 3
    assert hook.segment(SESSION) == USERS


@pytest.mark.parametrize(
    ("indexes", "message"),
    [
        ([(1, False), (3, True)], "chunk 3 follows 1"),
        ([(1, False), (2, False), (2, True)], "chunk 2 follows 2"),
        ([(2, True)], "first chunk is 2"),
        ([(1, True), (2, True)], "after the last chunk"),
    ],
)
def test_chunk_order_errors_are_detected(
    hook: WebhookEmulator,
    http: httpx2.Client,
    indexes: list[tuple[int, bool]],
    message: str,
) -> None:
    for index, last in indexes:
        assert post(http, hook, chunk_body(index, last, USERS)).status_code == 200

    with pytest.raises(ChunkOrderError, match=message):
        hook.segment(SESSION)


def test_a_name_change_inside_an_attempt_is_detected(
    hook: WebhookEmulator, http: httpx2.Client
) -> None:
    post(http, hook, chunk_body(1, False, USERS))
    post(http, hook, chunk_body(2, True, USERS, type="primary"))

    with pytest.raises(ChunkOrderError, match="type changes"):
        hook.segment(SESSION)


def test_sessions_are_kept_apart(hook: WebhookEmulator, http: httpx2.Client) -> None:
    post(http, hook, chunk_body(1, False, USERS[:1], session_id="a"))
    post(http, hook, chunk_body(1, True, USERS[3:], session_id="b"))
    post(http, hook, chunk_body(2, True, USERS[1:2], session_id="a"))

    assert hook.segment("a") == USERS[:2]
    assert hook.segment("b") == USERS[3:]
    assert hook.wait_for_segment("b", timeout=1) == USERS[3:]


def test_wait_for_segment_returns_once_the_last_chunk_arrives(
    hook: WebhookEmulator, http: httpx2.Client
) -> None:
    def deliver() -> None:
        with httpx2.Client(timeout=10) as own:
            send_attempt(own, hook, [USERS[:3], USERS[3:]])

    sender = threading.Thread(target=deliver)
    sender.start()
    try:
        assert hook.wait_for_segment(SESSION, timeout=10) == USERS
    finally:
        sender.join()
    with pytest.raises(NoCompleteAttempt):
        hook.wait_for_segment("never", timeout=0.05)


# -- concurrency -----------------------------------------------------------------------------


def _post_together(hook: WebhookEmulator, bodies: list[dict[str, Any]]) -> list[int]:
    """POST each body from its own thread, all released at once by a barrier."""
    barrier = threading.Barrier(len(bodies))
    statuses: list[int] = [0] * len(bodies)

    def send(position: int) -> None:
        with httpx2.Client(timeout=30) as own:
            barrier.wait()
            statuses[position] = post(own, hook, bodies[position]).status_code

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    try:
        # Held answers keep both requests open until both are inside: no timing involved.
        hook.wait_until(lambda: hook.in_flight() == len(bodies), timeout=10)
    finally:
        hook.release()
        for thread in threads:
            thread.join()
    return statuses


def test_overlapping_requests_for_one_session_are_counted(hook: WebhookEmulator) -> None:
    hook.delay(30, times=2)

    statuses = _post_together(hook, [chunk_body(1, False, USERS), chunk_body(1, True, USERS)])

    assert statuses == [200, 200]
    assert hook.max_in_flight(SESSION) == 2
    assert hook.max_in_flight() == 2
    assert hook.in_flight(SESSION) == 0


def test_overlap_across_sessions_is_not_overlap_within_one(hook: WebhookEmulator) -> None:
    hook.delay(30, times=2)

    statuses = _post_together(
        hook,
        [chunk_body(1, True, USERS, session_id="a"), chunk_body(1, True, USERS, session_id="b")],
    )

    assert statuses == [200, 200]
    assert hook.max_in_flight("a") == 1
    assert hook.max_in_flight("b") == 1
    assert hook.max_in_flight() == 2


def test_sequential_delayed_requests_never_overlap(
    hook: WebhookEmulator, http: httpx2.Client
) -> None:
    hook.delay(0.05, times=3)

    send_attempt(http, hook, [USERS[:2], USERS[2:4], USERS[4:]])

    assert hook.max_in_flight(SESSION) == 1
    assert hook.max_in_flight("unknown") == 0


# -- lifecycle -------------------------------------------------------------------------------


def test_close_joins_every_thread_even_with_open_and_held_connections() -> None:
    before = set(threading.enumerate())
    hook = WebhookEmulator(SECRET).start()
    url = hook.url
    idle = httpx2.Client(timeout=30)
    outcome: list[str] = []

    def held_request() -> None:
        with httpx2.Client(timeout=30) as own:
            try:
                outcome.append(str(post(own, hook, chunk_body(1, True, USERS)).status_code))
            except httpx2.TransportError as exc:
                outcome.append(type(exc).__name__)

    try:
        assert post(idle, hook, chunk_body(1, True, USERS)).status_code == 200  # kept alive
        hook.delay(60)
        sender = threading.Thread(target=held_request)
        sender.start()
        hook.wait_until(lambda: hook.in_flight() == 1)

        started = time.monotonic()
        hook.close()
        closing_took = time.monotonic() - started
        sender.join()
    finally:
        idle.close()
        hook.close()

    assert closing_took < 5
    assert outcome  # the held request ended one way or another instead of waiting 60 s
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(httpx2.TransportError):
        httpx2.post(url, content=b"{}", timeout=2)

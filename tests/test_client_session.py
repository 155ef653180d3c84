"""client/session.py: batching, what the server misses, and whole uploads against a server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from audience_server.client import AudienceClient, status, upload, wait
from audience_server.client.errors import InputError, SessionFailed
from audience_server.client.session import batch_count, make_batches, missing_of
from tests.servers import ServerProcess


def test_batches_are_numbered_from_one_and_only_wanted_ones_encoded() -> None:
    users = [{"email": f"u{i}"} for i in range(25)]
    every = list(make_batches(users, 10))
    assert [(b.sequence, b.users) for b in every] == [(1, 10), (2, 10), (3, 5)]
    assert [b.sequence for b in make_batches(users, 10, {3})] == [3]
    assert (batch_count(25, 10), batch_count(20, 10), batch_count(0, 10)) == (3, 2, 1)


def session(state: str, **fields: Any) -> dict[str, Any]:
    return {"sessionId": "s", "state": state, "totalBatches": 3, "sequenceBase": 1} | fields


def test_missing_sequences_come_from_the_servers_status() -> None:
    assert missing_of(None, 3) == {1, 2, 3}
    assert missing_of(session("receiving", missingSequences=[2, 3]), 3) == {2, 3}
    assert missing_of(session("complete"), 3) == set()
    assert missing_of(session("delivered"), 3) == set()
    with pytest.raises(SessionFailed, match="session s is expired: idle"):
        missing_of(session("expired", reason="idle"), 3)
    with pytest.raises(SessionFailed, match=r"has 3 batches \(base 1\), this upload 4 from 1"):
        missing_of(session("receiving", missingSequences=[1]), 4)
    with pytest.raises(SessionFailed, match=r"\(base 0\)"):
        missing_of(session("receiving", sequenceBase=0, missingSequences=[1]), 3)


def test_nothing_to_upload_is_an_input_error_before_any_request() -> None:
    nowhere = "http://127.0.0.1:9"  # nothing is asked of it
    with pytest.raises(InputError, match="holds no users"):
        upload([], name="Empty", url=nowhere)
    with pytest.raises(InputError, match="holds no users"):
        upload(iter([]), name="Empty", url=nowhere)


class Ticks:
    """Monotonic time the test owns: the client's sleeps move it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def server_at(ticks: Ticks, body: Callable[[float], dict[str, Any] | None]) -> AudienceClient:
    """A client of a server whose status body at each moment is ``body(seconds waited)``."""
    started = ticks.now

    def answer(request: httpx2.Request) -> httpx2.Response:
        found = body(ticks.now - started)
        return httpx2.Response(404) if found is None else httpx2.Response(200, json=found)

    return AudienceClient(transport=httpx2.MockTransport(answer), sleep=ticks.sleep)


def assembling(users: int, state: str = "complete") -> dict[str, Any]:
    return session(state, totalUsers=10_000_000, assembledUsers=users, deliveries=[])


def test_wait_goes_on_while_the_server_progresses_however_long_it_takes() -> None:
    """An assembly of 10^7 users moving every 500 s of 3,000 outlasts a 600 s timeout."""
    ticks, seen = Ticks(), list[dict[str, Any]]()

    def body(waited: float) -> dict[str, Any]:
        if waited >= 3_000:
            return assembling(10_000_000, "delivered")
        return assembling(int(waited // 500) * 1_000_000)

    client = server_at(ticks, body)
    found = wait(client, "s", 600, poll=1.0, clock=ticks, on_progress=seen.append)
    assert found["state"] == "delivered" and ticks.now - 1_000.0 == 3_000.0
    assert [s["assembledUsers"] for s in seen] == [i * 1_000_000 for i in range(6)] + [10**7]


def test_wait_gives_up_after_its_timeout_without_progress() -> None:
    ticks, seen = Ticks(), list[dict[str, Any]]()

    def body(waited: float) -> dict[str, Any]:  # moves once, at 250 s, then stalls
        return assembling(0 if waited < 250 else 4_000_000)

    client = server_at(ticks, body)
    found = wait(client, "s", 600, poll=1.0, clock=ticks, on_progress=seen.append)
    assert (found["state"], found["assembledUsers"]) == ("complete", 4_000_000)
    assert ticks.now - 1_000.0 == 250 + 600  # 600 s after the last change, not after the start
    assert [s["assembledUsers"] for s in seen] == [0, 4_000_000]


def test_wait_for_a_session_the_server_does_not_have_fails() -> None:
    ticks = Ticks()
    with pytest.raises(SessionFailed, match="session gone does not exist on the server"):
        wait(server_at(ticks, lambda waited: None), "gone", 600, clock=ticks)
    assert ticks.now == 1_000.0


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(database_url, tmp_path / "server.log").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.slow
def test_upload_a_generator_then_resume_it(server: ServerProcess) -> None:
    def users() -> Iterator[dict[str, Any]]:
        for i in range(2_345):
            yield {"email": f"user{i}@example.com", "tier": str(i % 3)}

    seen: list[int] = []
    result = upload(
        users(),
        name="Gen",
        url=server.url,
        session_id="gen-1",
        batch_size=500,
        concurrency=3,
        on_batch=lambda sequence, count: seen.append(sequence),
    )
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert (result.total_batches, result.status["state"]) == (5, "complete")
    again = upload(list(users()), name="Gen", url=server.url, session_id="gen-1", batch_size=500)
    assert (again.sent_batches, again.status["receivedUsers"]) == (0, 2_345)
    found = status("gen-1", url=server.url)
    assert found is not None and found["state"] == "complete"
    assert status("nope", url=server.url) is None

"""Several real server processes on one database: the completion race, kill -9, and the
EdgeTag example over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, func, select

from audience_server.models import batches, events
from tests.conftest import make_users
from tests.helpers import form
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow


def post(client: httpx2.Client, base: str, fields: dict[str, str]) -> httpx2.Response:
    files = {key: (None, value) for key, value in fields.items()}
    return client.post(f"{base}/audience", files=files)


@pytest.fixture
def servers(database_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    pair = [ServerProcess(database_url, tmp_path / f"server{i}.log") for i in range(2)]
    try:
        for server in pair:
            server.start()
        yield pair
    finally:
        for server in pair:
            server.stop()


def at_once(*calls: Callable[[], httpx2.Response]) -> list[httpx2.Response]:
    """Run the calls in threads released by one barrier, as close to simultaneous as we can."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx2.Response]) -> httpx2.Response:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_last_batches_racing_on_two_processes_complete_exactly_once(
    servers: list[ServerProcess], engine: Engine
) -> None:
    a, b = (s.url for s in servers)
    rounds = 40
    with httpx2.Client(timeout=30) as ca, httpx2.Client(timeout=30) as cb:
        for i in range(rounds):
            key = f"race-{i}"
            parts = {seq: make_users(5, seq * 5) for seq in (1, 2, 3, 4)}

            def send(
                client: httpx2.Client, base: str, seq: int, key: str = key, parts: Any = parts
            ) -> Callable[[], httpx2.Response]:
                return lambda: post(client, base, form(key, seq, 4, 20, parts[seq]))

            # the session is created by two processes at once
            created = at_once(send(ca, a, 1), send(cb, b, 2))
            # the two last batches complete it at once
            completed = at_once(send(ca, a, 3), send(cb, b, 4))
            # the completing batch re-sent to both at once changes nothing
            resent = at_once(send(ca, a, 4), send(cb, b, 4))
            for response in created + completed + resent:
                assert (response.status_code, response.content) == (200, b'{"success": true}')
            status = ca.get(f"{a}/audience/sessions/{key}").json()
            assert (status["state"], status["receivedUsers"]) == ("complete", 20)

    with engine.connect() as conn:
        kinds = conn.execute(
            select(events.c.kind, func.count()).group_by(events.c.kind).order_by(events.c.kind)
        ).all()
        stored = conn.execute(select(func.count()).select_from(batches)).scalar_one()
    assert [tuple(k) for k in kinds] == [("complete", rounds), ("created", rounds)]
    assert stored == 4 * rounds


def test_kill_9_loses_no_acknowledged_batch(database_url: str, tmp_path: Path) -> None:
    total_batches, per_batch = 40, 2000
    parts = {seq: make_users(per_batch, seq * per_batch) for seq in range(1, total_batches + 1)}
    fields = {
        seq: form("crash", seq, total_batches, total_batches * per_batch, users)
        for seq, users in parts.items()
    }
    server = ServerProcess(database_url, tmp_path / "server.log").start()
    acked: set[int] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def send(seq: int) -> None:
        if killed.is_set():
            return
        try:
            with httpx2.Client(timeout=30) as client:
                response = post(client, server.url, fields[seq])
        except httpx2.TransportError:
            return  # in flight at the kill: not acknowledged, may or may not be stored
        assert response.status_code == 200, response.text
        with lock:
            acked.add(seq)
            if len(acked) == 12:
                server.kill()
                killed.set()

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, fields))
        assert killed.is_set() and len(acked) >= 12
        server.start()
        with httpx2.Client(timeout=30) as client:
            status = client.get(f"{server.url}/audience/sessions/crash").json()
            assert not acked & set(status["missingSequences"])
            assert status["receivedBatches"] >= len(acked)
            assert status["receivedUsers"] == status["receivedBatches"] * per_batch
            # the client resumes by sending everything again: the stored ones are no-ops
            for seq in range(1, total_batches + 1):
                assert post(client, server.url, fields[seq]).status_code == 200
            status = client.get(f"{server.url}/audience/sessions/crash").json()
        assert (status["state"], status["receivedUsers"]) == ("complete", total_batches * per_batch)
    finally:
        server.stop()


def test_edgetag_example_over_http(database_url: str, tmp_path: Path) -> None:
    """The documented 25,000 users in 3 batches, sent out of order, exactly as EdgeTag shows."""
    server = ServerProcess(database_url, tmp_path / "server.log").start()
    users = make_users(25_000)
    parts = {1: users[:10_000], 2: users[10_000:20_000], 3: users[20_000:]}
    try:
        with httpx2.Client(timeout=60) as client:
            for seq in (3, 1, 2):
                fields = form(1708531200, seq, 3, 25_000, parts[seq], pullDate="2026-01-01")
                response = client.post(
                    f"{server.url}/audience?disablePrefix=false&sync=true",
                    files={key: (None, value) for key, value in fields.items()},
                )
                assert (response.status_code, response.content) == (200, b'{"success": true}')
            body: dict[str, Any] = client.get(f"{server.url}/audience/sessions/1708531200").json()
    finally:
        server.stop()
    assert {k: body[k] for k in body if k not in ("createdAt", "updatedAt")} == {
        "sessionId": "1708531200",
        "name": "High Value Customers Q1",
        "type": "custom",
        "state": "complete",
        "reason": None,
        "totalBatches": 3,
        "totalUsers": 25_000,
        "receivedBatches": 3,
        "receivedUsers": 25_000,
        "assembledUsers": None,  # no worker runs: never assembled
        "uniqueUsers": None,
        "missingSequences": [],
        "sequenceBase": 1,
        "expiresAt": None,
        "deliveries": [],
    }
    assert body["createdAt"] <= body["updatedAt"]

"""Worker processes on one database: kill -9 mid-delivery resumes elsewhere, and two
workers never deliver one (session, destination) at the same time."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import make_users
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET, eventually, form
from tests.servers import ServerProcess, WorkerProcess

pytestmark = pytest.mark.slow


def destinations_file(tmp_path: Path, hook: WebhookEmulator, chunk_size: int) -> str:
    path = tmp_path / "destinations.toml"
    path.write_text(
        "[[destinations]]\n"
        'id = "crm"\nkind = "webhook"\n'
        f'url = "{hook.url}"\nsecret = "${{HOOK_SECRET}}"\nchunk_size = {chunk_size}\n'
    )
    return str(path)


def worker_env(tmp_path: Path, hook: WebhookEmulator, chunk_size: int) -> dict[str, str]:
    return {
        "AUDIENCE_DESTINATIONS": destinations_file(tmp_path, hook, chunk_size),
        "HOOK_SECRET": HOOK_SECRET,
        "AUDIENCE_WORKER_LEASE": "2s",
        "AUDIENCE_WORKER_POLL": "0.1s",
        "AUDIENCE_DELIVERY_RETRY_BASE": "0.1s",
        "AUDIENCE_LOG_LEVEL": "WARNING",
    }


def upload(base: str, key: str, users: list[dict[str, Any]], per_batch: int) -> None:
    parts = [users[i : i + per_batch] for i in range(0, len(users), per_batch)]
    with httpx2.Client(timeout=60) as client:
        for sequence, part in enumerate(parts, 1):
            fields = form(key, sequence, len(parts), len(users), part)
            files = {k: (None, v) for k, v in fields.items()}
            response = client.post(f"{base}/audience", files=files)
            assert response.status_code == 200, response.text


def session(base: str, key: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.get(f"{base}/audience/sessions/{key}", timeout=30).json()
    return body


def test_worker_killed_mid_delivery_is_resumed_by_another(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    users = make_users(2_000)
    scratch = tmp_path / "scratch"
    # One lane per worker: with a lease this short, a stalled machine could otherwise let a
    # worker's own idle lane take its delivery over.
    env = worker_env(tmp_path, hook, chunk_size=100) | {
        "AUDIENCE_SCRATCH_DIR": str(scratch),
        "AUDIENCE_WORKER_CONCURRENCY": "1",
    }
    server = ServerProcess(database_url, tmp_path / "server.log", **env, AUDIENCE_WORKER="false")
    server.start()
    first = WorkerProcess(database_url, tmp_path / "worker1.log", **env).start()
    second = WorkerProcess(database_url, tmp_path / "worker2.log", **env)
    try:
        hook.delay(0.05, times=10_000)  # a slow receiver: the kill lands mid-delivery
        upload(server.url, "crash", users, 500)
        hook.wait_until(lambda: len(hook.requests) >= 5, timeout=30)
        first.kill()
        received_before = len(hook.requests)
        assert received_before < 20  # the first attempt did not finish
        (left,) = scratch.glob("worker-*")  # the killed worker's folder, never cleaned up
        second.start()
        assert hook.wait_for_segment("crash", timeout=60) == users
        body = eventually(lambda: session(server.url, "crash"), lambda b: b["state"] == "delivered")
        assert not left.exists()  # the second worker removed it when it started
    finally:
        for process in (first, second, server):
            process.stop()
    assert not scratch.exists()  # and its own folder when it stopped
    assert body["state"] == "delivered"
    (delivery,) = body["deliveries"]
    assert delivery["attempts"] == 2 and delivery["usersSent"] == 2_000
    assert hook.attempts("crash") == 2  # the resumed delivery started over from chunk 1
    assert hook.max_in_flight("crash") == 1


def test_two_workers_never_deliver_one_session_at_once(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    env = worker_env(tmp_path, hook, chunk_size=50) | {"AUDIENCE_WORKER_LEASE": "30s"}
    server = ServerProcess(database_url, tmp_path / "server.log", **env, AUDIENCE_WORKER="false")
    server.start()
    workers = [
        WorkerProcess(database_url, tmp_path / f"worker{i}.log", **env).start() for i in range(2)
    ]
    keys = [f"pair-{i}" for i in range(6)]
    segments = {key: make_users(300, i * 1000) for i, key in enumerate(keys)}
    try:
        hook.delay(0.01, times=10_000)
        for key in keys:
            upload(server.url, key, segments[key], 100)
        for key in keys:
            assert hook.wait_for_segment(key, timeout=60) == segments[key]
        states = [
            eventually(partial(session, server.url, key), lambda b: b["state"] == "delivered")
            for key in keys
        ]
    finally:
        processes: list[WorkerProcess | ServerProcess] = [*workers, server]
        for process in processes:
            process.stop()
    for key, body in zip(keys, states, strict=True):
        assert body["state"] == "delivered"
        assert body["deliveries"][0]["attempts"] == 1
        assert hook.attempts(key) == 1
        assert hook.max_in_flight(key) == 1

"""``serve`` runs its worker in a child process: restarted when it dies, its work taken back
at once, woken by the server and waking it, gone when the server goes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest

from audience_server.supervisor import WorkerSupervisor
from audience_server.worker import Doorbell
from tests.conftest import make_users
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import eventually, form
from tests.servers import ServerProcess
from tests.test_worker_processes import session, upload, worker_env

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(child) for child in text.split() if is_running(int(child))]
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def the_worker(server: ServerProcess, not_this: int | None = None) -> int:
    assert server.process is not None
    pid = server.process.pid
    (child,) = eventually(
        lambda: children(pid), lambda found: len(found) == 1 and found[0] != not_this
    )
    return child


def serve(database_url: str, tmp_path: Path, hook: WebhookEmulator) -> ServerProcess:
    env = worker_env(tmp_path, hook, chunk_size=100) | {
        # Far longer than the test may take: work resumes because the new child takes back
        # the dead one's leases, not because they lapsed.
        "AUDIENCE_WORKER_LEASE": "600s",
        "AUDIENCE_WORKER_CONCURRENCY": "1",
        "AUDIENCE_LOG_LEVEL": "INFO",
    }
    return ServerProcess(database_url, tmp_path / "server.log", **env, AUDIENCE_WORKER="true")


def test_a_killed_worker_child_is_restarted_and_resumes_its_delivery_at_once(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    users = make_users(1_000)
    server = serve(database_url, tmp_path, hook).start()
    try:
        first = the_worker(server)
        hook.delay(120, times=1)  # the first chunk is held until released
        upload(server.url, "restart", users, 250)
        hook.wait_until(lambda: hook.in_flight("restart") == 1, timeout=30)
        os.kill(first, signal.SIGKILL)
        second = the_worker(server, not_this=first)
        hook.release()
        assert hook.wait_for_segment("restart", timeout=60) == users
        body = eventually(
            lambda: session(server.url, "restart"), lambda b: b["state"] == "delivered"
        )
    finally:
        server.stop()
    assert not is_running(second)  # stopped with the server
    (delivery,) = body["deliveries"]
    assert (delivery["attempts"], delivery["usersSent"]) == (2, 1_000)
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    messages = [line.get("event") for line in lines]
    assert "worker process exited; restarting it" in messages
    assert "took back the work a previous worker of this id left" in messages


def test_a_sync_batch_is_answered_when_the_child_delivers(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    users = make_users(10)
    server = serve(database_url, tmp_path, hook).start()
    try:
        fields = form("sync-child", 1, 1, len(users), users)
        response = httpx2.post(
            f"{server.url}/audience?sync=true",
            files={k: (None, v) for k, v in fields.items()},
            timeout=60,
        )
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    assert hook.wait_for_segment("sync-child", timeout=1) == users


def test_the_worker_child_stops_when_the_server_is_killed(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    server = serve(database_url, tmp_path, hook).start()
    child = the_worker(server)
    server.kill()
    assert not eventually(lambda: is_running(child), lambda running: not running, timeout=40)


# --- the supervisor alone, with a stand-in child --------------------------------------------

# Answers every ``w`` with ``c``, as a worker that finished the work it was woken for; exits
# with the code its first argument names once its socket closes (or at once, if not 0).
STAND_IN = """
import socket, sys
code = int(sys.argv[1])
if code:
    sys.exit(code)
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--control-fd") + 1]))
while data := sock.recv(64):
    if b"w" in data:
        sock.send(b"c")
"""


def stand_in(code: int) -> list[str]:
    return [sys.executable, "-c", STAND_IN, str(code)]


def test_a_wake_reaches_the_child_and_its_answer_rings_the_server() -> None:
    async def main() -> bool:
        changes = Doorbell()
        supervisor = WorkerSupervisor(changes, command=stand_in(0))
        stop = asyncio.Event()
        running = asyncio.create_task(supervisor.run(stop))
        while supervisor.pid is None:  # started
            await asyncio.sleep(0.01)
        rung = asyncio.create_task(changes.wait(30))  # a limit, not the expected time
        await asyncio.sleep(0)  # the waiter is registered before the wake is sent
        supervisor.wake()
        await rung
        answered = supervisor.restarts == 0 and not running.done()
        stop.set()
        await running
        return answered and supervisor.pid is None

    assert asyncio.run(asyncio.wait_for(main(), 60))


def test_a_child_that_keeps_dying_is_restarted_ever_more_slowly() -> None:
    waits: list[float] = []

    async def main() -> int:
        supervisor = WorkerSupervisor(Doorbell(), command=stand_in(3), backoff=(0.01, 0.04))
        stop = asyncio.Event()
        real_wait_for = asyncio.wait_for

        async def counting(awaitable: Any, timeout: float) -> Any:
            waits.append(timeout)
            if len(waits) == 4:
                stop.set()
            return await real_wait_for(awaitable, timeout)

        asyncio.wait_for = counting  # type: ignore[assignment]
        try:
            await supervisor.run(stop)
        finally:
            asyncio.wait_for = real_wait_for
        return supervisor.restarts

    assert asyncio.run(main()) == 4
    assert waits == [0.01, 0.02, 0.04, 0.04]

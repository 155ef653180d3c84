"""Scratch folders: nothing a worker writes outlives it, kill -9 included."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine
from starlette.testclient import TestClient

from audience_server.app import create_app
from audience_server.runtime import make_worker
from audience_server.scratch import Scratch
from audience_server.settings import Settings
from tests.conftest import make_users
from tests.helpers import form, send
from tests.servers import clean_env

HOLDER = """
import sys
from pathlib import Path
from audience_server.scratch import Scratch
scratch = Scratch.take(Path(sys.argv[1]))
(scratch.path / "seen.db-journal").write_bytes(b"x")
print(scratch.path, flush=True)
sys.stdin.read()  # hold the folder until killed
"""


@contextmanager
def holder(root: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process holding a scratch folder under ``root``."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    ) as process:
        try:
            assert process.stdout is not None
            yield process, Path(process.stdout.readline().strip())
        finally:
            process.kill()


def test_a_scratch_folder_is_removed_with_everything_in_it(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    with Scratch.take(root) as scratch:
        assert scratch.path.parent == root and (scratch.path / "lock").exists()
        (scratch.path / "seen.db").write_bytes(b"x")
        (scratch.path / "seen.db-journal").write_bytes(b"")
    assert not root.exists()  # the last one out removes the root as well
    scratch.close()  # twice is harmless


def test_a_starting_worker_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    with holder(root) as (killed, left):
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    assert (left / "seen.db-journal").exists()  # kill -9: nothing cleaned up
    with Scratch.take(root) as scratch:
        assert not left.exists()
        assert [p.name for p in root.iterdir() if p.name != ".lock"] == [scratch.path.name]
    assert not root.exists()


def test_a_live_workers_folder_is_never_swept(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    with holder(root) as (_, alive):
        with Scratch.take(root) as mine:
            assert alive.exists() and (alive / "seen.db-journal").exists()
            assert mine.path != alive
        assert alive.exists()  # closing mine left the other process's folder and root
    with Scratch.take(root):
        assert not alive.exists()  # its owner is gone now
    assert not root.exists()


def test_two_in_one_process_are_as_separate_as_two_processes(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    first = Scratch.take(root)
    second = Scratch.take(root)  # flock is per open file: the first's folder is held
    assert first.path.exists() and second.path.exists()
    first.close()
    assert not first.path.exists() and second.path.exists()
    second.close()
    assert not root.exists()


def test_a_worker_leaves_no_file_after_assembling(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    """The seen-keys database of duplicate detection (and its SQLite journal) lives in the
    worker's folder and goes with it."""
    root = tmp_path / "scratch"
    settings = Settings(database_url=database_url, scratch_dir=root)
    app = create_app(settings, engine=engine, sweeper=False, destinations={}, worker=False)
    with TestClient(app) as client:
        users = make_users(5)
        assert send(client, form("s1", 1, 1, 6, [*users, users[0]])).status_code == 200
        worker = make_worker(settings, engine, {})

        async def drain() -> None:
            await worker.drain()
            assert root.exists()  # taken while it worked
            await worker.close()

        asyncio.run(drain())
        assert not root.exists()
        assert client.get("/audience/sessions/s1").json()["state"] == "delivered"

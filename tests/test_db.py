"""db.py's writer queue on SQLite: every write transaction holds an ``flock`` on the file
beside the database, so writers of several processes wait in the kernel, not in SQLite's
sleeping busy handler. Other processes are real child processes, driven through pipes."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from audience_server import db, store
from tests.helpers import eventually
from tests.test_delivery_store import new_session

TENANT = "default"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)

# A child that, one line of stdin at a time: takes the lock file (argv[1]) and says "held";
# writes to the database (argv[2]) without waiting for SQLite's lock and says "wrote";
# exits, letting the lock go.
HOLDER = """
import fcntl, os, sqlite3, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
sys.stdin.readline()
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
lite = sqlite3.connect(sys.argv[2], timeout=0, isolation_level=None)
lite.execute("BEGIN IMMEDIATE")
lite.execute("CREATE TABLE holder_was_here (x INTEGER)")
lite.execute("COMMIT")
print("wrote", flush=True)
sys.stdin.readline()
"""
# A child that tries the lock without waiting and says whether it was free.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("free")
"""


@pytest.fixture
def sqlite_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    path = tmp_path / "audience.db"
    shutil.copy(sqlite_template, path)
    engine = db.make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def lock_file_of(engine: Engine) -> Path:
    path = db.writer_lock_file(engine.url.render_as_string())
    assert path is not None
    return path


def probe(path: Path) -> str:
    """Whether another process could take the lock right now."""
    child = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True
    )
    return child.stdout.strip()


def waiting_for_flock(path: Path, pid: int) -> bool:
    """Whether process ``pid`` is queued for an ``flock`` on ``path`` (Linux: /proc/locks
    lists waiters as ``-> FLOCK … <pid> <dev>:<inode> …``)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        queued = fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid)
        if queued and fields[6].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def test_the_lock_file_sits_beside_a_database_file_and_memory_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert db.writer_lock_file("sqlite:///./a.db") == tmp_path / "a.db-writer.lock"
    assert db.writer_lock_file("sqlite:////var/lib/x.db") == Path("/var/lib/x.db-writer.lock")
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:m?mode=memory&uri=true"):
        assert db.writer_lock_file(memory) is None, memory


def test_an_in_memory_database_writes_without_a_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = db.make_engine("sqlite://")
    try:
        with db.write_transaction(engine) as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    finally:
        engine.dispose()
    assert list(tmp_path.iterdir()) == []


def test_a_write_transaction_holds_the_lock_file(sqlite_engine: Engine) -> None:
    path = lock_file_of(sqlite_engine)
    with db.write_transaction(sqlite_engine) as conn:
        new_session(conn, "held", TENANT)
        assert probe(path) == "busy"
    assert probe(path) == "free"
    with db.read_transaction(sqlite_engine) as conn:  # readers never take it
        assert probe(path) == "free"
        assert store.get_session(conn, TENANT, "held") is not None


def test_a_write_waits_while_another_process_holds_the_lock(sqlite_engine: Engine) -> None:
    path = lock_file_of(sqlite_engine)
    database = sqlite_engine.url.database
    assert database is not None
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), database],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    written = threading.Event()

    def write() -> None:
        with db.write_transaction(sqlite_engine) as conn:
            new_session(conn, "after-the-holder", TENANT)
        written.set()

    writer = threading.Thread(target=write)
    try:
        holder.stdin.write("take\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "held\n"
        writer.start()
        eventually(lambda: waiting_for_flock(path, os.getpid()), bool)
        # Queued on the file, before SQLite's lock: the holder can still write at once...
        assert not written.is_set()
        holder.stdin.write("write\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "wrote\n"
        with db.read_transaction(sqlite_engine) as conn:
            assert store.get_session(conn, TENANT, "after-the-holder") is None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
        writer.join()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    assert written.is_set()  # ...and the write went on once the lock was let go
    with db.read_transaction(sqlite_engine) as conn:
        session = store.get_session(conn, TENANT, "after-the-holder")
        conn.exec_driver_sql("SELECT count(*) FROM holder_was_here")  # the holder's write
    assert session is not None and session.created_at == NOW


def test_a_child_forked_during_a_write_does_not_keep_the_lock(sqlite_engine: Engine) -> None:
    path = lock_file_of(sqlite_engine)
    read_end, write_end = os.pipe()
    with db.write_transaction(sqlite_engine) as conn:
        new_session(conn, "forked", TENANT)
        pid = os.fork()
        if pid == 0:  # the child lives on past the transaction, until the pipe closes
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
    os.close(read_end)
    try:
        assert probe(path) == "free"  # the child's copy of the descriptor was closed
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)

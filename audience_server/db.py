"""Engines, transactions and the schema's version, for SQLite and PostgreSQL alike.

Transactions belong to the caller at the edge (a request, a worker step): data functions
take a connection and never commit. Writers on SQLite take the write lock up front
(``BEGIN IMMEDIATE``) so that two writers never deadlock upgrading a read lock, and queue
for it first on a thread lock and a lock file, so that they wait without polling. Every
stage of that wait shares one deadline, the engine's lock timeout (``AUDIENCE_DB_LOCK_TIMEOUT``):
a writer that cannot have the lock by then gets :class:`LockTimeout`, never a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The newest migration's revision. Checking a database against it needs no Alembic, whose
# import costs a quarter of a second of every process start; tests/test_migrations.py
# fails if it is not the head of migrations/. Alembic itself is imported to migrate.
SCHEMA_HEAD = "0004"
DEFAULT_LOCK_TIMEOUT = 10.0  # seconds; the default of AUDIENCE_DB_LOCK_TIMEOUT


class LockTimeout(OperationalError):
    """The SQLite writer lock stayed taken past the lock timeout. An ``OperationalError``
    like SQLite's own "database is locked", so it is answered alike: 503 with
    ``Retry-After`` at the HTTP edge, a later retry in the worker."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            "waiting for the SQLite writer lock",
            None,
            TimeoutError(f"not free within {seconds:g}s"),
        )


@dataclass(frozen=True)
class _WriterQueue:
    """SQLite has one writer at a time, and a writer that finds the lock taken polls with
    sleeps (its busy handler: 1, 2, 5 … 100 ms). Queueing first on a thread lock (this
    process) and an ``flock`` on a file beside the database (every process) lets writers
    wait without sleeping. Correctness never depends on it: SQLite's own lock still does."""

    threads: threading.Lock
    lock_file: Path | None  # None for an in-memory database
    timeout: float  # seconds a writer may wait for its turn, all stages together


_sqlite_writers: weakref.WeakKeyDictionary[Engine, _WriterQueue] = weakref.WeakKeyDictionary()
_held_lock_files: set[int] = set()  # descriptors of the lock files this process holds now


def normalize_url(url: str) -> str:
    """Let ``postgres://`` and ``postgresql://`` URLs use psycopg 3, the installed driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the 200, even across a power cut.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    # SQLite's busy handler waits for the lock at BEGIN IMMEDIATE: a writer gets only
    # what is left of its deadline, a reader the whole timeout back.
    busy_ms = options.get("audience_busy_ms", options.get("audience_full_busy_ms"))
    if busy_ms is not None and conn.info.get("busy_ms") != busy_ms:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_ms)}")
        conn.info["busy_ms"] = busy_ms
    mode = "IMMEDIATE" if options.get("audience_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Engine:
    """An engine for ``url``. On SQLite, ``lock_timeout`` (seconds) bounds a writer's whole
    wait for the write lock: this process's queue, the lock file, SQLite's busy handler."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"timeout": lock_timeout, "check_same_thread": False},
            execution_options={"audience_full_busy_ms": max(1, round(lock_timeout * 1000))},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        _sqlite_writers[engine] = _WriterQueue(
            threading.Lock(), writer_lock_file(url), lock_timeout
        )
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def lock_timeout(engine: Engine) -> float | None:
    """Seconds a writer of ``engine`` waits at most for the write lock; None on PostgreSQL."""
    queue = _sqlite_writers.get(engine)
    return None if queue is None else queue.timeout


def writer_lock_file(url: str) -> Path | None:
    """``<database file>-writer.lock``, where writers of every process queue; None for an
    in-memory SQLite database (one process only)."""
    parsed = make_url(url)
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # a URI filename (uri=true)
        if "mode=memory" in database:
            return None
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(os.path.abspath(database + "-writer.lock"))  # fixed now, whatever cwd becomes


class _FileLock:
    """An exclusive ``flock`` on a lock file, waited for until a deadline. ``flock`` cannot
    time out by itself: a contended wait runs in a helper thread, asleep in the kernel; a
    wait given up on leaves the descriptor to that thread, which closes it (releasing the
    lock at once) when it is granted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._granted = threading.Event()
        self._abandoned = False

    def acquire(self, deadline: float) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        threading.Thread(target=self._wait, name="audience-flock", daemon=True).start()
        if self._granted.wait(max(0.0, deadline - time.monotonic())):
            return True
        with self._lock:
            if self._granted.is_set():  # granted just as the wait ended
                return True
            self._abandoned = True
            return False

    def _wait(self) -> None:
        with contextlib.suppress(OSError):  # closed by a forked child's handler
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        with self._lock:
            if self._abandoned:
                _close_lock_file(self.fd)
            else:
                self._granted.set()


def _close_lock_file(fd: int) -> None:
    if fd in _held_lock_files:  # else closed already (a forked child's handler)
        _held_lock_files.discard(fd)
        os.close(fd)  # releases the lock


@contextmanager
def _locked_file(path: Path | None, deadline: float, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting (asleep in the kernel) until
    ``deadline`` at most; past it, :class:`LockTimeout`."""
    try:
        fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:  # e.g. a read-only folder: SQLite's own lock still serialises writers
        fd = None
    if fd is None:
        yield
        return
    _held_lock_files.add(fd)
    try:
        acquired = _FileLock(fd).acquire(deadline)
    except BaseException:
        _close_lock_file(fd)
        raise
    if not acquired:  # the helper thread closes the descriptor when its flock returns
        raise LockTimeout(timeout)
    try:
        yield
    finally:
        _close_lock_file(fd)


@contextmanager
def _writer_turn(engine: Engine, deadline: float | None) -> Iterator[float | None]:
    """This writer's turn at the write lock; yields its deadline (None on PostgreSQL)."""
    queue = _sqlite_writers.get(engine)
    if queue is None:  # PostgreSQL: row locks, no single writer
        yield None
        return
    if deadline is None:
        deadline = time.monotonic() + queue.timeout
    if not queue.threads.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise LockTimeout(queue.timeout)
    try:
        with _locked_file(queue.lock_file, deadline, queue.timeout):
            yield deadline
    finally:
        queue.threads.release()


@contextmanager
def write_transaction(engine: Engine, *, deadline: float | None = None) -> Iterator[Connection]:
    """One short read-write transaction, committed on success, rolled back on error. On
    SQLite its wait for the write lock ends by ``deadline`` (``time.monotonic()``; default:
    the engine's lock timeout from now) with :class:`LockTimeout` or SQLite's "database is
    locked", both ``OperationalError``."""
    with _writer_turn(engine, deadline) as turn_deadline, engine.connect() as conn:
        conn.execution_options(audience_write=True)
        if turn_deadline is not None:
            left = max(1, round((turn_deadline - time.monotonic()) * 1000))  # 0 would never wait
            conn.execution_options(audience_busy_ms=left)
        with conn.begin():
            yield conn


def _close_inherited_lock_files() -> None:
    # A forked child shares the parent's open lock file: while the child kept it open, the
    # parent's close would not release the lock.
    for fd in list(_held_lock_files):
        os.close(fd)
    _held_lock_files.clear()


os.register_at_fork(after_in_child=_close_inherited_lock_files)


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def alembic_config(engine: Engine | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic is its only authority)."""
    from alembic import command

    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def head_revision() -> str:
    return SCHEMA_HEAD


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (None: not migrated), read as Alembic keeps it."""
    if not inspect(conn).has_table("alembic_version"):
        return None  # a database never migrated
    versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    return versions[0][0] if len(versions) == 1 else None


def schema_is_current(engine: Engine) -> bool:
    with engine.connect() as conn:
        return current_revision(conn) == SCHEMA_HEAD

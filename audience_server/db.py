"""Engines, transactions and the schema's version, for SQLite and PostgreSQL alike.

Transactions belong to the caller at the edge (a request, a worker step): data functions
take a connection and never commit. Writers on SQLite take the write lock up front
(``BEGIN IMMEDIATE``) so that two writers never deadlock upgrading a read lock, and queue
for it first on a thread lock and a lock file, so that they wait without polling.
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The newest migration's revision. Checking a database against it needs no Alembic, whose
# import costs a quarter of a second of every process start; tests/test_migrations.py
# fails if it is not the head of migrations/. Alembic itself is imported to migrate.
SCHEMA_HEAD = "0004"


@dataclass(frozen=True)
class _WriterQueue:
    """SQLite has one writer at a time, and a writer that finds the lock taken polls with
    sleeps (its busy handler: 1, 2, 5 … 100 ms). Queueing first on a thread lock (this
    process) and an ``flock`` on a file beside the database (every process) lets writers
    wait without sleeping. Correctness never depends on it: SQLite's own lock still does."""

    threads: threading.Lock
    lock_file: Path | None  # None for an in-memory database


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
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.get_execution_options().get("audience_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        _sqlite_writers[engine] = _WriterQueue(threading.Lock(), writer_lock_file(url))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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


@contextmanager
def _locked_file(path: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting (asleep in the kernel) for it."""
    try:
        fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:  # e.g. a read-only folder: SQLite's own lock still serialises writers
        fd = None
    if fd is None:
        yield
        return
    try:
        _held_lock_files.add(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _held_lock_files.discard(fd)
        os.close(fd)  # releases the lock


@contextmanager
def _writer_turn(engine: Engine) -> Iterator[None]:
    queue = _sqlite_writers.get(engine)
    if queue is None:  # PostgreSQL: row locks, no single writer
        yield
        return
    with queue.threads, _locked_file(queue.lock_file):
        yield


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One short read-write transaction, committed on success, rolled back on error."""
    with _writer_turn(engine), engine.connect() as conn:
        conn.execution_options(audience_write=True)
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

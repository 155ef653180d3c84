"""Fixtures: a real SQLite file and a real PostgreSQL, each at the migrations' head.

PostgreSQL comes from AUDIENCE_TEST_POSTGRES_URL (a server URL): a run migrates a template
database on it once, and each test gets a fresh copy (``CREATE DATABASE ... TEMPLATE``),
dropped after it; the template is dropped at the end. Without it the PostgreSQL variants skip,
saying so. SQLite tests get a copy of a migrated template file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, make_url
from starlette.testclient import TestClient

from audience_server import db
from audience_server.app import create_app
from audience_server.settings import Settings
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET
from tests.servers import ServerProcess, clear_audience_variables

PG_ENV = "AUDIENCE_TEST_POSTGRES_URL"
clear_audience_variables()  # the shell's AUDIENCE_* settings never change what is tested
BACKENDS = ["sqlite", "postgresql"]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """pytest removes a green run's temp folders but leaves their parent behind, empty."""
    with contextlib.suppress(OSError):  # not empty: a failed test's files are kept there
        (Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}").rmdir()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def _pg_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    url = _pg_admin_url()
    if url is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1/test)")
    return db.normalize_url(url)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """A new database on the server of ``server_url``, empty or a copy of ``template``;
    returns its URL."""
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with _admin(server_url) as conn:
        _drop(conn, name)
        conn.execute(create)
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop the database, cutting whatever connections are still open to it."""
    with _admin(server_url) as conn:
        _drop(conn, name)


def _admin(server_url: str) -> psycopg.Connection[Any]:
    conninfo = make_url(server_url).set(drivername="postgresql")
    return psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True)


def _drop(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_template(postgres_server_url: str) -> Iterator[str]:
    """A database at the migrations' head, made once a run; its name. Tests get copies."""
    name = f"audience_template_{os.getpid()}"
    engine = db.make_engine(create_database(postgres_server_url, name))
    db.migrate(engine)
    engine.dispose()  # CREATE DATABASE ... TEMPLATE refuses while anyone is connected to it
    yield name
    drop_database(postgres_server_url, name)


_copies = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server_url: str, postgres_template: str) -> Iterator[str]:
    """A fresh copy of the migrated template for one test, dropped after it."""
    name = f"audience_test_{os.getpid()}_{next(_copies)}"
    yield create_database(postgres_server_url, name, template=postgres_template)
    drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "audience.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "audience.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def hook() -> Iterator[WebhookEmulator]:
    """A strict signed-webhook receiver on loopback, verifying ``HOOK_SECRET``."""
    with WebhookEmulator(HOOK_SECRET) as emulator:
        yield emulator


@pytest.fixture
def receiving(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server process without worker or destinations: sessions stay where the test
    puts them."""
    server = ServerProcess(database_url, tmp_path / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture
def fast(database_url: str) -> Settings:
    """Settings for deliveries that retry: short backoff, a short poll, four attempts."""
    return Settings(
        database_url=database_url,
        retry_base=dt.timedelta(milliseconds=20),
        retry_cap=dt.timedelta(milliseconds=100),
        poll_interval=dt.timedelta(milliseconds=50),
        delivery_max_attempts=4,
    )


@pytest.fixture
def client(settings: Settings, engine: Engine, clock: FakeClock) -> Iterator[TestClient]:
    """The app without a delivery worker: sessions stop at ``complete``."""
    app = create_app(
        settings, engine=engine, clock=clock, sweeper=False, destinations={}, worker=False
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def make_users(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "edgeTagId": f"et_{i}",
            "email": f"user{i}@example.com",
            "phone": f"+1415555{i:04d}",
            "firstName": "Jane",
            "lastName": "Doe",
            "country": "US",
            "postalCode": "90202",
            "purchase": [{"sku": f"sku-{i % 7}", "amount": 12.5}],
        }
        for i in range(start, start + count)
    ]

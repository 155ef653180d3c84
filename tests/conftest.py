"""Fixtures: a real SQLite file and a real PostgreSQL, each at the migrations' head.

PostgreSQL comes from AUDIENCE_TEST_POSTGRES_URL (a server URL; the tests create and drop
their own database on it). Without it the PostgreSQL variants skip, saying so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, make_url, text
from starlette.testclient import TestClient

from audience_server import db
from audience_server.app import create_app
from audience_server.models import metadata
from audience_server.settings import Settings
from tests.servers import clear_audience_variables

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


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server of ``server_url``; returns its URL."""
    conninfo = make_url(server_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    conninfo = make_url(server_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """One migrated database for the whole run; tests empty it before use."""
    name = f"audience_test_{os.getpid()}"
    url = create_database(postgres_server_url, name)
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    yield url
    drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "audience.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    engine.dispose()
    return path


def truncate_all(engine: Engine) -> None:
    names = ", ".join(table.name for table in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "audience.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    engine = db.make_engine(url)
    truncate_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


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

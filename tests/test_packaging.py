"""A wheel of the project, installed (not editable) into a fresh venv, migrates and serves.

The wheel is built from a copy of the working tree's files, not in the checkout itself: an
in-tree build reuses ``build/lib`` and ``audience_server.egg-info/SOURCES.txt``, which still
list files that a changed ``package-data`` no longer ships, and would hide that mistake.
The fresh venv sees this venv's dependencies through a ``.pth`` line (no downloads); such a
directory's own ``.pth`` files (the editable install's finder) are not processed, so
``audience_server`` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from audience_server import db
from tests.conftest import create_database, drop_database
from tests.helpers import eventually, form
from tests.servers import clean_env, free_port

REPO = Path(__file__).resolve().parent.parent
USERS = [{"email": "a@example.com"}, {"email": "b@example.com"}]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Installed:
    """A fresh venv holding the wheel, and the wheel itself."""

    venv: Path
    wheel: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def source_files() -> list[str]:
    """The working tree's files as git sees them: tracked or new, never ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(name for name in listed.split("\0") if name and (REPO / name).is_file())


def fresh_env(tmp: Path, **audience: str) -> dict[str, str]:
    """A subprocess environment without AUDIENCE_* or PYTHONPATH (either could hide what the
    wheel does), whose temporary files stay under ``tmp``."""
    env = clean_env(**audience)
    env.pop("PYTHONPATH", None)
    scratch = tmp / "tmp"
    scratch.mkdir(exist_ok=True)
    return env | {"TMPDIR": str(scratch), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    output = f"{result.stdout[-1500:]}{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{output}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    env = fresh_env(root)
    source = root / "source"
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip"]
    run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            dist,
            source,
        ],
        cwd=root,
        env=env,
    )
    (wheel,) = dist.glob("*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    run(
        [*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        cwd=root,
        env=env,
    )
    # Only now: pip must not see this venv's editable audience-server as already installed.
    purelib = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
    ).stdout.strip()
    (Path(purelib) / "audience-test-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return Installed(venv=venv, wheel=wheel)


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@contextmanager
def serving(installed: Installed, cwd: Path, log: Path, **audience: str) -> Iterator[str]:
    """``audience-server serve`` of the fresh venv, run in ``cwd``; yields its URL once ready,
    then stops it with SIGTERM and checks that it shuts down cleanly and soon."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(installed.bin / "audience-server"), "serve", "--port", str(port)],
            cwd=cwd,
            env=fresh_env(log.parent, **audience),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited {process.returncode}:\n{read_log(log)}")
            try:
                if httpx2.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {READY_TIMEOUT:g} s:\n{read_log(log)}")
            time.sleep(0.05)  # polling for readiness, not waiting for a result
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code: int | None = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
    # uvicorn re-raises the signal it caught once shutdown is done, so a clean stop ends
    # with -SIGTERM (143 in a shell), as an unhandled SIGTERM would: the log tells them apart.
    assert code in (0, -signal.SIGTERM), f"SIGTERM gave exit {code}:\n{read_log(log)}"
    assert "Application shutdown complete" in read_log(log), read_log(log)


def post_batch(url: str, session_id: str) -> httpx2.Response:
    """One complete batch of USERS, as EdgeTag sends it (multipart/form-data)."""
    fields = form(session_id, 1, 1, len(USERS), USERS, name="Wheel test")
    files = {key: (None, value) for key, value in fields.items()}
    return httpx2.post(f"{url}/audience", files=files, timeout=10)


def session(url: str, session_id: str) -> dict[str, Any]:
    response = httpx2.get(f"{url}/audience/sessions/{session_id}", timeout=10)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def store_and_deliver(url: str, session_id: str) -> dict[str, Any]:
    response = post_batch(url, session_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    view = session(url, session_id)
    assert (view["receivedBatches"], view["receivedUsers"]) == (1, len(USERS))
    return eventually(lambda: session(url, session_id), lambda v: v["state"] == "delivered")


def empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.slow
def test_wheel_ships_the_package_with_its_migrations_and_no_tests(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    package = {name for name in names if name.startswith("audience_server/")}
    expected = {name for name in source_files() if name.startswith("audience_server/")}
    versions = {
        name
        for name in expected
        if name.startswith("audience_server/migrations/versions/") and name.endswith(".py")
    }
    assert versions, "the checkout has no migrations: the comparison below would prove nothing"
    assert {"audience_server/migrations/env.py", *versions} <= package
    assert package == expected, (
        f"missing from the wheel: {sorted(expected - package)}; "
        f"not in the checkout: {sorted(package - expected)}"
    )
    tops = {name.split("/")[0] for name in names} - {"audience_server"}
    assert all(top.endswith(".dist-info") for top in tops), tops  # no tests/, no migrations/


@pytest.mark.slow
def test_fresh_venv_imports_the_wheel_not_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    code = "import alembic, audience_server; print(audience_server.__file__, alembic.__file__)"
    result = run(
        [installed.bin / "python", "-c", code], empty_dir(tmp_path / "cwd"), fresh_env(tmp_path)
    )
    package, dependency = (Path(path).resolve() for path in result.stdout.split())
    assert package.is_relative_to(installed.venv.resolve()), package
    assert dependency.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve())


@pytest.mark.slow
def test_wheel_serves_and_delivers_on_sqlite_with_the_defaults(
    installed: Installed, tmp_path: Path
) -> None:
    cwd = empty_dir(tmp_path / "cwd")
    with serving(installed, cwd, tmp_path / "server.log") as url:
        view = store_and_deliver(url, "wheel-1")
    assert [(d["destination"], d["state"]) for d in view["deliveries"]] == [("file", "succeeded")]
    assert (cwd / "audience.db").is_file()
    delivered = (cwd / "deliveries" / "wheel-1.ndjson").read_text().splitlines()
    assert sorted(json.loads(line)["email"] for line in delivered) == [u["email"] for u in USERS]


@pytest.mark.slow
def test_wheel_migrates_and_serves_postgresql(
    installed: Installed, postgres_server_url: str, tmp_path: Path
) -> None:
    name = f"audience_wheel_{os.getpid()}"
    database_url = create_database(postgres_server_url, name)
    try:
        cwd = empty_dir(tmp_path / "cwd")
        migrate = run(
            [installed.bin / "audience-server", "migrate"],
            cwd,
            fresh_env(tmp_path, AUDIENCE_DATABASE_URL=database_url),
        )
        assert f"schema at revision {db.head_revision()}" in migrate.stdout
        with serving(
            installed, cwd, tmp_path / "server.log", AUDIENCE_DATABASE_URL=database_url
        ) as url:
            store_and_deliver(url, "wheel-1")
        assert not (cwd / "audience.db").exists()  # the URL was used, not the SQLite default
    finally:
        drop_database(postgres_server_url, name)


def test_repo_alembic_ini_upgrades_the_database_it_is_given(tmp_path: Path) -> None:
    database = tmp_path / "x.db"
    elsewhere = empty_dir(tmp_path / "elsewhere")
    run(
        [sys.executable, "-m", "alembic", "-c", REPO / "alembic.ini", "upgrade", "head"],
        elsewhere,
        # the server's other settings have no say in a migration, even broken ones
        clean_env(AUDIENCE_DATABASE_URL=f"sqlite:///{database}", AUDIENCE_PORT="abc"),
    )
    assert list(elsewhere.iterdir()) == [], "migrated the default ./audience.db instead"
    assert database.is_file(), "AUDIENCE_DATABASE_URL was not used"
    with closing(sqlite3.connect(database)) as conn:
        versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(db.head_revision(),)]

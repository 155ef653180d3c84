"""What the benchmarks share: loopback server processes, scratch databases, upload bodies,
and the report's small helpers."""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
BOUNDARY = "audience-bench-" + "5f3c9e21d7a84b06"
STARTUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 300.0


class BenchError(RuntimeError):
    """A process did not start or failed, or a server answered with something unexpected."""


# --- processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server to measure: how to start it, and which SPEC ratio applies to it."""

    name: str
    kind: str  # "floor", "sqlite" or "postgresql" (ingest); free-form elsewhere
    command: list[str]
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def audience_server_command() -> list[str]:
    script = Path(sys.executable).with_name("audience-server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "audience_server"]


def server_env(database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    env["AUDIENCE_LOG_LEVEL"] = "WARNING"  # a log line per batch would be part of the cost
    if database_url is not None:
        env["AUDIENCE_DATABASE_URL"] = database_url
    return env


def http_get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    """A running target process and the port it answers on."""

    target: Target
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path


@contextlib.contextmanager
def running(target: Target, workdir: Path) -> Iterator[Server]:
    """Start ``target`` on a free port, wait for ``/healthz``, and always stop it."""
    port = free_port()
    log_path = workdir / f"{target.name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*target.command, "--host", HOST, "--port", str(port)],
            cwd=ROOT,
            env=target.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches only us; we stop it ourselves
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise BenchError(
                    f"{target.name} exited with {process.returncode}:\n{log_tail(log_path)}"
                )
            with contextlib.suppress(OSError):
                if http_get(port, "/healthz") == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"{target.name} did not answer /healthz:\n{log_tail(log_path)}")
            time.sleep(0.1)
        yield Server(target, port, process, log_path)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (uvicorn's graceful stop), then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)


def raise_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C does, so ``finally`` blocks clean up."""
    raise SystemExit(128 + signum)


# --- PostgreSQL ------------------------------------------------------------------------


def _admin_conninfo(admin_url: str) -> str:
    from sqlalchemy.engine import make_url

    server = make_url(admin_url).set(drivername="postgresql")
    return server.render_as_string(hide_password=False)


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on ``admin_url``'s server."""
    from sqlalchemy.engine import make_url

    server = make_url(admin_url).set(drivername="postgresql")
    return server.set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(_admin_conninfo(admin_url), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def postgres_database(
    admin_url: str,
    workdir: Path,
    name: str | None = None,
    template: str | None = None,
    migrate_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A new database on ``admin_url``'s server, dropped at the end: migrated to head (by
    ``audience-server migrate`` in ``migrate_env``, e.g. another checkout's), or a copy of
    the database ``template`` (which nobody may be connected to)."""
    import psycopg
    from psycopg import sql

    name = name or f"audience_bench_{os.getpid()}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(_admin_conninfo(admin_url), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(create)
    try:
        url = database_url(admin_url, name)
        if template is None:
            result = subprocess.run(
                [*audience_server_command(), "migrate"],
                cwd=workdir,
                env=server_env(url) | (migrate_env or {}),
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise BenchError(f"migrate failed:\n{result.stdout}{result.stderr}")
        yield url
    finally:
        drop_database(admin_url, name)


# --- uploads ---------------------------------------------------------------------------


def form_field(name: str, value: bytes) -> bytes:
    """One part of a ``multipart/form-data`` body delimited by :data:`BOUNDARY`."""
    header = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
    return header.encode() + value + b"\r\n"


def post_batch(conn: http.client.HTTPConnection, body: bytes, what: str) -> float:
    """Send one batch; its latency in ms. Anything but 200 ``{"success": true}`` fails."""
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(body)),
    }
    start = time.perf_counter()
    try:
        conn.request("POST", "/audience", body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{what}: {type(exc).__name__}: {exc}") from exc
    elapsed = (time.perf_counter() - start) * 1000
    try:
        ok = response.status == 200 and orjson.loads(answer) == {"success": True}
    except orjson.JSONDecodeError:
        ok = False
    if not ok:
        raise BenchError(f"{what}: HTTP {response.status}: {answer[:500]!r}")
    return elapsed


# --- the report ------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "MISS")


def git_revision(root: Path = ROOT) -> str:
    """The short HEAD, with ``+dirty`` when ``audience_server/`` has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "audience_server"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}"


def count_lines(path: Path) -> int:
    """Lines of a file (NDJSON: users), read a MiB at a time."""
    count = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
    return count


def machine(load_at_start: float, **more: Any) -> dict[str, Any]:
    """What a results file says of the machine it was measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": load_at_start,
        **more,
    }

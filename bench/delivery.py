"""Delivery benchmark (SPEC §7 "Memory", and delivery throughput): the real worker against
a bare baseline, each a separate process.

Preparation: for each size, the real server (``serve`` with no worker and no destination)
receives ONE session of that many users in 10,000-user batches over HTTP and is stopped,
leaving a database that holds one complete session. Every measured run then gets a fresh
copy of that database (a file copy on SQLite, ``CREATE DATABASE … TEMPLATE`` on
PostgreSQL), so every run does the same work from the same state.

- Memory: ``audience-server worker --drain`` with one ``file`` destination, as its own
  process; its peak RSS (``ru_maxrss`` from ``wait4``) for the small and the large session.
  SPEC §7: RSS(2,000,000 users) ≤ 1.3 x RSS(200,000 users).
- Throughput: users/s of that worker on the small session to the ``file`` destination and
  to a ``webhook`` destination (a loopback receiver process, ``bench.receiver``), each next
  to ``bench.baseline_delivery`` doing the same delivery barely (read, decode, write or
  POST the same chunks; no duplicate detection, leases or progress records). Worker and
  baseline runs alternate; medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import http.client
import itertools
import os
import platform
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .common import (
    BOUNDARY,
    HOST,
    REQUEST_TIMEOUT_S,
    RESULTS_DIR,
    ROOT,
    BenchError,
    Target,
    audience_server_command,
    count_lines,
    form_field,
    git_revision,
    log_tail,
    post_batch,
    postgres_database,
    raise_on_sigterm,
    running,
    server_env,
    stop,
    verdict,
)

MEMORY_LIMIT = 1.3  # SPEC §7: peak RSS for the large session ÷ that for the small one
SEGMENT_NAME = "bench delivery"
TENANT = "default"
HOOK_SECRET = "bench-hook-secret"
WEBHOOK_CHUNK = 1_000  # the webhook provider's default chunk size
RUN_TIMEOUT_S = 900.0
POLL_S = 0.005  # how often a measured process is checked for its exit
IDLE_IMPORT_ROUNDS = 3

# --- the segment -----------------------------------------------------------------------

_FIRST = [
    "Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiro", "Inès", "Jonas",
    "Kwame", "Léa", "Mateo", "Nadia", "Olu", "Priya", "Quentin", "Rosa", "Søren", "Tomás",
]  # fmt: skip
_LAST = [
    "Okafor", "Schmidt", "García", "Tanaka", "Novak", "Silva", "Kowalski", "Nguyen",
    "O'Brien", "Müller", "Rossi", "Haddad", "Kim", "Johansson", "Da Costa", "Petrov",
]  # fmt: skip
_DOMAINS = ["example.com", "mail.example.org", "example.net", "example.co.uk"]
_COUNTRIES = ["US", "DE", "FR", "GB", "JP", "BR", "NG", "PL", "IT", "ES", "IN", "CA"]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY"]


def make_user(rng: random.Random) -> dict[str, Any]:
    """One plausible user, about 220 bytes of JSON (the random ``edgeTagId`` makes it unique).

    Fields come and go and change type as in real exports: phones in several formats or as
    an integer, a missing or null name, an optional ``externalId``, 0-2 purchases."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{last}_{first}", first))
    if rng.random() < 0.8:
        local = local.lower()
    user: dict[str, Any] = {
        "edgeTagId": f"{rng.getrandbits(80):020x}",
        "email": f"{local.replace(' ', '')}{rng.randrange(1000)}@{rng.choice(_DOMAINS)}",
    }
    shape = rng.random()
    if shape < 0.5:
        user["phone"] = f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}"
    elif shape < 0.75:
        user["phone"] = f"+44 20 {rng.randrange(1000, 9999)} {rng.randrange(10_000):04d}"
    elif shape < 0.85:
        user["phone"] = rng.randrange(491_500_000_000, 491_799_999_999)
    if rng.random() < 0.2:
        user["externalId"] = f"crm-{rng.randrange(10**9):09d}"
    user["firstName"] = first
    user["lastName"] = last if rng.random() < 0.95 else None
    user["country"] = rng.choice(_COUNTRIES)
    user["postalCode"] = f"{rng.randrange(10_000, 99_999)}"
    user["purchase"] = [
        {"sku": f"SKU-{rng.randrange(1000, 9999)}", "value": rng.randrange(500, 20_000) / 100}
        for _ in range(rng.choice((0, 0, 1, 1, 2)))
    ]
    if rng.random() < 0.2:
        user["purchase"][:1] = [{"sku": "GIFT", "value": 0, "currency": rng.choice(_CURRENCIES)}]
    return user


@dataclass(frozen=True)
class SegmentPlan:
    """A session of ``users`` users in batches; ``duplicates`` of them repeat an earlier one."""

    session_key: str
    users: int
    batch_size: int
    duplicates_per_batch: int
    seed: int

    @property
    def total_batches(self) -> int:
        return -(-self.users // self.batch_size)

    def batch_users(self, sequence: int) -> int:
        return min(self.batch_size, self.users - (sequence - 1) * self.batch_size)

    def duplicates_in(self, sequence: int) -> int:
        return min(self.duplicates_per_batch, self.batch_users(sequence) // 2)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicates_in(s) for s in range(1, self.total_batches + 1))

    @property
    def unique_users(self) -> int:
        return self.users - self.duplicates


def batch_bodies(plan: SegmentPlan) -> Iterator[bytes]:
    """The multipart bodies of the session's batches, sequences 1..N, built one at a time.

    Each batch repeats ``duplicates_in(sequence)`` users exactly, some from earlier batches
    and some from its own, half of them with their keys in another order (still equal)."""
    rng = random.Random(plan.seed)
    earlier: list[dict[str, Any]] = []  # a sample of users of earlier batches
    closing = f"--{BOUNDARY}--\r\n".encode()
    head = form_field("name", SEGMENT_NAME.encode()) + form_field("type", b"custom")
    for sequence in range(1, plan.total_batches + 1):
        size, repeats = plan.batch_users(sequence), plan.duplicates_in(sequence)
        users = [make_user(rng) for _ in range(size - repeats)]
        for index in range(repeats):
            pool = earlier if earlier and index % 2 == 0 else users
            copy = dict(rng.choice(pool))
            if index % 4 < 2:
                copy = dict(reversed(copy.items()))
            users.insert(rng.randrange(len(users) + 1), copy)
        earlier.extend(rng.sample(users[: size - repeats], min(20, size - repeats)))
        batch = {
            "sessionId": plan.session_key,
            "sequence": sequence,
            "totalBatches": plan.total_batches,
            "totalUsers": plan.users,
        }
        yield (
            head
            + form_field("batch", orjson.dumps(batch))
            + form_field("users", orjson.dumps(users))
            + closing
        )


# --- databases -------------------------------------------------------------------------


class Databases:
    """Scratch databases of one backend: SQLite files in the work directory, or databases
    on a PostgreSQL server. Everything made is removed when the benchmark ends."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack, admin_url: str | None):
        self.workdir = workdir
        self.stack = stack
        self.admin_url = admin_url
        self.kind = "sqlite" if admin_url is None else "postgresql"
        self._names: dict[str, str] = {}  # url -> PostgreSQL database name

    def _pg_name(self, label: str) -> str:
        return f"audience_bench_delivery_{os.getpid()}_{label}"

    def empty(self, label: str) -> str:
        """A database at the migrations' head, kept until the end."""
        if self.admin_url is None:
            return f"sqlite:///{self.workdir / f'{label}.db'}"  # the server migrates it
        name = self._pg_name(label)
        url = self.stack.enter_context(postgres_database(self.admin_url, self.workdir, name))
        self._names[url] = name
        return url

    def settle(self, url: str) -> None:
        """Fold SQLite's write-ahead log into the file, so that a file copy is whole."""
        if self.admin_url is None:
            conn = sqlite3.connect(url.removeprefix("sqlite:///"))
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    @contextlib.contextmanager
    def copy(self, source: str, label: str) -> Iterator[str]:
        """A fresh copy of ``source`` for one run, removed after it."""
        if self.admin_url is None:
            path = self.workdir / f"{label}.db"
            shutil.copyfile(source.removeprefix("sqlite:///"), path)
            try:
                yield f"sqlite:///{path}"
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        with postgres_database(
            self.admin_url, self.workdir, self._pg_name(label), template=self._names[source]
        ) as url:
            yield url


def prepare_session(databases: Databases, plan: SegmentPlan, workdir: Path) -> str:
    """A database holding ``plan``'s session, complete and not yet assembled."""
    url = databases.empty(f"prepared_{plan.users}")
    env = server_env(url)
    env["AUDIENCE_WORKER"] = "false"
    env["AUDIENCE_DESTINATIONS"] = str(workdir / "none.toml")  # an empty file: none
    target = Target(
        f"prepare-{plan.users}", databases.kind, [*audience_server_command(), "serve"], env
    )
    with (
        running(target, workdir) as server,
        ThreadPoolExecutor(2, "bench-prepare") as pool,
    ):
        conns = [
            http.client.HTTPConnection(HOST, server.port, timeout=REQUEST_TIMEOUT_S)
            for _ in range(2)
        ]
        in_flight: list[Future[float]] = []
        try:
            for sequence, body in enumerate(batch_bodies(plan), start=1):
                if len(in_flight) == len(conns):
                    in_flight.pop(0).result()
                conn = conns[sequence % len(conns)]
                in_flight.append(pool.submit(post_batch, conn, body, f"prepare batch {sequence}"))
                if sequence == plan.total_batches - 1:  # the completing batch goes alone
                    for future in in_flight:
                        future.result()
                    in_flight.clear()
            for future in in_flight:
                future.result()
            status, view = get_json(server.port, f"/audience/sessions/{plan.session_key}")
        finally:
            for conn in conns:
                conn.close()
    if status != 200 or view.get("state") != "complete" or view.get("receivedUsers") != plan.users:
        raise BenchError(f"the prepared session is not complete: HTTP {status}: {view}")
    databases.settle(url)
    return url


def get_json(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


# --- measured processes ----------------------------------------------------------------


@dataclass
class ProcessRun:
    """A finished process: its wall time, peak RSS and what it printed."""

    wall_s: float
    max_rss_mib: float
    rss_source: str  # "wait4" (exact) or "VmHWM" (sampled every POLL_S)
    stdout: bytes


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak RSS so far, from /proc; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(command: Sequence[str], env: dict[str, str], log_path: Path) -> ProcessRun:
    """Run ``command`` to its end; raises BenchError unless it exits with 0.

    Peak RSS: ``ru_maxrss`` from ``wait4`` is exact for that one process, except that Linux
    carries the parent's peak over into a child at ``exec``: when the figure does not exceed
    this process's own peak it says nothing, and the peak sampled from /proc is used."""
    out_path = log_path.with_suffix(".out")
    own_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Write back what earlier runs left dirty (database copies, deleted outputs) now, rather
    # than under the fsyncs of this run.
    os.sync()
    sampled_kib = 0
    with log_path.open("wb") as log, out_path.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=log, start_new_session=True
        )
    try:
        deadline = started + RUN_TIMEOUT_S
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - started
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{command[0]} ran over {RUN_TIMEOUT_S:g} s:\n{log_tail(log_path)}"
                )
            sampled_kib = max(sampled_kib, _vm_hwm_kib(process.pid))
            time.sleep(POLL_S)
    finally:
        stop(process)
    if process.returncode != 0:
        raise BenchError(
            f"{' '.join(command)} exited with {process.returncode}:\n{log_tail(log_path)}"
        )
    if usage.ru_maxrss > own_peak_kib + 1024:
        peak_kib, source = usage.ru_maxrss, "wait4"
    else:
        peak_kib, source = sampled_kib, "VmHWM"
    return ProcessRun(wall, peak_kib / 1024, source, out_path.read_bytes())


def worker_env(url: str, destinations: Path, workdir: Path) -> dict[str, str]:
    env = server_env(url)
    env["AUDIENCE_DESTINATIONS"] = str(destinations)
    env["TMPDIR"] = str(workdir / "tmp")  # where assembly keeps its scratch file
    return env


@dataclass
class Delivered:
    """What the database says a worker run did."""

    session_state: str
    unique_users: int | None
    delivery_state: str
    users_sent: int
    attempts: int
    last_error: str | None
    to_assembled_s: float  # from the worker's start to the end of assembly
    delivery_s: float  # the delivery attempt, from its claim to its end


def delivered(url: str, session_key: str, started_at: dt.datetime) -> Delivered:
    from sqlalchemy import select

    from audience_server import db
    from audience_server.models import deliveries, delivery_attempts, events, sessions

    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            session = conn.execute(
                select(sessions.c.state, sessions.c.unique_users).where(
                    sessions.c.tenant == TENANT, sessions.c.session_key == session_key
                )
            ).one()
            delivery = conn.execute(
                select(deliveries).where(
                    deliveries.c.tenant == TENANT, deliveries.c.session_key == session_key
                )
            ).one()
            attempt = conn.execute(
                select(delivery_attempts.c.started_at, delivery_attempts.c.finished_at)
                .where(
                    delivery_attempts.c.tenant == TENANT,
                    delivery_attempts.c.session_key == session_key,
                )
                .order_by(delivery_attempts.c.number.desc())
            ).first()
            assembled_at = conn.execute(
                select(events.c.at).where(
                    events.c.tenant == TENANT,
                    events.c.session_key == session_key,
                    events.c.kind == "assembled",
                )
            ).scalar()
    finally:
        engine.dispose()
    return Delivered(
        session_state=session.state,
        unique_users=session.unique_users,
        delivery_state=delivery.state,
        users_sent=delivery.users_sent,
        attempts=delivery.attempts,
        last_error=delivery.last_error,
        to_assembled_s=(assembled_at - started_at).total_seconds() if assembled_at else 0.0,
        delivery_s=(attempt.finished_at - attempt.started_at).total_seconds()
        if attempt is not None and attempt.finished_at is not None
        else 0.0,
    )


# --- runs ------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured process: the worker or the baseline, to one destination kind."""

    target: str  # worker-file, baseline-file, worker-webhook, baseline-webhook, idle-*
    users: int  # users in the session (duplicates included): what was read
    round: int
    warmup: bool
    wall_s: float
    max_rss_mib: float
    rss_source: str
    delivered_users: int
    in_process_s: float | None = None  # baseline: after its imports
    to_assembled_s: float | None = None  # worker: start to end of assembly
    delivery_s: float | None = None  # worker: the delivery attempt

    @property
    def users_per_s(self) -> float:
        return self.users / self.wall_s


@dataclass
class Bench:
    """What every run needs: the work directory, databases, destinations and receiver."""

    workdir: Path
    databases: Databases
    file_destinations: Path
    webhook_destinations: Path
    receiver_port: int
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def label(self, what: str) -> str:
        return f"{what.replace('-', '_')}_{next(self.counter)}"


def run_worker_file(
    bench: Bench, source: str, plan: SegmentPlan, index: int, warmup: bool
) -> list[Run]:
    """The worker delivering ``plan``'s session to the file destination, then the same
    worker started again with nothing left to do (its fixed cost)."""
    label = bench.label(f"worker_file_{plan.users}")
    out = bench.workdir / "out" / f"{plan.session_key}.ndjson"
    with bench.databases.copy(source, label) as url:
        env = worker_env(url, bench.file_destinations, bench.workdir)
        started_at = dt.datetime.now(dt.UTC)
        result = measure(
            [*audience_server_command(), "worker", "--drain"], env, bench.workdir / f"{label}.log"
        )
        record = delivered(url, plan.session_key, started_at)
        check_delivered(record, plan, "worker-file")
        lines = count_lines(out)
        out.unlink()
        if lines != plan.unique_users:
            raise BenchError(f"worker-file wrote {lines} lines; expected {plan.unique_users}")
        idle = measure(
            [*audience_server_command(), "worker", "--drain"],
            env,
            bench.workdir / f"{label}-idle.log",
        )
    run = Run(
        target="worker-file",
        users=plan.users,
        round=index,
        warmup=warmup,
        wall_s=result.wall_s,
        max_rss_mib=result.max_rss_mib,
        rss_source=result.rss_source,
        delivered_users=lines,
        to_assembled_s=record.to_assembled_s,
        delivery_s=record.delivery_s,
    )
    idle_run = Run(
        "idle-worker", 0, index, warmup, idle.wall_s, idle.max_rss_mib, idle.rss_source, 0
    )
    return [run, idle_run]


def check_delivered(record: Delivered, plan: SegmentPlan, what: str) -> None:
    if (
        record.session_state != "delivered"
        or record.delivery_state != "succeeded"
        or record.attempts != 1
        or record.unique_users != plan.unique_users
        or record.users_sent != plan.unique_users
    ):
        raise BenchError(f"{what}: the delivery did not succeed as expected: {record}")


def run_worker_webhook(
    bench: Bench, source: str, plan: SegmentPlan, index: int, warmup: bool
) -> list[Run]:
    label = bench.label("worker_webhook")
    with bench.databases.copy(source, label) as url:
        env = worker_env(url, bench.webhook_destinations, bench.workdir)
        before = receiver_stats(bench.receiver_port)
        started_at = dt.datetime.now(dt.UTC)
        result = measure(
            [*audience_server_command(), "worker", "--drain"], env, bench.workdir / f"{label}.log"
        )
        received = check_received(bench.receiver_port, before, plan, "worker-webhook")
        record = delivered(url, plan.session_key, started_at)
        check_delivered(record, plan, "worker-webhook")
    run = Run(
        target="worker-webhook",
        users=plan.users,
        round=index,
        warmup=warmup,
        wall_s=result.wall_s,
        max_rss_mib=result.max_rss_mib,
        rss_source=result.rss_source,
        delivered_users=received,
        to_assembled_s=record.to_assembled_s,
        delivery_s=record.delivery_s,
    )
    return [run]


def run_baseline(
    bench: Bench, source: str, plan: SegmentPlan, index: int, warmup: bool, mode: str
) -> list[Run]:
    label = bench.label(f"baseline_{mode}")
    out = bench.workdir / "out" / f"baseline-{plan.session_key}.ndjson"
    with bench.databases.copy(source, label) as url:
        command = [
            sys.executable,
            "-m",
            "bench.baseline_delivery",
            mode,
            "--database-url",
            url,
            "--session",
            plan.session_key,
        ]
        if mode == "file":
            command += ["--out", str(out)]
        else:
            command += [
                "--url",
                f"http://{HOST}:{bench.receiver_port}/hook",
                "--secret",
                HOOK_SECRET,
                "--chunk-size",
                str(WEBHOOK_CHUNK),
                "--segment-name",
                "blotout_" + SEGMENT_NAME.replace(" ", "_"),
                "--name",
                SEGMENT_NAME,
            ]
        before = receiver_stats(bench.receiver_port) if mode == "webhook" else None
        result = measure(command, server_env(), bench.workdir / f"{label}.log")
    report = orjson.loads(result.stdout)
    if mode == "file":
        users = count_lines(out)
        out.unlink()
    else:
        assert before is not None
        users = check_received(bench.receiver_port, before, plan, f"baseline-{mode}", plan.users)
    if users != plan.users or report["users"] != plan.users:
        raise BenchError(f"baseline-{mode} delivered {users} users; expected {plan.users}")
    run = Run(
        target=f"baseline-{mode}",
        users=plan.users,
        round=index,
        warmup=warmup,
        wall_s=result.wall_s,
        max_rss_mib=result.max_rss_mib,
        rss_source=result.rss_source,
        delivered_users=users,
        in_process_s=report["seconds"],
    )
    return [run]


def receiver_stats(port: int) -> dict[str, Any]:
    status, stats = get_json(port, "/stats")
    if status != 200:
        raise BenchError(f"the receiver answered /stats with HTTP {status}")
    result: dict[str, Any] = stats
    return result


def check_received(
    port: int, before: dict[str, Any], plan: SegmentPlan, what: str, expected: int | None = None
) -> int:
    """The users the receiver got since ``before``; raises unless all were well signed."""
    after = receiver_stats(port)
    expected = plan.unique_users if expected is None else expected
    users: int = after["users"] - before["users"]
    bad = (after["bad_signatures"] - before["bad_signatures"]) + (
        after["bad_bodies"] - before["bad_bodies"]
    )
    lasts = (
        after["sessions"][plan.session_key][2]
        - before["sessions"].get(plan.session_key, [0, 0, 0])[2]
    )
    if users != expected or bad or lasts != 1:
        raise BenchError(
            f"{what}: the receiver got {users} users (expected {expected}), "
            f"{bad} bad requests, {lasts} last chunks"
        )
    return users


def idle_import_rss(workdir: Path) -> float:
    """Peak RSS of a process that only imports the worker's module."""
    result = measure(
        [sys.executable, "-c", "import audience_server.worker"],
        server_env(),
        workdir / "idle-import.log",
    )
    return result.max_rss_mib


# --- the report ------------------------------------------------------------------------


@dataclass
class Throughput:
    target: str
    rounds: int
    users_per_s: float  # users in the session / process wall time, median
    wall_s: float
    ratio: float | None = None  # to the baseline of the same destination kind
    net_users_per_s: float | None = None  # worker: wall minus an idle worker; baseline: in-process
    net_ratio: float | None = None
    to_assembled_s: float | None = None
    delivery_s: float | None = None
    max_rss_mib: float = 0.0


@dataclass
class Memory:
    users: int
    rounds: int
    max_rss_mib: float  # median over rounds
    wall_s: float
    users_per_s: float
    by_round_mib: list[float]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize_throughput(runs: Sequence[Run], users: int) -> list[Throughput]:
    """Worker and baseline runs on the session of ``users`` users, with their ratios."""
    counted = [r for r in runs if not r.warmup and r.users in (0, users)]
    idle_wall = _median([r.wall_s for r in counted if r.target == "idle-worker"])
    summaries: dict[str, Throughput] = {}
    for target in ("baseline-file", "worker-file", "baseline-webhook", "worker-webhook"):
        mine = [r for r in counted if r.target == target and r.users]
        if not mine:
            continue
        wall = _median([r.wall_s for r in mine])
        summary = Throughput(
            target=target,
            rounds=len(mine),
            users_per_s=_median([r.users_per_s for r in mine]),
            wall_s=wall,
            max_rss_mib=_median([r.max_rss_mib for r in mine]),
        )
        if target.startswith("baseline"):
            summary.net_users_per_s = _median([users / (r.in_process_s or wall) for r in mine])
        else:
            summary.net_users_per_s = _median([users / (r.wall_s - idle_wall) for r in mine])
            summary.to_assembled_s = _median([r.to_assembled_s or 0.0 for r in mine])
            summary.delivery_s = _median([r.delivery_s or 0.0 for r in mine])
            baseline = summaries.get(target.replace("worker", "baseline"))
            if baseline is not None and baseline.net_users_per_s:
                summary.ratio = summary.users_per_s / baseline.users_per_s
                summary.net_ratio = summary.net_users_per_s / baseline.net_users_per_s
        summaries[target] = summary
    return list(summaries.values())


def summarize_memory(runs: Sequence[Run]) -> list[Memory]:
    memory = []
    for users in sorted({r.users for r in runs if r.target == "worker-file"}):
        mine = [r for r in runs if r.target == "worker-file" and r.users == users and not r.warmup]
        memory.append(
            Memory(
                users=users,
                rounds=len(mine),
                max_rss_mib=_median([r.max_rss_mib for r in mine]),
                wall_s=_median([r.wall_s for r in mine]),
                users_per_s=_median([r.users_per_s for r in mine]),
                by_round_mib=[round(r.max_rss_mib, 1) for r in mine],
            )
        )
    return memory


@dataclass
class Idle:
    """Context for the RSS figures: processes that deliver nothing."""

    import_mib: float  # python -c "import audience_server.worker"
    worker_mib: float  # worker --drain with nothing to do
    worker_s: float
    worker_rounds: int


def format_report(
    memory: Sequence[Memory], throughput: Sequence[Throughput], idle: Idle, backend: str
) -> tuple[str, float | None, bool | None]:
    """The tables, and the memory ratio with its verdict."""
    lines = [f"memory: worker --drain to the file destination, {backend}; peak RSS (ru_maxrss)"]
    header = f"{'process':<36}{'rounds':>7}{'RSS MiB':>10}{'wall s':>9}{'users/s':>11}  by round"
    lines += [header, "-" * len(header)]
    lines.append(
        f"{'import audience_server.worker':<36}{IDLE_IMPORT_ROUNDS:>7}{idle.import_mib:>10.1f}"
    )
    lines.append(
        f"{'worker, nothing to do':<36}{idle.worker_rounds:>7}{idle.worker_mib:>10.1f}"
        f"{idle.worker_s:>9.2f}"
    )
    for m in memory:
        lines.append(
            f"{f'worker, {m.users:,} users':<36}{m.rounds:>7}{m.max_rss_mib:>10.1f}"
            f"{m.wall_s:>9.2f}{m.users_per_s:>11,.0f}  {m.by_round_mib}"
        )
    ratio: float | None = None
    passed: bool | None = None
    if len(memory) >= 2:
        small, large = memory[0], memory[-1]
        ratio = large.max_rss_mib / small.max_rss_mib
        passed = ratio <= MEMORY_LIMIT
        growth = large.max_rss_mib - idle.worker_mib, small.max_rss_mib - idle.worker_mib
        lines.append(
            f"RSS({large.users:,}) / RSS({small.users:,}) = {ratio:.2f}x   goal ≤ {MEMORY_LIMIT}x"
            f"   {verdict(passed)}   (above the idle worker: {growth[0]:.1f} / {growth[1]:.1f} MiB)"
        )
    if throughput:
        users = memory[0].users if memory else 0
        lines += ["", f"throughput: {users:,} users, {throughput[0].rounds} rounds, medians"]
        header = (
            f"{'target':<18}{'users/s':>10}{'x base':>8}{'wall s':>8}"
            f"{'net users/s':>13}{'x base':>8}{'to assembled s':>16}{'delivery s':>12}"
            f"{'RSS MiB':>9}"
        )
        lines += [header, "-" * len(header)]
        for t in throughput:
            ratio_text = f"{t.ratio:>7.2f}x" if t.ratio is not None else f"{'':>8}"
            net_ratio = f"{t.net_ratio:>7.2f}x" if t.net_ratio is not None else f"{'':>8}"
            phases = (
                f"{t.to_assembled_s:>16.2f}{t.delivery_s:>12.2f}"
                if t.to_assembled_s is not None and t.delivery_s is not None
                else f"{'':>28}"
            )
            lines.append(
                f"{t.target:<18}{t.users_per_s:>10,.0f}{ratio_text}{t.wall_s:>8.2f}"
                f"{t.net_users_per_s or 0:>13,.0f}{net_ratio}{phases}{t.max_rss_mib:>9.1f}"
            )
    return "\n".join(lines), ratio, passed


LEGEND = """\
users/s: users in the session (duplicates included) / the process's wall time, start to exit.
net users/s: the worker's wall time minus that of the same worker with nothing to do (start-up,
schema check, exit); the baseline's own time after its imports. x base: worker ÷ baseline of
the same destination. to assembled: worker start → end of duplicate detection (from the
database); delivery: the delivery attempt, claim → end (from the database)."""


def write_results(document: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"delivery-{document['at']}.json"
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return path


# --- the command -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__)
    parser.add_argument("--users", type=int, default=200_000, help="the small session")
    parser.add_argument("--large-users", type=int, default=2_000_000, help="the large session")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="counted rounds on the small session (each: worker "
        "and baseline to file and to webhook; the worker's file runs give its RSS)",
    )
    parser.add_argument("--large-rounds", type=int, default=3, help="runs on the large session")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    parser.add_argument("--batch-size", type=int, default=10_000, help="users per batch")
    parser.add_argument("--duplicates", type=int, default=5, help="repeated users per batch")
    parser.add_argument(
        "--postgres-url",
        help="run on a scratch database on this PostgreSQL server instead of SQLite",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, databases)"
    )
    args = parser.parse_args(argv)
    if (
        min(args.users, args.batch_size, args.rounds) < 1
        or min(args.large_rounds, args.warmup, args.large_users) < 0
    ):
        parser.error("sizes and rounds must be positive")
    return args


def _write_destinations(workdir: Path, receiver_port: int) -> tuple[Path, Path]:
    (workdir / "none.toml").write_text("")
    file_toml = workdir / "file.toml"
    file_toml.write_text(
        f'[[destinations]]\nid = "out"\nkind = "file"\ndir = "{workdir / "out"}"\n'
    )
    hook_toml = workdir / "webhook.toml"
    hook_toml.write_text(
        '[[destinations]]\nid = "hook"\nkind = "webhook"\n'
        f'url = "http://{HOST}:{receiver_port}/hook"\nsecret = "{HOOK_SECRET}"\n'
    )
    return file_toml, hook_toml


def run_rounds(
    bench: Bench, plan: SegmentPlan, source: str, warmup_rounds: int, rounds: int
) -> list[Run]:
    """Worker and baseline, to file and to webhook, alternating; the baseline goes first
    every other round."""
    runs: list[Run] = []
    for index in range(warmup_rounds + rounds):
        warmup = index < warmup_rounds
        steps: list[Callable[..., list[Run]]] = [
            run_worker_file,
            functools.partial(run_baseline, mode="file"),
            run_worker_webhook,
            functools.partial(run_baseline, mode="webhook"),
        ]
        if index % 2:
            steps = [steps[1], steps[0], steps[3], steps[2]]
        for step in steps:
            for result in step(bench, source, plan, index, warmup):
                runs.append(result)
                if result.users:
                    _print_run(result, f"round {index}{' (warm-up)' if warmup else ''}")
    return runs


def _print_run(result: Run, what: str) -> None:
    print(
        f"  {what} {result.target:<16}{result.users_per_s:>10,.0f} users/s"
        f"  {result.wall_s:6.2f} s  RSS {result.max_rss_mib:6.1f} MiB ({result.rss_source})",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        print(
            f"note: 1-min load average {load_at_start:.2f} at start: other work skews the numbers"
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    small = SegmentPlan(
        f"bench-{args.users}", args.users, args.batch_size, args.duplicates, args.seed
    )
    large = SegmentPlan(
        f"bench-{args.large_users}",
        args.large_users,
        args.batch_size,
        args.duplicates,
        args.seed + 1,
    )
    plans = [small] + ([large] if args.large_users and args.large_rounds else [])

    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="audience-bench-delivery-"))
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        (workdir / "out").mkdir()
        (workdir / "tmp").mkdir()
        databases = Databases(workdir, stack, args.postgres_url)
        receiver = stack.enter_context(
            running(
                Target(
                    "receiver",
                    "receiver",
                    [sys.executable, "-m", "bench.receiver", "--secret", HOOK_SECRET],
                    server_env(),
                ),
                workdir,
            )
        )
        file_toml, hook_toml = _write_destinations(workdir, receiver.port)
        sources = {}
        for plan in plans:
            t0 = time.perf_counter()
            sources[plan.users] = prepare_session(databases, plan, workdir)
            print(
                f"prepared: {plan.users:,} users ({plan.duplicates:,} repeats, "
                f"{plan.unique_users:,} unique) in {plan.total_batches} batches, "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        bench = Bench(workdir, databases, file_toml, hook_toml, receiver.port)
        idle_import = _median([idle_import_rss(workdir) for _ in range(IDLE_IMPORT_ROUNDS)])

        runs = run_rounds(bench, small, sources[small.users], args.warmup, args.rounds)
        if len(plans) > 1:
            for index in range(args.large_rounds):
                result = run_worker_file(bench, sources[large.users], large, index, False)[0]
                runs.append(result)
                _print_run(result, f"large {index}")
        if args.keep:
            print(f"work directory kept: {workdir}")

    counted_idle = [r for r in runs if r.target == "idle-worker" and not r.warmup]
    idle = Idle(
        import_mib=idle_import,
        worker_mib=_median([r.max_rss_mib for r in counted_idle]),
        worker_s=_median([r.wall_s for r in counted_idle]),
        worker_rounds=len(counted_idle),
    )
    memory = summarize_memory(runs)
    throughput = summarize_throughput(runs, small.users)
    backend = databases.kind
    table, ratio, passed = format_report(memory, throughput, idle, backend)
    print()
    print(table)
    print()
    print(LEGEND)
    document = {
        "benchmark": "delivery",
        "at": stamp,
        "revision": git_revision(),
        "backend": backend,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": load_at_start,
            # A child's ru_maxrss can be no lower than this (Linux carries it over at exec).
            "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "config": {
            "users": args.users,
            "large_users": args.large_users,
            "rounds": args.rounds,
            "large_rounds": args.large_rounds,
            "warmup_rounds": args.warmup,
            "batch_size": args.batch_size,
            "repeats": {str(p.users): p.duplicates for p in plans},
            "webhook_chunk": WEBHOOK_CHUNK,
        },
        "memory": {
            "sizes": [asdict(m) for m in memory],
            "ratio": ratio,
            "limit": MEMORY_LIMIT,
            "pass": passed,
            "idle": asdict(idle),
        },
        "throughput": [asdict(t) for t in throughput],
        "runs": [{**asdict(r), "users_per_s": r.users_per_s if r.users else None} for r in runs],
    }
    path = write_results(document)
    print(f"\nresults: {path.relative_to(ROOT)}  ({time.perf_counter() - started:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench.delivery: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.delivery: interrupted; processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

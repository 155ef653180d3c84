"""Ingest benchmark (SPEC §7 "Ingest" and "Completion"): the real server against a floor.

Every target runs as its own process on a loopback port: the floor server (parses the same
multipart body and JSON, stores nothing), the real server on SQLite and, when a PostgreSQL
URL is given, the real server on a fresh PostgreSQL database. Each round uploads the whole
segment as a new session; rounds alternate between targets so machine noise falls on all.

Per round, all batches but a few are sent in random order at the given concurrency (this
part's wall time gives users/s), then a few intermediate batches one at a time, then the
completing batch alone, so the completing batch is compared with intermediate batches sent
the same way (an intermediate batch sent at concurrency N also waits for N - 1 others).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    Server,
    Target,
    audience_server_command,
    form_field,
    git_revision,
    machine,
    percentile,
    post_batch,
    postgres_database,
    raise_on_sigterm,
    running,
    server_env,
    verdict,
)

SEGMENT_NAME = "bench segment"
# SPEC §7: minimum users/s relative to the floor, and the completing batch's latency limit.
INGEST_TARGETS = {"sqlite": 0.8, "postgresql": 0.7}
COMPLETION_LIMIT = 1.5

_FIRST = ["Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiro", "Ines", "Jonas"]
_LAST = ["Okafor", "Schmidt", "García", "Tanaka", "Novak", "Silva", "Kowalski", "Nguyen"]
_COUNTRIES = ["US", "DE", "FR", "GB", "JP", "BR", "NG", "PL", "IT", "ES"]


# --- the segment ---------------------------------------------------------------------


def make_users(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` plausible users of about 200 bytes of JSON each, the same for every seed."""
    rng = random.Random(seed)
    users = []
    for i in range(count):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        users.append(
            {
                "edgeTagId": f"{rng.getrandbits(96):024x}",
                "email": f"{first.lower()}.{last.lower()}{i}@example.com",
                "phone": f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}",
                "firstName": first,
                "lastName": last,
                "country": rng.choice(_COUNTRIES),
                "postalCode": f"{rng.randrange(10_000, 99_999)}",
                "purchase": [
                    {
                        "sku": f"SKU-{rng.randrange(1000, 9999)}",
                        "value": rng.randrange(500, 20_000) / 100,
                    }
                ],
            }
        )
    return users


@dataclass(frozen=True)
class Segment:
    """The segment's batches, pre-encoded once: only the small ``batch`` part varies."""

    total_users: int
    user_counts: list[int]  # index i holds sequence i + 1
    head: bytes  # the name and type parts
    users_parts: list[bytes]  # the users part and the closing boundary, per batch

    @property
    def total_batches(self) -> int:
        return len(self.user_counts)

    @property
    def encoded_bytes(self) -> int:
        return sum(len(self.head) + len(part) for part in self.users_parts)

    def body(self, session_id: str, sequence: int) -> bytes:
        """The multipart body of one batch of session ``session_id`` (sequences from 1)."""
        batch = {
            "sessionId": session_id,
            "sequence": sequence,
            "totalBatches": self.total_batches,
            "totalUsers": self.total_users,
        }
        return self.head + form_field("batch", orjson.dumps(batch)) + self.users_parts[sequence - 1]


def build_segment(total_users: int, batch_size: int, seed: int = 7) -> Segment:
    users = make_users(total_users, seed)
    chunks = [users[i : i + batch_size] for i in range(0, total_users, batch_size)]
    closing = f"--{BOUNDARY}--\r\n".encode()
    return Segment(
        total_users=total_users,
        user_counts=[len(chunk) for chunk in chunks],
        head=form_field("name", SEGMENT_NAME.encode()) + form_field("type", b"custom"),
        users_parts=[form_field("users", orjson.dumps(chunk)) + closing for chunk in chunks],
    )


# --- the targets -----------------------------------------------------------------------


# --- one round -------------------------------------------------------------------------


@dataclass
class Round:
    """One upload of the whole segment to one target."""

    target: str
    index: int
    warmup: bool
    concurrent_users: int
    concurrent_wall_s: float
    latencies_ms: list[float]  # the batches sent concurrently
    lone_intermediate_ms: list[float]  # intermediate batches sent one at a time
    completing_ms: float

    @property
    def users_per_s(self) -> float:
        return self.concurrent_users / self.concurrent_wall_s


def _drain(
    conn: http.client.HTTPConnection, queue: deque[int], bodies: dict[int, bytes], what: str
) -> list[float]:
    latencies: list[float] = []
    while True:
        try:
            sequence = queue.popleft()  # atomic: workers share the queue without a lock
        except IndexError:
            return latencies
        latencies.append(post_batch(conn, bodies[sequence], f"{what} sequence {sequence}"))


def run_round(
    server: Server,
    segment: Segment,
    order: Sequence[int],
    lone: int,
    index: int,
    warmup: bool,
    pool: ThreadPoolExecutor,
    conns: Sequence[http.client.HTTPConnection],
) -> Round:
    """Upload the segment as a new session in ``order``; the last ``lone + 1`` go alone."""
    session_id = f"bench-{server.target.name}-{index}-{uuid.uuid4().hex[:12]}"
    bodies = {sequence: segment.body(session_id, sequence) for sequence in order}
    split = len(order) - 1 - lone
    concurrent, alone, completing = order[:split], order[split:-1], order[-1]
    what = f"{server.target.name} round {index}"
    queue = deque(concurrent)
    for conn in conns:  # uvicorn drops keep-alive connections idle for 5 s: open fresh ones
        conn.close()
        conn.connect()
    start = time.perf_counter()
    futures = [pool.submit(_drain, conn, queue, bodies, what) for conn in conns]
    try:
        latencies = [latency for future in futures for latency in future.result()]
    except BaseException:
        queue.clear()  # the other workers stop after their current batch
        raise
    wall = time.perf_counter() - start
    lone_ms = [post_batch(conns[0], bodies[s], f"{what} sequence {s} (alone)") for s in alone]
    completing_ms = post_batch(
        conns[0], bodies[completing], f"{what} sequence {completing} (completing)"
    )
    return Round(
        target=server.target.name,
        index=index,
        warmup=warmup,
        concurrent_users=sum(segment.user_counts[s - 1] for s in concurrent),
        concurrent_wall_s=wall,
        latencies_ms=latencies,
        lone_intermediate_ms=lone_ms,
        completing_ms=completing_ms,
    )


# --- the report ------------------------------------------------------------------------


@dataclass
class Summary:
    """One target's counted rounds, reduced to the numbers SPEC §7 compares."""

    target: str
    kind: str
    rounds: int
    median_users_per_s: float
    p50_ms: float
    p99_ms: float
    ratio_to_floor: float | None = None
    ratio_to_decode_floor: float | None = None  # vs the floor that decodes as the server does
    ingest_target: float | None = None
    ingest_pass: bool | None = None
    completing_ms: float | None = None
    lone_intermediate_ms: float | None = None
    completion_ratio: float | None = None  # completing / lone intermediate
    completion_ratio_vs_concurrent_p50: float | None = None
    completion_pass: bool | None = None
    users_per_s_by_round: list[float] = field(default_factory=list)


def summarize(
    target: Target,
    rounds: Sequence[Round],
    floor: Summary | None,
    decode_floor: Summary | None = None,
) -> Summary:
    counted = [r for r in rounds if not r.warmup]
    latencies = [ms for r in counted for ms in r.latencies_ms]
    summary = Summary(
        target=target.name,
        kind=target.kind,
        rounds=len(counted),
        median_users_per_s=statistics.median(r.users_per_s for r in counted),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        users_per_s_by_round=[round(r.users_per_s) for r in counted],
    )
    if target.kind == "floor":
        return summary
    if floor is not None:
        summary.ratio_to_floor = summary.median_users_per_s / floor.median_users_per_s
        summary.ingest_target = INGEST_TARGETS[target.kind]
        summary.ingest_pass = summary.ratio_to_floor >= summary.ingest_target
    if decode_floor is not None:
        summary.ratio_to_decode_floor = summary.median_users_per_s / decode_floor.median_users_per_s
    summary.completing_ms = statistics.median(r.completing_ms for r in counted)
    summary.lone_intermediate_ms = statistics.median(
        ms for r in counted for ms in r.lone_intermediate_ms
    )
    summary.completion_ratio = summary.completing_ms / summary.lone_intermediate_ms
    summary.completion_ratio_vs_concurrent_p50 = summary.completing_ms / summary.p50_ms
    summary.completion_pass = summary.completion_ratio <= COMPLETION_LIMIT
    return summary


def format_table(summaries: Sequence[Summary]) -> str:
    """The results as a fixed-width table, with SPEC §7's targets next to the ratios."""
    header = (
        f"{'target':<16}{'users/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'x floor':>9}{'goal':>7}{'':>6}"
        f"{'last ms':>9}{'alone ms':>10}{'last÷alone':>11}{'goal':>7}{'':>6}{'last÷p50':>10}"
        f"{'x floor2':>10}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        row = f"{s.target:<16}{s.median_users_per_s:>10,.0f}{s.p50_ms:>9.1f}{s.p99_ms:>9.1f}"
        if s.ratio_to_floor is not None and s.ingest_target is not None:
            row += (
                f"{s.ratio_to_floor:>8.2f}x{'≥' + format(s.ingest_target, '.1f'):>7}"
                f"{verdict(s.ingest_pass):>6}"
            )
        else:
            row += f"{'':>22}"
        if s.completion_ratio is not None:
            assert s.completing_ms is not None and s.lone_intermediate_ms is not None
            assert s.completion_ratio_vs_concurrent_p50 is not None
            row += (
                f"{s.completing_ms:>9.1f}{s.lone_intermediate_ms:>10.1f}"
                f"{s.completion_ratio:>10.2f}x{'≤' + format(COMPLETION_LIMIT, '.1f'):>7}"
                f"{verdict(s.completion_pass):>6}{s.completion_ratio_vs_concurrent_p50:>9.2f}x"
            )
        if s.ratio_to_decode_floor is not None:
            row += f"{s.ratio_to_decode_floor:>9.2f}x"
        lines.append(row)
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace,
    segment: Segment,
    summaries: Sequence[Summary],
    rounds: Sequence[Round],
    load_at_start: float,
) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"ingest-{stamp}.json"
    document = {
        "benchmark": "ingest",
        "at": stamp,
        "revision": git_revision(),
        "machine": machine(load_at_start),
        "config": {
            "rounds": args.rounds,
            "warmup_rounds": 1,
            "users": args.users,
            "batch_size": args.batch_size,
            "batches": segment.total_batches,
            "batches_sent_alone_per_round": args.lone + 1,
            "concurrency": args.concurrency,
            "compare_with": None
            if args.compare_with is None
            else {"path": str(args.compare_with), "revision": git_revision(args.compare_with)},
            "encoded_mb": round(segment.encoded_bytes / 1e6, 1),
            "throughput": "users of the batches sent concurrently / their wall time; "
            "the batches sent alone are excluded",
            "completion_ratio": "median completing batch / median intermediate batch, "
            "both sent alone, over the counted rounds",
        },
        "summary": [asdict(s) for s in summaries],
        "rounds": [{**asdict(r), "users_per_s": r.users_per_s} for r in rounds],
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return path


# --- the command -----------------------------------------------------------------------


def ingest_only(env: dict[str, str], workdir: Path) -> dict[str, str]:
    """The real server with its delivery worker off and no destination: this benchmark
    measures ingest, not the assembly and delivery that completing sessions would start."""
    none = workdir / "no-destinations.toml"
    none.touch()
    return env | {"AUDIENCE_WORKER": "false", "AUDIENCE_DESTINATIONS": str(none)}


def tree_env(tree: Path | None) -> dict[str, str]:
    """Environment that runs the package of another checkout (``tree``), e.g. a clone of
    HEAD to measure a change against in the same run: it comes first on the path."""
    if tree is None:
        return {}
    paths = [str(tree.resolve()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def as_served(env: dict[str, str], workdir: Path, name: str) -> dict[str, str]:
    """The real server as a user runs it: its delivery worker on (``serve``'s default) and
    one ``file`` destination, so each round's session is assembled and delivered while
    the next round's batches arrive."""
    destinations = workdir / f"{name}-destinations.toml"
    folder = workdir / f"{name}-deliveries"
    destinations.write_text(f'[[destinations]]\nid = "file"\nkind = "file"\ndir = "{folder}"\n')
    return env | {"AUDIENCE_WORKER": "true", "AUDIENCE_DESTINATIONS": str(destinations)}


def server_target(
    prefix: str,
    kind: str,
    database_url: str,
    tree: Path | None,
    workdir: Path,
    served: bool = False,
) -> Target:
    """The real server on ``database_url``, of this checkout or of ``tree``; ``served``:
    with its worker on, delivering to a file (target ``<kind>-serve``)."""
    name = f"{prefix}{kind}{'-serve' if served else ''}"
    env = server_env(database_url)
    env = as_served(env, workdir, name) if served else ingest_only(env, workdir)
    return Target(name, kind, [*audience_server_command(), "serve"], env | tree_env(tree))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds per target")
    parser.add_argument("--users", type=int, default=200_000, help="users in the segment")
    parser.add_argument(
        "--batch-users",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=10_000,
        help="users per batch (1,000 measures the per-request cost: commit, fsync)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUDIENCE_BENCH_POSTGRES_URL")
        or os.environ.get("AUDIENCE_TEST_POSTGRES_URL"),
        help="a PostgreSQL server to create a scratch database on "
        "(default: AUDIENCE_BENCH_POSTGRES_URL or AUDIENCE_TEST_POSTGRES_URL; none: skip)",
    )
    parser.add_argument(
        "--lone", type=int, default=3, help="intermediate batches sent alone per round"
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="DIR",
        help="also measure the server of another checkout (e.g. `git clone -q . /tmp/base`), "
        "as targets base-sqlite and base-postgresql, in the same interleaved rounds",
    )
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also measure the default serve (worker on, a file destination: each round's "
        "session is delivered while the next one arrives) as targets sqlite-serve and "
        "postgresql-serve",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the users and batch order")
    args = parser.parse_args(argv)
    if min(args.rounds, args.concurrency, args.batch_size, args.lone) < 1:
        parser.error("--rounds, --concurrency, --batch-users and --lone must be at least 1")
    if args.compare_with is not None and not (args.compare_with / "audience_server").is_dir():
        parser.error(f"--compare-with: {args.compare_with} holds no audience_server package")
    if math.ceil(args.users / args.batch_size) < args.lone + 2:
        parser.error("the segment needs at least --lone + 2 batches (--users / --batch-users)")
    return args


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        print(
            f"note: 1-min load average {load_at_start:.2f} at start: other work skews the numbers"
        )
    segment = build_segment(args.users, args.batch_size, args.seed)
    print(
        f"segment: {args.users:,} users in {segment.total_batches} batches of ≤{args.batch_size:,},"
        f" {segment.encoded_bytes / 1e6:.1f} MB encoded; concurrency {args.concurrency};"
        f" {args.rounds} rounds + 1 warm-up per target",
        flush=True,
    )
    rng = random.Random(args.seed)
    orders = [
        rng.sample(range(1, segment.total_batches + 1), segment.total_batches)
        for _ in range(args.rounds + 1)
    ]

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="audience-bench-")))
        python = [sys.executable, "-m"]
        targets = [
            Target("floor", "floor", [*python, "bench.floor"], server_env()),
            Target("floor2", "floor", [*python, "bench.floor", "--decode", "server"], server_env()),
        ]
        trees: list[tuple[str, Path | None]] = [("", None)]
        if args.compare_with is not None:
            trees.append(("base-", args.compare_with))
        modes = [False, True] if args.with_worker else [False]
        for prefix, tree in trees:
            for served in modes:
                label = f"{prefix}bench{'-serve' if served else ''}"
                sqlite_url = f"sqlite:///{workdir / f'{label}.db'}"
                targets.append(server_target(prefix, "sqlite", sqlite_url, tree, workdir, served))
        if args.postgres_url:
            for prefix, tree in trees:
                for served in modes:
                    head = prefix.strip("-") or "head"
                    name = f"audience_bench_{os.getpid()}_{head}{'_serve' if served else ''}"
                    url = stack.enter_context(
                        postgres_database(args.postgres_url, workdir, name, None, tree_env(tree))
                    )
                    targets.append(server_target(prefix, "postgresql", url, tree, workdir, served))
        # Entered before the servers so that it is shut down after they stop: a worker still
        # waiting on a server then fails at once instead of holding up the exit.
        pool = stack.enter_context(ThreadPoolExecutor(args.concurrency, "bench-client"))
        servers = [stack.enter_context(running(target, workdir)) for target in targets]
        conns = {}
        for server in servers:
            conns[server.target.name] = [
                http.client.HTTPConnection(HOST, server.port, timeout=REQUEST_TIMEOUT_S)
                for _ in range(args.concurrency)
            ]
            for conn in conns[server.target.name]:
                stack.callback(conn.close)

        rounds: list[Round] = []
        for index, order in enumerate(orders):
            for server in servers:
                result = run_round(
                    server,
                    segment,
                    order,
                    args.lone,
                    index,
                    index == 0,
                    pool,
                    conns[server.target.name],
                )
                rounds.append(result)
                print(
                    f"  round {index}{' (warm-up)' if result.warmup else ''} "
                    f"{server.target.name:<10} {result.users_per_s:>9,.0f} users/s  "
                    f"alone {statistics.median(result.lone_intermediate_ms):6.1f} ms  "
                    f"completing {result.completing_ms:6.1f} ms",
                    flush=True,
                )

    floor = summarize(targets[0], [r for r in rounds if r.target == "floor"], None)
    floor2 = summarize(targets[1], [r for r in rounds if r.target == "floor2"], None)
    summaries = [floor, floor2] + [
        summarize(target, [r for r in rounds if r.target == target.name], floor, floor2)
        for target in targets[2:]
    ]
    print()
    print(format_table(summaries))
    print(
        "\nusers/s: median over rounds of the concurrent part (lone batches excluded). "
        "p50/p99: latency of the concurrent batches.\nlast: the completing batch, sent alone; "
        "alone: intermediate batches sent one at a time just before it; medians over rounds.\n"
        "x floor: SPEC §7's ratio, to a floor that decodes users with orjson.loads. x floor2: to "
        "a floor that decodes them as the server does (msgspec, typed), i.e. the cost of storage."
    )
    path = write_results(args, segment, summaries, rounds, load_at_start)
    print(f"\nresults: {path.relative_to(ROOT)}  ({time.perf_counter() - started:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench.ingest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.ingest: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

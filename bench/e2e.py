"""End-to-end benchmark (issue 10): what a new user runs, measured phase by phase.

    ./dev bench e2e [--users 200000,1000000] [--rounds 3]

For each size N (and round), in a fresh temporary directory: the DEFAULT server exactly as
a user starts it (``audience-server serve``: SQLite ``./audience.db``, no destinations file
so one ``file`` destination writing ``./deliveries/``, the worker on, log level INFO) on a
free loopback port, then the real client as a child process, ``audience-server upload
users.csv --name … --url … --concurrency 4 --wait``. The CSV (N users, ~1% exact duplicate
rows) is generated once per (N, seed) and cached under the results directory; generating it
is no phase.

Phases come from the server's own event times (read from the SQLite file, read-only, after
the server stopped) and one harness observation:

- first byte: the harness sees the client's first TCP socket to the server (checked every
  5 ms; the client counts the file before that, shown as "count pass");
- upload: first byte → ``complete`` event (the completing batch committed);
- assembly: ``complete`` → ``assembled`` (state ``delivering``);
- delivery: ``assembled`` → ``delivered``; whole job: first byte → ``delivered``.

users/s is N (duplicates included: what each phase reads) ÷ the phase. Peak RSS is sampled
every 0.1 s from /proc for the server's whole process tree (descendants found by parent pid):
the tree's summed VmRSS, each process's VmHWM (its exact peak, as of its last sample), the
worker alone when it is a separate process; the client's from ``wait4`` (or its VmHWM when
Linux's carry-over of this process's peak at exec hides it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import http.client
import os
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
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .common import (
    HOST,
    RESULTS_DIR,
    BenchError,
    audience_server_command,
    count_lines,
    free_port,
    git_revision,
    log_tail,
    machine,
    raise_on_sigterm,
    verdict,
)

GENERATOR_VERSION = 2  # bump when the generated rows change: old cache files are not reused
DUPLICATE_SHARE = 0.01
RECENT_ROWS = 20_000  # duplicates repeat one of these (two batches' worth): constant memory
CONCURRENCY = 4
SOCKET_POLL_S = 0.005  # until the client's first socket: the first-byte mark
SAMPLE_S = 0.1  # RSS sampling afterwards
STATUS_POLL_S = 0.2  # only once the client's --wait gave up before the session ended
STARTUP_TIMEOUT_S = 60.0
STOP_WAIT_S = (15.0, 5.0, 5.0)  # SIGINT (graceful), SIGTERM, SIGKILL
ENDED = {"delivered", "partially_delivered", "failed", "aborted", "expired", "inconsistent"}
PROGRESSING = {"complete", "delivering"}  # every batch arrived; the worker has it
# Issue 10's targets (at 10^7 against 2x10^5; here: the largest N against the smallest).
WHOLE_OVER_UPLOAD_MAX = 2.0
FLAT_RATE_MIN = 0.8
RSS_GROWTH_MAX = 1.3


# --- the users file --------------------------------------------------------------------

_FIRST = [
    "Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiro", "Inès", "Jonas",
    "Kwame", "Léa", "Mateo", "Nadia", "Olu", "Priya", "Quentin", "Rosa", "Søren", "Tomás",
    "Aisha", "Bruno", "Carmen", "Daniel", "Elif", "Farah", "Gabriel", "Hana", "Ivan", "Julia",
    "Kenji", "Lucía", "Marek", "Noor", "Oscar", "Paula", "Rahul", "Sofia", "Theo", "Yara",
]  # fmt: skip
_LAST = [
    "Okafor", "Schmidt", "García", "Tanaka", "Novak", "Silva", "Kowalski", "Nguyen",
    "O'Brien", "Müller", "Rossi", "Haddad", "Kim", "Johansson", "Da Costa", "Petrov",
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Martin", "Dubois", "Lefebvre",
    "Moreau", "Fischer", "Weber", "Wagner", "Becker", "Hoffmann", "Sato", "Suzuki",
]  # fmt: skip
_DOMAINS = [
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "gmx.de",
    "example.com", "mail.example.org", "example.net", "example.co.uk",
]  # fmt: skip
_COUNTRIES = ["US"] * 6 + ["GB", "DE", "FR", "CA", "BR", "IN", "JP", "ES"]
_CALLING_CODES = {
    "US": 1, "CA": 1, "GB": 44, "DE": 49, "FR": 33, "BR": 55, "IN": 91, "JP": 81, "ES": 34
}  # fmt: skip
HEADER = ["email", "phone", "firstName", "lastName", "country"]
_EMAIL_SPACE = 10**8  # users per file at most: the e-mail number is a permutation of the row
_EMAIL_STEP = 2_654_435_761  # odd and not a multiple of 5: coprime to 10^8, so a bijection


def _ascii(name: str) -> str:
    """A name as it appears in e-mail addresses: no accents, spaces or apostrophes."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return plain.replace(" ", "").replace("'", "")


_PLAIN = {name: _ascii(name) for name in _FIRST + _LAST}


def _local_part(rng: random.Random, first: str, last: str) -> str:
    """``ana.garcia``, ``AGarcia`` or ``ana_g``: ends in a letter, so a number appended after
    it cannot make two addresses equal."""
    first, last = _PLAIN[first], _PLAIN[last]
    style = rng.random()
    if style < 0.5:
        local = f"{first}.{last}"
    elif style < 0.75:
        local = f"{first[0]}{last}"
    else:
        local = f"{first}_{last[0]}"
    return local.lower() if rng.random() < 0.85 else local


def _phone(rng: random.Random, country: str) -> str:
    """E.164 mostly, a US national format now and then, empty for 8%."""
    shape = rng.random()
    if shape < 0.08:
        return ""
    if country == "US" and shape < 0.35:
        return f"({rng.randrange(201, 990)}) {rng.randrange(200, 999)}-{rng.randrange(10**4):04d}"
    return f"+{_CALLING_CODES[country]}{rng.randrange(10**9, 10**10)}"


def user_rows(users: int, seed: int) -> Iterator[tuple[list[str], bool]]:
    """``users`` CSV rows and whether each repeats an earlier one exactly (~1%, one of the
    last rows or an older one kept at random: within a batch and across batches).

    Every new row is distinct: its e-mail ends in a number that is a permutation of the row's
    index. Cells are empty now and then (a missing phone or last name), as in real exports."""
    if users > _EMAIL_SPACE:
        raise BenchError(f"at most {_EMAIL_SPACE:,} users per file")
    rng = random.Random(seed)
    recent: list[list[str]] = []
    offset = rng.randrange(_EMAIL_SPACE)
    for index in range(users):
        if recent and rng.random() < DUPLICATE_SHARE:
            yield rng.choice(recent), True
            continue
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        number = (index * _EMAIL_STEP + offset) % _EMAIL_SPACE
        country = rng.choice(_COUNTRIES)
        row = [
            f"{_local_part(rng, first, last)}{number}@{rng.choice(_DOMAINS)}",
            _phone(rng, country),
            first,
            last if rng.random() > 0.03 else "",
            country,
        ]
        if len(recent) < RECENT_ROWS:
            recent.append(row)
        else:
            recent[rng.randrange(RECENT_ROWS)] = row
        yield row, False


@dataclass(frozen=True)
class Dataset:
    """A users CSV on disk and what it holds."""

    path: Path
    users: int
    unique: int
    seed: int
    bytes: int
    generated_s: float | None  # None: reused from the cache


def dataset(cache_dir: Path, users: int, seed: int) -> Dataset:
    """The CSV of ``users`` users for ``seed``: from the cache, or written (streamed) to a
    temporary name and renamed into place with its description, so a Ctrl-C leaves no
    half file that a later run would take for whole."""
    stem = f"users-{users}-seed{seed}-v{GENERATOR_VERSION}"
    path, meta_path = cache_dir / f"{stem}.csv", cache_dir / f"{stem}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        meta = orjson.loads(meta_path.read_bytes())
        if path.stat().st_size == meta["bytes"]:
            return Dataset(path, users, int(meta["unique"]), seed, int(meta["bytes"]), None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = path.with_suffix(f".partial-{os.getpid()}")
    duplicates = 0
    try:
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(HEADER)
            for row, repeated in user_rows(users, seed):
                duplicates += repeated
                writer.writerow(row)
        size = partial.stat().st_size
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    meta_path.write_bytes(
        orjson.dumps({"users": users, "unique": users - duplicates, "bytes": size})
    )
    return Dataset(path, users, users - duplicates, seed, size, time.perf_counter() - started)


# --- /proc -----------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2 :].split()  # the command name may hold spaces
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB ({} once it is gone or a zombie)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith((b"VmRSS:", b"VmHWM:")):
                    found[line[:5].decode()] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, by parent pid (a full scan of /proc: this
    kernel has no /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (found := proc_stat(int(entry.name))) is not None:
            children.setdefault(found[0], []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class Proc:
    """One process seen in the server's tree, and its peak so far."""

    pid: int
    start: int  # start time: tells a reused pid from this process
    role: str  # serve, worker (a descendant doing the delivery work) or helper
    command: str
    peak_kib: int = 0


def _role(pid: int, root: int, command: str) -> str:
    if pid == root:
        return "serve"
    if "resource_tracker" in command or "semaphore_tracker" in command:
        return "helper"  # multiprocessing's bookkeeping process, not delivery work
    return "worker"


@dataclass
class TreeSampler:
    """The server's process tree, sampled: its summed RSS and each process's own peak."""

    root: int
    procs: dict[tuple[int, int], Proc] = field(default_factory=dict)
    tree_peak_kib: int = 0
    samples: int = 0

    def sample(self) -> None:
        total = 0
        for pid in descendants(self.root):
            found = proc_stat(pid)
            memory = _status_kib(pid)
            if found is None or not memory:
                continue
            key = (pid, found[1])
            proc = self.procs.get(key)
            if proc is None:
                command = _cmdline(pid)
                proc = self.procs[key] = Proc(
                    pid, found[1], _role(pid, self.root, command), command
                )
            proc.peak_kib = max(proc.peak_kib, memory.get("VmHWM", 0))
            total += memory.get("VmRSS", 0)
        self.tree_peak_kib = max(self.tree_peak_kib, total)
        self.samples += 1

    def peak_mib(self, role: str) -> float | None:
        peaks = [p.peak_kib for p in self.procs.values() if p.role == role]
        return max(peaks) / 1024 if peaks else None

    def alive(self) -> list[int]:
        """Processes once seen in the tree that still run (orphans of a dead server too)."""
        return [p.pid for p in self.procs.values() if (s := proc_stat(p.pid)) and s[1] == p.start]


def connected_to(pid: int, port: int) -> bool:
    """Whether ``pid`` holds a TCP socket to ``port`` on loopback (connecting or connected)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    if not inodes:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                cells = line.split()
                if cells[9] in inodes and int(cells[2].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# --- processes -------------------------------------------------------------------------


def clean_env(workdir: Path) -> dict[str, str]:
    """The shell's environment without AUDIENCE_* settings, so every setting is the default.
    TMPDIR points into the run's directory (same file system as the default): the worker's
    scratch folder goes where the run's clean-up removes it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    env["TMPDIR"] = str(workdir / "tmp")
    return env


def _signal_all(pids: Sequence[int], group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(process: subprocess.Popen[bytes], timeout: float) -> resource.struct_rusage | None:
    """Wait up to ``timeout`` s for ``process``; its rusage when it exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process.returncode is not None:
            return None
        try:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already: never signal that pid again
            process.returncode = -1
            return None
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def stop_tree(
    process: subprocess.Popen[bytes], sampler: TreeSampler | None
) -> resource.struct_rusage | None:
    """SIGINT to the server (uvicorn's graceful stop, which stops its own children), then
    SIGTERM and SIGKILL to its process group and to every process seen in its tree."""
    usage = None
    for sig, wait_s in zip(
        (signal.SIGINT, signal.SIGTERM, signal.SIGKILL), STOP_WAIT_S, strict=True
    ):
        stray = [p for p in (sampler.alive() if sampler else []) if p != process.pid]
        if process.returncode is not None and not stray:
            break
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        if sig != signal.SIGINT:
            _signal_all(stray, process.pid, sig)
        usage = _reap(process, wait_s) or usage
        if sig == signal.SIGINT and sampler is not None:
            deadline = time.monotonic() + wait_s
            while sampler.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
    return usage


def stop_client(process: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in zip((signal.SIGINT, signal.SIGKILL), (10.0, 5.0), strict=True):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        _reap(process, wait_s)


def http_json(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, orjson.loads(body) if body else None
    finally:
        conn.close()


def wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Until ``/readyz`` answers 200 (database reachable, schema at head)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise BenchError(f"serve exited with {process.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(OSError, ValueError):
            if http_json(port, "/readyz")[0] == 200:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"serve did not become ready:\n{log_tail(log_path)}")
        time.sleep(0.1)


# --- one run ---------------------------------------------------------------------------


@dataclass
class Events:
    """What the server recorded, read from its SQLite file after it stopped."""

    state: str
    unique_users: int | None
    at: dict[str, float]  # first time of each event kind, Unix seconds
    delivery_state: str
    users_sent: int
    attempts: int
    attempt_s: float | None  # the last delivery attempt, claim → end


def _unix(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def read_events(database: Path) -> Events:
    """The one session's state, event times and delivery (SQLite, opened read-only)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        sessions = conn.execute(
            "SELECT tenant, session_key, state, unique_users FROM sessions"
        ).fetchall()
        if len(sessions) != 1:
            raise BenchError(f"expected one session in the database, found {len(sessions)}")
        tenant, key, state, unique = sessions[0]
        at: dict[str, float] = {}
        for when, kind in conn.execute(
            "SELECT at, kind FROM session_events WHERE tenant = ? AND session_key = ? ORDER BY id",
            (tenant, key),
        ):
            at.setdefault(kind, _unix(when))
        deliveries = conn.execute(
            "SELECT state, users_sent, attempts FROM deliveries"
            " WHERE tenant = ? AND session_key = ?",
            (tenant, key),
        ).fetchall()
        if len(deliveries) != 1:
            raise BenchError(f"expected one delivery (the file), found {len(deliveries)}")
        attempt = conn.execute(
            "SELECT started_at, finished_at FROM delivery_attempts"
            " WHERE tenant = ? AND session_key = ? ORDER BY number DESC LIMIT 1",
            (tenant, key),
        ).fetchone()
    finally:
        conn.close()
    attempt_s = None
    if attempt is not None and attempt[1] is not None:
        attempt_s = _unix(attempt[1]) - _unix(attempt[0])
    delivery_state, users_sent, attempts = deliveries[0]
    return Events(state, unique, at, delivery_state, users_sent, attempts, attempt_s)


@dataclass
class Run:
    """One end-to-end run: phase times (s), rates, line count and peak RSS (MiB)."""

    users: int
    unique: int
    round: int
    cli_exit: int
    first_byte_source: str  # "socket" (observed by the harness) or "created" (server event)
    count_s: float  # client start → first byte: its counting (and hashing) pass
    upload_s: float  # first byte → complete
    assembly_s: float  # complete → assembled
    delivery_s: float  # assembled → delivered
    whole_s: float  # first byte → delivered
    first_commit_s: float  # first byte → the first batch committed (created event)
    delivery_attempt_s: float | None  # the file delivery's attempt, claim → end
    cli_wall_s: float  # client start → exit (its --wait polls every 0.5 s)
    delivered_lines: int
    server_tree_peak_mib: float  # summed VmRSS of the server's tree, max over samples
    serve_peak_mib: float  # the serve process's own VmHWM
    worker_peak_mib: float | None  # a separate worker process's VmHWM; None: in-process
    delivery_process_peak_mib: float  # the worker's, else serve's (it delivers in-process)
    serve_wait4_mib: (
        float | None
    )  # ru_maxrss of serve from wait4: max over it and its reaped children
    client_peak_mib: float
    client_rss_source: str  # "wait4" or "VmHWM"
    samples: int
    processes: list[dict[str, Any]]

    def rate(self, seconds: float) -> float:
        return self.users / seconds if seconds > 0 else float("nan")


def default_timeout(users: int) -> float:
    return 120.0 + users / 5_000


@dataclass
class Watched:
    """What the harness saw of the client: when it started and first sent, how it ended."""

    started: float  # Unix seconds
    first_byte: float | None
    exit_code: int
    wall_s: float
    usage: resource.struct_rusage
    sampled_peak_kib: int  # its VmHWM, as of the last sample


class Trial:
    """One run in its own directory: the default server, one upload with ``--wait``, the
    checks; ``close`` stops every process and removes the directory (errors, Ctrl-C too)."""

    def __init__(
        self, data: Dataset, timeout_s: float, keep: bool, wait_timeout: float | None = None
    ) -> None:
        self.data = data
        self.wait_timeout = wait_timeout
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"audience-bench-e2e-{data.users}-"))
        if keep:
            print(f"  work directory kept: {self.workdir}", flush=True)
        else:
            self.stack.callback(shutil.rmtree, self.workdir, True)
        self.env = clean_env(self.workdir)
        self.port = free_port()
        self.serve_log = self.workdir / "serve.log"
        self.server: subprocess.Popen[bytes] | None = None
        self.sampler: TreeSampler | None = None
        self.serve_usage: list[resource.struct_rusage | None] = []  # set once it stopped

    def close(self) -> None:
        self.stack.close()

    def failure(self, what: str) -> BenchError:
        """``what``, with the tails of the server's log and the client's output."""
        err, out = self.workdir / "upload.err", self.workdir / "upload.out"
        return BenchError(
            f"{what}\n--- serve log (tail):\n{log_tail(self.serve_log)}\n"
            f"--- upload (tail):\n{log_tail(err)}\n{log_tail(out)}"
        )

    def start_server(self) -> None:
        """The default server in the run's directory, once it answers ``/readyz``."""
        (self.workdir / "tmp").mkdir()
        # A user's first upload: no resume state, which lands beside the link, not the cache.
        (self.workdir / "users.csv").symlink_to(self.data.path)
        with self.serve_log.open("wb") as log:
            self.server = subprocess.Popen(
                [*audience_server_command(), "serve", "--host", HOST, "--port", str(self.port)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it ourselves
            )
        self.sampler = TreeSampler(self.server.pid)
        self.stack.callback(self.stop_server)
        wait_ready(self.server, self.port, self.serve_log)
        self.sampler.sample()

    def stop_server(self) -> None:
        if self.server is not None and not self.serve_usage:
            self.serve_usage.append(stop_tree(self.server, self.sampler))

    def upload(self) -> Watched:
        """Run the client to its exit, marking its first byte and sampling RSS meanwhile."""
        assert self.server is not None and self.sampler is not None
        command = [
            *audience_server_command(),
            "upload",
            "users.csv",
            "--name",
            f"e2e {self.data.users}",
            "--url",
            f"http://{HOST}:{self.port}",
            "--concurrency",
            str(CONCURRENCY),
            "--wait",
        ]
        if self.wait_timeout is not None:
            command += ["--wait-timeout", str(self.wait_timeout)]
        out_path, err_path = self.workdir / "upload.out", self.workdir / "upload.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.time()
            client = subprocess.Popen(
                command, cwd=self.workdir, env=self.env, stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        self.stack.callback(stop_client, client)
        first_byte: float | None = None
        peak_kib = 0
        last_sample = 0.0
        while True:
            pid, status, usage = os.wait4(client.pid, os.WNOHANG)
            if pid:
                client.returncode = os.waitstatus_to_exitcode(status)
                wall_s = time.time() - started
                return Watched(started, first_byte, client.returncode, wall_s, usage, peak_kib)
            if first_byte is None and connected_to(client.pid, self.port):
                first_byte = time.time()
            now = time.monotonic()
            if now - last_sample >= SAMPLE_S:
                last_sample = now
                self.sampler.sample()
                peak_kib = max(peak_kib, _status_kib(client.pid).get("VmHWM", 0))
                if self.server.poll() is not None:
                    raise self.failure(f"serve exited with {self.server.returncode}")
            if now > self.deadline:
                raise self.failure(f"the run took over {self.timeout_s:g} s")
            time.sleep(SOCKET_POLL_S if first_byte is None else SAMPLE_S / 4)

    def wait_ended(self, exit_code: int) -> None:
        """The client gave up (``--wait`` timed out): if every batch arrived, the server
        goes on and so do we, polling its status every 0.2 s until the session ends. Any
        other failure of the client (a session still receiving, or none) fails the run."""
        assert self.sampler is not None
        session = self.session()
        if session is None or session["state"] not in PROGRESSING | ENDED:
            state = session and session["state"]
            raise self.failure(f"upload exited with {exit_code}; the session is {state}")
        print(f"  upload exited with {exit_code} ({session['state']}); polling the status")
        while session is None or session["state"] not in ENDED:
            if time.monotonic() > self.deadline:
                raise self.failure(f"the session did not end within {self.timeout_s:g} s")
            time.sleep(STATUS_POLL_S)
            self.sampler.sample()
            session = self.session()

    def session(self) -> dict[str, Any] | None:
        """The one session, as the server's list shows it."""
        listed = http_json(self.port, "/audience/sessions?limit=1")[1]
        sessions: list[dict[str, Any]] = listed["sessions"] if listed else []
        return sessions[0] if sessions else None

    def verify(self) -> tuple[Events, int]:
        """The server's record (after it stopped) and the delivered file's line count;
        raises unless the session was delivered whole, duplicates removed."""
        events = read_events(self.workdir / "audience.db")
        missing = {"created", "complete", "assembled", "delivered"} - events.at.keys()
        if events.state != "delivered" or missing:
            raise self.failure(f"session {events.state}, events missing {sorted(missing)}")
        files = sorted((self.workdir / "deliveries").rglob("*.ndjson"))
        if len(files) != 1:
            raise self.failure(f"expected one delivered file, found {[str(f) for f in files]}")
        lines = count_lines(files[0])
        if not lines == self.data.unique == events.unique_users == events.users_sent:
            raise self.failure(
                f"delivered {lines:,} lines; the server counted {events.unique_users} unique "
                f"users and sent {events.users_sent}; the file has {self.data.unique:,}"
            )
        return events, lines


def run_once(
    data: Dataset, index: int, timeout_s: float, keep: bool, wait_timeout: float | None = None
) -> Run:
    """One fresh server and one upload of ``data``, checked; everything stopped after."""
    trial = Trial(data, timeout_s, keep, wait_timeout)
    own_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        trial.start_server()
        watched = trial.upload()
        if watched.exit_code != 0:
            trial.wait_ended(watched.exit_code)
        assert trial.sampler is not None
        trial.sampler.sample()
        trial.stop_server()
        events, lines = trial.verify()
    finally:
        trial.close()
    return make_run(data, index, watched, events, lines, trial, own_peak_kib)


def make_run(
    data: Dataset,
    index: int,
    watched: Watched,
    events: Events,
    lines: int,
    trial: Trial,
    own_peak_kib: int,
) -> Run:
    """The run's figures from the server's event times and the harness's observations."""
    assert trial.sampler is not None
    at, sampler = events.at, trial.sampler
    first_byte, first_byte_source = watched.first_byte, "socket"
    if first_byte is None:  # never seen (it cannot be missed while connected): the server's
        first_byte, first_byte_source = at["created"], "created"
    serve_peak = sampler.peak_mib("serve") or 0.0
    worker_peak = sampler.peak_mib("worker")
    serve_usage = trial.serve_usage[0] if trial.serve_usage else None
    # Linux carries this process's peak into a child at exec: a wait4 figure not above it
    # says nothing, and the sampled VmHWM stands.
    if watched.usage.ru_maxrss > own_peak_kib + 1024:
        client_peak, client_source = watched.usage.ru_maxrss / 1024, "wait4"
    else:
        client_peak, client_source = watched.sampled_peak_kib / 1024, "VmHWM"
    return Run(
        users=data.users,
        unique=data.unique,
        round=index,
        cli_exit=watched.exit_code,
        first_byte_source=first_byte_source,
        count_s=first_byte - watched.started,
        upload_s=at["complete"] - first_byte,
        assembly_s=at["assembled"] - at["complete"],
        delivery_s=at["delivered"] - at["assembled"],
        whole_s=at["delivered"] - first_byte,
        first_commit_s=at["created"] - first_byte,
        delivery_attempt_s=events.attempt_s,
        cli_wall_s=watched.wall_s,
        delivered_lines=lines,
        server_tree_peak_mib=sampler.tree_peak_kib / 1024,
        serve_peak_mib=serve_peak,
        worker_peak_mib=worker_peak,
        delivery_process_peak_mib=worker_peak if worker_peak is not None else serve_peak,
        serve_wait4_mib=serve_usage.ru_maxrss / 1024 if serve_usage is not None else None,
        client_peak_mib=client_peak,
        client_rss_source=client_source,
        samples=sampler.samples,
        processes=[
            {
                "pid": p.pid,
                "start": p.start,
                "role": p.role,
                "command": p.command[:200],
                "peak_mib": round(p.peak_kib / 1024, 1),
            }
            for p in sampler.procs.values()
        ],
    )


# --- the report ------------------------------------------------------------------------

PHASES = ("upload", "assembly", "delivery", "whole")
FIGURES = (
    "count_s", "upload_s", "assembly_s", "delivery_s", "whole_s", "first_commit_s",
    "cli_wall_s", "server_tree_peak_mib", "serve_peak_mib", "delivery_process_peak_mib",
    "client_peak_mib",
)  # fmt: skip


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: Sequence[Run]) -> dict[int, dict[str, Any]]:
    """Per size: the median of every figure over its rounds, and the derived rates."""
    summary: dict[int, dict[str, Any]] = {}
    for users in sorted({r.users for r in runs}):
        mine = [r for r in runs if r.users == users]
        figures: dict[str, Any] = {
            name: _median([getattr(r, name) for r in mine]) for name in FIGURES
        }
        workers = [r.worker_peak_mib for r in mine if r.worker_peak_mib is not None]
        figures["worker_peak_mib"] = _median(workers) if workers else None
        figures["rounds"] = len(mine)
        figures["unique"] = mine[0].unique
        figures["delivered_lines"] = mine[0].delivered_lines
        for phase in PHASES:
            figures[f"{phase}_users_per_s"] = _median(
                [r.rate(getattr(r, f"{phase}_s")) for r in mine]
            )
        figures["assembly_delivery_users_per_s"] = _median(
            [r.rate(r.assembly_s + r.delivery_s) for r in mine]
        )
        figures["whole_over_upload"] = _median([r.whole_s / r.upload_s for r in mine])
        summary[users] = figures
    return summary


def ratios(summary: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Issue 10's ratios, each with its goal and verdict: whole job ÷ upload at the largest
    size; the largest size against the smallest for the (assembly + delivery) rate and for
    the delivery process's peak RSS. (The issue's sizes: 10^7 and 2x10^5.)"""
    sizes = sorted(summary)
    small, large = summary[sizes[0]], summary[sizes[-1]]
    whole = large["whole_over_upload"]
    found: dict[str, Any] = {
        "sizes_compared": [sizes[0], sizes[-1]],
        "whole_over_upload": {"value": whole, "goal": f"<= {WHOLE_OVER_UPLOAD_MAX}"},
    }
    found["whole_over_upload"]["pass"] = whole <= WHOLE_OVER_UPLOAD_MAX
    if len(sizes) > 1:
        flat = large["assembly_delivery_users_per_s"] / small["assembly_delivery_users_per_s"]
        rss = large["delivery_process_peak_mib"] / small["delivery_process_peak_mib"]
        found["flat_rate"] = {
            "value": flat, "goal": f">= {FLAT_RATE_MIN}", "pass": flat >= FLAT_RATE_MIN
        }  # fmt: skip
        found["delivery_rss_growth"] = {
            "value": rss, "goal": f"<= {RSS_GROWTH_MAX}", "pass": rss <= RSS_GROWTH_MAX
        }  # fmt: skip
    return found


def format_report(summary: dict[int, dict[str, Any]], found: dict[str, Any]) -> str:
    """The table (a column per size) and the ratios."""
    sizes = sorted(summary)
    rounds = ", ".join(str(summary[n]["rounds"]) for n in sizes)
    header = f"{'users':<36}" + "".join(f"{n:>22,}" for n in sizes)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"{label:<36}" + "".join(f"{cell(summary[n]):>22}" for n in sizes)

    def phase(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: f"{s[f'{name}_s']:.2f} s {s[f'{name}_users_per_s']:>9,.0f}/s"

    def mib(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: "in-process" if s[name] is None else f"{s[name]:.1f}"

    lines = [
        "e2e: default `audience-server serve` (SQLite, file destination, worker on) and "
        f"`upload users.csv --concurrency {CONCURRENCY} --wait`; rounds {rounds}; medians",
        header,
        "-" * len(header),
        row("client start → 1st byte (count pass)", lambda s: f"{s['count_s']:.2f} s"),
        row("upload (1st byte → complete)", phase("upload")),
        row("assembly (complete → delivering)", phase("assembly")),
        row("delivery (delivering → delivered)", phase("delivery")),
        row("whole job (1st byte → delivered)", phase("whole")),
        row("assembly + delivery", lambda s: f"{s['assembly_delivery_users_per_s']:,.0f}/s"),
        row("whole job ÷ upload", lambda s: f"{s['whole_over_upload']:.2f}x"),
        row("client wall (start → exit)", lambda s: f"{s['cli_wall_s']:.2f} s"),
        row("1st byte → 1st batch committed", lambda s: f"{s['first_commit_s']:.3f} s"),
        row("delivered lines (= unique users)", lambda s: f"{s['delivered_lines']:,}"),
        row("peak RSS, server tree (sum) MiB", mib("server_tree_peak_mib")),
        row("peak RSS, serve process MiB", mib("serve_peak_mib")),
        row("peak RSS, worker process MiB", mib("worker_peak_mib")),
        row("peak RSS, client MiB", mib("client_peak_mib")),
        "",
    ]
    small, large = (f"{n:,}" for n in found["sizes_compared"])
    texts = {
        "whole_over_upload": f"whole job ÷ upload phase at {large}",
        "flat_rate": f"(assembly + delivery) users/s at {large} ÷ at {small}",
        "delivery_rss_growth": f"delivery-process peak RSS at {large} ÷ at {small}",
    }
    for key, text in texts.items():
        if key in found:
            ratio = found[key]
            lines.append(
                f"{text}: {ratio['value']:.2f}x   goal {ratio['goal']}x   {verdict(ratio['pass'])}"
            )
    lines.append("(issue 10's goals hold at 10^7 users, the RSS and rate ones against 2x10^5)")
    return "\n".join(lines)


LEGEND = """\
Times: the server's event times (SQLite, read-only after it stopped) and the harness's wall
clock; first byte = the client's first TCP socket to the server, seen within 5 ms. users/s:
all users of the file (duplicates included) ÷ the phase. RSS: /proc sampled every 0.1 s;
the tree is the summed VmRSS of serve and its descendants, a process's figure its VmHWM;
"in-process": serve runs the worker itself, so the delivery process is serve. The machine
is shared and noisy: compare ratios within one run, not absolute figures across runs."""


# --- the command -----------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of user counts: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"user counts must be positive: {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench e2e", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--users",
        type=_sizes,
        action="append",
        help="users in the CSV; repeat it or give a list (200000,1000000); default 1000000",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per size (medians)")
    parser.add_argument("--seed", type=int, default=10, help="the generated file's seed")
    parser.add_argument(
        "--timeout", type=float, help="seconds per run (default 120 + users / 5000)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="results and the CSV cache"
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        help="passed to upload (default: the client's); when --wait gives up first, the "
        "harness follows the session itself",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's work directory")
    args = parser.parse_args(argv)
    args.users = sorted({n for group in args.users or [[1_000_000]] for n in group})
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the result document (also written as JSON)."""
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        print(f"note: 1-min load average {load_at_start:.2f} at start: other work skews this")
    datasets = {}
    for users in args.users:
        data = datasets[users] = dataset(args.results_dir / "e2e-data", users, args.seed)
        made = "reused" if data.generated_s is None else f"generated in {data.generated_s:.1f} s"
        print(
            f"users file: {users:,} users, {users - data.unique:,} duplicate rows, "
            f"{data.bytes / 2**20:,.1f} MiB, {made}",
            flush=True,
        )
    runs: list[Run] = []
    for index in range(args.rounds):
        order = args.users if index % 2 == 0 else args.users[::-1]  # noise falls on all sizes
        for users in order:
            timeout = args.timeout or default_timeout(users)
            result = run_once(datasets[users], index, timeout, args.keep, args.wait_timeout)
            runs.append(result)
            print(
                f"  round {index} {users:>11,} users: upload {result.upload_s:7.2f} s, assembly "
                f"{result.assembly_s:7.2f} s, delivery {result.delivery_s:7.2f} s, whole "
                f"{result.whole_s:7.2f} s; RSS tree {result.server_tree_peak_mib:.0f} MiB, "
                f"client {result.client_peak_mib:.0f} MiB",
                flush=True,
            )
    summary = summarize(runs)
    found = ratios(summary)
    print()
    print(format_report(summary, found))
    print()
    print(LEGEND)
    document: dict[str, Any] = {
        "benchmark": "e2e",
        "at": stamp,
        "revision": git_revision(),
        "machine": machine(load_at_start, loadavg_at_end=os.getloadavg()[0]),
        "config": {
            "users": args.users,
            "rounds": args.rounds,
            "seed": args.seed,
            "concurrency": CONCURRENCY,
            "wait_timeout": args.wait_timeout,
            "duplicate_share": DUPLICATE_SHARE,
            "times": "server events from SQLite (read-only, after the run); first byte: "
            "the client's first TCP socket, polled every 5 ms",
        },
        "datasets": {
            str(d.users): {"unique": d.unique, "bytes": d.bytes, "path": str(d.path)}
            for d in datasets.values()
        },
        "summary": {str(n): s for n, s in summary.items()},
        "ratios": found,
        "runs": [asdict(r) for r in runs],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"e2e-{stamp}.json"
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    document["path"] = str(path)
    print(f"\nresults: {path}  ({time.perf_counter() - started:.0f} s)")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        run(args)
    except BenchError as exc:
        print(f"bench.e2e: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "bench.e2e: interrupted; processes stopped, work directories removed", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

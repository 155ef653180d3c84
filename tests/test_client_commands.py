"""client/commands.py: ``audience-server upload``, ``status`` and ``sessions`` as subprocesses
against real server processes: a large CSV, kill -9 half-way and resume, a flaky proxy, a
conflict, every input format, and ``--wait`` following a held, a retried and a stalled
delivery to a webhook receiver."""

from __future__ import annotations

import contextlib
import csv
import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET, eventually, form
from tests.servers import ServerProcess, clean_env

pytestmark = pytest.mark.slow
FIELDS = ["email", "phone", "firstName", "country", "tier"]


def users(count: int, start: int = 0) -> list[dict[str, str]]:
    """Flat string users (as CSV can hold them); some cells empty, i.e. absent."""
    return [
        {
            key: value
            for key, value in {
                "email": f"user{i}@example.com",
                "phone": f"+1415{i:07d}",
                "firstName": "Jane" if i % 3 else "",
                "country": "US",
                "tier": f"t{i % 5}",
            }.items()
            if value
        }
        for i in range(start, start + count)
    ]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def cli(
    *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audience_server", "upload", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(AUDIENCE_LOG_LEVEL="WARNING"),
    )


def file_destination(tmp_path: Path) -> tuple[dict[str, str], Path]:
    out = tmp_path / "out"
    toml = tmp_path / "destinations.toml"
    toml.write_text(f'[[destinations]]\nid = "archive"\nkind = "file"\ndir = "{out}"\n')
    return {"AUDIENCE_DESTINATIONS": str(toml), "AUDIENCE_WORKER_POLL": "0.1s"}, out


@pytest.fixture
def delivering(database_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    env, out = file_destination(tmp_path)
    server = ServerProcess(database_url, tmp_path / "server.log", **env).start()
    try:
        yield server, out
    finally:
        server.stop()


def status(server: ServerProcess, key: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.get(f"{server.url}/audience/sessions/{key}", timeout=30).json()
    return body


def batch_events(log: Path, key: str) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "batch" and entry.get("sessionId") == key:
                events.append(entry)
    return events


def delivered_lines(out: Path, key: str) -> list[str]:
    return sorted((out / f"{key}.ndjson").read_text().splitlines())


def test_large_csv_is_uploaded_complete_and_delivered(
    delivering: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, out = delivering
    source = write_csv(tmp_path / "big.csv", users(20_000))
    done = cli(
        str(source), "--name", "Big", "--url", server.url, "--concurrency", "4",
        "--batch-size", "1000", "--session-id", "big-1", "--wait",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "users     20,000/20,000" in done.stdout
    assert "archive" in done.stdout and "delivered" in done.stdout
    assert "100.0% users 20,000/20,000 batches 20/20" in done.stderr
    body = status(server, "big-1")
    assert (body["state"], body["receivedUsers"], body["receivedBatches"]) == (
        "delivered",
        20_000,
        20,
    )
    assert len(delivered_lines(out, "big-1")) == 20_000
    # the same command again sends nothing and still succeeds
    again = cli(str(source), "--name", "Big", "--url", server.url, "--batch-size", "1000", "--wait")
    assert again.returncode == 0, again.stderr
    assert "sent 0 of 20 batches" in again.stdout
    assert len(batch_events(server.log_path, "big-1")) == 20

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "audience_server", *args, "--url", server.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )

    shown = command("status", "big-1")
    assert shown.returncode == 0 and "state     delivered" in shown.stdout
    assert "archive" in shown.stdout.split("DESTINATION", 1)[1]
    assert json.loads(command("status", "big-1", "--json").stdout)["receivedUsers"] == 20_000
    listed = command("sessions")
    assert listed.stdout.startswith("SESSION") and "archive:succeeded" in listed.stdout
    assert [
        s["sessionId"] for s in json.loads(command("sessions", "--json").stdout)["sessions"]
    ] == ["big-1"]
    assert command("status", "nope").returncode == 1


def test_killed_upload_resumes_sending_only_missing_batches(
    receiving: ServerProcess, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "resume.csv", users(20_000))
    args = [str(source), "--name", "Resume", "--url", receiving.url, "--batch-size", "200"]
    args += ["--session-id", "resume-1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "audience_server", "upload", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    try:
        seen = eventually(
            lambda: httpx2.get(f"{receiving.url}/audience/sessions/resume-1", timeout=30),
            lambda r: r.status_code == 200 and r.json()["receivedBatches"] >= 30,
            timeout=60,
        )
        assert seen.status_code == 200
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    halfway = status(receiving, "resume-1")
    assert halfway["state"] == "receiving" and halfway["missingSequences"]

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "resuming session resume-1" in second.stderr
    body = status(receiving, "resume-1")
    assert (body["state"], body["receivedUsers"]) == ("complete", 20_000)

    events = batch_events(receiving.log_path, "resume-1")
    sends = Counter(event["sequence"] for event in events)
    assert set(sends) == set(range(1, 101))
    twice = [sequence for sequence, count in sends.items() if count > 1]
    assert len(twice) <= 1  # only the batch in flight at the kill may be sent again
    assert all(e["result"] in ("stored", "completed", "duplicate") for e in events)


class FlakyProxy:
    """Forwards to a real server, but answers the first ``failures`` POSTs with 503."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream = upstream
        self.failures = failures
        self.posts = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def forward(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if method == "POST":
                    proxy.posts += 1
                    if proxy.posts <= proxy.failures:
                        self.reply(503, b'{"success": false, "errors": ["try later"]}')
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                response = httpx2.request(
                    method, proxy.upstream + self.path, content=body, headers=headers, timeout=60
                )
                self.reply(response.status_code, response.content)

            def reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.forward("GET")

            def do_POST(self) -> None:
                self.forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_503s_are_ridden_out_and_a_409_stops_with_the_message(
    receiving: ServerProcess, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "flaky.csv", users(3_000))
    with FlakyProxy(receiving.url, failures=4) as proxy:
        done = cli(
            str(source), "--name", "Flaky", "--url", proxy.url, "--batch-size", "1000",
            "--session-id", "flaky-1", "--retry-base", "0.05",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert proxy.posts == 3 + 4
    assert status(receiving, "flaky-1")["state"] == "complete"

    with FlakyProxy(receiving.url, failures=100) as proxy:
        given_up = cli(
            str(source), "--name", "Flaky", "--url", proxy.url, "--batch-size", "1000",
            "--session-id", "flaky-2", "--retry-base", "0.01", "--max-attempts", "3",
            "--state", str(tmp_path / "flaky-2.state"),
        )  # fmt: skip
    assert given_up.returncode == 3
    assert "batch 1 failed 3 times; last: 503 try later" in given_up.stderr

    # a session the server holds under another name: 409, with the message and batch number
    fields = form("clash-1", 1, 3, 3_000, users(1_000), name="Someone else's")
    posted = httpx2.post(
        f"{receiving.url}/audience", files={k: (None, v) for k, v in fields.items()}, timeout=30
    )
    assert posted.status_code == 200
    conflict = cli(
        str(source), "--name", "Flaky", "--url", receiving.url, "--batch-size", "1000",
        "--session-id", "clash-1", "--state", str(tmp_path / "clash.state"),
    )  # fmt: skip
    assert conflict.returncode == 1
    assert "server refused batch 2 with 409: " in conflict.stderr

    # the input changed since its state file was written: refused before sending anything
    write_csv(source, users(3_000, start=90_000))
    changed = cli(str(source), "--name", "Flaky", "--url", receiving.url, "--batch-size", "1000")
    assert changed.returncode == 2
    assert "the input changed since session flaky-1 started" in changed.stderr


def test_csv_ndjson_json_and_stdin_give_the_same_segment(
    delivering: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    server, out = delivering
    rows = users(2_500)
    csv_file = write_csv(tmp_path / "u.csv", rows)
    ndjson_file = tmp_path / "u.ndjson"
    ndjson_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    json_file = tmp_path / "u.json"
    json_file.write_text(json.dumps(rows, indent=1))
    runs = {
        "csv": cli(str(csv_file), "--session-id", "f-csv", "--name", "F", "--url", server.url,
                   "--batch-size", "700", "--wait"),
        "ndjson": cli(str(ndjson_file), "--session-id", "f-ndjson", "--name", "F",
                      "--url", server.url, "--batch-size", "700", "--wait"),
        "json": cli(str(json_file), "--session-id", "f-json", "--name", "F",
                    "--url", server.url, "--batch-size", "700", "--wait"),
        "stdin": cli("-", "--session-id", "f-stdin", "--name", "F", "--url", server.url,
                     "--batch-size", "700", "--wait", stdin=csv_file.read_bytes()),
    }  # fmt: skip
    for fmt, run in runs.items():
        assert run.returncode == 0, (fmt, run.stderr)
    delivered = {fmt: delivered_lines(out, f"f-{fmt}") for fmt in runs}
    assert len(delivered["csv"]) == 2_500
    assert delivered["ndjson"] == delivered["csv"]
    assert delivered["json"] == delivered["csv"]
    assert delivered["stdin"] == delivered["csv"]


@contextlib.contextmanager
def hook_server(
    database_url: str, tmp_path: Path, hook: WebhookEmulator, **env: str
) -> Iterator[ServerProcess]:
    """A running server whose worker delivers to ``hook`` as destination ``crm``."""
    toml = tmp_path / "destinations.toml"
    toml.write_text(
        f'[[destinations]]\nid = "crm"\nkind = "webhook"\nurl = "{hook.url}"\n'
        'secret = "${HOOK_SECRET}"\n'
    )
    env = {"AUDIENCE_DESTINATIONS": str(toml), "HOOK_SECRET": HOOK_SECRET} | env
    server = ServerProcess(
        database_url, tmp_path / "server.log", AUDIENCE_WORKER_POLL="0.1s", **env
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class StderrLines:
    """The lines a running command writes to stderr, read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self.stream = process.stderr
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        with self.cond:
            found = self.cond.wait_for(
                lambda: next((line for line in self.lines if text in line), None), timeout
            )
        assert found, f"no {text!r} on stderr within {timeout} s: {self.lines}"
        return found


def upload_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "audience_server", "upload", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(AUDIENCE_LOG_LEVEL="WARNING"),
    )


def progress_lines(stderr: str) -> list[str]:
    """--wait's lines, without their time prefix."""
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if line.startswith("[")]


def test_wait_follows_a_held_delivery_until_it_succeeds(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    source = write_csv(tmp_path / "held.csv", users(300))
    hook.delay(120)  # the first chunk is held until released
    with hook_server(database_url, tmp_path, hook) as server, upload_process(
        str(source), "--name", "Held", "--url", server.url, "--session-id", "held-1",
        "--batch-size", "100", "--wait",
    ) as process:  # fmt: skip
        try:
            stderr = StderrLines(process)
            stderr.wait_for("delivering: crm 0 of 300 users")
            # The attempt shows as running before its first chunk reaches the receiver: a
            # release sent earlier would find nothing to release (the chunk would then wait
            # out the provider's 30 s timeout and be retried).
            hook.wait_until(lambda: hook.in_flight("held-1") == 1, timeout=30)
            assert process.poll() is None  # still waiting on the held chunk
            hook.release()
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
        stderr.thread.join(10)
        assert process.stdout is not None
        stdout = process.stdout.read()
    shown = progress_lines("\n".join(stderr.lines))
    assert shown[-1] == "delivered: crm succeeded (300 users)", shown
    assert "delivering: crm 0 of 300 users" in shown
    assert len(shown) == len(set(shown))  # a line per change, none repeated
    assert "state     delivered" in stdout and "unique    300" in stdout
    assert len(hook.wait_for_segment("held-1")) == 300


def test_wait_outlasts_its_timeout_while_retries_make_progress(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    """Six 503s, each asking for a retry a second later: at least 6 s of retrying, longer
    than the 4 s --wait-timeout, yet each attempt is progress, so --wait sees it to the end."""
    source = write_csv(tmp_path / "retried.csv", users(200))
    hook.fail(503, times=6, retry_after="1")
    retries = {"AUDIENCE_DELIVERY_RETRY_BASE": "0.5s", "AUDIENCE_DELIVERY_RETRY_CAP": "0.5s"}
    with hook_server(database_url, tmp_path, hook, **retries) as server, upload_process(
        str(source), "--name", "Retried", "--url", server.url, "--session-id", "retried-1",
        "--wait", "--wait-timeout", "4",
    ) as process:  # fmt: skip
        try:
            hook.wait_until(lambda: len(hook.rejected) >= 1, timeout=60)
            first_failure = time.monotonic()
            _, stderr = process.communicate(timeout=120)
            retrying = time.monotonic() - first_failure
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert retrying > 4  # --wait went on past its timeout, since every attempt is progress
    assert len(hook.rejected) == 6 and len(hook.requests) == 1
    shown = progress_lines(stderr)
    assert shown[-1] == "delivered: crm succeeded (200 users)"
    # Polled every 0.5 s, --wait sees the seven attempts come and go, in order.
    seen = [int(n) for line in shown for n in re.findall(r"\(attempt (\d+)\)", line)]
    assert seen == sorted(seen) and len(set(seen)) >= 4, shown


def test_wait_gives_up_on_a_stalled_delivery_with_exit_4(
    database_url: str, tmp_path: Path, hook: WebhookEmulator
) -> None:
    source = write_csv(tmp_path / "stalled.csv", users(300))
    hook.delay(300)  # held well past the test; the emulator's close ends it
    with hook_server(database_url, tmp_path, hook) as server:
        started = time.monotonic()
        done = cli(
            str(source), "--name", "Stalled", "--url", server.url, "--session-id", "stall-1",
            "--wait", "--wait-timeout", "1.5",
        )  # fmt: skip
        took = time.monotonic() - started
        body = status(server, "stall-1")
        hook.release()  # so that the server stops at once, its delivery done
    assert done.returncode == 4, done.stderr
    assert took < 60
    assert (
        "audience-server: uploaded; the deliveries had not ended when --wait gave up after "
        "1.5 s without progress; follow with `audience-server status stall-1`"
    ) in done.stderr
    assert progress_lines(done.stderr)[-1] == "delivering: crm 0 of 300 users"
    assert "state     delivering" in done.stdout
    assert (body["state"], body["assembledUsers"], body["uniqueUsers"]) == ("delivering", 300, 300)
    assert body["deliveries"][0]["state"] == "running"


def test_a_wait_timeout_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "u.csv", users(3))
    for bad in ("0", "-1", "nan"):
        done = cli(str(source), "--name", "N", "--url", "http://127.0.0.1:9", "--wait",
                   "--wait-timeout", bad)  # fmt: skip
        assert done.returncode == 2 and "--wait-timeout must be > 0" in done.stderr

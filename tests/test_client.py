"""The Python client and the file reading under it: streamed formats, fingerprints, retries."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from audience_server import upload as files
from audience_server.client import (
    AudienceClient,
    Batch,
    Rejected,
    Unreachable,
    make_batches,
    status,
    upload,
)
from audience_server.retry import RetryPolicy
from tests.servers import ServerProcess


def test_csv_cells_are_strings_empty_cells_absent_unknown_columns_kept(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text('\ufeffemail,phone,tier\na@x.com,,gold\n,+1415,"multi\nline"\n,,\n')
    assert list(files.read_users(path, "csv")) == [
        {"email": "a@x.com", "tier": "gold"},
        {"phone": "+1415", "tier": "multi\nline"},
    ]


def test_a_json_array_is_decoded_element_by_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_CHUNK", 7)  # elements straddle every read
    rows = [{"email": f"u{i}@x.com", "n": [i, {"k": "]"}]} for i in range(50)]
    path = tmp_path / "u.json"
    path.write_text(" \n" + json.dumps(rows, indent=2) + "\n")
    assert list(files.read_users(path, "json")) == rows
    path.write_text('[{"a": "1"}, 2]')
    with pytest.raises(files.InputError, match="element 1 is not an object"):
        list(files.read_users(path, "json"))
    path.write_text('[{"a": "1"}, {"b": ')
    with pytest.raises(files.InputError, match="element 1 is not valid JSON"):
        list(files.read_users(path, "json"))


def test_formats_are_detected_and_the_fingerprint_follows_the_content(tmp_path: Path) -> None:
    ndjson = tmp_path / "users.txt"
    ndjson.write_text('{"email": "a@x.com"}\n\n{"email": "b@x.com"}\n')
    assert files.detect_format(ndjson) == "ndjson"
    first = files.fingerprint(ndjson, "ndjson")
    assert (first.users, first.size) == (2, ndjson.stat().st_size)
    ndjson.write_text('{"email": "a@x.com"}\n\n{"email": "c@x.com"}\n')
    assert files.fingerprint(ndjson, "ndjson").sha256 != first.sha256


def test_batches_are_numbered_from_one_and_only_wanted_ones_encoded() -> None:
    users = [{"email": f"u{i}"} for i in range(25)]
    every = list(make_batches(users, 10))
    assert [(b.sequence, b.users) for b in every] == [(1, 10), (2, 10), (3, 5)]
    assert [b.sequence for b in make_batches(users, 10, {3})] == [3]


class Ticks:
    """A monotonic clock the test moves; it starts at 0, as on a machine just booted."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("boot", [0.0, 59.0, 86_400.0])
def test_progress_prints_plain_lines_when_not_a_terminal(boot: float) -> None:
    """The first line comes at once and the last at the end, however long the machine has
    been up (monotonic time is the time since boot)."""
    out, clock = io.StringIO(), Ticks(boot)
    progress = files.Progress(40, 4, out, interval=3600, clock=clock)
    for _ in range(4):
        clock.now += 1.0
        progress.advance(10)
    first, last = out.getvalue().splitlines()  # the first at once, then the last
    assert first.startswith("progress  25.0% users 10/40 batches 1/4 ")
    assert last.startswith("progress 100.0% users 40/40 batches 4/4 ")
    assert "10 users/s elapsed 0:04" in last  # 40 users in 4 s of the injected clock


def test_progress_lines_come_every_interval() -> None:
    out, clock = io.StringIO(), Ticks()
    progress = files.Progress(100, 10, out, interval=5.0, clock=clock)
    for _ in range(10):
        clock.now += 2.0
        progress.advance(10)
    shown = [line.split("batches ")[1].split(" ")[0] for line in out.getvalue().splitlines()]
    assert shown == ["1/10", "4/10", "7/10", "10/10"]  # at 2 s, 8 s, 14 s, then the last


def flaky(failures: int, final: int) -> tuple[httpx2.MockTransport, list[int]]:
    calls: list[int] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        if len(calls) <= failures:
            if len(calls) == 1:
                raise httpx2.ConnectError("refused", request=request)
            return httpx2.Response(503, json={"success": False, "errors": ["busy"]})
        if final == 200:
            return httpx2.Response(200, json={"success": True})
        return httpx2.Response(final, json={"success": False, "errors": ["name differs."]})

    return httpx2.MockTransport(handle), calls


def send(client: AudienceClient) -> None:
    batch = Batch(4, 1, b'[{"email": "a@x.com"}]')
    client.send_batch(
        name="S", type="custom", session_id="s", total_batches=5, total_users=5, batch=batch
    )


def test_transient_failures_are_retried_then_given_up_and_4xx_stop() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(base=1.0, cap=4.0, max_attempts=4)
    transport, calls = flaky(3, 200)
    send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    assert len(calls) == 4 and len(sleeps) == 3
    transport, calls = flaky(9, 200)
    with pytest.raises(Unreachable, match="batch 4 failed 4 times; last: 503 busy"):
        send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    transport, calls = flaky(0, 409)
    with pytest.raises(Rejected, match=r"refused batch 4 with 409: name differs\.") as caught:
        send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    assert (caught.value.status, caught.value.sequence, len(calls)) == (409, 4, 1)


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(database_url, tmp_path / "server.log").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.slow
def test_upload_a_generator_then_resume_it(server: ServerProcess) -> None:
    def users() -> Iterator[dict[str, Any]]:
        for i in range(2_345):
            yield {"email": f"user{i}@example.com", "tier": str(i % 3)}

    seen: list[int] = []
    result = upload(
        users(),
        name="Gen",
        url=server.url,
        session_id="gen-1",
        batch_size=500,
        concurrency=3,
        on_batch=lambda sequence, count: seen.append(sequence),
    )
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert (result.total_batches, result.status["state"]) == (5, "complete")
    again = upload(list(users()), name="Gen", url=server.url, session_id="gen-1", batch_size=500)
    assert (again.sent_batches, again.status["receivedUsers"]) == (0, 2_345)
    found = status("gen-1", url=server.url)
    assert found is not None and found["state"] == "complete"
    assert status("nope", url=server.url) is None


def test_spooled_stdin_has_no_name_to_leave_behind(tmp_path: Path) -> None:
    """stdin is spooled to be read twice; a client killed meanwhile must leave no file."""
    data = b'{"email": "a@x.com"}\n{"email": "b@x.com"}\n'
    with files.spool_stdin(io.BytesIO(data), directory=str(tmp_path)) as spooled:
        assert list(tmp_path.iterdir()) == []
        assert files.detect_format(spooled) == "ndjson"
        assert files.fingerprint(spooled, "ndjson").users == 2
        assert [u["email"] for u in files.read_users(spooled, "ndjson")] == ["a@x.com", "b@x.com"]

"""client/progress.py: progress lines on an injected clock that starts near zero, while
batches go out and while ``--wait`` follows the server."""

from __future__ import annotations

import io
from typing import Any

import pytest

from audience_server.client.progress import (
    Progress,
    WaitProgress,
    describe_progress,
    progress_key,
)


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
    progress = Progress(40, 4, out, interval=3600, clock=clock)
    for _ in range(4):
        clock.now += 1.0
        progress.advance(10)
    first, last = out.getvalue().splitlines()  # the first at once, then the last
    assert first.startswith("progress  25.0% users 10/40 batches 1/4 ")
    assert last.startswith("progress 100.0% users 40/40 batches 4/4 ")
    assert "10 users/s elapsed 0:04" in last  # 40 users in 4 s of the injected clock


def test_progress_lines_come_every_interval() -> None:
    out, clock = io.StringIO(), Ticks()
    progress = Progress(100, 10, out, interval=5.0, clock=clock)
    for _ in range(10):
        clock.now += 2.0
        progress.advance(10)
    shown = [line.split("batches ")[1].split(" ")[0] for line in out.getvalue().splitlines()]
    assert shown == ["1/10", "4/10", "7/10", "10/10"]  # at 2 s, 8 s, 14 s, then the last


def test_skipped_batches_count_as_done_but_not_in_the_rate() -> None:
    out, clock = io.StringIO(), Ticks()
    progress = Progress(100, 10, out, interval=3600, clock=clock)
    progress.skip(8, 80)
    clock.now += 2.0
    progress.advance(10)
    assert out.getvalue().startswith("progress  90.0% users 90/100 batches 9/10 5 users/s ")


def session(state: str, **fields: Any) -> dict[str, Any]:
    """A status body as GET /audience/sessions/{id} gives it, with what the test sets."""
    body: dict[str, Any] = {
        "sessionId": "s",
        "state": state,
        "reason": None,
        "totalUsers": 10_000_000,
        "receivedUsers": 10_000_000,
        "assembledUsers": None,
        "uniqueUsers": None,
        "deliveries": [],
    }
    return body | fields


def delivery(destination: str, state: str, attempts: int, sent: int = 0) -> dict[str, Any]:
    return {"destination": destination, "state": state, "attempts": attempts, "usersSent": sent}


def test_progress_lines_say_what_the_server_is_doing() -> None:
    assert describe_progress(session("receiving", receivedUsers=1_500)) == (
        "receiving: 1,500 of 10,000,000 users"
    )
    assert describe_progress(session("complete")) == (
        "complete: waiting for assembly of 10,000,000 users"
    )
    assert describe_progress(session("complete", assembledUsers=4_000_000)) == (
        "assembling: 4,000,000 of 10,000,000 users"
    )
    deliveries = [
        delivery("file", "running", 1, 3_100_000),
        delivery("crm", "pending", 1),
        delivery("meta", "pending", 0),
        delivery("tiktok", "running", 3, 20_000),
    ]
    assert describe_progress(
        session("delivering", uniqueUsers=9_900_557, deliveries=deliveries)
    ) == (
        "delivering: file 3,100,000 of 9,900,557 users, crm pending (attempt 2), "
        "meta pending, tiktok 20,000 of 9,900,557 users (attempt 3)"
    )
    ended = [delivery("file", "succeeded", 1, 9_900_557), delivery("crm", "failed", 1)]
    assert describe_progress(session("partially_delivered", deliveries=ended)) == (
        "partially_delivered: file succeeded (9,900,557 users), crm failed after 1 attempt"
    )
    assert describe_progress(session("aborted", reason="aborted by an operator")) == (
        "aborted: aborted by an operator"
    )


def test_progress_is_any_change_of_state_assembly_or_a_deliverys_work() -> None:
    base = session("delivering", deliveries=[delivery("file", "running", 1, 10)])
    same = session("delivering", deliveries=[delivery("file", "running", 1, 10)])
    assert progress_key(base) == progress_key(same | {"updatedAt": "later"})
    changes = [
        session("delivered", deliveries=[delivery("file", "running", 1, 10)]),
        session("delivering", assembledUsers=5, deliveries=[delivery("file", "running", 1, 10)]),
        session("delivering", deliveries=[delivery("file", "pending", 1, 10)]),
        session("delivering", deliveries=[delivery("file", "running", 2, 10)]),
        session("delivering", deliveries=[delivery("file", "running", 1, 11)]),
        session("delivering", deliveries=[delivery("crm", "running", 1, 10)]),
    ]
    assert all(progress_key(changed) != progress_key(base) for changed in changes)


def test_wait_progress_prints_a_line_per_change_with_the_time_waited() -> None:
    out, clock = io.StringIO(), Ticks(59.0)  # monotonic time since boot, not zero
    shown = WaitProgress(out, tty=False, clock=clock)
    shown.show(session("complete"))
    clock.now += 75.0
    shown.show(session("complete", assembledUsers=4_000_000))
    shown.close()
    assert out.getvalue().splitlines() == [
        "[0:00] complete: waiting for assembly of 10,000,000 users",
        "[1:15] assembling: 4,000,000 of 10,000,000 users",
    ]


def test_wait_progress_rewrites_one_line_on_a_terminal() -> None:
    out, clock = io.StringIO(), Ticks()
    shown = WaitProgress(out, tty=True, clock=clock)
    shown.close()
    assert out.getvalue() == ""  # nothing shown, nothing to end
    shown.show(session("complete", assembledUsers=1))
    clock.now += 3_725.0
    shown.show(session("complete", assembledUsers=2))
    shown.close()
    assert out.getvalue() == (
        "\r[0:00] assembling: 1 of 10,000,000 users\x1b[K"
        "\r[1:02:05] assembling: 2 of 10,000,000 users\x1b[K\n"
    )

"""client/progress.py: progress lines on an injected clock that starts near zero."""

from __future__ import annotations

import io

import pytest

from audience_server.client.progress import Progress


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

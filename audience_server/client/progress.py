"""The progress shown while batches go out: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A bar redrawn in place on a terminal; plain lines every ``interval`` s otherwise."""

    def __init__(
        self,
        total_users: int,
        total_batches: int,
        stream: TextIO = sys.stderr,
        *,
        tty: bool | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_users = total_users
        self.total_batches = total_batches
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = 0.1 if self.tty else interval
        self.users = 0
        self.batches = 0
        self.sent_users = 0  # only what this run sent: the rate ignores skipped batches
        self.clock = clock
        self.started = clock()
        # Never shown yet: the first line is due at once, whatever the clock reads (monotonic
        # time starts near zero on a machine booted a minute ago).
        self.shown = -math.inf

    def skip(self, batches: int, users: int) -> None:
        """Batches the server already had, counted as done."""
        self.batches += batches
        self.users += users

    def advance(self, users: int) -> None:
        self.batches += 1
        self.users += users
        self.sent_users += users
        now = self.clock()
        if now - self.shown >= self.interval or self.batches == self.total_batches:
            self.shown = now
            self.show()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = self.sent_users / elapsed
        left = self.total_users - self.users
        eta = _duration(left / rate) if rate > 0 else "?"
        share = self.users / self.total_users if self.total_users else 1.0
        return (
            f"{share:6.1%} users {self.users:,}/{self.total_users:,} "
            f"batches {self.batches:,}/{self.total_batches:,} "
            f"{rate:,.0f} users/s elapsed {_duration(elapsed)} eta {eta}"
        )

    def show(self) -> None:
        if self.tty:
            width = 24
            filled = int(width * self.users / self.total_users) if self.total_users else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {self.line()}\x1b[K")
        else:
            self.stream.write(f"progress {self.line()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.batches:
            self.stream.write("\n")
            self.stream.flush()

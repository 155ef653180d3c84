"""The progress shown while batches go out, and while ``--wait`` follows the server's work
on the session: rewritten in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, TextIO

from ..states import DeliveryState, SessionState


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


def progress_key(status: dict[str, Any]) -> Hashable:
    """What changes while the server works on a session: its state, the users assembled, and
    each delivery's state, attempts and users sent. ``--wait`` gives up only once this has
    stayed the same for its whole timeout."""
    deliveries = tuple(
        (d["destination"], d["state"], d["attempts"], d["usersSent"])
        for d in status.get("deliveries") or ()
    )
    return status["state"], status.get("assembledUsers"), deliveries


def _delivery_line(delivery: dict[str, Any], unique: int | None) -> str:
    """One delivery's part of the line; ``(attempt N)`` names the attempt it is on or waits
    to make, shown from the second on."""
    name, state, attempts = delivery["destination"], delivery["state"], delivery["attempts"]
    sent = delivery["usersSent"]
    if state == DeliveryState.RUNNING:
        of = f" of {unique:,}" if unique is not None else ""
        again = f" (attempt {attempts})" if attempts > 1 else ""
        return f"{name} {sent:,}{of} users{again}"
    if state == DeliveryState.PENDING:  # not yet claimed, or its retry is due later
        return f"{name} pending (attempt {attempts + 1})" if attempts else f"{name} pending"
    if state == DeliveryState.SUCCEEDED:
        return f"{name} succeeded ({sent:,} users)"
    return f"{name} {state} after {attempts} attempt{'s' if attempts != 1 else ''}"


def describe_progress(status: dict[str, Any]) -> str:
    """The session's progress in one line: ``assembling: 4,000,000 of 10,000,000 users``,
    ``delivering: file 3,100,000 of 9,900,557 users, crm pending (attempt 2)``."""
    state = status["state"]
    if state == SessionState.RECEIVING:
        return f"receiving: {status['receivedUsers']:,} of {status['totalUsers']:,} users"
    if state == SessionState.COMPLETE:
        assembled = status.get("assembledUsers")
        if assembled is None:
            return f"complete: waiting for assembly of {status['totalUsers']:,} users"
        return f"assembling: {assembled:,} of {status['totalUsers']:,} users"
    deliveries = status.get("deliveries") or []
    if deliveries:
        unique = status.get("uniqueUsers")
        return f"{state}: " + ", ".join(_delivery_line(d, unique) for d in deliveries)
    reason = status.get("reason")
    return f"{state}: {reason}" if reason else state


class WaitProgress:
    """The session's progress while ``--wait`` follows it, shown on each change: one line
    per change, or one line rewritten in place on a terminal; each with the time waited."""

    def __init__(
        self,
        stream: TextIO = sys.stderr,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.shown = False

    def show(self, status: dict[str, Any]) -> None:
        line = f"[{_duration(self.clock() - self.started)}] {describe_progress(status)}"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()

"""Prometheus metrics: the process's counters, the gauges read from the database at scrape
time, and how ``serve`` shares counters with its worker child.

Counters and the request histogram are per process, as Prometheus expects. ``serve`` runs
its delivery worker in a child process, so it gives both a folder for prometheus-client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, inherited by the child) and its scrape
sums them. The folder lives in serve's scratch folder: removed when serve stops, and swept
by the next start if serve was killed. Sessions by state and the oldest receiving session's
age are read from the database on each scrape, so every process on one database says the
same.

prometheus-client picks its value storage (memory or shared files) when it is imported,
so this module imports it only on first use: after ``share_with_children`` has run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from . import db
from .clock import Clock
from .models import sessions
from .scratch import Scratch
from .states import BatchResult, SessionState
from .store import overdue

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Up to the sync wait's default (120 s): a sync completing batch waits for its deliveries.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Instruments:
    """This process's counters and histogram, and the registry that holds them."""

    registry: CollectorRegistry
    batches: Counter
    users_received: Counter
    conflicts: Counter
    attempts: Counter
    users_sent: Counter
    request_duration: Histogram


_lock = threading.Lock()
_instruments: Instruments | None = None


def instruments() -> Instruments:
    """The process's instruments, made on first use (see the module's docstring)."""
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = _make()
        return _instruments


def _make() -> Instruments:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    # A registry of our own: the default one would add the client's process metrics,
    # which a multiprocess scrape could not sum.
    registry = CollectorRegistry(auto_describe=True)
    return Instruments(
        registry=registry,
        batches=Counter(
            "audience_batches",
            "Batches by what they did: stored, duplicate, completed, inconsistent, "
            "or rejected_<status class> (nothing stored).",
            ["result"],
            registry=registry,
        ),
        users_received=Counter(
            "audience_users_received",
            "Users in batches stored (duplicates of a batch excluded).",
            registry=registry,
        ),
        conflicts=Counter(
            "audience_conflicts", "Batches refused with 409 (conflicts).", registry=registry
        ),
        attempts=Counter(
            "audience_delivery_attempts",
            "Delivery attempts by destination and outcome: succeeded, retry, failed, interrupted.",
            ["destination", "outcome"],
            registry=registry,
        ),
        users_sent=Counter(
            "audience_delivery_users_sent",
            "Users sent to a destination, counted when each attempt ends.",
            ["destination"],
            registry=registry,
        ),
        request_duration=Histogram(
            "audience_request_duration_seconds",
            "HTTP request duration by route template.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
    )


def batch_label(result: BatchResult, status: int) -> str:
    """The ``result`` label: a refused batch by its status class (``rejected_4xx``)."""
    if result == BatchResult.REJECTED:
        return f"rejected_{status // 100}xx"
    return str(result)


def count_batch(result: BatchResult, status: int, users: int) -> None:
    """Count one batch's outcome. Never raises: metrics must not fail a request."""
    with _never_raise():
        metrics = instruments()
        metrics.batches.labels(batch_label(result, status)).inc()
        if result in (BatchResult.STORED, BatchResult.COMPLETED, BatchResult.INCONSISTENT):
            metrics.users_received.inc(users)
        if status == 409:
            metrics.conflicts.inc()


def count_attempt(destination: str, outcome: str, users_sent: int) -> None:
    """Count one ended attempt and the users it sent (an attempt's count starts at 0)."""
    with _never_raise():
        metrics = instruments()
        metrics.attempts.labels(destination, outcome).inc()
        metrics.users_sent.labels(destination).inc(users_sent)


def observe_request(route: str, seconds: float) -> None:
    with _never_raise():
        instruments().request_duration.labels(route).observe(seconds)


@contextlib.contextmanager
def _never_raise() -> Iterator[None]:
    # OSError: a multiprocess folder removed under a worker whose serve was killed.
    with contextlib.suppress(OSError):
        yield


def share_with_children(scratch: Scratch) -> Path:
    """Make this process and the children it starts keep counters in files of one folder
    under ``scratch``; call before anything imports prometheus_client."""
    folder = scratch.path / "metrics"
    folder.mkdir(mode=0o700)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


class DatabaseCollector:
    """The gauges read from the database on each scrape, over every tenant."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        now = self.clock()
        receiving = sessions.c.state == SessionState.RECEIVING
        with db.read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(sessions.c.state, func.count())
                .where(~overdue(now))
                .group_by(sessions.c.state)
            ).all()
            expired = conn.execute(select(func.count()).where(overdue(now))).scalar_one()
            oldest = conn.execute(
                select(func.min(sessions.c.created_at)).where(receiving, ~overdue(now))
            ).scalar_one()
        counts: dict[str, int] = {state: count for state, count in rows}
        counts[SessionState.EXPIRED] = counts.get(SessionState.EXPIRED, 0) + expired
        by_state = GaugeMetricFamily(
            "audience_sessions", "Sessions by state, as status reads them.", labels=["state"]
        )
        for state in SessionState:  # every state, zeros too: alerts need the series
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily(
            "audience_oldest_receiving_session_age_seconds",
            "Age of the oldest session still receiving (0 when none is).",
            value=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
        )


class _Scrape:
    """The collectors of one scrape, as the one ``generate_latest`` takes."""

    def __init__(self, *collectors: CollectorRegistry | DatabaseCollector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def exposition(engine: Engine, clock: Clock) -> bytes:
    """The scrape's text: this process's instruments (with the multiprocess folder: every
    process's, summed) and the database's gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    own = instruments().registry  # made now if not yet: every family shows from the start
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:  # the files hold this process's values too
        own = CollectorRegistry()
        MultiProcessCollector(own, folder)  # type: ignore[no-untyped-call]
    return generate_latest(_Scrape(own, DatabaseCollector(engine, clock)))

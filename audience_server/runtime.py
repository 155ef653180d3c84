"""What a server or worker process runs besides requests: the schema check, the
destinations, the worker and the sweeper. Both ``app``'s lifespan and ``cli`` use it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable

import anyio.to_thread
from sqlalchemy import Connection, Engine

from . import db
from .clock import Clock, utcnow
from .lifecycle import expire_overdue, purge_ended
from .providers import configured_destinations
from .retry import RetryPolicy
from .settings import Settings
from .worker import Destinations, Doorbell, Worker

log = logging.getLogger("audience_server")


def prepare_database(settings: Settings, engine: Engine) -> None:
    """SQLite migrates itself; PostgreSQL must already be at head (``audience-server migrate``)."""
    if db.schema_is_current(engine):
        return
    if settings.is_sqlite:
        db.migrate(engine)
    else:
        raise RuntimeError(
            "the database schema is not at the newest revision; run `audience-server migrate`"
        )


def load_destinations(settings: Settings) -> Destinations:
    """Every configured destination, built and ready to send."""
    return configured_destinations(
        settings.destinations_path, explicit=settings.destinations_explicit, environ=os.environ
    )


def make_worker(
    settings: Settings,
    engine: Engine,
    destinations: Destinations,
    clock: Clock = utcnow,
    changes: Doorbell | None = None,
    worker_id: str | None = None,
) -> Worker:
    """A worker as the settings describe it."""
    return Worker(
        engine,
        destinations,
        clock=clock,
        policy=RetryPolicy(
            base=settings.retry_base.total_seconds(),
            cap=settings.retry_cap.total_seconds(),
            max_attempts=settings.delivery_max_attempts,
        ),
        segment_prefix=settings.segment_prefix,
        lease=settings.lease,
        chunk_timeout=settings.chunk_timeout,
        poll_interval=settings.poll_interval.total_seconds(),
        concurrency=settings.worker_concurrency,
        changes=changes,
        scratch_root=settings.scratch_dir,
        worker_id=worker_id,
    )


async def run_worker(worker: Worker, stop: asyncio.Event, grace: float = 10.0) -> None:
    """Run until ``stop``; then give work in hand ``grace`` seconds before cancelling it
    (a cancelled delivery's lease lapses and another worker resumes it)."""
    task = asyncio.create_task(worker.run(stop))
    await stop.wait()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def sweep_once(
    engine: Engine, now: dt.datetime, retention: dt.timedelta = dt.timedelta(days=7)
) -> tuple[int, int]:
    """Expire overdue receiving sessions and purge the users of sessions whose deliveries
    ended ``retention`` ago, in short transactions of 100; returns both counts."""

    def repeat(step: Callable[[Connection], int]) -> int:
        total = 0
        while True:
            with db.write_transaction(engine) as conn:
                count = step(conn)
            total += count
            if count == 0:
                return total

    expired = repeat(lambda conn: expire_overdue(conn, now))
    purged = repeat(lambda conn: purge_ended(conn, now, retention))
    return expired, purged


async def sweep_forever(settings: Settings, engine: Engine, clock: Clock) -> None:
    """``sweep_once`` every ``AUDIENCE_SWEEP_INTERVAL`` until cancelled; a failed sweep is
    logged and tried again at the next."""
    interval = settings.sweep_interval.total_seconds()
    while True:
        await asyncio.sleep(interval)
        try:
            expired, purged = await anyio.to_thread.run_sync(
                sweep_once, engine, clock(), settings.retention
            )
            if expired or purged:
                log.info("sweep", extra={"sessionsExpired": expired, "sessionsPurged": purged})
        except Exception:
            log.exception("sweep failed; will try again")

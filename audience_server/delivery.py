"""The delivery worker: assembles complete sessions and forwards them to every destination.

Work is claimed from the database in short transactions (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite's single writer does the same), run with no transaction open, and its
outcome written in another. A claim is a lease: a worker that dies stops renewing it, and
once it lapses any worker takes the work over. So any number of workers, in any number of
processes, share one database and never run one (session, destination) at the same time.

    complete --assemble--> delivering --every delivery ended--> delivered
                                                             | partially_delivered | failed
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection, Engine, Select, and_, insert, or_, select, update

from . import db, store
from .assembly import UsersPurged, chunked, find_duplicates, unique_users
from .destinations import DestinationConfig
from .models import deliveries, delivery_attempts, sessions
from .providers.base import (
    Chunk,
    ChunkResult,
    DeliveryError,
    PermanentError,
    Provider,
    RetryableError,
    Segment,
)
from .retry import RetryPolicy
from .scratch import LazyScratch

log = logging.getLogger("audience_server.delivery")

ENDED = frozenset({"succeeded", "failed"})
SESSION_ENDED = frozenset({"delivered", "partially_delivered", "failed"})


def segment_name(name: str, prefix: str, disable_prefix: bool) -> str:
    """The name at the destination: ``blotout_High_Value_Customers_Q1`` or the name as sent."""
    if disable_prefix:
        return name
    return prefix + re.sub(r"\s+", "_", name)


class Signal:
    """Wakes coroutines waiting for a change; safe to fire from any thread."""

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def fire(self) -> None:
        for loop, event in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)

    async def wait(self, timeout: float) -> None:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        self._waiters.add(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[1].wait(), timeout)
        finally:
            self._waiters.discard(entry)


@dataclass(frozen=True)
class Claim:
    """A delivery this worker holds the lease of, with what it needs to run it."""

    tenant: str
    session_key: str
    destination: str
    attempt: int
    budget_from: int
    name: str
    type: str
    segment_name: str
    unique_users: int


@dataclass(frozen=True)
class Outcome:
    state: str  # succeeded | pending (retry) | failed
    users_sent: int
    invalid_users: int
    error: str | None = None
    http_status: int | None = None
    retry_after: float | None = None


class Worker:
    """Claims and runs assembly and delivery work until stopped."""

    def __init__(
        self,
        engine: Engine,
        destinations: Mapping[str, tuple[DestinationConfig, Provider]],
        *,
        clock: Callable[[], dt.datetime],
        policy: RetryPolicy,
        segment_prefix: str = "blotout_",
        lease: dt.timedelta = dt.timedelta(seconds=60),
        poll_interval: float = 1.0,
        concurrency: int = 4,
        changes: Signal | None = None,
        scratch_root: Path | None = None,
        chunk_timeout: dt.timedelta = dt.timedelta(minutes=10),
    ) -> None:
        self.engine = engine
        self.destinations = destinations
        self.clock = clock
        self.policy = policy
        self.segment_prefix = segment_prefix
        self.lease = lease
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.changes = changes or Signal()
        self.scratch = LazyScratch(scratch_root)
        self.chunk_timeout = chunk_timeout.total_seconds()
        self.id = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = Signal()

    def wake(self) -> None:
        """New work may be waiting (a session just completed, a retry was asked for)."""
        self._wake.fire()

    async def run(self, stop: asyncio.Event) -> None:
        """Run ``concurrency`` lanes until ``stop`` is set; work in hand is finished first."""
        log.info("worker started", extra={"worker": self.id, "concurrency": self.concurrency})
        try:
            await anyio.to_thread.run_sync(self.scratch.path)  # sweeps what killed ones left
            await asyncio.gather(*(self._lane(stop) for _ in range(self.concurrency)))
        finally:
            await self.close()

    async def close(self) -> None:
        """Release the providers' connections and remove this worker's scratch folder."""
        try:
            for _, provider in self.destinations.values():
                await provider.aclose()
        finally:
            self.scratch.close()

    async def _lane(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await self.step()
            except Exception:
                log.exception("worker step failed; going on", extra={"worker": self.id})
                busy = False
            if not busy:
                waiter = asyncio.ensure_future(self._wake.wait(self.poll_interval))
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()

    async def step(self) -> bool:
        """Do one piece of work if there is any; False when there was none."""
        session = await anyio.to_thread.run_sync(self._claim_assembly)
        if session is not None:
            await anyio.to_thread.run_sync(self._assemble, *session)
            return True
        claim = await anyio.to_thread.run_sync(self._claim_delivery)
        if claim is not None:
            await self._deliver(claim)
            return True
        return False

    async def drain(self) -> None:
        """Run work until none is ready now (one-shot runs). A delivery waiting to be
        retried later is left for a later run."""
        await anyio.to_thread.run_sync(self.scratch.path)  # sweeps what killed ones left
        while await self.step():
            pass

    # --- assembly -------------------------------------------------------------------

    def _claim_assembly(self) -> tuple[str, str] | None:
        now = self.clock()
        query = (
            select(sessions.c.tenant, sessions.c.session_key)
            .where(
                sessions.c.state == "complete",
                or_(sessions.c.lease_expires_at.is_(None), sessions.c.lease_expires_at < now),
            )
            .order_by(sessions.c.completed_at)
            .limit(1)
        )
        if not self._any(query):
            return None
        with db.write_transaction(self.engine) as conn:
            row = conn.execute(query.with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            store.update_session(
                conn,
                row.tenant,
                row.session_key,
                lease_owner=self.id,
                lease_expires_at=now + self.lease,
            )
        return row.tenant, row.session_key

    def _assemble(self, tenant: str, key: str) -> None:
        try:
            unique = find_duplicates(self.engine, tenant, key, self.scratch.path())
        except UsersPurged:
            log.info("assembly stopped: users purged", extra={"sessionId": key})
            return
        now = self.clock()
        with db.write_transaction(self.engine) as conn:
            session = store.lock_session(conn, tenant, key)
            if session is None or session.state != "complete" or session.lease_owner != self.id:
                return  # aborted meanwhile, or the lease lapsed and another worker took it
            names = {
                destination: segment_name(
                    session.name, self.segment_prefix, bool(session.disable_prefix)
                )
                for destination in self.destinations
            }
            for destination, (config, _) in self.destinations.items():
                conn.execute(
                    insert(deliveries).values(
                        tenant=tenant,
                        session_key=key,
                        destination=destination,
                        kind=config.kind,
                        segment_name=names[destination],
                        state="pending",
                        attempts=0,
                        budget_from=0,
                        users_sent=0,
                        invalid_users=0,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
            values: dict[str, Any] = {
                "state": "delivering" if self.destinations else "delivered",
                "unique_users": unique,
                "lease_owner": None,
                "lease_expires_at": None,
                "updated_at": now,
            }
            if not self.destinations:
                values["ended_at"] = now
            store.update_session(conn, tenant, key, **values)
            detail = f"{unique} unique users; {len(self.destinations)} deliveries"
            store.add_event(conn, tenant, key, now, "assembled", detail)
        log.info(
            "session assembled",
            extra={"sessionId": key, "tenant": tenant, "uniqueUsers": unique},
        )
        self.changes.fire()

    # --- deliveries -----------------------------------------------------------------

    def _any(self, query: Select[Any]) -> bool:
        """A cheap look without locks: an idle worker polling must not take SQLite's
        write lock (or PostgreSQL row locks) each time it finds nothing."""
        with db.read_transaction(self.engine) as conn:
            return conn.execute(query).first() is not None

    def _claim_delivery(self) -> Claim | None:
        now = self.clock()
        query = (
            select(deliveries)
            .where(
                deliveries.c.destination.in_(list(self.destinations)),
                or_(
                    and_(deliveries.c.state == "pending", deliveries.c.next_attempt_at <= now),
                    and_(deliveries.c.state == "running", deliveries.c.lease_expires_at < now),
                ),
            )
            .order_by(deliveries.c.next_attempt_at)
            .limit(1)
        )
        if not self._any(query):
            return None
        with db.write_transaction(self.engine) as conn:
            row = conn.execute(query.with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            pk = (row.tenant, row.session_key, row.destination)
            if row.state == "running":  # its worker died or hung: close that attempt
                conn.execute(
                    update(delivery_attempts)
                    .where(*_attempt_pk(*pk), delivery_attempts.c.finished_at.is_(None))
                    .values(finished_at=now, outcome="interrupted", error="worker lost its lease")
                )
            session = store.get_session(conn, row.tenant, row.session_key)
            assert session is not None
            if session.state == "aborted" or session.purged_at is not None:
                conn.execute(
                    update(deliveries)
                    .where(*_delivery_pk(*pk))
                    .values(state="failed", last_error="session aborted", updated_at=now)
                )
                return None
            attempt = row.attempts + 1
            conn.execute(
                insert(delivery_attempts).values(
                    tenant=row.tenant,
                    session_key=row.session_key,
                    destination=row.destination,
                    number=attempt,
                    worker=self.id,
                    started_at=now,
                )
            )
            conn.execute(
                update(deliveries)
                .where(*_delivery_pk(*pk))
                .values(
                    state="running",
                    attempts=attempt,
                    users_sent=0,
                    invalid_users=0,
                    lease_owner=self.id,
                    lease_expires_at=now + self.lease,
                    updated_at=now,
                )
            )
        return Claim(
            tenant=row.tenant,
            session_key=row.session_key,
            destination=row.destination,
            attempt=attempt,
            budget_from=row.budget_from,
            name=session.name,
            type=session.type,
            segment_name=row.segment_name,
            unique_users=session.unique_users or 0,
        )

    def _aborted(self, claim: Claim) -> bool:
        with db.read_transaction(self.engine) as conn:
            session = store.get_session(conn, claim.tenant, claim.session_key)
        return session is None or session.state == "aborted"

    def _heartbeat(self, claim: Claim, sent: int, invalid: int) -> str | None:
        """Renew the lease and record progress; a reason to stop, or None to go on."""
        now = self.clock()
        with db.write_transaction(self.engine) as conn:
            session = store.get_session(conn, claim.tenant, claim.session_key)
            if session is None or session.state == "aborted":
                return "session aborted"
            renewed = conn.execute(
                update(deliveries)
                .where(
                    *_delivery_pk(claim.tenant, claim.session_key, claim.destination),
                    deliveries.c.lease_owner == self.id,
                    deliveries.c.state == "running",
                )
                .values(
                    lease_expires_at=now + self.lease,
                    users_sent=sent,
                    invalid_users=invalid,
                    updated_at=now,
                )
                .returning(deliveries.c.destination)
            ).first()
        return None if renewed is not None else "lease lost"

    async def _deliver(self, claim: Claim) -> None:
        config, provider = self.destinations[claim.destination]
        segment = Segment(
            destination=claim.destination,
            tenant=claim.tenant,
            session_id=claim.session_key,
            name=claim.name,
            segment_name=claim.segment_name,
            type=claim.type,
            total_users=claim.unique_users,
        )
        chunks = chunked(
            unique_users(self.engine, claim.tenant, claim.session_key),
            provider.chunk_size,
            claim.unique_users,
        )
        sent = invalid = 0
        status: int | None = None
        timeout = self.chunk_timeout
        lease = _LeaseClock(self.clock, self.lease / 3)
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(next, chunks, None)
                if chunk is None:
                    break
                # Renewing writes (and fsyncs); between renewals an abort check is a read.
                if lease.due():
                    stop = await anyio.to_thread.run_sync(self._heartbeat, claim, sent, invalid)
                    lease.renewed()
                elif await anyio.to_thread.run_sync(self._aborted, claim):
                    stop = "session aborted"
                else:
                    stop = None
                if stop == "lease lost":
                    log.warning("lease lost; another worker has the delivery", extra=_ids(claim))
                    return
                if stop is not None:
                    raise PermanentError(stop)
                try:
                    async with asyncio.timeout(timeout):
                        result = await self._send_keeping_lease(
                            provider, segment, chunk, claim, sent, invalid, lease
                        )
                except TimeoutError:
                    raise RetryableError(f"chunk not done within {timeout:g} s") from None
                if result is None:
                    log.warning("lease lost; another worker has the delivery", extra=_ids(claim))
                    return
                sent += len(chunk.users)
                invalid += result.invalid
                status = result.status
            outcome = Outcome("succeeded", sent, invalid, http_status=status)
        except UsersPurged:
            outcome = Outcome("failed", sent, invalid, "session aborted: its users were purged")
        except RetryableError as exc:
            outcome = Outcome("pending", sent, invalid, str(exc), exc.status, exc.retry_after)
        except DeliveryError as exc:
            outcome = Outcome("failed", sent, invalid, str(exc), exc.status)
        except Exception as exc:  # a bug or an unmapped error: log it, try again later
            log.exception("delivery raised", extra=_ids(claim))
            outcome = Outcome("pending", sent, invalid, f"internal error: {type(exc).__name__}")
        finally:
            chunks.close()
        await anyio.to_thread.run_sync(self._finish, claim, config.kind, outcome)

    async def _send_keeping_lease(
        self,
        provider: Provider,
        segment: Segment,
        chunk: Chunk,
        claim: Claim,
        sent: int,
        invalid: int,
        lease: _LeaseClock,
    ) -> ChunkResult | None:
        """``provider.send``, renewing the lease every third of it while the call runs (a
        platform may take minutes: import jobs, rate-limit waits). None if the lease was
        lost meanwhile: the call is abandoned to the worker that took over."""
        sending = asyncio.ensure_future(provider.send(segment, chunk))
        try:
            while True:
                # The clock is read again at least every poll interval: it need not be the
                # event loop's (tests move theirs by hand).
                wait = min(lease.remaining(), self.poll_interval)
                done, _ = await asyncio.wait({sending}, timeout=wait)
                if done:
                    return sending.result()
                if not lease.due():
                    continue
                stop = await anyio.to_thread.run_sync(self._heartbeat, claim, sent, invalid)
                lease.renewed()
                if stop == "lease lost":
                    return None
        finally:
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sending

    def _finish(self, claim: Claim, kind: str, outcome: Outcome) -> None:
        now = self.clock()
        state = outcome.state
        next_attempt_at = now
        attempt_outcome = {"succeeded": "succeeded", "failed": "failed"}.get(state, "retry")
        if state == "pending":
            if self.policy.allows_another(claim.attempt - claim.budget_from):
                delay = self.policy.delay(claim.attempt - claim.budget_from, outcome.retry_after)
                next_attempt_at = now + dt.timedelta(seconds=delay)
            else:
                state = attempt_outcome = "failed"
        pk = (claim.tenant, claim.session_key, claim.destination)
        with db.write_transaction(self.engine) as conn:
            session = store.lock_session(conn, claim.tenant, claim.session_key)
            owned = conn.execute(
                update(deliveries)
                .where(*_delivery_pk(*pk), deliveries.c.lease_owner == self.id)
                .values(
                    state=state,
                    users_sent=outcome.users_sent,
                    invalid_users=outcome.invalid_users,
                    last_error=outcome.error,
                    next_attempt_at=next_attempt_at,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                .returning(deliveries.c.destination)
            ).first()
            if owned is None:
                return  # the lease lapsed meanwhile; the worker that took over records it
            conn.execute(
                update(delivery_attempts)
                .where(*_attempt_pk(*pk), delivery_attempts.c.number == claim.attempt)
                .values(
                    finished_at=now,
                    outcome=attempt_outcome,
                    http_status=outcome.http_status,
                    error=outcome.error,
                )
            )
            if session is not None and session.state != "aborted":
                settle_session(conn, claim.tenant, claim.session_key, now)
        log.info(
            "delivery attempt ended",
            extra={
                **_ids(claim),
                "kind": kind,
                "attempt": claim.attempt,
                "outcome": attempt_outcome,
                "usersSent": outcome.users_sent,
                "invalidUsers": outcome.invalid_users,
                "error": outcome.error,
            },
        )
        self.changes.fire()
        if state == "pending":
            self.wake()


class _LeaseClock:
    """When this worker last renewed a lease, and whether a third of it has gone by, on
    the worker's clock: the one that dates the lease in the database."""

    def __init__(self, clock: Callable[[], dt.datetime], every: dt.timedelta) -> None:
        self.clock = clock
        self.every = every
        self.renewed()

    def renewed(self) -> None:
        self.at = self.clock()

    def remaining(self) -> float:
        return max(0.0, (self.every - (self.clock() - self.at)).total_seconds())

    def due(self) -> bool:
        return self.remaining() == 0.0


def settle_session(conn: Connection, tenant: str, key: str, now: dt.datetime) -> str:
    """Set the session's state from its deliveries' states; returns it."""
    states = [row.state for row in store.deliveries_of(conn, tenant, key)]
    if not all(state in ENDED for state in states):
        state = "delivering"
        store.update_session(conn, tenant, key, state=state, ended_at=None, updated_at=now)
        return state
    if all(state == "succeeded" for state in states):
        state = "delivered"
    elif all(state == "failed" for state in states):
        state = "failed"
    else:
        state = "partially_delivered"
    store.update_session(conn, tenant, key, state=state, ended_at=now, updated_at=now)
    store.add_event(conn, tenant, key, now, state)
    return state


def _delivery_pk(tenant: str, key: str, destination: str) -> tuple[Any, ...]:
    return (
        deliveries.c.tenant == tenant,
        deliveries.c.session_key == key,
        deliveries.c.destination == destination,
    )


def _attempt_pk(tenant: str, key: str, destination: str) -> tuple[Any, ...]:
    return (
        delivery_attempts.c.tenant == tenant,
        delivery_attempts.c.session_key == key,
        delivery_attempts.c.destination == destination,
    )


def _ids(claim: Claim) -> dict[str, Any]:
    return {
        "sessionId": claim.session_key,
        "tenant": claim.tenant,
        "destination": claim.destination,
    }

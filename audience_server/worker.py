"""The delivery worker: assembles complete sessions and forwards them to every destination.

Work is claimed from the database in short transactions (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite's single writer does the same), run with no transaction open, and its
outcome written in another. A claim is a lease: a worker that dies stops renewing it, and
once it lapses any worker takes the work over. So any number of workers, in any number of
processes, share one database and never run one (session, destination) at the same time.

    complete --assemble--> delivering --every delivery ended--> delivered
                                                             | partially_delivered | failed

One delivery attempt is ``attempt.Attempt``; this module schedules them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
from sqlalchemy import Engine

from . import db, delivery_store, store
from .assembly import Batch, Findings, UsersPurged, find_duplicates, unique_users
from .attempt import Attempt, Claim, Terms
from .clock import Clock
from .delivery_store import DeliveryKey
from .destinations import DestinationConfig
from .providers.base import Provider
from .retry import RetryPolicy
from .scratch import LazyScratch
from .states import DeliveryState, EventKind, SessionState, segment_name
from .store import SessionKey

log = logging.getLogger("audience_server.delivery")  # the name log filters know

Destinations = Mapping[str, tuple[DestinationConfig, Provider]]


class Doorbell:
    """Wakes every coroutine waiting on it, in whatever event loop it waits; safe to ring
    from any thread."""

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the ringing thread) on every ring, too."""
        self._subscribers.append(callback)

    def ring(self) -> None:
        for loop, event in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)
        for callback in self._subscribers:
            callback()

    async def wait(self, timeout: float) -> None:
        """Until the next ring, or ``timeout`` seconds."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        self._waiters.add(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[1].wait(), timeout)
        finally:
            self._waiters.discard(entry)


class Wakeable(Protocol):
    """What runs the delivery work for a server: a worker in its process, or the
    supervisor of one in a child process."""

    def wake(self) -> None:
        """New work may be waiting (a session just completed, a retry was asked for)."""


class Worker:
    """Claims and runs assembly and delivery work until stopped."""

    def __init__(
        self,
        engine: Engine,
        destinations: Destinations,
        *,
        clock: Clock,
        policy: RetryPolicy,
        segment_prefix: str = "blotout_",
        lease: dt.timedelta = dt.timedelta(seconds=60),
        poll_interval: float = 1.0,
        concurrency: int = 4,
        changes: Doorbell | None = None,
        scratch_root: Path | None = None,
        chunk_timeout: dt.timedelta = dt.timedelta(minutes=10),
        worker_id: str | None = None,
    ) -> None:
        # An id given is kept across restarts: what a dead predecessor of that id held is
        # taken back at start. Otherwise it is new, unique to this process.
        self.id = worker_id or f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # The engine, clock and lease live in ``terms`` alone: every attempt runs under them.
        self.terms = Terms(
            engine, self.id, clock, lease, poll_interval, chunk_timeout.total_seconds(), policy
        )
        self.destinations = destinations
        self.segment_prefix = segment_prefix
        self.concurrency = concurrency
        self.changes = changes or Doorbell()  # rung whenever an assembly or a delivery ends
        self.scratch = LazyScratch(scratch_root)
        self._new_work = Doorbell()

    def wake(self) -> None:
        """New work may be waiting (a session just completed, a retry was asked for)."""
        self._new_work.ring()

    async def run(self, stop: asyncio.Event) -> None:
        """Run ``concurrency`` lanes until ``stop`` is set; work in hand is finished first."""
        log.info("worker started", extra={"worker": self.id, "concurrency": self.concurrency})
        try:
            await anyio.to_thread.run_sync(self._start)
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

    def _start(self) -> None:
        """Take back the leases a dead worker of this id held, so its work resumes now
        rather than when they lapse; sweep the scratch folders killed workers left."""
        now = self.terms.clock()
        with db.write_transaction(self.terms.engine) as conn:
            sessions = store.release_assembly_leases(conn, self.id)
            deliveries = delivery_store.release_leases(conn, self.id, now)
        if sessions or deliveries:
            log.warning(
                "took back the work a previous worker of this id left",
                extra={"worker": self.id, "assemblies": sessions, "deliveries": deliveries},
            )
        self.scratch.path()

    async def _lane(self, stop: asyncio.Event) -> None:
        """Drain, then wait for new work, the poll interval or the stop, whichever is first."""
        while not stop.is_set():
            try:
                busy = await self.step()
            except Exception:
                log.exception("worker step failed; going on", extra={"worker": self.id})
                busy = False
            if not busy:
                waiter = asyncio.ensure_future(self._new_work.wait(self.terms.poll_interval))
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
        await anyio.to_thread.run_sync(self._start)
        while await self.step():
            pass

    # --- a session's batches, read back -----------------------------------------------

    def _batches(self, tenant: str, key: str) -> Iterator[Batch]:
        """The session's batches in sequence order, each read in a short transaction of
        its own: one batch in memory at a time, however large the session."""
        with db.read_transaction(self.terms.engine) as conn:
            sequences = store.received_sequences(conn, tenant, key)
        for sequence in sequences:
            yield self._read_batch(tenant, key, sequence)

    def _read_batch(self, tenant: str, key: str, sequence: int) -> Batch:
        with db.read_transaction(self.terms.engine) as conn:
            row = store.find_batch(conn, tenant, key, sequence)
        assert row is not None  # batches are never deleted, only their users purged
        if row.users is None:
            raise UsersPurged(f"session {key}'s users were purged")
        return Batch(sequence, store.unpack_users(row.users), row.repeated, row.user_count)

    # --- assembly ---------------------------------------------------------------------

    def _claim_assembly(self) -> SessionKey | None:
        now = self.terms.clock()
        # A cheap look without locks first: an idle worker polling must not take SQLite's
        # write lock (or PostgreSQL row locks) each time it finds nothing.
        with db.read_transaction(self.terms.engine) as conn:
            if not store.assembly_due(conn, now):
                return None
        with db.write_transaction(self.terms.engine) as conn:
            found = store.lock_assembly_due(conn, now)
            if found is not None:
                store.update_session(
                    conn, *found, lease_owner=self.id, lease_expires_at=now + self.terms.lease
                )
        return found

    def _assemble(self, tenant: str, key: str) -> None:
        """Find the session's duplicates, then create its deliveries, once."""
        progress = _AssemblyProgress(self.terms, tenant, key)
        batches = progress.counted(self._batches(tenant, key))
        findings = find_duplicates(batches, self.scratch.path())
        try:
            progress.store(findings)
        except UsersPurged:
            log.info("assembly stopped: users purged", extra={"sessionId": key})
            return
        finally:
            findings.close()
        unique = progress.unique
        now = self.terms.clock()
        with db.write_transaction(self.terms.engine) as conn:
            session = store.lock_session(conn, tenant, key)
            if (
                session is None
                or session.state != SessionState.COMPLETE
                or session.lease_owner != self.id
            ):
                return  # aborted meanwhile, or the lease lapsed and another worker took it
            name = segment_name(session.name, self.segment_prefix, bool(session.disable_prefix))
            for destination, (config, _) in self.destinations.items():
                delivery_store.create_delivery(
                    conn,
                    DeliveryKey(tenant, key, destination),
                    kind=config.kind,
                    segment_name=name,
                    now=now,
                )
            values: dict[str, Any] = {
                "state": SessionState.DELIVERING if self.destinations else SessionState.DELIVERED,
                "unique_users": unique,
                "assembled_users": session.received_users,
                "lease_owner": None,
                "lease_expires_at": None,
                "updated_at": now,
            }
            if not self.destinations:
                values["ended_at"] = now
            store.update_session(conn, tenant, key, **values)
            detail = f"{unique} unique users; {len(self.destinations)} deliveries"
            store.add_event(conn, tenant, key, now, EventKind.ASSEMBLED, detail)
        log.info(
            "session assembled",
            extra={"sessionId": key, "tenant": tenant, "uniqueUsers": unique},
        )
        self.changes.ring()

    # --- deliveries -------------------------------------------------------------------

    def _claim_delivery(self) -> Claim | None:
        now = self.terms.clock()
        with db.read_transaction(self.terms.engine) as conn:  # a cheap look first, as above
            if not delivery_store.delivery_due(conn, self.destinations, now):
                return None
        with db.write_transaction(self.terms.engine) as conn:
            row = delivery_store.lock_delivery_due(conn, self.destinations, now)
            if row is None:
                return None
            if row.state == DeliveryState.RUNNING:  # its worker died or hung: close that attempt
                delivery_store.interrupt_attempt(conn, row.key, now)
            session = store.get_session(conn, row.tenant, row.session_key)
            assert session is not None
            if session.state == SessionState.ABORTED or session.purged_at is not None:
                delivery_store.fail_delivery(conn, row.key, "session aborted", now)
                return None
            attempt = row.attempts + 1
            delivery_store.start_attempt(
                conn, row.key, attempt, worker=self.id, now=now, lease_until=now + self.terms.lease
            )
        return Claim(
            key=row.key,
            attempt=attempt,
            budget_from=row.budget_from,
            name=session.name,
            type=session.type,
            segment_name=row.segment_name,
            unique_users=session.unique_users or 0,
            leased_at=now,
        )

    async def _deliver(self, claim: Claim) -> None:
        config, provider = self.destinations[claim.key.destination]
        users = unique_users(self._batches(claim.key.tenant, claim.key.session_key))
        state = await Attempt(self.terms, claim, provider, config.kind, users).run()
        if state is None:
            return  # the lease was lost: the worker that took over records the delivery
        self.changes.ring()
        if state == DeliveryState.PENDING:
            self.wake()


class _AssemblyProgress:
    """One assembly's bookkeeping. While the batches are read, the users read so far are
    recorded and the session's lease renewed about every second (operators see it move;
    no other worker takes the session over). Then what was found is stored in a few
    transactions, not one per batch: each commit is an fsync."""

    EVERY = dt.timedelta(seconds=1)
    GROUP = 200  # batches' findings per transaction, at most

    def __init__(self, terms: Terms, tenant: str, key: str) -> None:
        self.terms = terms
        self.tenant = tenant
        self.key = key
        self.unique = 0
        self._written: dt.datetime | None = None  # when progress was last written

    def _due(self) -> dt.datetime | None:
        now = self.terms.clock()
        if self._written is not None and now - self._written < self.EVERY:
            return None
        self._written = now
        return now

    def counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The batches, progress recorded as they are read."""
        read = 0
        for batch in batches:
            yield batch
            read += batch.size
            now = self._due()
            if now is not None:
                self._write(read, now)

    def _write(self, read: int, now: dt.datetime) -> None:
        with db.write_transaction(self.terms.engine) as conn:
            store.record_assembly_progress(conn, self.tenant, self.key, read, now)
            store.renew_assembly_lease(
                conn, self.tenant, self.key, self.terms.worker, now + self.terms.lease
            )

    def store(self, findings: Iterator[Findings]) -> None:
        """Store every batch's findings, a group of them per transaction."""
        group: list[Findings] = []
        for found in findings:
            group.append(found)
            self.unique += found.unique
            if len(group) == self.GROUP or self._due() is not None:
                self._store(group)
                group = []
        self._store(group)

    def _store(self, group: list[Findings]) -> None:
        if not group:
            return
        with db.write_transaction(self.terms.engine) as conn:
            for found in group:
                store.record_assembly(
                    conn,
                    self.tenant,
                    self.key,
                    found.sequence,
                    repeated=found.repeated,
                    canonical_digest=found.canonical_digest,
                )

"""One delivery attempt: a claimed delivery's users streamed to its destination, chunk by
chunk, and its outcome recorded.

The attempt holds the delivery's lease. One lease-keeping task renews it every third of
its length, on the worker's clock, for as long as the attempt runs: a platform may take
minutes over one chunk (import jobs, rate-limit waits). Should another worker have taken
the delivery over meanwhile, the task raises ``LeaseLost``: the attempt stops and leaves
the delivery to that worker. Between chunks the attempt stops if the session was aborted.
No transaction is open while the destination is called.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection, Engine

from . import db, delivery_store, members, metrics, store
from .assembly import UsersPurged, chunked
from .clock import Clock
from .delivery_store import DeliveryKey
from .providers.base import DeliveryError, PermanentError, Provider, RetryableError, Segment
from .retry import RetryPolicy
from .states import AttemptOutcome, DeliveryState, EventKind, SessionState, settled_state

log = logging.getLogger("audience_server.delivery")  # the name log filters know

PROGRESS_EVERY = dt.timedelta(seconds=2)


class LeaseLost(Exception):
    """Another worker holds the delivery's lease now; this attempt records nothing."""


@dataclass(frozen=True)
class Terms:
    """What every attempt of one worker runs under."""

    engine: Engine
    worker: str  # the worker's id: the owner its leases are written with
    clock: Clock  # the one that dates leases in the database
    lease: dt.timedelta
    poll_interval: float  # seconds; the clock is read again at least this often
    chunk_timeout: float  # seconds one chunk's call may take
    policy: RetryPolicy


@dataclass(frozen=True)
class Claim:
    """A delivery this worker holds the lease of, with what it needs to run it."""

    key: DeliveryKey
    attempt: int
    budget_from: int
    name: str
    type: str
    segment_name: str
    unique_users: int
    leased_at: dt.datetime


@dataclass(frozen=True)
class Outcome:
    state: DeliveryState  # succeeded | pending (retry later) | failed
    users_sent: int
    invalid_users: int
    error: str | None = None
    http_status: int | None = None
    retry_after: float | None = None


@dataclass
class Attempt:
    """One attempt at a claimed delivery, sending ``users`` to ``provider``."""

    terms: Terms
    claim: Claim
    provider: Provider
    kind: str
    users: Iterator[list[bytes]]  # batch by batch, each user's JSON object as received
    sent: int = field(default=0, init=False)  # users sent so far
    invalid: int = field(default=0, init=False)  # of those, how many the platform refused
    ledger: members.Ledger | None = field(default=None, init=False)  # made by ``_send``

    async def run(self) -> DeliveryState | None:
        """Send every chunk, then record the outcome. Returns the delivery's state after
        it, or None when the lease was lost (the worker that took over records it)."""
        sending = asyncio.create_task(self._send())
        keeping = asyncio.create_task(self._keep_lease())
        try:
            await asyncio.wait({sending, keeping}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled from outside too: neither task outlives the attempt
            for task in (sending, keeping):
                task.cancel()
            await asyncio.gather(sending, keeping, return_exceptions=True)
        if sending.cancelled():  # the lease-keeping task ended first: it raised
            error = keeping.exception()
            if isinstance(error, LeaseLost):
                log.warning("lease lost; another worker has the delivery", extra=self._ids())
                return None
            log.error("lease renewal raised", exc_info=error, extra=self._ids())
            outcome = self._internal_error(error)
        else:
            outcome = sending.result()
        return await anyio.to_thread.run_sync(self._finish, outcome)

    async def _send(self) -> Outcome:
        claim = self.claim
        self.ledger = members.Ledger(
            self.terms.engine,
            claim.key.tenant,
            claim.key.destination,
            claim.segment_name,
            self.terms.clock,
        )
        segment = Segment(
            destination=claim.key.destination,
            tenant=claim.key.tenant,
            session_id=claim.key.session_key,
            name=claim.name,
            segment_name=claim.segment_name,
            type=claim.type,
            total_users=claim.unique_users,
            ledger=self.ledger,
        )
        chunks = chunked(self.users, self.provider.chunk_size, claim.unique_users)
        status: int | None = None
        timeout = self.terms.chunk_timeout
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(next, chunks, None)
                if chunk is None:
                    break
                if await anyio.to_thread.run_sync(self._aborted):
                    raise PermanentError("session aborted")
                try:
                    async with asyncio.timeout(timeout):
                        result = await self.provider.send(segment, chunk)
                except TimeoutError:
                    raise RetryableError(f"chunk not done within {timeout:g} s") from None
                self.sent += len(chunk)
                self.invalid += result.invalid
                status = result.status
            return Outcome(DeliveryState.SUCCEEDED, self.sent, self.invalid, http_status=status)
        except UsersPurged:
            error = "session aborted: its users were purged"
            return Outcome(DeliveryState.FAILED, self.sent, self.invalid, error)
        except RetryableError as exc:
            return Outcome(
                DeliveryState.PENDING,
                self.sent,
                self.invalid,
                str(exc),
                exc.status,
                exc.retry_after,
            )
        except DeliveryError as exc:
            return Outcome(DeliveryState.FAILED, self.sent, self.invalid, str(exc), exc.status)
        except Exception as exc:  # a bug or an unmapped error: log it, try again later
            log.exception("delivery raised", extra=self._ids())
            return self._internal_error(exc)
        finally:
            chunks.close()

    def _internal_error(self, exc: BaseException | None) -> Outcome:
        error = f"internal error: {type(exc).__name__}"
        return Outcome(DeliveryState.PENDING, self.sent, self.invalid, error)

    async def _keep_lease(self) -> None:
        """Renew the lease, recording progress, every third of it (every two seconds at
        most: operators follow ``usersSent``) until cancelled; raises LeaseLost once the
        lease is another worker's."""
        every = min(self.terms.lease / 3, PROGRESS_EVERY)
        renewed_at = self.claim.leased_at
        while True:
            # The clock is read again at least every poll interval: it need not be the
            # event loop's (tests move theirs by hand).
            wait = (every - (self.terms.clock() - renewed_at)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, self.terms.poll_interval))
                continue
            renewed_at = await anyio.to_thread.run_sync(self._renew, self.sent, self.invalid)

    def _renew(self, sent: int, invalid: int) -> dt.datetime:
        """Extend the lease and record progress; when it was renewed."""
        now = self.terms.clock()
        with db.write_transaction(self.terms.engine) as conn:
            renewed = delivery_store.renew_lease(
                conn,
                self.claim.key,
                worker=self.terms.worker,
                until=now + self.terms.lease,
                users_sent=sent,
                invalid_users=invalid,
                now=now,
            )
        if not renewed:
            raise LeaseLost
        return now

    def _aborted(self) -> bool:
        with db.read_transaction(self.terms.engine) as conn:
            session = store.get_session(conn, self.claim.key.tenant, self.claim.key.session_key)
        return session is None or session.state == SessionState.ABORTED

    def _finish(self, outcome: Outcome) -> DeliveryState | None:
        """Record the outcome, with the next attempt's time when there is one to make."""
        terms, claim = self.terms, self.claim
        now = terms.clock()
        state = outcome.state
        next_attempt_at = now
        result = {
            DeliveryState.SUCCEEDED: AttemptOutcome.SUCCEEDED,
            DeliveryState.FAILED: AttemptOutcome.FAILED,
        }.get(state, AttemptOutcome.RETRY)
        spent = claim.attempt - claim.budget_from
        if state == DeliveryState.PENDING:
            if terms.policy.allows_another(spent):
                delay = terms.policy.delay(spent, outcome.retry_after)
                next_attempt_at = now + dt.timedelta(seconds=delay)
            else:
                state, result = DeliveryState.FAILED, AttemptOutcome.FAILED
        tenant, key = claim.key.tenant, claim.key.session_key
        with db.write_transaction(terms.engine) as conn:
            session = store.lock_session(conn, tenant, key)
            owned = delivery_store.finish_delivery(
                conn,
                claim.key,
                worker=terms.worker,
                state=state,
                users_sent=outcome.users_sent,
                invalid_users=outcome.invalid_users,
                error=outcome.error,
                next_attempt_at=next_attempt_at,
                now=now,
            )
            if not owned:
                # The lease lapsed meanwhile; the worker that took over records it.
                metrics.count_attempt(
                    claim.key.destination, AttemptOutcome.INTERRUPTED, outcome.users_sent
                )
                return None
            delivery_store.finish_attempt(
                conn,
                claim.key,
                claim.attempt,
                outcome=result,
                http_status=outcome.http_status,
                error=outcome.error,
                now=now,
            )
            # What the attempt staged in the member ledger becomes the ledger's set in the
            # transaction that records the success, or never.
            confirmed = (
                result == AttemptOutcome.SUCCEEDED
                and self.ledger is not None
                and self.ledger.confirm(conn, now)
            )
            if session is not None and session.state != SessionState.ABORTED:
                settle_session(conn, tenant, key, now)
        if confirmed and self.ledger is not None:
            try:
                self.ledger.collect()  # the superseded generations, in short transactions
            except Exception:  # the next success collects them: never fail a recorded outcome
                log.exception("member ledger collection failed", extra=self._ids())
        # After the commit: counted once the outcome is recorded. ``users_sent`` is this
        # attempt's alone (each attempt starts over from chunk 1).
        metrics.count_attempt(claim.key.destination, result, outcome.users_sent)
        log.info(
            "delivery attempt ended",
            extra={
                **self._ids(),
                "kind": self.kind,
                "attempt": claim.attempt,
                "outcome": result,
                "usersSent": outcome.users_sent,
                "invalidUsers": outcome.invalid_users,
                "error": outcome.error,
            },
        )
        return state

    def _ids(self) -> dict[str, Any]:
        key = self.claim.key
        return {"sessionId": key.session_key, "tenant": key.tenant, "destination": key.destination}


def settle_session(conn: Connection, tenant: str, key: str, now: dt.datetime) -> SessionState:
    """Set the session's state from its deliveries' states; returns it."""
    state = settled_state(row.state for row in delivery_store.deliveries_of(conn, tenant, key))
    if state == SessionState.DELIVERING:
        store.update_session(conn, tenant, key, state=state, ended_at=None, updated_at=now)
        return state
    store.update_session(conn, tenant, key, state=state, ended_at=now, updated_at=now)
    store.add_event(conn, tenant, key, now, EventKind(state))
    return state

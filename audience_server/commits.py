"""Group commit: batches that arrive together share one transaction and one commit.

Each request's commit costs an fsync (SQLite WAL, PostgreSQL's WAL flush) and the
statements that begin and end it; with small batches that sets the pace. So a request
hands its batch to its engine's ``GroupCommitter`` and blocks. Whoever finds no group
under way leads: it takes every batch queued at that moment (no timer: a lone request goes
at once), applies each with ``ingest.receive_batch``, commits once and answers every
waiter. If a batch is refused, that transaction is rolled back and the group is applied
again with each batch in its own SAVEPOINT, so the refused batch gets its error and the
others commit. A database error fails the whole group, as it would have failed each batch
alone. Then the lead passes to the oldest batch queued meanwhile, so nobody waits for
more than the group ahead of its own. A batch is answered only after the commit that
holds it: a 200 still means committed.

On SQLite every batch has a deadline, the engine's lock timeout from when it was queued:
a batch still queued at its deadline leaves the queue with ``db.LockTimeout``, a lead drops
the batches already past theirs, and a group's wait for the write lock ends at the
earliest deadline among its batches. So no batch waits longer than the lock timeout in
all, however many groups are ahead of it.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from . import db
from .clock import Clock
from .errors import AudienceError
from .ingest import Outcome, receive_batch
from .parsing import BatchUpload

# PostgreSQL caches 64 subtransaction ids per backend; a transaction with more savepoints
# that wrote overflows the cache and slows every other backend's snapshots.
MAX_GROUP_BATCHES = 32
MAX_GROUP_BYTES = 64 * 1024 * 1024  # packed users one transaction carries


@dataclass(frozen=True, slots=True)
class Batch:
    """One request's validated batch. ``clock`` is read when the batch is applied, so its
    times are those of its transaction, as when each request had its own."""

    tenant: str
    upload: BatchUpload
    packed_users: bytes  # store.pack_users(upload.users_json), made outside the lock
    clock: Clock
    ttl: dt.timedelta

    @property
    def order(self) -> tuple[str, str, int]:
        """Groups lock sessions in this order in every process, so two processes' groups
        never wait on each other in a cycle (PostgreSQL deadlocks)."""
        return (self.tenant, self.upload.session_key, self.upload.sequence)


class _Waiter:
    """A queued batch and its answer; ``ready`` is set when it is answered, or when it is
    handed the lead (``lead``)."""

    __slots__ = ("batch", "deadline", "error", "lead", "outcome", "ready")

    def __init__(self, batch: Batch, deadline: float | None) -> None:
        self.batch = batch
        self.deadline = deadline  # time.monotonic(); None: no bound (PostgreSQL)
        self.ready = threading.Event()
        self.lead = False
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None


class GroupCommitter:
    """Queues one engine's ingest writes in this process and commits them in groups."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batches: int = MAX_GROUP_BATCHES,
        max_bytes: int = MAX_GROUP_BYTES,
    ) -> None:
        # Weak: the registry below is keyed by the engine and must not keep it alive.
        self._engine = weakref.ref(engine)
        self._max_batches = max_batches
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._leading = False  # a thread is running a group; the queue waits for it
        self.groups = 0  # groups run so far (committed or failed)
        self.batches = 0  # batches in them

    @property
    def waiting(self) -> int:
        """Batches queued behind the group under way."""
        with self._lock:
            return len(self._queue)

    def commit(self, batch: Batch) -> Outcome:
        """Store ``batch`` and return once its group has committed; raises the batch's
        refusal (``AudienceError``) or the group's database error."""
        engine = self._engine()
        timeout = None if engine is None else db.lock_timeout(engine)
        waiter = _Waiter(batch, None if timeout is None else time.monotonic() + timeout)
        with self._lock:
            self._queue.append(waiter)
            waiter.lead = not self._leading
            self._leading = True
        if not waiter.lead and not waiter.ready.wait(_left(waiter.deadline)):
            with self._lock:
                given_up = not waiter.lead and waiter in self._queue
                if given_up:  # still queued: no group holds it, none will
                    self._queue.remove(waiter)
            if given_up:
                assert timeout is not None
                raise db.LockTimeout(timeout)
            waiter.ready.wait()  # taken into a group, which ends by this batch's deadline
        if waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.outcome is not None
        return waiter.outcome

    def _lead(self) -> None:
        group = self._take()
        try:
            live = _past_deadline(group, self._engine())
            if live:
                self._run(live)
        finally:
            for waiter in group:
                waiter.ready.set()
            self._pass_lead()

    def _take(self) -> list[_Waiter]:
        """What is queued now, oldest first, within the bounds (the first always fits)."""
        with self._lock:
            group = [self._queue.popleft()]
            size = len(group[0].batch.packed_users)
            while self._queue and len(group) < self._max_batches:
                size += len(self._queue[0].batch.packed_users)
                if size > self._max_bytes:
                    break
                group.append(self._queue.popleft())
            self.groups += 1
            self.batches += len(group)
        return group

    def _pass_lead(self) -> None:
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
            else:
                successor.lead = True
        if successor is not None:
            successor.ready.set()

    def _run(self, group: list[_Waiter]) -> None:
        engine = self._engine()
        assert engine is not None  # every caller holds it
        ordered = sorted(group, key=lambda waiter: waiter.batch.order)
        try:
            try:
                _commit_together(engine, ordered)
            except AudienceError as exc:  # rolled back, the refused batch's writes with it
                if len(ordered) == 1:
                    ordered[0].error = exc
                else:
                    _commit_isolated(engine, ordered)
        except BaseException as exc:  # nothing was committed: every batch fails alike
            for waiter in ordered:
                waiter.outcome, waiter.error = None, exc


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _past_deadline(group: list[_Waiter], engine: Engine | None) -> list[_Waiter]:
    """Answers the batches of ``group`` already past their deadline with ``LockTimeout``
    (they waited their whole lock timeout in the queue); returns the others."""
    now = time.monotonic()
    live = []
    for waiter in group:
        if waiter.deadline is not None and waiter.deadline <= now and engine is not None:
            waiter.error = db.LockTimeout(db.lock_timeout(engine) or 0.0)
        else:
            live.append(waiter)
    return live


def _group_deadline(ordered: list[_Waiter]) -> float | None:
    deadlines = [waiter.deadline for waiter in ordered if waiter.deadline is not None]
    return min(deadlines, default=None)


def _commit_together(engine: Engine, ordered: list[_Waiter]) -> None:
    """The usual case, no refusal: the batches one after another, one commit. (A
    savepoint per batch would cost as much again as the rest of its statements.)"""
    with db.write_transaction(engine, deadline=_group_deadline(ordered)) as conn:
        for waiter in ordered:
            waiter.outcome = _apply(conn, waiter.batch)


def _commit_isolated(engine: Engine, ordered: list[_Waiter]) -> None:
    """After a refusal: the group again from the start, each batch in its own savepoint,
    so a refused batch takes back only its own writes and its neighbours commit."""
    with db.write_transaction(engine, deadline=_group_deadline(ordered)) as conn:
        for waiter in ordered:
            waiter.outcome = waiter.error = None
            try:
                with conn.begin_nested():
                    waiter.outcome = _apply(conn, waiter.batch)
            except AudienceError as exc:
                waiter.error = exc


def _apply(conn: Connection, batch: Batch) -> Outcome:
    return receive_batch(
        conn,
        batch.tenant,
        batch.upload,
        packed_users=batch.packed_users,
        now=batch.clock(),
        ttl=batch.ttl,
    )


_committers: weakref.WeakKeyDictionary[Engine, GroupCommitter] = weakref.WeakKeyDictionary()
_committers_lock = threading.Lock()


def committer_for(engine: Engine) -> GroupCommitter:
    """The engine's committer in this process (made on first use)."""
    with _committers_lock:
        committer = _committers.get(engine)
        if committer is None:
            committer = _committers[engine] = GroupCommitter(engine)
        return committer


def commit(engine: Engine, batch: Batch) -> Outcome:
    """Store one batch through the engine's group committer (see the module docstring)."""
    return committer_for(engine).commit(batch)


def _forget_committers() -> None:
    # A forked child has none of the parent's threads: a queue or lead it copied would
    # never be served.
    global _committers_lock
    _committers_lock = threading.Lock()
    _committers.clear()


os.register_at_fork(after_in_child=_forget_committers)

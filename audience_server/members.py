"""The member ledger: what a ``primary`` delivery put at a destination, so the next one of
the same segment sends only the difference (TikTok: its ``segment/mapping`` adds and deletes,
the audience and its id kept).

Kept per (tenant, destination, segment name): the SHA-256 digests of the identifiers sent
(32 bytes each, with the identifier's kind), never an identifier in clear. They are what the
destination already holds, so keeping them adds no personal data the platform does not
have; without them a replace could not tell who left, and those people would stay in the
audience forever. Nothing else is kept (no session, no name, no address).

Each attempt stages what it sends under a new *generation*; the rows of the last successful
attempt (``confirmed``) stay untouched until another succeeds, and the swap is one update
of ``confirmed`` in the transaction that records the success (``confirm``). So a failed,
aborted or interrupted attempt leaves the previous set intact, and its own staged rows are
kept beside it: the ids it may have added are deleted by the next attempt if they are not in
its segment. The next attempt trusts the confirmed set (skips adding who is surely there)
only when no attempt began since the success and the platform's list is the same one;
otherwise its state is unknown and it adds everyone (adding twice changes nothing).

Memory stays bounded whatever the segment's size: staging takes one chunk at a time, and
those who left are read in pages in (kind, digest) order by an anti-join in SQL, the same
on SQLite and PostgreSQL (both order bytes by memcmp). Superseded generations are deleted
after a success in short transactions of ``GARBAGE_PAGE`` rows.

Purge (``purge``): the ledgers of a destination no longer configured, and of a segment with
no delivery attempt for ``STALE_AFTER`` (180 days, fixed). After a purge the next primary
delivery of that segment adds everyone and cannot remove who left: so the period is long,
longer than any plausible delivery schedule, and far longer than session retention
(``AUDIENCE_RETENTION``, which is about users in clear).

Two attempts of one segment at once (two sessions of the same name): the later ``begin``
supersedes the earlier, whose next step raises ``Superseded`` (the provider retries it later).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy import Connection, Engine, and_, delete, exists, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import ColumnElement, Insert

from . import db
from .clock import Clock
from .models import ledger_members, member_ledgers

STALE_AFTER = dt.timedelta(days=180)
GARBAGE_PAGE = 10_000  # rows deleted per transaction when collecting or purging

Member = tuple[int, bytes]  # (kind: the id's position in the platform's schema, digest)


class Superseded(Exception):
    """A later attempt of the same segment began; this one must stop."""


@dataclass(frozen=True)
class Stage:
    """One attempt's place in the ledger."""

    ledger: str
    generation: int
    trusted: int | None  # the generation whose members are surely at the target, if known
    floor: int  # the lowest generation whose members may be at the target
    target: str


class Ledger:
    """The ledger of one (tenant, destination, segment name), used by one attempt."""

    def __init__(
        self, engine: Engine, tenant: str, destination: str, segment_name: str, clock: Clock
    ) -> None:
        self.engine = engine
        self.tenant = tenant
        self.destination = destination
        self.segment_name = segment_name
        self.clock = clock
        self.stage: Stage | None = None  # set by ``begin``

    # --- for the provider (async: each call is a short transaction in a thread) ---------

    async def begin(self, target: str) -> Stage:
        """Start this attempt's generation for the platform's list ``target``."""
        self.stage = await anyio.to_thread.run_sync(self._begin, target)
        return self.stage

    async def add(self, members: Sequence[Member]) -> list[Member]:
        """Stage ``members`` (the chunk's); returns those not surely at the target yet."""
        return await anyio.to_thread.run_sync(self._add, members)

    async def leavers(self, after: Member | None, limit: int) -> list[Member]:
        """Up to ``limit`` members that may be at the target but are not staged by this
        attempt, in (kind, digest) order after ``after``."""
        return await anyio.to_thread.run_sync(self._leavers, after, limit)

    # --- for the attempt ----------------------------------------------------------------

    def confirm(self, conn: Connection, now: dt.datetime) -> bool:
        """In the transaction recording the attempt's success: this attempt's set becomes
        the confirmed one. False when nothing was staged or a later attempt began."""
        stage = self.stage
        if stage is None:
            return False
        result = conn.execute(
            update(member_ledgers)
            .where(self._key(), member_ledgers.c.latest == stage.generation)
            .values(
                confirmed=stage.generation,
                target=stage.target,
                delivered_at=now,
                updated_at=now,
            )
        )
        return result.rowcount == 1

    def collect(self) -> int:
        """Delete the rows of generations older than the confirmed one, in short
        transactions; returns how many."""
        stage = self.stage
        if stage is None:
            return 0
        removed = 0
        while True:
            with db.write_transaction(self.engine) as conn:
                done = _delete_page(
                    conn,
                    self.tenant,
                    stage.ledger,
                    ledger_members.c.generation < stage.generation,
                )
            removed += done
            if done < GARBAGE_PAGE:
                return removed

    # --- the transactions ---------------------------------------------------------------

    def _key(self) -> ColumnElement[bool]:
        c = member_ledgers.c
        return and_(
            c.tenant == self.tenant,
            c.destination == self.destination,
            c.segment_name == self.segment_name,
        )

    def _begin(self, target: str) -> Stage:
        now = self.clock()
        with db.write_transaction(self.engine) as conn:
            _insert_absent(
                conn,
                {
                    "tenant": self.tenant,
                    "destination": self.destination,
                    "segment_name": self.segment_name,
                    "ledger": uuid.uuid4().hex,
                    "latest": 0,
                    "updated_at": now,
                },
            )
            row = conn.execute(select(member_ledgers).where(self._key()).with_for_update()).one()
            generation = row.latest + 1
            conn.execute(
                update(member_ledgers).where(self._key()).values(latest=generation, updated_at=now)
            )
        known = row.confirmed is not None and row.latest == row.confirmed
        trusted = row.confirmed if known and row.target == target else None
        return Stage(row.ledger, generation, trusted, row.confirmed or 0, target)

    def _current(self) -> Stage:
        if self.stage is None:
            raise RuntimeError("the ledger was not begun")
        return self.stage

    def _check(self, conn: Connection, stage: Stage) -> None:
        latest = conn.execute(select(member_ledgers.c.latest).where(self._key())).scalar()
        if latest != stage.generation:
            raise Superseded(f"a later delivery of {self.segment_name} began")

    def _add(self, members: Sequence[Member]) -> list[Member]:
        stage = self._current()
        unique = sorted(set(members))
        with db.write_transaction(self.engine) as conn:
            self._check(conn, stage)
            if unique:
                rows = [
                    {
                        "tenant": self.tenant,
                        "ledger": stage.ledger,
                        "kind": kind,
                        "digest": digest,
                        "generation": stage.generation,
                    }
                    for kind, digest in unique
                ]
                conn.execute(_members_insert(conn), rows)
            if stage.trusted is None or not unique:
                return unique
            present: set[Member] = set()
            c = ledger_members.c
            for kind in {kind for kind, _ in unique}:
                digests = [digest for k, digest in unique if k == kind]
                found = conn.execute(
                    select(c.digest).where(
                        c.tenant == self.tenant,
                        c.ledger == stage.ledger,
                        c.kind == kind,
                        c.digest.in_(digests),
                        c.generation == stage.trusted,
                    )
                ).scalars()
                present.update((kind, bytes(digest)) for digest in found)
        return [member for member in unique if member not in present]

    def _leavers(self, after: Member | None, limit: int) -> list[Member]:
        stage = self._current()
        c = ledger_members.c
        staged = ledger_members.alias("staged")
        s = staged.c
        query = (
            select(c.kind, c.digest)
            .distinct()
            .where(
                c.tenant == self.tenant,
                c.ledger == stage.ledger,
                c.generation >= stage.floor,
                c.generation < stage.generation,
                ~exists().where(
                    s.tenant == c.tenant,
                    s.ledger == c.ledger,
                    s.kind == c.kind,
                    s.digest == c.digest,
                    s.generation == stage.generation,
                ),
            )
            .order_by(c.kind, c.digest)
            .limit(limit)
        )
        if after is not None:
            query = query.where(
                or_(c.kind > after[0], and_(c.kind == after[0], c.digest > after[1]))
            )
        with db.read_transaction(self.engine) as conn:
            self._check(conn, stage)
            return [(row.kind, bytes(row.digest)) for row in conn.execute(query)]


def purge(
    conn: Connection, configured: Collection[str], now: dt.datetime, limit: int = GARBAGE_PAGE
) -> int:
    """Delete up to ``limit`` member rows of ledgers due for purge (their destination is no
    longer configured, or no attempt of their segment began or succeeded for
    ``STALE_AFTER``), and the ledgers left empty. Returns the rows deleted; call again, in a
    new transaction, until it returns 0."""
    c = member_ledgers.c
    stale = now - STALE_AFTER
    # ``updated_at`` moves at every attempt's start and success: a segment still being
    # tried is not stale, however long its failures last.
    due = or_(c.destination.not_in(list(configured)), c.updated_at < stale)
    ledgers = conn.execute(select(c.tenant, c.ledger).where(due).order_by(c.tenant, c.ledger))
    removed = 0
    for row in ledgers.all():
        done = _delete_page(conn, row.tenant, row.ledger, None, limit - removed)
        removed += done
        if removed >= limit:
            return removed
        conn.execute(delete(member_ledgers).where(c.tenant == row.tenant, c.ledger == row.ledger))
    return removed


def _delete_page(
    conn: Connection,
    tenant: str,
    ledger: str,
    extra: ColumnElement[bool] | None,
    limit: int = GARBAGE_PAGE,
) -> int:
    """Delete up to ``limit`` rows of one ledger (matching ``extra`` too); how many."""
    c = ledger_members.c
    key = tuple_(c.tenant, c.ledger, c.kind, c.digest, c.generation)
    page = select(c.tenant, c.ledger, c.kind, c.digest, c.generation).where(
        c.tenant == tenant, c.ledger == ledger
    )
    if extra is not None:
        page = page.where(extra)
    page = page.limit(limit)
    return conn.execute(delete(ledger_members).where(key.in_(page))).rowcount


def _insert_absent(conn: Connection, values: dict[str, object]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(member_ledgers).values(values)
    conn.execute(
        statement.on_conflict_do_nothing(index_elements=["tenant", "destination", "segment_name"])
    )


def _members_insert(conn: Connection) -> Insert:
    """INSERT of staged rows; a member staged twice by one attempt (two users sharing a
    phone) is kept once."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(ledger_members).on_conflict_do_nothing()
    return sqlite.insert(ledger_members).on_conflict_do_nothing()

"""Group commit (commits.py) on SQLite and PostgreSQL: batches queued behind a group share
one transaction, each in its savepoint; refusals stay with their batch, a database error
fails its whole group, and completion is still decided once per session."""

from __future__ import annotations

import contextlib
import datetime as dt
import operator
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from audience_server import commits, db, store
from audience_server.app import create_app
from audience_server.commits import Batch, GroupCommitter
from audience_server.errors import AudienceError, Conflict
from audience_server.ingest import Outcome
from audience_server.models import events
from audience_server.parsing import Limits, parse_upload
from audience_server.settings import Settings
from audience_server.states import BatchResult, EventKind, SessionState
from tests.conftest import FakeClock, make_users
from tests.helpers import eventually, form, send

TENANT = "default"
TTL = dt.timedelta(hours=24)


def batch(
    clock: FakeClock,
    key: str,
    sequence: int,
    total_batches: int,
    users: list[dict[str, Any]],
    total_users: int | None = None,
    **extra: Any,
) -> Batch:
    """A validated batch of session ``key`` (``total_users`` defaults to 2 per batch)."""
    total = 2 * total_batches if total_users is None else total_users
    upload = parse_upload(form(key, sequence, total_batches, total, users, **extra), {}, Limits())
    return Batch(TENANT, upload, store.pack_users(upload.users_json), clock, TTL)


def pair(n: int) -> list[dict[str, Any]]:
    """Two users, distinct for each ``n``."""
    return make_users(2, start=2 * n)


@contextlib.contextmanager
def writes_blocked(engine: Engine) -> Iterator[None]:
    """Hold the database's write lock from a connection of our own (not through ``db``),
    so a group's transaction waits inside the database until the block ends."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        lite = sqlite3.connect(url.database, isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            lite.rollback()
            lite.close()
        return
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as pg:
        pg.execute("LOCK TABLE sessions IN EXCLUSIVE MODE")  # FOR UPDATE waits for it
        yield
        pg.rollback()


@dataclass
class Sent:
    """Batches committed from threads, and what each got back (by index)."""

    threads: list[threading.Thread] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)

    def start(self, committer: GroupCommitter, items: Sequence[Batch], first: int = 0) -> None:
        for index, item in enumerate(items, first):
            thread = threading.Thread(target=self._commit, args=(committer, index, item))
            self.threads.append(thread)
            thread.start()

    def _commit(self, committer: GroupCommitter, index: int, item: Batch) -> None:
        try:
            self.outcomes[index] = committer.commit(item)
        except BaseException as exc:  # recorded for the test to look at
            self.errors[index] = exc

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def grouped(committer: GroupCommitter, engine: Engine, head: Batch, rest: Sequence[Batch]) -> Sent:
    """Commit ``head`` alone (held up inside the database), queue ``rest`` behind it, then
    let both groups go: ``rest`` is committed as one group (within the committer's bounds)."""
    sent, before = Sent(), committer.groups
    with writes_blocked(engine):
        sent.start(committer, [head])
        eventually(lambda: committer.groups, lambda groups: groups == before + 1)  # head's runs
        sent.start(committer, rest, first=1)
        eventually(lambda: committer.waiting, lambda waiting: waiting == len(rest))
    sent.join()
    return sent


def session(engine: Engine, key: str) -> store.SessionRow:
    with db.read_transaction(engine) as conn:
        row = store.get_session(conn, TENANT, key)
    assert row is not None
    return row


def stored_sequences(engine: Engine, key: str) -> list[int]:
    with db.read_transaction(engine) as conn:
        return store.received_sequences(conn, TENANT, key)


def completions(engine: Engine) -> dict[str, int]:
    """COMPLETE events per session."""
    stmt = (
        select(events.c.session_key, func.count())
        .where(events.c.kind == EventKind.COMPLETE)
        .group_by(events.c.session_key)
    )
    with db.read_transaction(engine) as conn:
        return {key: count for key, count in conn.execute(stmt)}


def test_a_lone_batch_is_its_own_group(engine: Engine, clock: FakeClock) -> None:
    committer = GroupCommitter(engine)
    outcome = committer.commit(batch(clock, "alone", 1, 1, pair(0)))
    assert outcome == Outcome(BatchResult.COMPLETED, SessionState.COMPLETE)
    assert (committer.groups, committer.batches, committer.waiting) == (1, 1, 0)
    with pytest.raises(Conflict):  # refused alone: its transaction rolls back, as before
        committer.commit(batch(clock, "alone", 1, 1, pair(1)))
    assert session(engine, "alone").received_batches == 1


def test_batches_queued_behind_a_group_share_one_and_all_commit(
    engine: Engine, clock: FakeClock
) -> None:
    committer = GroupCommitter(engine)
    sessions, per_session = 6, 4
    rest = [
        batch(clock, f"s{s}", sequence, per_session, pair(s * per_session + sequence))
        for sequence in range(per_session, 0, -1)  # arrival order is not the applied order
        for s in range(sessions)
    ]
    sent = grouped(committer, engine, batch(clock, "head", 1, 2, pair(99)), rest)

    assert sent.errors == {}
    assert (committer.groups, committer.batches) == (2, 1 + len(rest))
    assert sent.outcomes[0] == Outcome(BatchResult.STORED, SessionState.RECEIVING)
    for index, item in enumerate(rest, 1):
        # Applied in (session, sequence) order: the last sequence fills the last gap.
        expected = (
            Outcome(BatchResult.COMPLETED, SessionState.COMPLETE)
            if item.upload.sequence == per_session
            else Outcome(BatchResult.STORED, SessionState.RECEIVING)
        )
        assert sent.outcomes[index] == expected
    for s in range(sessions):
        row = session(engine, f"s{s}")
        assert (row.state, row.received_batches, row.received_users) == (
            SessionState.COMPLETE,
            per_session,
            2 * per_session,
        )
        assert stored_sequences(engine, f"s{s}") == [1, 2, 3, 4]
    assert completions(engine) == {f"s{s}": 1 for s in range(sessions)}


def test_a_refused_batch_in_a_group_loses_only_its_own_savepoint(
    engine: Engine, clock: FakeClock
) -> None:
    committer = GroupCommitter(engine)
    committer.commit(batch(clock, "known", 1, 3, pair(1)))
    rest = [
        batch(clock, "known", 1, 3, pair(50)),  # 0: sequence 1 again, other users
        batch(clock, "known", 2, 3, pair(2)),  # 1: stored
        batch(clock, "known", 3, 3, pair(3), name="Other name"),  # 2: not the session's name
        batch(clock, "fresh", 1, 1, pair(4), total_users=1),  # 3: over totalUsers, creates it
        batch(clock, "fresh2", 1, 2, pair(5)),  # 4: stored, new session
        batch(clock, "known", 1, 3, pair(1)),  # 5: identical re-send
        batch(clock, "known", 3, 3, pair(3)),  # 6: completes "known"
    ]
    sent = grouped(committer, engine, batch(clock, "head", 1, 2, pair(99)), rest)

    assert (committer.groups, committer.batches) == (3, 2 + len(rest))
    assert sorted(sent.errors) == [1, 3, 4]
    assert all(isinstance(sent.errors[i], Conflict) for i in (1, 3, 4))
    assert "already received with different users" in str(sent.errors[1])
    assert "name differs" in str(sent.errors[3])
    assert "above totalUsers" in str(sent.errors[4])
    stored = Outcome(BatchResult.STORED, SessionState.RECEIVING)
    assert sent.outcomes == {
        0: stored,
        2: stored,
        5: stored,
        6: Outcome(BatchResult.DUPLICATE, SessionState.RECEIVING),
        7: Outcome(BatchResult.COMPLETED, SessionState.COMPLETE),
    }
    known = session(engine, "known")
    assert (known.state, known.received_batches, known.received_users) == (
        SessionState.COMPLETE,
        3,
        6,
    )
    with db.read_transaction(engine) as conn:
        assert store.get_session(conn, TENANT, "fresh") is None  # its savepoint took it back
        sequence_one = store.find_batch(conn, TENANT, "known", 1)
    assert sequence_one is not None
    assert store.unpack_users(sequence_one.users or b"") == rest[5].upload.users_json
    assert session(engine, "fresh2").received_batches == 1
    assert completions(engine) == {"known": 1}


def test_a_database_error_fails_every_batch_of_its_group_and_stores_none(
    engine: Engine, clock: FakeClock
) -> None:
    with engine.begin() as conn:  # sequence 3 cannot be stored: the database says so
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_three BEFORE INSERT ON batches WHEN NEW.sequence = 3 "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_three() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF NEW.sequence = 3 THEN RAISE EXCEPTION 'refused by the test' "
                    "USING ERRCODE = '57P01'; END IF; RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_three BEFORE INSERT ON batches "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_three()"
                )
            )
    committer = GroupCommitter(engine)
    rest = [batch(clock, "g", sequence, 4, pair(sequence)) for sequence in (1, 2, 3)]
    rest.append(batch(clock, "other", 1, 2, pair(9)))
    sent = grouped(committer, engine, batch(clock, "head", 1, 2, pair(99)), rest)

    assert sent.outcomes == {0: Outcome(BatchResult.STORED, SessionState.RECEIVING)}
    assert sorted(sent.errors) == [1, 2, 3, 4]
    failures = set(sent.errors.values())
    assert len(failures) == 1  # one error, the group's, given to every batch
    failure = failures.pop()
    assert isinstance(failure, DBAPIError)
    assert "refused by the test" in str(failure)
    with db.read_transaction(engine) as conn:
        assert store.get_session(conn, TENANT, "g") is None
        assert store.get_session(conn, TENANT, "other") is None
    # The committer goes on: the next batch leads a group of its own.
    assert committer.commit(batch(clock, "g", 1, 4, pair(1))).result == BatchResult.STORED


def test_a_group_stops_at_its_bounds(engine: Engine, clock: FakeClock) -> None:
    rest = [batch(clock, f"b{i}", 1, 2, pair(i)) for i in range(10)]
    by_count = GroupCommitter(engine, max_batches=4)
    sent = grouped(by_count, engine, batch(clock, "head", 1, 2, pair(99)), rest)
    assert sent.errors == {}
    assert (by_count.groups, by_count.batches) == (1 + 3, 11)  # 1, then 4 + 4 + 2

    again = [batch(clock, f"c{i}", 1, 2, pair(i)) for i in range(6)]
    sizes = [len(item.packed_users) for item in again]
    assert 3 * min(sizes) > 2 * max(sizes)  # so any two fit in 2 * max, never three
    by_bytes = GroupCommitter(engine, max_bytes=2 * max(sizes))
    sent = grouped(by_bytes, engine, batch(clock, "head2", 1, 2, pair(98)), again)
    assert sent.errors == {}
    assert (by_bytes.groups, by_bytes.batches) == (1 + 3, 7)
    assert session(engine, "c5").received_batches == 1


def test_two_committers_racing_complete_every_session_exactly_once(
    database_url: str, engine: Engine, clock: FakeClock
) -> None:
    """Two engines, as two server processes would have, each with its committer; every
    batch is sent twice, one copy through each, the two sides in opposite session order."""
    other = db.make_engine(database_url)
    try:
        near, far = GroupCommitter(engine), GroupCommitter(other)
        keys = [f"r{s}" for s in range(8)]
        per_session = 3
        items = [(key, sequence) for sequence in range(1, per_session + 1) for key in sorted(keys)]
        threads_per_side = 4
        results: list[tuple[str, int, Outcome | BaseException]] = []
        lock = threading.Lock()

        def side(committer: GroupCommitter, order: list[tuple[str, int]], lane: int) -> None:
            for key, sequence in order[lane::threads_per_side]:
                n = keys.index(key) * per_session + sequence
                try:
                    answer: Outcome | BaseException = committer.commit(
                        batch(clock, key, sequence, per_session, pair(n))
                    )
                except BaseException as exc:
                    answer = exc
                with lock:
                    results.append((key, sequence, answer))

        threads = [
            threading.Thread(target=side, args=(committer, order, lane))
            for committer, order in ((near, items), (far, items[::-1]))
            for lane in range(threads_per_side)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        other.dispose()

    failures = [answer for _, _, answer in results if isinstance(answer, BaseException)]
    assert failures == []
    assert len(results) == 2 * len(items)
    for key in keys:
        answers = [a for k, _, a in results if k == key and isinstance(a, Outcome)]
        kinds = sorted(answer.result for answer in answers)
        assert kinds.count(BatchResult.COMPLETED) == 1
        assert kinds.count(BatchResult.STORED) == per_session - 1
        # The other copy of each batch is a re-send: identical before or after completion.
        assert kinds.count(BatchResult.DUPLICATE) == per_session
        row = session(engine, key)
        assert (row.state, row.received_batches) == (SessionState.COMPLETE, per_session)
    assert completions(engine) == dict.fromkeys(keys, 1)
    assert near.batches + far.batches == 2 * len(items)


def test_concurrent_posts_share_a_group_and_answer_each_batch(
    settings: Settings, engine: Engine, clock: FakeClock
) -> None:
    """Through the HTTP edge: a 409 amid 200s, each answered after the group's commit."""
    app = create_app(
        settings, engine=engine, clock=clock, sweeper=False, destinations={}, worker=False
    )
    committer = commits.committer_for(engine)
    fields = [
        form("web", 1, 3, 6, pair(1)),
        form("web", 2, 3, 6, pair(2)),
        form("web", 1, 3, 6, pair(7)),  # sequence 1 with other users
        form("web", 3, 3, 6, pair(3)),
    ]
    statuses: dict[int, int] = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert send(client, form("web-head", 1, 2, 4, pair(0))).status_code == 200
        groups = committer.groups

        def post(index: int) -> None:
            statuses[index] = send(client, fields[index]).status_code

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(fields))]
        with writes_blocked(engine):
            threads[0].start()
            eventually(lambda: committer.groups, lambda n: n == groups + 1)
            for thread in threads[1:]:
                thread.start()
            eventually(lambda: committer.waiting, lambda waiting: waiting == len(fields) - 1)
        for thread in threads:
            thread.join()
        status = client.get("/audience/sessions/web").json()

    assert statuses == {0: 200, 1: 200, 2: 409, 3: 200}
    assert committer.groups == groups + 2
    assert (status["state"], status["receivedBatches"]) == ("complete", 3)
    assert completions(engine) == {"web": 1}


def test_commit_uses_one_committer_per_engine(engine: Engine, clock: FakeClock) -> None:
    committer = commits.committer_for(engine)
    assert commits.committer_for(engine) is committer
    before = committer.batches
    assert commits.commit(engine, batch(clock, "one", 1, 1, pair(0))).result == (
        BatchResult.COMPLETED
    )
    assert committer.batches == before + 1


def test_refusals_keep_their_own_error(engine: Engine, clock: FakeClock) -> None:
    """Each refused batch of a group raises its own error object, not a neighbour's."""
    committer = GroupCommitter(engine)
    committer.commit(batch(clock, "k", 1, 2, pair(1)))
    rest = [batch(clock, "k", 1, 2, pair(n)) for n in (5, 6, 7)]
    sent = grouped(committer, engine, batch(clock, "head", 1, 2, pair(99)), rest)
    errors = [sent.errors[i] for i in (1, 2, 3)]
    assert all(isinstance(error, AudienceError) for error in errors)
    assert len({id(error) for error in errors}) == 3


def test_groups_of_two_processes_lock_sessions_in_one_order(
    postgres_url: str, clock: FakeClock
) -> None:
    """PostgreSQL: two groups holding the same two sessions, queued in opposite orders,
    released at once; locked in arrival order they would deadlock (one fails)."""
    engines = [db.make_engine(postgres_url) for _ in range(2)]
    conninfo = make_url(postgres_url).set(drivername="postgresql")
    admin = conninfo.render_as_string(hide_password=False)
    committers = [GroupCommitter(engine) for engine in engines]
    for key in ("h0", "h1", "s1", "s2"):
        committers[0].commit(batch(clock, key, 1, 3, pair(0)))

    def lock_rows(conn: psycopg.Connection[Any], *keys: str) -> None:
        conn.execute("SELECT 1 FROM sessions WHERE session_key = ANY(%s) FOR UPDATE", [list(keys)])

    def waiting_on_locks() -> int:
        with psycopg.connect(admin) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    def queue_behind_head(committer: GroupCommitter, side: int, keys: Sequence[str]) -> Sent:
        sent, before = Sent(), committer.groups
        sent.start(committer, [batch(clock, f"h{side}", 2, 3, pair(1))])
        eventually(lambda: committer.groups, lambda n: n == before + 1)
        for n, key in enumerate(keys, 1):  # one at a time: the queue keeps this order
            sent.start(committer, [batch(clock, key, 2, 3, pair(2))], n)
            eventually(lambda: committer.waiting, partial(operator.eq, n))
        return sent

    try:
        with psycopg.connect(admin) as heads, psycopg.connect(admin) as rows:
            lock_rows(heads, "h0", "h1")
            lock_rows(rows, "s1", "s2")
            sent = [
                queue_behind_head(committers[0], 0, ["s1", "s2"]),
                queue_behind_head(committers[1], 1, ["s2", "s1"]),
            ]
            heads.rollback()  # both heads commit; both groups then wait for s1 or s2
            eventually(waiting_on_locks, lambda n: n == 2)
            rows.rollback()
            for each in sent:
                each.join()
    finally:
        for engine in engines:
            engine.dispose()

    assert [each.errors for each in sent] == [{}, {}]
    outcomes = sorted(o.result for each in sent for i, o in each.outcomes.items() if i > 0)
    assert outcomes == [BatchResult.DUPLICATE] * 2 + [BatchResult.STORED] * 2

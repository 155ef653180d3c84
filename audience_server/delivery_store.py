"""Data functions over deliveries and their attempts: creation, claims, leases, outcomes.

Like ``store``, they take a connection and never commit; a worker step owns each short
transaction, and none stays open while a destination is called. A delivery's lease is
``lease_owner`` + ``lease_expires_at``: its owner renews it, and once it lapses any worker
may claim the delivery again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, Row, Select, and_, insert, or_, select, update

from .models import deliveries, delivery_attempts
from .states import AttemptOutcome, DeliveryState
from .store import SessionKey, SessionRow


class DeliveryKey(NamedTuple):
    tenant: str
    session_key: str
    destination: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """A ``deliveries`` row: one session's delivery to one destination."""

    tenant: str
    session_key: str
    destination: str
    kind: str
    segment_name: str
    state: DeliveryState
    attempts: int
    budget_from: int  # attempts already spent before an operator's re-queue
    users_sent: int
    invalid_users: int
    last_error: str | None
    next_attempt_at: dt.datetime
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def key(self) -> DeliveryKey:
        return DeliveryKey(self.tenant, self.session_key, self.destination)


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """A ``delivery_attempts`` row; ``outcome`` is None while the attempt runs."""

    tenant: str
    session_key: str
    destination: str
    number: int
    worker: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    outcome: AttemptOutcome | None
    http_status: int | None
    error: str | None


def _delivery(row: Row[Any]) -> DeliveryRow:
    values = dict(row._mapping)
    return DeliveryRow(**values | {"state": DeliveryState(values["state"])})


def _is_delivery(key: DeliveryKey) -> ColumnElement[bool]:
    return and_(
        deliveries.c.tenant == key.tenant,
        deliveries.c.session_key == key.session_key,
        deliveries.c.destination == key.destination,
    )


def _update(conn: Connection, key: DeliveryKey, **values: Any) -> None:
    conn.execute(update(deliveries).where(_is_delivery(key)).values(**values))


def _attempts_of(key: DeliveryKey) -> ColumnElement[bool]:
    return and_(
        delivery_attempts.c.tenant == key.tenant,
        delivery_attempts.c.session_key == key.session_key,
        delivery_attempts.c.destination == key.destination,
    )


def create_delivery(
    conn: Connection, key: DeliveryKey, *, kind: str, segment_name: str, now: dt.datetime
) -> None:
    """A pending delivery, due at once."""
    conn.execute(
        insert(deliveries).values(
            **key._asdict(),
            kind=kind,
            segment_name=segment_name,
            state=DeliveryState.PENDING,
            attempts=0,
            budget_from=0,
            users_sent=0,
            invalid_users=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
    )


def _of_sessions(tenant: str, keys: Collection[str]) -> Select[Any]:
    return (
        select(deliveries)
        .where(deliveries.c.tenant == tenant, deliveries.c.session_key.in_(keys))
        .order_by(deliveries.c.destination)
    )


def deliveries_of(conn: Connection, tenant: str, key: str) -> list[DeliveryRow]:
    """The session's deliveries, by destination."""
    return [_delivery(row) for row in conn.execute(_of_sessions(tenant, [key]))]


def deliveries_for(
    conn: Connection, sessions_page: Sequence[SessionRow]
) -> dict[SessionKey, list[DeliveryRow]]:
    """The deliveries of a page of one tenant's sessions, in one query."""
    found: dict[SessionKey, list[DeliveryRow]] = {}
    if not sessions_page:
        return found
    keys = [session.session_key for session in sessions_page]
    for row in conn.execute(_of_sessions(sessions_page[0].tenant, keys)):
        delivery = _delivery(row)
        found.setdefault(SessionKey(delivery.tenant, delivery.session_key), []).append(delivery)
    return found


def attempts_of(conn: Connection, key: DeliveryKey) -> list[AttemptRow]:
    """The delivery's attempts, first first."""
    stmt = select(delivery_attempts).where(_attempts_of(key)).order_by(delivery_attempts.c.number)
    rows = [dict(row._mapping) for row in conn.execute(stmt)]
    for row in rows:
        if row["outcome"] is not None:
            row["outcome"] = AttemptOutcome(row["outcome"])
    return [AttemptRow(**row) for row in rows]


# --- claims ----------------------------------------------------------------------------


def _delivery_due(destinations: Collection[str], now: dt.datetime) -> Select[Any]:
    """Pending and due, or running with a lapsed lease (its worker died or hung)."""
    return (
        select(deliveries)
        .where(
            deliveries.c.destination.in_(list(destinations)),
            or_(
                and_(
                    deliveries.c.state == DeliveryState.PENDING,
                    deliveries.c.next_attempt_at <= now,
                ),
                and_(
                    deliveries.c.state == DeliveryState.RUNNING,
                    deliveries.c.lease_expires_at < now,
                ),
            ),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(1)
    )


def delivery_due(conn: Connection, destinations: Collection[str], now: dt.datetime) -> bool:
    """Whether a delivery to one of ``destinations`` is due, looked at without locking."""
    return conn.execute(_delivery_due(destinations, now)).first() is not None


def lock_delivery_due(
    conn: Connection, destinations: Collection[str], now: dt.datetime
) -> DeliveryRow | None:
    """The due delivery waiting longest, locked; other workers skip it."""
    row = conn.execute(_delivery_due(destinations, now).with_for_update(skip_locked=True)).first()
    return None if row is None else _delivery(row)


def interrupt_attempt(conn: Connection, key: DeliveryKey, now: dt.datetime) -> None:
    """Close the delivery's open attempt: its worker lost the lease."""
    conn.execute(
        update(delivery_attempts)
        .where(_attempts_of(key), delivery_attempts.c.finished_at.is_(None))
        .values(finished_at=now, outcome=AttemptOutcome.INTERRUPTED, error="worker lost its lease")
    )


def fail_delivery(conn: Connection, key: DeliveryKey, error: str, now: dt.datetime) -> None:
    """End the delivery as failed without an attempt (its session was aborted)."""
    _update(conn, key, state=DeliveryState.FAILED, last_error=error, updated_at=now)


def start_attempt(
    conn: Connection,
    key: DeliveryKey,
    number: int,
    *,
    worker: str,
    now: dt.datetime,
    lease_until: dt.datetime,
) -> None:
    """Record attempt ``number`` and give ``worker`` the delivery's lease."""
    conn.execute(
        insert(delivery_attempts).values(
            **key._asdict(), number=number, worker=worker, started_at=now
        )
    )
    _update(
        conn,
        key,
        state=DeliveryState.RUNNING,
        attempts=number,
        users_sent=0,
        invalid_users=0,
        lease_owner=worker,
        lease_expires_at=lease_until,
        updated_at=now,
    )


def release_leases(conn: Connection, owner: str, now: dt.datetime) -> int:
    """Let the running deliveries ``owner`` holds (it is known dead) be taken over now,
    as if their leases had lapsed: the claim closes their attempts. How many."""
    result = conn.execute(
        update(deliveries)
        .where(deliveries.c.lease_owner == owner, deliveries.c.state == DeliveryState.RUNNING)
        .values(lease_expires_at=now - dt.timedelta(seconds=1))
    )
    return result.rowcount


def renew_lease(
    conn: Connection,
    key: DeliveryKey,
    *,
    worker: str,
    until: dt.datetime,
    users_sent: int,
    invalid_users: int,
    now: dt.datetime,
) -> bool:
    """Extend ``worker``'s lease and record progress; False if the lease is no longer its."""
    return _update_leased(
        conn,
        key,
        worker,
        deliveries.c.state == DeliveryState.RUNNING,
        lease_expires_at=until,
        users_sent=users_sent,
        invalid_users=invalid_users,
        updated_at=now,
    )


def finish_delivery(
    conn: Connection,
    key: DeliveryKey,
    *,
    worker: str,
    state: DeliveryState,
    users_sent: int,
    invalid_users: int,
    error: str | None,
    next_attempt_at: dt.datetime,
    now: dt.datetime,
) -> bool:
    """Write an attempt's result and release the lease; False (nothing written) if the
    lease is no longer ``worker``'s: the worker that took over records the delivery."""
    result = {"state": state, "users_sent": users_sent, "invalid_users": invalid_users}
    released = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    return _update_leased(
        conn, key, worker, **result, last_error=error, next_attempt_at=next_attempt_at, **released
    )


def _update_leased(
    conn: Connection,
    key: DeliveryKey,
    worker: str,
    *conditions: ColumnElement[bool],
    **values: Any,
) -> bool:
    """Update the delivery if ``worker`` holds its lease; whether it did."""
    stmt = (
        update(deliveries)
        .where(_is_delivery(key), deliveries.c.lease_owner == worker, *conditions)
        .values(**values)
        .returning(deliveries.c.destination)
    )
    return conn.execute(stmt).first() is not None


def finish_attempt(
    conn: Connection,
    key: DeliveryKey,
    number: int,
    *,
    outcome: AttemptOutcome,
    http_status: int | None,
    error: str | None,
    now: dt.datetime,
) -> None:
    conn.execute(
        update(delivery_attempts)
        .where(_attempts_of(key), delivery_attempts.c.number == number)
        .values(finished_at=now, outcome=outcome, http_status=http_status, error=error)
    )


def requeue_delivery(
    conn: Connection, key: DeliveryKey, *, budget_from: int, now: dt.datetime
) -> None:
    """Make a failed delivery pending and due now, its attempts counted from ``budget_from``."""
    _update(
        conn,
        key,
        state=DeliveryState.PENDING,
        budget_from=budget_from,
        next_attempt_at=now,
        updated_at=now,
    )

"""The states of a session and of a delivery, and the rules that read them. Pure.

    receiving --last gap filled, users add up--> complete --assembled--> delivering
        |   \\--users do not add up--> inconsistent
        \\--idle past expires_at--> expired               delivering --every delivery ended-->
    any but delivered/expired --operator--> aborted        delivered | partially_delivered | failed

    delivery: pending --claimed--> running --> succeeded | pending (retry later) | failed

The string values are the API's and the database's: they never change. ``states.is_overdue``
has one SQL twin, ``store.overdue``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from enum import StrEnum


class SessionState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    PARTIALLY_DELIVERED = "partially_delivered"
    FAILED = "failed"
    INCONSISTENT = "inconsistent"
    EXPIRED = "expired"
    ABORTED = "aborted"


class DeliveryState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Every delivery has ended, well or not: nothing more will happen without an operator.
DELIVERIES_ENDED = frozenset(
    {SessionState.DELIVERED, SessionState.PARTIALLY_DELIVERED, SessionState.FAILED}
)
# Nothing more will happen to the session by itself (what `upload --wait` waits for).
ENDED = DELIVERIES_ENDED | {SessionState.ABORTED}
# The session takes no more batches, and never will.
REFUSING = frozenset({SessionState.INCONSISTENT, SessionState.EXPIRED, SessionState.ABORTED})
# An operator's abort leaves these as they are (their users are gone or were delivered).
ABORT_KEEPS = frozenset({SessionState.DELIVERED, SessionState.EXPIRED, SessionState.ABORTED})

DELIVERY_ENDED = frozenset({DeliveryState.SUCCEEDED, DeliveryState.FAILED})

EXPIRED_REASON = "no batch arrived within the session TTL"


class AttemptOutcome(StrEnum):
    """How one delivery attempt ended (``delivery_attempts.outcome``)."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"  # the delivery is pending again
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its worker lost the lease; another took the delivery over


class EventKind(StrEnum):
    """What ``session_events`` records: a session's transitions and who caused them."""

    CREATED = "created"
    COMPLETE = "complete"
    INCONSISTENT = "inconsistent"
    ASSEMBLED = "assembled"
    DELIVERED = "delivered"
    PARTIALLY_DELIVERED = "partially_delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    ABORTED = "aborted"
    RETRY = "retry"  # an operator re-queued failed deliveries
    PURGED = "purged"  # retention reached: the users were forgotten


class BatchResult(StrEnum):
    """What one batch did to its session, as the batch log line says."""

    STORED = "stored"
    COMPLETED = "completed"
    INCONSISTENT = "inconsistent"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # refused with an error; nothing was stored


def effective_state(state: str, expires_at: dt.datetime | None, now: dt.datetime) -> SessionState:
    """The state as readers see it: a receiving session idle past ``expires_at`` has expired,
    whether or not the sweeper has marked it yet."""
    if is_overdue(state, expires_at, now):
        return SessionState.EXPIRED
    return SessionState(state)


def is_overdue(state: str, expires_at: dt.datetime | None, now: dt.datetime) -> bool:
    """Receiving, and past its expiry."""
    return state == SessionState.RECEIVING and expires_at is not None and expires_at <= now


def settled_state(delivery_states: Iterable[str]) -> SessionState:
    """The session's state from its deliveries': still delivering until every one ended."""
    states = [DeliveryState(state) for state in delivery_states]
    if not all(state in DELIVERY_ENDED for state in states):
        return SessionState.DELIVERING
    if all(state == DeliveryState.SUCCEEDED for state in states):
        return SessionState.DELIVERED
    if all(state == DeliveryState.FAILED for state in states):
        return SessionState.FAILED
    return SessionState.PARTIALLY_DELIVERED


def segment_name(name: str, prefix: str, disable_prefix: bool) -> str:
    """The name at the destination: ``blotout_High_Value_Customers_Q1`` or the name as sent."""
    if disable_prefix:
        return name
    return prefix + re.sub(r"\s+", "_", name)

"""How sessions look to operators: the camelCase bodies of the status endpoints."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Sequence
from typing import Any

import orjson

from .delivery_store import DeliveryRow
from .errors import InvalidField
from .sequencing import missing_sequences
from .states import EXPIRED_REASON, SessionState, effective_state
from .store import SessionRow


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def delivery_view(row: DeliveryRow) -> dict[str, Any]:
    return {
        "destination": row.destination,
        "kind": row.kind,
        "segmentName": row.segment_name,
        "state": row.state,
        "attempts": row.attempts,
        "usersSent": row.users_sent,
        "invalidUsers": row.invalid_users,
        "lastError": row.last_error,
        "updatedAt": _iso(row.updated_at),
    }


def session_view(
    session: SessionRow,
    now: dt.datetime,
    sequences: list[int] | None = None,
    deliveries: Sequence[DeliveryRow] = (),
) -> dict[str, Any]:
    """A session as SPEC §4 shows it, with assembly's progress; ``missingSequences`` only
    when ``sequences`` is given."""
    state = effective_state(session.state, session.expires_at, now)
    reason = session.reason
    if state != session.state:  # overdue, not yet marked by the sweeper
        reason = EXPIRED_REASON
    view: dict[str, Any] = {
        "sessionId": session.session_key,
        "name": session.name,
        "type": session.type,
        "state": state,
        "reason": reason,
        "totalBatches": session.total_batches,
        "totalUsers": session.total_users,
        "receivedBatches": session.received_batches,
        "receivedUsers": session.received_users,
        # Assembly's progress: users read so far (null before it starts), then the unique
        # users it found (null until it ends), which deliveries' usersSent count towards.
        "assembledUsers": session.assembled_users,
        "uniqueUsers": session.unique_users,
    }
    if sequences is not None:
        view["missingSequences"] = missing_sequences(
            session.sequence_base, session.total_batches, sequences
        )
    view.update(
        sequenceBase=session.sequence_base,
        createdAt=_iso(session.created_at),
        updatedAt=_iso(session.updated_at),
        expiresAt=_iso(session.expires_at) if state == SessionState.RECEIVING else None,
        deliveries=[delivery_view(row) for row in deliveries],
    )
    return view


def encode_cursor(session: SessionRow) -> str:
    raw = orjson.dumps([session.updated_at.isoformat(), session.session_key])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated_at, key = orjson.loads(raw)
        when = dt.datetime.fromisoformat(updated_at)
        if when.tzinfo is None or not isinstance(key, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidField("cursor is not one this server issued.") from None
    return when, key

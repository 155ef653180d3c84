"""Store one batch in its session and, when it fills the last gap, decide completion.

Everything happens in the caller's single transaction with the session row locked, so
batches of one session are applied one at a time and the completion check runs exactly
once, whichever process receives the last batch.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection

from . import store
from .digests import canonical_digest
from .errors import AudienceError, Conflict, SessionGone
from .parsing import BatchUpload, decode_users
from .sequencing import base_settled_by, fits_base, inconsistency
from .states import BatchResult, EventKind, SessionState, effective_state
from .store import BatchRow, SessionRow


@dataclass(frozen=True)
class Outcome:
    """What a batch did; ``error`` is answered after the transaction commits."""

    result: BatchResult
    state: SessionState
    error: AudienceError | None = None


def _same_users(stored: BatchRow, upload: BatchUpload) -> bool:
    if stored.digest == upload.digest:
        return True
    if stored.user_count != upload.user_count:
        return False
    # Same JSON value written differently (spacing, key order): still the same batch.
    mine = canonical_digest(decode_users(upload.users_json))
    if stored.canonical_digest is not None:  # set by assembly; survives the purge
        return stored.canonical_digest == mine
    if stored.users is None:
        return False
    return canonical_digest(decode_users(store.unpack_users(stored.users))) == mine


def _check_matches_session(session: SessionRow, upload: BatchUpload) -> None:
    key = upload.session_key
    problems = []
    if upload.name != session.name:
        problems.append(f"name differs from the name session {key} was started with.")
    if upload.type != session.type:
        problems.append(f"type is {upload.type} but session {key} was started as {session.type}.")
    for field, sent, started in (
        ("totalBatches", upload.total_batches, session.total_batches),
        ("totalUsers", upload.total_users, session.total_users),
    ):
        if sent != started:
            problems.append(
                f"batch.{field} is {sent} but session {key} was started with {started}."
            )
    if problems:
        raise Conflict(*problems)


def receive_batch(
    conn: Connection,
    tenant: str,
    upload: BatchUpload,
    *,
    packed_users: bytes,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> Outcome:
    """Apply one validated batch to its session (SPEC §2 semantics).

    ``packed_users`` is ``store.pack_users(upload.users_json)``, made by the caller before
    the transaction so the compression does not lengthen the time the session is locked.
    """
    key = upload.session_key
    # Most batches find their session: lock it straight away; create it only when absent.
    session = store.lock_session(conn, tenant, key)
    created = session is None and store.create_session_if_absent(
        conn,
        tenant,
        key,
        name=upload.name,
        type=upload.type,
        total_batches=upload.total_batches,
        total_users=upload.total_users,
        now=now,
        expires_at=now + ttl,
    )
    if session is None:
        session = store.lock_session(conn, tenant, key)
    assert session is not None  # created above or already there; sessions are never deleted
    if created:
        store.add_event(conn, tenant, key, now, EventKind.CREATED)

    state = effective_state(session.state, session.expires_at, now)
    if state == SessionState.ABORTED:
        raise SessionGone(f"session {key} was aborted; start a new session to upload again.")
    if state == SessionState.EXPIRED:
        raise SessionGone(
            f"session {key} expired at {session.expires_at.isoformat()} after no batch arrived "
            "for the session TTL; start a new session to upload again."
        )
    _check_matches_session(session, upload)
    if state == SessionState.INCONSISTENT:
        raise Conflict(f"session {key} is inconsistent: {session.reason}.")

    total_batches = session.total_batches
    base = session.sequence_base
    if not fits_base(upload.sequence, base, total_batches):
        assert base is not None
        raise Conflict(
            f"batch.sequence {upload.sequence} is outside session {key}, which numbers its "
            f"batches from {base} ({base}..{base + total_batches - 1})."
        )

    # Insert first: a new sequence (the usual case) costs one statement; a sequence already
    # there is then compared. Any refusal below rolls the insert back with the transaction.
    inserted = store.insert_batch_if_absent(
        conn,
        tenant=tenant,
        session_key=key,
        sequence=upload.sequence,
        user_count=upload.user_count,
        digest=upload.digest,
        meta=orjson.dumps(upload.batch).decode(),
        users=packed_users,
        received_at=now,
    )
    if not inserted:
        stored = store.find_batch(conn, tenant, key, upload.sequence)
        assert stored is not None
        if _same_users(stored, upload):
            return Outcome(BatchResult.DUPLICATE, state)
        raise Conflict(
            f"batch.sequence {upload.sequence} of session {key} was already received with "
            "different users."
        )

    received_users = session.received_users + upload.user_count
    if received_users > session.total_users:
        raise Conflict(
            f"this batch's {upload.user_count} users would bring session {key} to "
            f"{received_users} users, above totalUsers ({session.total_users})."
        )
    received_batches = session.received_batches + 1
    values: dict[str, Any] = {
        "received_batches": received_batches,
        "received_users": received_users,
        "updated_at": now,
        "expires_at": now + ttl,
    }
    if base is None:
        values["sequence_base"] = base_settled_by(upload.sequence, total_batches)

    outcome = Outcome(BatchResult.STORED, SessionState.RECEIVING)
    if received_batches == total_batches:
        # Count again from the batches themselves, not the running total: this is the proof.
        counted = store.sum_users(conn, tenant, key)
        reason = inconsistency(session.total_users, counted, total_batches)
        values["completed_at"] = now
        if reason is None:
            values.update(
                state=SessionState.COMPLETE, sync=upload.sync, disable_prefix=upload.disable_prefix
            )
            store.add_event(conn, tenant, key, now, EventKind.COMPLETE)
            outcome = Outcome(BatchResult.COMPLETED, SessionState.COMPLETE)
        else:
            values.update(state=SessionState.INCONSISTENT, reason=reason)
            store.add_event(conn, tenant, key, now, EventKind.INCONSISTENT, reason)
            outcome = Outcome(
                BatchResult.INCONSISTENT,
                SessionState.INCONSISTENT,
                Conflict(f"session {key} is inconsistent: {reason}."),
            )
    store.update_session(conn, tenant, key, **values)
    return outcome

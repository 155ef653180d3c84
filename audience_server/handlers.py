"""The endpoints: each turns a request into a response. Database work runs in the thread
pool, one short transaction per request (batches: per group of concurrent batches)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, TypedDict

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from . import commits, db, delivery_store, metrics, store
from .auth import tenant_of
from .clock import Clock
from .errors import (
    APPLICATION_JSON,
    SUCCESS_BODY,
    AudienceError,
    InvalidField,
    NotFound,
    ProviderErrors,
    SyncTimeout,
)
from .forms import read_form
from .ingest import Outcome
from .lifecycle import abort_session, retry_failed
from .parsing import BatchUpload, Limits, parse_upload
from .settings import Settings
from .states import ENDED, BatchResult, DeliveryState, SessionState
from .status import decode_cursor, encode_cursor, session_view
from .store import SessionKey
from .worker import Destinations, Doorbell, Wakeable

log = logging.getLogger("audience_server")


class State(TypedDict):
    """What the lifespan gives every request (``request.state``)."""

    settings: Settings
    engine: Engine
    clock: Clock
    limits: Limits
    changes: Doorbell  # rung whenever a delivery or an assembly ends in this process
    worker: Wakeable | None  # what runs the delivery work, when this server runs it
    destinations: Destinations


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type=APPLICATION_JSON)


def _log_batch(upload: BatchUpload, tenant: str, result: BatchResult, status: int) -> None:
    metrics.count_batch(result, status, upload.user_count)
    log.info(
        "batch",
        extra={
            "segment": upload.name,
            "sessionId": upload.session_key,
            "sequence": upload.sequence,
            "users": upload.user_count,
            "type": upload.type,
            "tenant": tenant,
            "result": result,
            "status": status,
        },
    )


def _ingest(
    state: State, tenant: str, fields: dict[str, str], query: Mapping[str, str]
) -> tuple[BatchUpload, Outcome]:
    try:
        upload = parse_upload(fields, query, state["limits"])
    except AudienceError as exc:  # logged as a refused request; counted as a refused batch
        metrics.count_batch(BatchResult.REJECTED, exc.status, 0)
        raise
    batch = commits.Batch(
        tenant,
        upload,
        packed_users=store.pack_users(upload.users_json),  # outside the lock: it takes time
        clock=state["clock"],
        ttl=state["settings"].session_ttl,
    )
    try:
        # Shares a transaction with the batches that arrive meanwhile; returns once committed.
        outcome = commits.commit(state["engine"], batch)
    except AudienceError as exc:
        _log_batch(upload, tenant, BatchResult.REJECTED, exc.status)
        raise
    _log_batch(upload, tenant, outcome.result, outcome.error.status if outcome.error else 200)
    return upload, outcome


async def post_audience(request: Request[State]) -> Response:
    state = request.state
    tenant = tenant_of(request, state["settings"].api_keys)
    fields = await read_form(request, state["settings"].max_body_bytes)
    upload, outcome = await run_in_threadpool(_ingest, state, tenant, fields, request.query_params)
    if outcome.error is not None:
        raise outcome.error
    worker = state["worker"]
    if outcome.result == BatchResult.COMPLETED and worker is not None:
        worker.wake()
    # With no destination configured there is nothing to wait for.
    waits = outcome.state not in (SessionState.RECEIVING, SessionState.INCONSISTENT)
    if upload.sync and state["destinations"] and waits:
        await _await_deliveries(state, tenant, upload.session_key)
    return Response(SUCCESS_BODY, 200, media_type=APPLICATION_JSON)


def _delivery_state(state: State, tenant: str, key: str) -> tuple[SessionState, list[str]]:
    with db.read_transaction(state["engine"]) as conn:
        session = store.get_session(conn, tenant, key)
        assert session is not None
        failed = [
            f"{row.destination}: {row.last_error or 'failed'}"
            for row in delivery_store.deliveries_of(conn, tenant, key)
            if row.state == DeliveryState.FAILED
        ]
    return session.state, failed


async def _await_deliveries(state: State, tenant: str, key: str) -> None:
    """Sync mode: wait until every delivery of the session has ended, within the limit."""
    limit = state["settings"].sync_timeout.total_seconds()
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        session_state, failed = await run_in_threadpool(_delivery_state, state, tenant, key)
        if session_state in ENDED:
            if failed:
                raise ProviderErrors(*failed)
            return
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise SyncTimeout(
                f"Delivery of session {key} is still running after {limit:g} s; it goes on. "
                f"Follow it at GET /audience/sessions/{key}."
            )
        # Woken at once by this process's worker; the timeout covers workers elsewhere.
        await state["changes"].wait(min(0.5, remaining))


def _status(state: State, tenant: str, key: str) -> dict[str, Any]:
    with db.read_transaction(state["engine"]) as conn:
        session = store.get_session(conn, tenant, key)
        if session is None:
            raise NotFound(f"session {key} does not exist.")
        sequences = store.received_sequences(conn, tenant, key)
        deliveries = delivery_store.deliveries_of(conn, tenant, key)
    return session_view(session, state["clock"](), sequences, deliveries)


async def get_session(request: Request[State]) -> Response:
    state = request.state
    tenant = tenant_of(request, state["settings"].api_keys)
    key = request.path_params["session_id"]
    return _json(await run_in_threadpool(_status, state, tenant, key))


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    value = int(raw) if raw.isascii() and raw.isdigit() else None
    if value is None or not low <= value <= high:
        raise InvalidField(f"{name} must be an integer from {low} to {high}.")
    return value


def _state_param(query: Mapping[str, str]) -> SessionState | None:
    raw = query.get("state") or None
    if raw is None:
        return None
    try:
        return SessionState(raw)
    except ValueError:
        raise InvalidField(f"state must be one of {', '.join(SessionState)}.") from None


def _list(state: State, tenant: str, query: Mapping[str, str]) -> dict[str, Any]:
    wanted = _state_param(query)
    limit = _int_param(query, "limit", 50, 1, 500)
    cursor = query.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    now = state["clock"]()
    with db.read_transaction(state["engine"]) as conn:
        rows = store.list_sessions(
            conn,
            tenant,
            now=now,
            limit=limit + 1,
            state=wanted,
            name=query.get("name"),
            after=after,
        )
        page = rows[:limit]
        deliveries = delivery_store.deliveries_for(conn, page)
    return {
        "sessions": [
            session_view(
                row, now, None, deliveries.get(SessionKey(row.tenant, row.session_key), [])
            )
            for row in page
        ],
        "nextCursor": encode_cursor(page[-1]) if len(rows) > limit else None,
    }


async def list_sessions(request: Request[State]) -> Response:
    state = request.state
    tenant = tenant_of(request, state["settings"].api_keys)
    return _json(await run_in_threadpool(_list, state, tenant, request.query_params))


def _abort(state: State, tenant: str, key: str) -> dict[str, Any]:
    now = state["clock"]()
    with db.write_transaction(state["engine"]) as conn:
        session = abort_session(conn, tenant, key, now)
        sequences = store.received_sequences(conn, tenant, key)
        deliveries = delivery_store.deliveries_of(conn, tenant, key)
    log.info("session aborted", extra={"sessionId": key, "tenant": tenant, "state": session.state})
    return session_view(session, now, sequences, deliveries)


async def delete_session(request: Request[State]) -> Response:
    state = request.state
    tenant = tenant_of(request, state["settings"].api_keys)
    key = request.path_params["session_id"]
    return _json(await run_in_threadpool(_abort, state, tenant, key))


def _retry(state: State, tenant: str, key: str) -> list[str]:
    with db.write_transaction(state["engine"]) as conn:
        return retry_failed(conn, tenant, key, state["clock"]())


async def retry_session(request: Request[State]) -> Response:
    state = request.state
    tenant = tenant_of(request, state["settings"].api_keys)
    key = request.path_params["session_id"]
    destinations = await run_in_threadpool(_retry, state, tenant, key)
    log.info("deliveries re-queued", extra={"sessionId": key, "destinations": destinations})
    worker = state["worker"]
    if worker is not None:
        worker.wake()
    return _json({"sessionId": key, "retried": destinations}, 202)


async def metrics_text(request: Request[State]) -> Response:
    """Prometheus' scrape: API keys apply unless ``AUDIENCE_METRICS_PUBLIC`` is set."""
    state = request.state
    if not state["settings"].metrics_public:
        tenant_of(request, state["settings"].api_keys)
    body = await run_in_threadpool(metrics.exposition, state["engine"], state["clock"])
    return Response(body, 200, media_type=metrics.CONTENT_TYPE)


async def healthz(request: Request[State]) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request[State]) -> Response:
    state = request.state
    tenant_of(request, state["settings"].api_keys)
    try:
        current = await run_in_threadpool(db.schema_is_current, state["engine"])
    except DBAPIError as exc:
        log.warning("database unreachable", extra={"error": type(exc.orig).__name__})
        return _json({"status": "unavailable", "reason": "database unreachable"}, 503)
    if not current:
        return _json(
            {"status": "unavailable", "reason": "schema is not at the newest revision"}, 503
        )
    return _json({"status": "ready"})

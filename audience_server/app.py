"""The HTTP edge: routes, the error table, and the lifespan (schema check, sweeper)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import db, store
from .auth import tenant_of
from .delivery import SESSION_ENDED, Signal, Worker
from .destinations import DestinationConfig
from .errors import (
    APPLICATION_JSON,
    SUCCESS_BODY,
    AudienceError,
    InvalidField,
    NotFound,
    ProviderErrors,
    SyncTimeout,
    errors_body,
)
from .forms import read_form
from .ingest import Outcome, receive_batch
from .lifecycle import abort_session, expire_overdue, purge_ended, retry_failed
from .parsing import BatchUpload, Limits, parse_upload
from .providers import Provider, configured_destinations
from .retry import RetryPolicy
from .settings import Settings
from .status import STATES, decode_cursor, encode_cursor, session_view

log = logging.getLogger("audience_server")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


Destinations = Mapping[str, tuple[DestinationConfig, Provider]]


@dataclass(frozen=True)
class Context:
    settings: Settings
    engine: Engine
    clock: Clock
    limits: Limits
    changes: Signal  # fired whenever a delivery or an assembly ends in this process
    worker: Worker | None  # the in-process worker, when serve runs one
    destinations: Destinations


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type=APPLICATION_JSON)


def _context(request: Request) -> Context:
    context: Context = request.app.state.context
    return context


def _log_batch(upload: BatchUpload, tenant: str, result: str, status: int) -> None:
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
    ctx: Context, tenant: str, fields: dict[str, str], query: Mapping[str, str]
) -> tuple[BatchUpload, Outcome]:
    upload = parse_upload(fields, query, ctx.limits)
    packed = store.pack_users(upload.users_json)
    try:
        with db.write_transaction(ctx.engine) as conn:
            outcome = receive_batch(
                conn,
                tenant,
                upload,
                packed_users=packed,
                now=ctx.clock(),
                ttl=ctx.settings.session_ttl,
            )
    except AudienceError as exc:
        _log_batch(upload, tenant, "rejected", exc.status)
        raise
    _log_batch(upload, tenant, outcome.result, outcome.error.status if outcome.error else 200)
    return upload, outcome


async def post_audience(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    fields = await read_form(request, ctx.settings.max_body_bytes)
    upload, outcome = await run_in_threadpool(_ingest, ctx, tenant, fields, request.query_params)
    if outcome.error is not None:
        raise outcome.error
    if outcome.result == "completed" and ctx.worker is not None:
        ctx.worker.wake()
    # With no destination configured there is nothing to wait for.
    waits = upload.sync and ctx.destinations and outcome.state not in ("receiving", "inconsistent")
    if waits:
        await _await_deliveries(ctx, tenant, upload.session_key)
    return Response(SUCCESS_BODY, 200, media_type=APPLICATION_JSON)


def _delivery_state(ctx: Context, tenant: str, key: str) -> tuple[str, list[str]]:
    with db.read_transaction(ctx.engine) as conn:
        session = store.get_session(conn, tenant, key)
        assert session is not None
        failed = [
            f"{row.destination}: {row.last_error or 'failed'}"
            for row in store.deliveries_of(conn, tenant, key)
            if row.state == "failed"
        ]
    return str(session.state), failed


async def _await_deliveries(ctx: Context, tenant: str, key: str) -> None:
    """Sync mode: wait until every delivery of the session has ended, within the limit."""
    limit = ctx.settings.sync_timeout.total_seconds()
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        state, failed = await run_in_threadpool(_delivery_state, ctx, tenant, key)
        if state in SESSION_ENDED or state == "aborted":
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
        await ctx.changes.wait(min(0.5, remaining))


def _status(ctx: Context, tenant: str, key: str) -> dict[str, Any]:
    with db.read_transaction(ctx.engine) as conn:
        session = store.get_session(conn, tenant, key)
        if session is None:
            raise NotFound(f"session {key} does not exist.")
        sequences = store.received_sequences(conn, tenant, key)
        deliveries = store.deliveries_of(conn, tenant, key)
    return session_view(session, ctx.clock(), sequences, deliveries)


async def get_session(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    key = request.path_params["session_id"]
    return _json(await run_in_threadpool(_status, ctx, tenant, key))


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidField(f"{name} must be an integer from {low} to {high}.")
    return int(raw)


def _list(ctx: Context, tenant: str, query: Mapping[str, str]) -> dict[str, Any]:
    state = query.get("state") or None
    if state is not None and state not in STATES:
        raise InvalidField(f"state must be one of {', '.join(STATES)}.")
    limit = _int_param(query, "limit", 50, 1, 500)
    cursor = query.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    now = ctx.clock()
    with db.read_transaction(ctx.engine) as conn:
        rows = store.list_sessions(
            conn, tenant, now=now, limit=limit + 1, state=state, name=query.get("name"), after=after
        )
        page = rows[:limit]
        deliveries = store.deliveries_for(conn, page)
    return {
        "sessions": [
            session_view(row, now, None, deliveries.get((row.tenant, row.session_key), []))
            for row in page
        ],
        "nextCursor": encode_cursor(page[-1]) if len(rows) > limit else None,
    }


async def list_sessions(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    return _json(await run_in_threadpool(_list, ctx, tenant, request.query_params))


def _abort(ctx: Context, tenant: str, key: str) -> dict[str, Any]:
    now = ctx.clock()
    with db.write_transaction(ctx.engine) as conn:
        session = abort_session(conn, tenant, key, now)
        sequences = store.received_sequences(conn, tenant, key)
        deliveries = store.deliveries_of(conn, tenant, key)
    log.info("session aborted", extra={"sessionId": key, "tenant": tenant, "state": session.state})
    return session_view(session, now, sequences, deliveries)


async def delete_session(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    key = request.path_params["session_id"]
    return _json(await run_in_threadpool(_abort, ctx, tenant, key))


def _retry(ctx: Context, tenant: str, key: str) -> list[str]:
    with db.write_transaction(ctx.engine) as conn:
        return retry_failed(conn, tenant, key, ctx.clock())


async def retry_session(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    key = request.path_params["session_id"]
    destinations = await run_in_threadpool(_retry, ctx, tenant, key)
    log.info("deliveries re-queued", extra={"sessionId": key, "destinations": destinations})
    if ctx.worker is not None:
        ctx.worker.wake()
    return _json({"sessionId": key, "retried": destinations}, 202)


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx = _context(request)
    tenant_of(request, ctx.settings.api_keys)
    try:
        current = await run_in_threadpool(db.schema_is_current, ctx.engine)
    except DBAPIError as exc:
        log.warning("database unreachable", extra={"error": type(exc.orig).__name__})
        return _json({"status": "unavailable", "reason": "database unreachable"}, 503)
    if not current:
        return _json(
            {"status": "unavailable", "reason": "schema is not at the newest revision"}, 503
        )
    return _json({"status": "ready"})


async def _audience_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AudienceError)
    if not isinstance(exc, InvalidField | NotFound):
        log.info("request refused", extra={"status": exc.status, "path": request.url.path})
    return Response(exc.body(), exc.status, media_type=exc.content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "No such endpoint.", 405: "Method not allowed for this endpoint."}.get(
        exc.status_code, str(exc.detail)
    )
    return Response(errors_body([message]), exc.status_code, exc.headers, APPLICATION_JSON)


async def _database_error(request: Request, exc: Exception) -> Response:
    log.error("database error", extra={"path": request.url.path, "error": type(exc).__name__})
    return Response(
        errors_body(["The database is unavailable; nothing was stored. Try again shortly."]),
        503,
        {"Retry-After": "5"},
        APPLICATION_JSON,
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", extra={"path": request.url.path})
    return Response(errors_body(["Internal server error."]), 500, media_type=APPLICATION_JSON)


async def _sweep_forever(ctx: Context) -> None:
    interval = ctx.settings.sweep_interval.total_seconds()
    while True:
        await asyncio.sleep(interval)
        try:
            expired, purged = await run_in_threadpool(
                sweep_once, ctx.engine, ctx.clock(), ctx.settings.retention
            )
            if expired or purged:
                log.info("sweep", extra={"expired": expired, "purged": purged})
        except Exception:
            log.exception("sweep failed; will try again")


def sweep_once(
    engine: Engine, now: dt.datetime, retention: dt.timedelta = dt.timedelta(days=7)
) -> tuple[int, int]:
    """Expire overdue receiving sessions and purge the users of sessions whose deliveries
    ended ``retention`` ago, in short transactions of 100; returns both counts."""

    def repeat(step: Callable[[Connection], int]) -> int:
        total = 0
        while True:
            with db.write_transaction(engine) as conn:
                count = step(conn)
            total += count
            if count == 0:
                return total

    expired = repeat(lambda conn: expire_overdue(conn, now))
    purged = repeat(lambda conn: purge_ended(conn, now, retention))
    return expired, purged


def prepare_database(settings: Settings, engine: Engine) -> None:
    """SQLite migrates itself; PostgreSQL must already be at head (``audience-server migrate``)."""
    if settings.is_sqlite:
        db.migrate(engine)
    elif not db.schema_is_current(engine):
        raise RuntimeError(
            "the database schema is not at the newest revision; run `audience-server migrate`"
        )


def load_destinations(settings: Settings) -> Destinations:
    return configured_destinations(
        settings.destinations_path, explicit=settings.destinations_explicit, environ=os.environ
    )


def make_worker(
    settings: Settings,
    engine: Engine,
    destinations: Destinations,
    clock: Clock = utcnow,
    changes: Signal | None = None,
) -> Worker:
    return Worker(
        engine,
        destinations,
        clock=clock,
        policy=RetryPolicy(
            base=settings.retry_base.total_seconds(),
            cap=settings.retry_cap.total_seconds(),
            max_attempts=settings.delivery_max_attempts,
        ),
        segment_prefix=settings.segment_prefix,
        lease=settings.lease,
        chunk_timeout=settings.chunk_timeout,
        poll_interval=settings.poll_interval.total_seconds(),
        concurrency=settings.worker_concurrency,
        changes=changes,
        scratch_root=settings.scratch_dir,
    )


async def run_worker(worker: Worker, stop: asyncio.Event, grace: float = 10.0) -> None:
    """Run until ``stop``; then give work in hand ``grace`` seconds before cancelling it
    (a cancelled delivery's lease lapses and another worker resumes it)."""
    task = asyncio.create_task(worker.run(stop))
    await stop.wait()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    clock: Clock = utcnow,
    sweeper: bool = True,
    destinations: Destinations | None = None,
    worker: bool | None = None,
) -> Starlette:
    """The ASGI app. Tests pass their own engine, clock and destinations."""
    own_engine = engine is None
    engine = engine if engine is not None else db.make_engine(settings.database_url)
    if destinations is None:
        destinations = load_destinations(settings)
    changes = Signal()
    run_in_process = settings.run_worker if worker is None else worker
    ctx = Context(
        settings=settings,
        engine=engine,
        clock=clock,
        limits=Limits(settings.max_batch_users, settings.max_total_batches),
        changes=changes,
        destinations=destinations,
        worker=make_worker(settings, engine, destinations, clock, changes)
        if run_in_process
        else None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(prepare_database, settings, ctx.engine)
        stop = asyncio.Event()
        sweeping = asyncio.create_task(_sweep_forever(ctx)) if sweeper else None
        working = (
            asyncio.create_task(run_worker(ctx.worker, stop)) if ctx.worker is not None else None
        )
        try:
            yield
        finally:
            stop.set()
            if sweeping is not None:
                sweeping.cancel()
            for task in (sweeping, working):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if own_engine:
                ctx.engine.dispose()

    app = Starlette(
        routes=[
            Route("/audience", post_audience, methods=["POST"]),
            Route("/audience/sessions", list_sessions, methods=["GET"]),
            Route("/audience/sessions/{session_id}", get_session, methods=["GET"]),
            Route("/audience/sessions/{session_id}", delete_session, methods=["DELETE"]),
            Route("/audience/sessions/{session_id}/retry", retry_session, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={
            AudienceError: _audience_error,
            HTTPException: _http_error,
            OperationalError: _database_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.context = ctx
    return app

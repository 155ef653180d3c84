"""The HTTP edge: routes, the error table, and the lifespan (schema check, sweeper)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import db, store
from .auth import tenant_of
from .errors import (
    APPLICATION_JSON,
    SUCCESS_BODY,
    AudienceError,
    InvalidField,
    NotFound,
    errors_body,
)
from .forms import read_form
from .ingest import Outcome, receive_batch
from .lifecycle import abort_session, expire_overdue
from .parsing import BatchUpload, Limits, parse_upload
from .settings import Settings
from .status import STATES, decode_cursor, encode_cursor, session_view

log = logging.getLogger("audience_server")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Context:
    settings: Settings
    engine: Engine
    clock: Clock
    limits: Limits


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


def _ingest(ctx: Context, tenant: str, fields: dict[str, str], query: Mapping[str, str]) -> Outcome:
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
    return outcome


async def post_audience(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    fields = await read_form(request, ctx.settings.max_body_bytes)
    outcome = await run_in_threadpool(_ingest, ctx, tenant, fields, request.query_params)
    if outcome.error is not None:
        raise outcome.error
    return Response(SUCCESS_BODY, 200, media_type=APPLICATION_JSON)


def _status(ctx: Context, tenant: str, key: str) -> dict[str, Any]:
    with db.read_transaction(ctx.engine) as conn:
        session = store.get_session(conn, tenant, key)
        if session is None:
            raise NotFound(f"session {key} does not exist.")
        sequences = store.received_sequences(conn, tenant, key)
    return session_view(session, ctx.clock(), sequences)


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
    return {
        "sessions": [session_view(row, now) for row in page],
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
    log.info("session aborted", extra={"sessionId": key, "tenant": tenant, "state": session.state})
    return session_view(session, now, sequences)


async def delete_session(request: Request) -> Response:
    ctx = _context(request)
    tenant = tenant_of(request, ctx.settings.api_keys)
    key = request.path_params["session_id"]
    return _json(await run_in_threadpool(_abort, ctx, tenant, key))


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
            expired = await run_in_threadpool(sweep_once, ctx.engine, ctx.clock())
            if expired:
                log.info("sessions expired", extra={"count": expired})
        except Exception:
            log.exception("sweep failed; will try again")


def sweep_once(engine: Engine, now: dt.datetime) -> int:
    """Expire every overdue receiving session, in short transactions of 100."""
    total = 0
    while True:
        with db.write_transaction(engine) as conn:
            count = expire_overdue(conn, now)
        total += count
        if count == 0:
            return total


def prepare_database(settings: Settings, engine: Engine) -> None:
    """SQLite migrates itself; PostgreSQL must already be at head (``audience-server migrate``)."""
    if settings.is_sqlite:
        db.migrate(engine)
    elif not db.schema_is_current(engine):
        raise RuntimeError(
            "the database schema is not at the newest revision; run `audience-server migrate`"
        )


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    clock: Clock = utcnow,
    sweeper: bool = True,
) -> Starlette:
    """The ASGI app. Tests pass their own engine and clock."""
    own_engine = engine is None
    engine = engine if engine is not None else db.make_engine(settings.database_url)
    ctx = Context(
        settings=settings,
        engine=engine,
        clock=clock,
        limits=Limits(settings.max_batch_users, settings.max_total_batches),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(prepare_database, settings, ctx.engine)
        task = asyncio.create_task(_sweep_forever(ctx)) if sweeper else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
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

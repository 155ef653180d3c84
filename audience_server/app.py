"""The HTTP edge: routes, the error table, and the lifespan that prepares the database,
runs the sweeper and the in-process worker, and hands every request its ``State``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import db, metrics
from .clock import Clock, utcnow
from .console import CONSOLE_ROUTES
from .errors import APPLICATION_JSON, AudienceError, InvalidField, NotFound, errors_body
from .handlers import (
    State,
    delete_session,
    get_session,
    healthz,
    list_sessions,
    metrics_text,
    post_audience,
    readyz,
    retry_session,
)
from .openapi import openapi_json
from .parsing import Limits
from .runtime import (
    load_destinations,
    make_worker,
    prepare_database,
    run_worker,
    sweep_forever,
)
from .settings import Settings
from .supervisor import WorkerSupervisor
from .worker import Destinations, Doorbell

log = logging.getLogger("audience_server")

# Destinations is the type of create_app's ``destinations``: importable from here.
__all__ = ["Destinations", "create_app"]

ROUTES = [
    Route("/audience", post_audience, methods=["POST"]),
    Route("/audience/sessions", list_sessions, methods=["GET"]),
    Route("/audience/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/audience/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/audience/sessions/{session_id}/retry", retry_session, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    *CONSOLE_ROUTES,  # /, /console and its static files
]


class RequestTimer:
    """Observes each HTTP request's duration under its route's template (never the raw
    path: one series per route, whatever the session ids)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            template = getattr(route, "path", None) or "unmatched"
            metrics.observe_request(template, time.perf_counter() - started)


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


# Looked up along the exception's class hierarchy: the most specific entry answers.
ERROR_HANDLERS = {
    AudienceError: _audience_error,
    HTTPException: _http_error,
    OperationalError: _database_error,
    Exception: _unexpected,
}


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    clock: Clock = utcnow,
    sweeper: bool = True,
    destinations: Destinations | None = None,
    worker: bool | None = None,
    worker_process: bool = False,
) -> Starlette:
    """The ASGI app. Tests pass their own engine, clock and destinations. The delivery
    worker (``worker``, default ``AUDIENCE_WORKER``) runs in this process, or with
    ``worker_process`` in a supervised child process (``serve`` does that)."""
    own_engine = engine is None
    engine = engine if engine is not None else db.make_engine(settings.database_url)
    if destinations is None:
        destinations = load_destinations(settings)
    changes = Doorbell()
    runs_worker = settings.run_worker if worker is None else worker
    supervisor = WorkerSupervisor(changes) if runs_worker and worker_process else None
    in_process = (
        make_worker(settings, engine, destinations, clock, changes)
        if runs_worker and supervisor is None
        else None
    )
    state = State(
        settings=settings,
        engine=engine,
        clock=clock,
        limits=Limits(settings.max_batch_users, settings.max_total_batches),
        changes=changes,
        destinations=destinations,
        worker=supervisor or in_process,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        await run_in_threadpool(prepare_database, settings, engine)
        stop = asyncio.Event()
        sweeping = asyncio.create_task(sweep_forever(settings, engine, clock)) if sweeper else None
        if supervisor is not None:
            working = asyncio.create_task(supervisor.run(stop))
        elif in_process is not None:
            working = asyncio.create_task(run_worker(in_process, stop))
        else:
            working = None
        try:
            yield state
        finally:
            stop.set()
            if sweeping is not None:
                sweeping.cancel()
            for task in (sweeping, working):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if own_engine:
                engine.dispose()

    return Starlette(
        routes=ROUTES,
        exception_handlers=ERROR_HANDLERS,
        middleware=[Middleware(RequestTimer)],
        lifespan=lifespan,
    )

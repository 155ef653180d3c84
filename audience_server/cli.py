"""The ``audience-server`` command: the server commands (serve, worker, migrate) and, mounted
from ``client.commands``, the client ones (upload, status, sessions, retry, abort). Flags
fall back to the AUDIENCE_* environment."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .destinations import DestinationsError
from .settings import Settings, SettingsError

if TYPE_CHECKING:
    from sqlalchemy import Engine


def tune_gc() -> None:
    """Collect garbage less often. Every batch decodes 10,000+ dicts; with the default
    thresholds the cyclic collector runs many times per batch over a heap it cannot free
    (measured: a third of a worker's time). Objects alive at start-up are frozen out of it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.port is not None and not 1 <= args.port <= 65535:
        print(f"audience-server: --port {args.port} is not a port; use 1 to 65535", file=sys.stderr)
        return 2

    # Deferred on purpose: the server's imports (uvicorn, SQLAlchemy, alembic, the
    # providers) cost the other commands, and a bad setting, nothing.
    from .metrics import share_with_children
    from .scratch import Scratch

    if not settings.run_worker or args.no_worker:
        return _run_server(args, settings)
    # Before the app's imports: the worker child's counters reach this process's /metrics.
    scratch = Scratch.take(settings.scratch_dir)

    def terminated(signum: int, frame: object) -> None:
        # uvicorn re-raises the SIGTERM it stopped on once it has shut down: the folder
        # goes first, then the process ends by the signal as before.
        scratch.close()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        share_with_children(scratch)
        return _run_server(args, settings)
    finally:
        scratch.close()


def _run_server(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .app import create_app
    from .limits import uvicorn_options
    from .logs import configure

    settings = dataclasses.replace(
        settings,
        host=args.host or settings.host,
        port=args.port or settings.port,
        run_worker=settings.run_worker and not args.no_worker,
    )
    configure(settings.log_level)
    # The worker in a child process: requests and deliveries each get a core.
    engine = _engine(settings)
    app = create_app(settings, engine=engine, worker_process=True)
    config = uvicorn.Config(
        # Headers and bodies read within AUDIENCE_READ_TIMEOUT, a connection cap below the
        # descriptor limit, bodies in flight within AUDIENCE_MAX_INFLIGHT_BYTES.
        **uvicorn_options(settings, app),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    tune_gc()
    try:
        server.run()
    finally:
        engine.dispose()
    return 0 if server.started else 1


def _engine(settings: Settings) -> Engine:
    """The database engine of a server process, its writers' wait bounded by
    ``AUDIENCE_DB_LOCK_TIMEOUT``."""
    from . import db

    return db.make_engine(
        settings.database_url, lock_timeout=settings.db_lock_timeout.total_seconds()
    )


def _worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    # Deferred on purpose, as in _serve.
    from .logs import configure
    from .runtime import load_destinations, make_worker, prepare_database, run_worker
    from .supervisor import attach_to_supervisor

    configure(settings.log_level)
    destinations = load_destinations(settings)
    engine = _engine(settings)
    try:
        prepare_database(settings, engine)
        worker = make_worker(settings, engine, destinations, worker_id=args.worker_id)
        tune_gc()

        async def main() -> None:
            if args.drain:
                await worker.drain()
                await worker.close()
                return
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            if args.control_fd is not None:  # serve's child: woken by it, stops with it
                attach_to_supervisor(args.control_fd, worker.wake, worker.changes, stop)
            await run_worker(worker, stop, grace=30.0)

        asyncio.run(main())
    finally:
        engine.dispose()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    from . import db  # deferred on purpose, as in _serve

    engine = db.make_engine(settings.database_url)
    try:
        db.migrate(engine)
        print(f"schema at revision {db.head_revision()}")
    finally:
        engine.dispose()
    return 0


SERVER_COMMANDS = ("serve", "worker", "migrate")


def build_parser(client: bool = True) -> argparse.ArgumentParser:
    """The whole command line; without ``client``, only the server commands (whose
    processes then never import the client and its HTTP library: a faster start)."""
    parser = argparse.ArgumentParser(
        prog="audience-server", description="Receive audience segments and forward them once."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (AUDIENCE_HOST, AUDIENCE_PORT)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="do not run the delivery worker (by default serve runs it in a child process "
        "it restarts if it dies; AUDIENCE_WORKER=false)",
    )
    serve.set_defaults(run=_serve)
    worker = commands.add_parser(
        "worker", help="run only the delivery worker (any number may share one database)"
    )
    worker.add_argument(
        "--drain", action="store_true", help="do the work waiting now, then exit (for cron, tests)"
    )
    worker.add_argument(
        "--worker-id",
        help="a stable id (default: new each run); a worker started with the id of one that "
        "died takes back its work at once. Give each live worker its own",
    )
    worker.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)  # serve's channel
    worker.set_defaults(run=_worker)
    migrate = commands.add_parser(
        "migrate", help="bring the database schema to the newest revision"
    )
    migrate.set_defaults(run=_migrate)
    if client:
        from .client.commands import add_client_commands

        add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Only the server commands (serve, worker, migrate) read the server's
    settings, first thing: a bad one ends them with one line and exit 2. The client commands
    read only their own flags (and AUDIENCE_URL, AUDIENCE_API_KEY)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(client=not argv or argv[0] not in SERVER_COMMANDS).parse_args(argv)
    try:
        code: int = args.run(args)
    except SettingsError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, DestinationsError) as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 1
    return code

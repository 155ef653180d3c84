"""The ``audience-server`` command. Flags fall back to the AUDIENCE_* environment."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from .destinations import DestinationsError
from .settings import Settings, SettingsError

if TYPE_CHECKING:
    from .client import AudienceClient


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

    import uvicorn

    from .app import create_app
    from .logs import configure

    settings = dataclasses.replace(
        settings,
        host=args.host or settings.host,
        port=args.port or settings.port,
        run_worker=settings.run_worker and not args.no_worker,
    )
    configure(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    tune_gc()
    server.run()
    return 0 if server.started else 1


def _worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    import asyncio
    import signal

    from . import db
    from .app import load_destinations, make_worker, prepare_database, run_worker
    from .logs import configure

    configure(settings.log_level)
    destinations = load_destinations(settings)
    engine = db.make_engine(settings.database_url)
    try:
        prepare_database(settings, engine)
        worker = make_worker(settings, engine, destinations)
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
            await run_worker(worker, stop, grace=30.0)

        asyncio.run(main())
    finally:
        engine.dispose()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    from . import db

    engine = db.make_engine(settings.database_url)
    try:
        db.migrate(engine)
        print(f"schema at revision {db.head_revision()}")
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
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
        help="do not run the delivery worker in this process (AUDIENCE_WORKER=false)",
    )
    serve.set_defaults(run=_serve)
    worker = commands.add_parser(
        "worker", help="run only the delivery worker (any number may share one database)"
    )
    worker.add_argument(
        "--drain", action="store_true", help="do the work waiting now, then exit (for cron, tests)"
    )
    worker.set_defaults(run=_worker)
    migrate = commands.add_parser(
        "migrate", help="bring the database schema to the newest revision"
    )
    migrate.set_defaults(run=_migrate)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Only the server commands (serve, worker, migrate) read the server's
    settings, first thing: a bad one ends them with one line and exit 2. The client commands
    read only their own flags (and AUDIENCE_URL, AUDIENCE_API_KEY)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except SettingsError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, DestinationsError) as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 1
    return code


# --- the client commands: upload, status, sessions ----------------------------------------

EXIT_OK = 0  # every batch acknowledged; the session complete (or delivered, when waited for)
EXIT_FAILED = 1  # the server refused a batch (4xx), or the session ended badly
EXIT_USAGE = 2  # bad arguments, unreadable input, or input that differs from its state file
EXIT_UNREACHABLE = 3  # transient failures outlasted the retries: re-run the command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C: re-run the same command to resume


def _client_options(parser: argparse.ArgumentParser) -> None:
    import os

    parser.add_argument(
        "--url",
        default=os.environ.get("AUDIENCE_URL", "http://127.0.0.1:8000"),
        help="server base URL (AUDIENCE_URL; default http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AUDIENCE_API_KEY"),
        help="bearer key when the server has API keys (AUDIENCE_API_KEY)",
    )


def _make_client(args: argparse.Namespace) -> AudienceClient:
    from .client import AudienceClient
    from .retry import RetryPolicy

    retry = RetryPolicy(
        base=getattr(args, "retry_base", 0.5),
        cap=30.0,
        max_attempts=getattr(args, "max_attempts", 10),
    )
    return AudienceClient(args.url, api_key=args.api_key, retry=retry)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _describe(status: dict[str, Any]) -> str:
    fields = [
        ("session", status["sessionId"]),
        ("name", status["name"]),
        ("type", status["type"]),
        ("state", status["state"] + (f" ({status['reason']})" if status.get("reason") else "")),
        ("batches", f"{status['receivedBatches']:,}/{status['totalBatches']:,}"),
        ("users", f"{status['receivedUsers']:,}/{status['totalUsers']:,}"),
    ]
    missing = status.get("missingSequences")
    if missing:
        shown = ", ".join(str(n) for n in missing[:20]) + (" ..." if len(missing) > 20 else "")
        fields.append(("missing", f"{len(missing)}: {shown}"))
    fields += [("created", status.get("createdAt")), ("updated", status.get("updatedAt"))]
    if status.get("expiresAt"):
        fields.append(("expires", status["expiresAt"]))
    text = "\n".join(f"{key:<9} {_cell(value)}" for key, value in fields)
    deliveries = status.get("deliveries") or []
    if deliveries:
        rows = [
            [
                d["destination"],
                d["kind"],
                d["state"],
                str(d["attempts"]),
                f"{d['usersSent']:,}",
                f"{d['invalidUsers']:,}",
                _cell(d.get("lastError")),
            ]
            for d in deliveries
        ]
        headers = ["DESTINATION", "KIND", "STATE", "ATTEMPTS", "SENT", "INVALID", "LAST ERROR"]
        text += "\n\n" + _table(rows, headers)
    return text


def _print_json(body: object) -> None:
    import json

    print(json.dumps(body, indent=2))


def _client_errors(run: Callable[[], int]) -> int:
    from .client import Rejected, SessionFailed, Unreachable, UploadError
    from .upload import InputError

    try:
        return run()
    except KeyboardInterrupt:
        print("audience-server: interrupted; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InputError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"audience-server: {exc}; re-run to resume.", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (Rejected, SessionFailed, UploadError) as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .client import ENDED_STATES
    from .upload import Plan, Source, default_state_path, spool_stdin, upload_file

    def run() -> int:
        if args.batch_size < 1 or args.concurrency < 1:
            print("audience-server: --batch-size and --concurrency must be >= 1", file=sys.stderr)
            return EXIT_USAGE
        plan = Plan(
            name=args.name,
            type=args.type,
            batch_size=args.batch_size,
            session_id=args.session_id,
            concurrency=args.concurrency,
            sync=args.sync,
            disable_prefix=args.disable_prefix,
        )
        spooled: IO[bytes] | None = None
        path: Source
        try:
            if args.file == "-":
                spooled = path = spool_stdin(sys.stdin.buffer)
                state_path = Path(args.state) if args.state else None
            else:
                path = Path(args.file)
                if not path.is_file():
                    print(f"audience-server: {path} is not a file", file=sys.stderr)
                    return EXIT_USAGE
                state_path = Path(args.state) if args.state else default_state_path(path)
            with _make_client(args) as client:
                result = upload_file(
                    client,
                    path,
                    plan,
                    fmt=args.format,
                    state_path=state_path,
                    progress_interval=args.progress_interval,
                )
                status = result.status
                if args.wait:
                    status = client.wait(result.session_id, args.wait_timeout)
        finally:
            if spooled is not None:
                spooled.close()
        print(
            f"sent {result.sent_batches} of {result.total_batches} batches "
            f"({result.skipped_batches} the server already had)"
        )
        print(_describe(status))
        if args.sync or args.wait:
            if status["state"] not in ENDED_STATES:
                print("audience-server: deliveries have not ended yet", file=sys.stderr)
                return EXIT_UNREACHABLE
            if status["state"] != "delivered":
                print(f"audience-server: session ended {status['state']}", file=sys.stderr)
                return EXIT_FAILED
        return EXIT_OK

    return _client_errors(run)


def _status_command(args: argparse.Namespace) -> int:
    def run() -> int:
        with _make_client(args) as client:
            status = client.status(args.session_id)
        if status is None:
            print(f"audience-server: session {args.session_id} does not exist", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            _print_json(status)
        else:
            print(_describe(status))
        return EXIT_OK

    return _client_errors(run)


def _sessions_command(args: argparse.Namespace) -> int:
    def run() -> int:
        with _make_client(args) as client:
            page = client.sessions(
                state=args.state, name=args.name, limit=args.limit, cursor=args.cursor
            )
        if args.json:
            _print_json(page)
            return EXIT_OK
        rows = [
            [
                s["sessionId"],
                s["name"],
                s["type"],
                s["state"],
                f"{s['receivedBatches']:,}/{s['totalBatches']:,}",
                f"{s['receivedUsers']:,}/{s['totalUsers']:,}",
                ",".join(f"{d['destination']}:{d['state']}" for d in s["deliveries"]) or "-",
                _cell(s.get("updatedAt")),
            ]
            for s in page["sessions"]
        ]
        headers = ["SESSION", "NAME", "TYPE", "STATE", "BATCHES", "USERS", "DELIVERIES", "UPDATED"]
        print(_table(rows, headers) if rows else "no sessions")
        if page.get("nextCursor"):
            print(f"\nmore: --cursor {page['nextCursor']}")
        return EXIT_OK

    return _client_errors(run)


def add_client_commands(commands: Any) -> None:
    """``upload``, ``status`` and ``sessions``: the HTTP client side of the command."""
    upload = commands.add_parser(
        "upload",
        help="upload a CSV / NDJSON / JSON file of users as one session (resumable)",
        description=(
            "Exit codes: 0 every batch acknowledged and the session complete (delivered, "
            "with --sync/--wait); 1 the server refused a batch or the session ended badly; "
            "2 bad arguments, unreadable input, or input that changed since its state file; "
            "3 the server stayed unreachable (re-run to resume); 130 interrupted (re-run)."
        ),
    )
    upload.add_argument(
        "file", help="the users: CSV with a header row, NDJSON, a JSON array; - is stdin"
    )
    upload.add_argument("--name", required=True, help="segment name")
    upload.add_argument("--type", choices=("custom", "primary"), default="custom")
    upload.add_argument("--batch-size", type=int, default=10_000, help="users per batch")
    upload.add_argument("--session-id", help="session id (default: new, or the state file's)")
    upload.add_argument(
        "--sync", action="store_true", help="the completing batch waits for delivery"
    )
    upload.add_argument("--wait", action="store_true", help="poll until deliveries have ended")
    upload.add_argument("--wait-timeout", type=float, default=600.0, help="seconds (default 600)")
    upload.add_argument("--disable-prefix", action="store_true", help="no segment name prefix")
    upload.add_argument("--concurrency", type=int, default=1, help="batches in flight at once")
    upload.add_argument("--format", choices=("csv", "ndjson", "json"), help="default: detected")
    upload.add_argument(
        "--state", help="resume state file (default FILE.upload-state.json; none for stdin)"
    )
    upload.add_argument("--max-attempts", type=int, default=10, help="attempts per request")
    upload.add_argument("--retry-base", type=float, default=0.5, help="first retry delay, s")
    upload.add_argument(
        "--progress-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    _client_options(upload)
    upload.set_defaults(run=_upload)

    status = commands.add_parser("status", help="show one session and its deliveries")
    status.add_argument("session_id", metavar="ID")
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(status)
    status.set_defaults(run=_status_command)

    sessions = commands.add_parser("sessions", help="list sessions, newest activity first")
    sessions.add_argument("--state", help="only sessions in this state")
    sessions.add_argument("--name", help="only sessions of this name")
    sessions.add_argument("--limit", type=int, default=50)
    sessions.add_argument("--cursor", help="the next page, as printed after a full page")
    sessions.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(sessions)
    sessions.set_defaults(run=_sessions_command)

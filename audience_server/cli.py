"""The ``audience-server`` command. Flags fall back to the AUDIENCE_* environment."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from .settings import Settings, SettingsError


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .logs import configure

    settings = dataclasses.replace(
        settings, host=args.host or settings.host, port=args.port or settings.port
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
    server.run()
    return 0 if server.started else 1


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
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
    serve.set_defaults(run=_serve)
    migrate = commands.add_parser(
        "migrate", help="bring the database schema to the newest revision"
    )
    migrate.set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.run(settings, args)
    except RuntimeError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return 1
    return code

"""The floor server: reads an upload exactly as the real server does, then stores nothing.

It uses the real server's streaming form reader and ``orjson.loads`` on ``batch`` and
``users``, under the same uvicorn settings (one process, no access log, no log config).

``--decode server`` reads ``users`` the way the server does instead (msgspec's typed
decoder, no dict per user). The server beats the plain floor because of that decoder; the
ratio to this second floor isolates what storage and the session logic cost.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from audience_server.cli import tune_gc
from audience_server.errors import APPLICATION_JSON, SUCCESS_BODY, AudienceError
from audience_server.forms import read_form
from audience_server.parsing import valid_user_count
from audience_server.settings import Settings


def create_floor_app(max_body_bytes: int, decode: str = "orjson") -> Starlette:
    """``POST /audience`` that parses and decodes the body, and ``GET /healthz``."""

    async def post_audience(request: Request) -> Response:
        fields = await read_form(request, max_body_bytes)
        orjson.loads(fields["batch"])
        if decode == "server":
            valid_user_count(fields["users"].encode())
        else:
            orjson.loads(fields["users"])
        return Response(SUCCESS_BODY, 200, media_type=APPLICATION_JSON)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, media_type=APPLICATION_JSON)

    async def audience_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AudienceError)
        return Response(exc.body(), exc.status, media_type=exc.content_type)

    return Starlette(
        routes=[
            Route("/audience", post_audience, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={AudienceError: audience_error},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--decode", choices=["orjson", "server"], default="orjson")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    config = uvicorn.Config(
        create_floor_app(settings.max_body_bytes, args.decode),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    tune_gc()  # the same collector settings as the real server: only storage differs
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())

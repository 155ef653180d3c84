"""The operator console: one static page and its assets, served by the server itself.

The page holds no data and needs no key: it is public, and everything it shows comes from the
JSON operator API, which the page calls with the operator's key (kept in the tab's
``sessionStorage``). So these routes never read a database or a key; they only make sure the
browser runs nothing but the server's own files (a strict Content-Security-Policy).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static" / "console"
STATIC_PREFIX = "/console/static"

# Only the server's own files: no inline script or style, no framing, no other origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
}
# By suffix, not by the host's mime.types: module scripts need a JavaScript type everywhere.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class ConsoleFiles(StaticFiles):
    """The console's assets with the page's security headers and fixed media types."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        media_type = MEDIA_TYPES.get(Path(path).suffix)
        if media_type is not None and response.status_code == 200:
            response.headers["Content-Type"] = media_type
        response.headers.update(SECURITY_HEADERS)
        # Revalidated each load (ETag): a new server version never runs with old scripts.
        response.headers["Cache-Control"] = "no-cache"
        return response


async def root(request: Request) -> Response:
    return RedirectResponse("/console", status_code=307)


async def console_page(request: Request) -> Response:
    headers = SECURITY_HEADERS | {"Cache-Control": "no-store"}
    return FileResponse(STATIC_DIR / "index.html", headers=headers, media_type=MEDIA_TYPES[".html"])


CONSOLE_ROUTES: list[BaseRoute] = [
    Route("/", root, methods=["GET", "HEAD"]),
    Route("/console", console_page, methods=["GET", "HEAD"]),
    Mount(STATIC_PREFIX, app=ConsoleFiles(directory=STATIC_DIR), name="console-static"),
]

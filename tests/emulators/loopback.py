"""A threaded HTTP/1.1 server on 127.0.0.1 that stops cleanly, for the destination emulators.

An emulator (see ``base.py``) gives it one function, ``Incoming -> Reply``, called on a thread
per connection. ``close()`` cuts kept-alive connections and joins every thread it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class HttpError(Exception):
    """An answer with an error status, raised from anywhere in a handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Reply:
    """What to answer."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class Incoming:
    """One request as the handler sees it; the body is read on demand."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._handler = handler
        self.method = handler.command
        self.path, _, self.query = handler.path.partition("?")
        self.headers: dict[str, str] = {}  # names lower-cased, repeated headers joined
        for name, value in handler.headers.items():
            key = name.lower()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        self.body: bytes | None = None  # set once read_body() succeeded
        # What the emulator made of it, for its call log:
        self.route = "unknown"  # its name for the endpoint
        self.principal: str | None = None  # the credential it accepted
        self.scripted = False  # answered by a scripted failure

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, one per occurrence."""
        return list(self._handler.headers.get_all(name) or [])

    def read_body(self, limit: int) -> bytes:
        """The whole body (Content-Length or chunked); HttpError 400/411/413 when it is bad."""
        lengths = self.header_values("Content-Length")
        encoding = self.headers.get("transfer-encoding", "").strip().lower()
        if encoding and lengths:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if encoding == "chunked":
            raw = _read_chunked(self._handler.rfile, limit)
        elif encoding:
            raise HttpError(400, f"unsupported Transfer-Encoding {encoding!r}")
        elif not lengths:
            raise HttpError(411, "Content-Length required")
        elif len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise HttpError(400, f"bad Content-Length {lengths!r}")
        elif int(lengths[0]) > limit:
            raise HttpError(413, f"body of {int(lengths[0])} bytes is over {limit}")
        else:
            raw = self._handler.rfile.read(int(lengths[0]))
            if len(raw) != int(lengths[0]):
                raise HttpError(400, "body shorter than Content-Length")
        self.body = raw
        return raw


class LoopbackServer:
    """``handle`` served on an ephemeral 127.0.0.1 port from a background thread, between
    ``start()`` and ``close()`` (an :class:`~tests.emulators.base.Emulator` calls them)."""

    def __init__(self, handle: Callable[[Incoming], Reply], name: str = "emulator") -> None:
        self._handle = handle
        self._name = name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = _Server(self._handle)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long close() may wait for the loop to notice
            name=f"{self._name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, cut open connections, and join every thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.cut_connections()
        server.server_close()  # joins the handler threads: daemon_threads is off
        thread.join()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins every handler thread
    block_on_close = True

    def __init__(self, handle: Callable[[Incoming], Reply]) -> None:
        self.handle = handle
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Wake handler threads blocked on a kept-alive connection or a slow client."""
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # the peer may have closed it already
                    connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # a stalled client must not pin a thread for ever
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle and delayed ACKs
    # stall every kept-alive response by ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        incoming = Incoming(self)
        try:
            reply = self.server.handle(incoming)
        except HttpError as exc:
            reply = Reply(exc.status, json.dumps({"error": exc.message}).encode())
        except Exception as exc:  # an emulator bug: say so to the client instead of hanging up
            reply = Reply(500, json.dumps({"error": f"emulator crashed: {exc!r}"}).encode())
        if incoming.body is None:  # unread bytes would be parsed as the next request
            self.close_connection = True
        self._send(reply)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # the client stopped waiting (its timeout)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read the emulator's records, not stderr


def _read_chunked(rfile: io.BufferedIOBase, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = rfile.readline(1024).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise HttpError(400, f"bad chunk size {size_line!r}") from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers carry nothing an emulator needs
            return b"".join(parts)
        total += size
        if total > limit:
            raise HttpError(413, f"body over {limit} bytes")
        part = rfile.read(size)
        if len(part) != size or rfile.readline(1024) not in (b"\r\n", b"\n"):
            raise HttpError(400, "truncated chunked body")
        parts.append(part)

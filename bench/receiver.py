"""A webhook receiver for the delivery benchmark: as little work per request as an honest
receiver can do, so that the sender's cost is what gets measured.

Raw HTTP/1.1 on asyncio streams with keep-alive. Each ``POST`` body is read by its
``Content-Length``; with ``--secret`` its ``X-Audience-Signature`` is checked (HMAC-SHA256
of ``"<t>.<body>"``); the JSON is decoded to count its ``users``; the answer is
``200 {}``. ``GET /stats`` returns what was counted so far (cumulative; callers take
differences), ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

# The stream buffer: a whole chunk (~200 KB) fits, and a request head must fit in it.
BUFFER_BYTES = 1024 * 1024
SIGNATURE_HEADER = b"x-audience-signature"


@dataclass
class Stats:
    """What the receiver has accepted so far."""

    requests: int = 0
    users: int = 0
    bytes: int = 0
    bad_signatures: int = 0
    bad_bodies: int = 0
    # sessionId -> [users, chunks, chunks flagged last]
    sessions: dict[str, list[int]] = field(default_factory=dict)


def signature_ok(secret: bytes, header: bytes | None, body: bytes) -> bool:
    """Whether ``header`` (``t=<unix seconds>,v1=<hex>``) signs ``body`` with ``secret``."""
    if not header:
        return False
    parts = dict(item.partition(b"=")[::2] for item in header.split(b","))
    timestamp, given = parts.get(b"t"), parts.get(b"v1")
    if not timestamp or not given:
        return False
    expected = hmac.new(secret, timestamp + b"." + body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, given)


class Receiver:
    """The request handling; one instance per process."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.stats = Stats()

    def accept(self, headers: dict[bytes, bytes], body: bytes) -> tuple[int, bytes]:
        """A POSTed chunk: the status and body to answer with."""
        self.stats.requests += 1
        self.stats.bytes += len(body)
        if self.secret is not None and not signature_ok(
            self.secret, headers.get(SIGNATURE_HEADER), body
        ):
            self.stats.bad_signatures += 1
            return 401, b'{"error":"bad signature"}'
        try:
            document: Any = orjson.loads(body)
            users = len(document["users"])
            session = str(document["sessionId"])
            last = bool(document["chunk"]["last"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.stats.bad_bodies += 1
            return 400, b'{"error":"not a chunk"}'
        self.stats.users += users
        counts = self.stats.sessions.setdefault(session, [0, 0, 0])
        counts[0] += users
        counts[1] += 1
        counts[2] += last
        return 200, b"{}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests one after another until the client closes it."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, b"{}", close=True))
                    return
                request_line, *lines = head[:-4].split(b"\r\n")
                method, _, rest = request_line.partition(b" ")
                path = rest.partition(b" ")[0]
                headers = {}
                for line in lines:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                close = headers.get(b"connection", b"").lower() == b"close"
                if b"transfer-encoding" in headers:
                    writer.write(_response(411, b'{"error":"send Content-Length"}', close=True))
                    return
                length = int(headers.get(b"content-length", b"0"))
                body = await reader.readexactly(length) if length else b""
                if method == b"POST":
                    status, answer = self.accept(headers, body)
                elif method == b"GET" and path == b"/stats":
                    status, answer = 200, orjson.dumps(asdict(self.stats))
                elif method == b"GET" and path == b"/healthz":
                    status, answer = 200, b'{"status":"ok"}'
                else:
                    status, answer = 404, b"{}"
                writer.write(_response(status, answer, close))
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}


def _response(status: int, body: bytes, close: bool = False) -> bytes:
    reason = _REASONS.get(status, b"Error")
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


async def _main(host: str, port: int, secret: bytes | None) -> None:
    receiver = Receiver(secret)
    server = await asyncio.start_server(receiver.serve, host, port, limit=BUFFER_BYTES)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", help="check X-Audience-Signature with this key")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host, args.port, args.secret.encode() if args.secret else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

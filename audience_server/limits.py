"""What keeps slow and greedy clients from taking ``serve`` down: a deadline for request
headers, a connection cap below the descriptor limit, a read timeout for request bodies, a
shared memory budget for bodies in flight, and a rate limit on asyncio's accept-error log.

uvicorn (h11) offers ``timeout_keep_alive`` (idle time *between* requests only),
``limit_concurrency`` (a plain-text 503 decided after the headers arrived, counting the
very connections a slow client holds, so it would refuse the good requests instead) and
``backlog``; none bounds how long headers or a body may take. So:

* :class:`GuardedH11Protocol` (a uvicorn protocol subclass, one timer per connection)
  closes a connection whose request headers are not complete ``read_timeout`` after it
  started waiting for them, and, once ``cap`` connections are open, closes the oldest one
  still waiting for headers for each new one: a slow client cannot hold the slots that a
  prompt request needs. Headroom below ``RLIMIT_NOFILE`` covers an accept burst
  (``backlog``) and the server's own files, so ``accept()`` never runs out of descriptors.
* :class:`RequestGuard` (ASGI middleware around the app) answers 503 when every slot holds
  a request already, bounds each wait for body bytes by ``read_timeout`` (408), and admits
  a request body only while the bodies in flight fit the budget (waiting up to
  ``BUDGET_WAIT`` seconds for room, else 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APPLICATION_JSON, errors_body
from .settings import Settings

# A body is held as bytes, then as the form's text and the decoded users, and once more
# packed for storage: measured, one request's peak memory is about this many times its
# body (tests/test_limits.py holds the server's peak RSS to the budget this charges).
BODY_MEMORY_FACTOR = 3
BUDGET_WAIT = 5.0  # seconds a body waits for room in the budget before its 503
RETRY_AFTER = "2"  # seconds, in the 503s of this module
MIN_RESERVE = 64  # descriptors kept for the database, logs, pipes, multipart spool files
ACCEPT_LOG_INTERVAL = 10.0  # seconds between two accept-error lines

log = logging.getLogger("audience_server")


def descriptor_limit() -> int:
    """This process's soft ``RLIMIT_NOFILE`` (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections ``serve`` keeps open, and its listen backlog."""

    cap: int
    backlog: int

    @classmethod
    def derive(cls, nofile: int, requested: int | None = None) -> ConnectionLimits:
        """Below ``nofile`` by the backlog (a burst asyncio accepts before any connection
        is seen) plus a reserve for the server's own descriptors; ``requested``
        (``AUDIENCE_MAX_CONNECTIONS``) may lower it, never raise it past that."""
        backlog = max(16, min(2048, nofile // 8))
        reserve = max(MIN_RESERVE, nofile // 16)
        ceiling = max(1, nofile - backlog - reserve)
        if requested is not None and requested > ceiling:
            log.warning(
                "AUDIENCE_MAX_CONNECTIONS lowered to fit the descriptor limit",
                extra={"requested": requested, "cap": ceiling, "nofile": nofile},
            )
        return cls(ceiling if requested is None else min(requested, ceiling), backlog)


@dataclass
class ConnectionGuard:
    """State the protocol instances and the middleware of one server share."""

    cap: int
    read_timeout: float
    open: int = 0
    # Connections waiting for request headers, oldest first (a dict keeps insertion order).
    waiting: dict[GuardedH11Protocol, None] = field(default_factory=dict)
    dropped: int = 0  # connections closed for slow headers or to make room

    def evict_for(self, newcomer: GuardedH11Protocol) -> None:
        """Past the cap, close the oldest connection still waiting for headers."""
        if self.open <= self.cap:
            return
        for victim in self.waiting:
            if victim is not newcomer:
                victim.drop()
                return


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and the cap's eviction;
    ``guard`` is set on a subclass made by :func:`guarded_protocol`."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.open += 1
        self._header_timer: asyncio.TimerHandle | None = None
        self._await_headers()
        self.guard.evict_for(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self._headers_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # waiting for a request line and headers
            self._await_headers()  # (after a body read to its end past an early answer)
        else:
            self._headers_done()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()  # the next request on this connection

    def _await_headers(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.guard.read_timeout, self.drop)
            self.guard.waiting[self] = None

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.guard.waiting.pop(self, None)

    def drop(self) -> None:
        """Close the connection, which has no request under way (nobody to answer)."""
        self._headers_done()
        if not self.transport.is_closing():
            self.guard.dropped += 1
            self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class MemoryBudget:
    """Bytes that request bodies in flight may take, granted first come, first served. A
    request alone is always admitted, so a body larger than the budget can still go."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def reserve(self, amount: int, timeout: float) -> bool:
        """Take ``amount`` once it fits (False: it did not within ``timeout`` seconds)."""
        if not self._queue and self._fits(amount):
            self.used += amount
            return True
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, granted)
        self._queue.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
            return True
        except TimeoutError:
            if granted.done():  # granted as the wait ended: keep it
                return True
            self._queue.remove(entry)
            self._grant()  # the head may have been the only one in the way
            return False
        except BaseException:
            if granted.done():
                self.release(amount)
            elif entry in self._queue:
                self._queue.remove(entry)
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._grant()

    def _fits(self, amount: int) -> bool:
        return self.used == 0 or self.used + amount <= self.limit

    def _grant(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            amount, granted = self._queue.popleft()
            self.used += amount
            granted.set_result(None)


class _Abandon(BaseException):
    """Ends the app's handling of a request whose body stalled or does not fit in the
    budget. A ``BaseException``, like cancellation, so that no error handler of the app
    answers it (as a 500): :class:`RequestGuard` answers it with ``response``."""

    def __init__(self, response: tuple[int, str, bool]) -> None:
        self.response = response  # status, message, close the connection


_SLOW_BODY = (408, "The request body stopped arriving; nothing was stored.", True)
_NO_ROOM = (
    503,
    "The server is receiving as much as it can hold; nothing was stored. Try again shortly.",
    False,  # the connection stays: uvicorn reads and drops the rest of the body
)
_FULL = (503, "The server has no connection to spare; nothing was stored. Try again shortly.", True)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return bool(_content_length(scope))


class RequestGuard:
    """ASGI middleware: the connection cap's 503, the body read timeout (408) and the
    in-flight memory budget (503 with ``Retry-After``)."""

    def __init__(
        self, app: ASGIApp, guard: ConnectionGuard, budget: MemoryBudget, read_timeout: float
    ) -> None:
        self.app = app
        self.guard = guard
        self.budget = budget
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.guard.open > self.guard.cap:
            await _answer(send, _FULL)
            return
        length = _content_length(scope)
        reserved = 0
        if length:
            reserved = length * BODY_MEMORY_FACTOR
            if not await self.budget.reserve(reserved, BUDGET_WAIT):
                await _answer(send, _NO_ROOM)
                return
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal reserved
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                raise _Abandon(_SLOW_BODY) from None
            if length is None and message["type"] == "http.request" and message.get("body"):
                # A body of unstated length is charged as it streams in.
                amount = len(message["body"]) * BODY_MEMORY_FACTOR
                if not await self.budget.reserve(amount, BUDGET_WAIT):
                    raise _Abandon(_NO_ROOM)
                reserved += amount
            return message

        try:
            await self.app(scope, guarded_receive if _has_body(scope) else receive, guarded_send)
        except _Abandon as abandon:
            if not started:
                await _answer(send, abandon.response)
        finally:
            if reserved:
                self.budget.release(reserved)


async def _answer(send: Send, response: tuple[int, str, bool]) -> None:
    status, message, close = response
    body = errors_body([message])
    headers = [
        (b"content-type", APPLICATION_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AcceptErrorFilter(logging.Filter):
    """Lets through one of asyncio's "accept() out of system resource" lines per
    ``interval`` seconds, telling how many it held back (asyncio logs one per failed
    accept: thousands a second when descriptors run out)."""

    def __init__(
        self, interval: float = ACCEPT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in str(record.msg):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} more like it held back)"
            self.suppressed = 0
        self._last = now
        return True


def uvicorn_options(settings: Settings, app: ASGIApp) -> dict[str, Any]:
    """The app wrapped in :class:`RequestGuard` and the ``uvicorn.Config`` options that go
    with it, for ``serve``."""
    limits = ConnectionLimits.derive(descriptor_limit(), settings.max_connections)
    read_timeout = settings.read_timeout.total_seconds()
    guard = ConnectionGuard(limits.cap, read_timeout)
    budget = MemoryBudget(settings.max_inflight_bytes)
    logging.getLogger("asyncio").addFilter(AcceptErrorFilter())
    return {
        "app": RequestGuard(app, guard, budget, read_timeout),
        "http": guarded_protocol(guard),
        "backlog": limits.backlog,
    }

"""What every platform emulator shares: its server's lifecycle, one call log, and one way to
script failures and slow answers.

    with TikTokEmulator(accounts) as tiktok:
        tiktok.fail(429, retry_after="1", on=MAPPING)   # the next valid mapping request
        tiktok.delay(30)                                # the next valid request waits...
        tiktok.release()                                # ...until now
        assert tiktok.routes()[-1] == (MAPPING, 200)

An emulator subclasses :class:`Emulator` and writes ``_handle``. It names each request's
``route`` (and its ``principal``, once authenticated) on the :class:`Incoming`, and calls
``_take(incoming)`` once the request has passed every check of the platform and before it
changes any state: scripted answers and delays apply there, so a request the platform would
refuse is refused whatever is scripted, and a scripted failure changes nothing.

What the platforms have in common beyond that lives here too: :class:`PlatformError`, which
every emulator's error class derives from (raised anywhere in ``_handle``, answered by the base
in the platform's own format), and :class:`JsonBody`, how a platform reads a JSON body and
what it answers when the body is not one (its messages are its own, passed as data).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

from tests.emulators.loopback import HttpError, Incoming, LoopbackServer, Reply

_TEXT = "text/plain; charset=utf-8"

On = str | Collection[str] | Callable[[Incoming], bool] | None
"""Which requests a scripted failure is for: a route, one of several, a predicate, or any."""


class PlatformError(Exception):
    """A refusal in a platform's own format: the HTTP ``status``, the ``message`` (the
    exception's text too), and the platform's error ``document`` (None: ``{"error": message}``),
    sent as JSON of ``content_type`` with extra ``headers``. Raised from anywhere in an
    emulator's ``_handle``, it is answered with ``reply()`` unless the emulator catches it to
    answer otherwise. A platform's error class builds the document from its own fields."""

    def __init__(
        self,
        status: int,
        message: str,
        document: Any = None,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.document = {"error": message} if document is None else document
        self.content_type = content_type
        self.headers = dict(headers or {})

    def reply(self) -> Reply:
        body = json.dumps(self.document).encode()
        return Reply(self.status, body, self.content_type, self.headers)


def media_type(incoming: Incoming) -> str:
    """The request's Content-Type without its parameters, lower-cased; "" when it has none."""
    return incoming.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass(frozen=True)
class JsonBody:
    """How a platform reads a JSON request body, and what it raises when the body is not what
    it takes: ``wrong_media`` given the media type when it is not one of ``media_types`` (None:
    the caller checks the media type), ``not_json`` given the parser's complaint,
    ``not_object`` when the JSON is not an object (None: any JSON value will do)."""

    not_json: Callable[[ValueError], Exception]
    not_object: Callable[[], Exception] | None = None
    wrong_media: Callable[[str], Exception] | None = None
    media_types: Collection[str] = ("application/json",)
    utf8: bool = False  # only UTF-8 (json.loads would take UTF-16 and UTF-32 bytes as well)

    def parse(self, incoming: Incoming, raw: bytes) -> Any:
        """The body ``raw`` of ``incoming``, parsed; the platform's error when it is refused."""
        media = media_type(incoming)
        if self.wrong_media is not None and media not in self.media_types:
            raise self.wrong_media(media)
        try:
            body = json.loads(raw.decode("utf-8") if self.utf8 else raw)
        except ValueError as exc:  # UnicodeDecodeError is one too
            raise self.not_json(exc) from None
        if self.not_object is not None and not isinstance(body, dict):
            raise self.not_object()
        return body


@dataclass(frozen=True)
class Call:
    """One request an emulator received and how it answered (refused ones too)."""

    method: str
    path: str
    query: str  # as sent
    headers: Mapping[str, str]  # names lower-cased
    body: bytes
    status: int
    answer: bytes  # the body of the reply
    route: str  # the emulator's name for the endpoint; "unknown" before it knew
    principal: str | None  # the credential it accepted (token, API key), if any
    scripted: bool  # answered by fail(), not by the emulator's own rules

    @property
    def params(self) -> dict[str, str]:
        """The query parameters, the last value of each."""
        return {key: values[-1] for key, values in parse_qs(self.query).items()}

    def json(self) -> Any:
        """The request body parsed as JSON."""
        return json.loads(self.body)

    def answer_json(self) -> Any:
        """The reply body parsed as JSON; None when it is not JSON."""
        try:
            return json.loads(self.answer)
        except ValueError:
            return None


@dataclass(frozen=True)
class Turn:
    """What the scripting holds for one valid request: a reply to give instead (None: answer
    it), and its delay, which ``release()`` or ``close()`` cuts short."""

    reply: Reply | None
    wait: Callable[[], None]


@dataclass
class _Scripted:
    reply: Reply
    times: int
    on: On
    after: int  # matching requests still to let through first

    def matches(self, incoming: Incoming) -> bool:
        if self.on is None:
            return True
        if isinstance(self.on, str):
            return incoming.route == self.on
        if callable(self.on):
            return self.on(incoming)
        return incoming.route in self.on


class Emulator:
    """A platform on a :class:`LoopbackServer`, started by ``start()`` or ``with`` and stopped
    (delays cut short, threads joined) by ``close()``."""

    def __init__(self, name: str) -> None:
        # One reentrant lock for all state, so wait_until predicates may call the accessors.
        self._cond = threading.Condition(threading.RLock())
        self._calls: list[Call] = []
        self._scripted: list[_Scripted] = []
        self._delays: deque[float] = deque()
        self._releases = 0  # how many times release() was called
        self._closing = False
        self._server = LoopbackServer(self._receive, name=name)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind an ephemeral loopback port and serve in a background thread."""
        self._server.start()
        return self

    def close(self) -> None:
        """Cut delays short, stop serving, and join every thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """Where the adapter under test points its ``base_url``."""
        return self._server.base_url

    # -- scripting ---------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        body: object = None,
        *,
        times: int = 1,
        on: On = None,
        after: int = 0,
        retry_after: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer ``times`` valid requests (those ``on`` a route, one of several routes, or
        matching a predicate; any when None), once ``after`` of them went through, with
        ``status`` and ``body``: text or bytes as they are (JSON when they parse), anything
        else as JSON, None for the platform's own error for that status."""
        if body is None:
            reply = self._failure(status, retry_after)
        elif isinstance(body, str | bytes):
            raw = body.encode() if isinstance(body, str) else body
            reply = Reply(status, raw, "application/json" if _is_json(raw) else _TEXT)
        else:
            reply = Reply(status, json.dumps(body).encode())
        extra = dict(headers or {}) | ({} if retry_after is None else {"Retry-After": retry_after})
        reply = replace(reply, headers={**reply.headers, **extra})
        with self._cond:
            self._scripted.append(_Scripted(reply, times, on, after))

    def delay(self, seconds: float, times: int = 1) -> None:
        """Make the next ``times`` valid requests wait ``seconds`` before they are answered;
        ``release()`` or ``close()`` ends the wait early."""
        with self._cond:
            self._delays.extend([seconds] * times)

    def release(self) -> None:
        """End the delays of the requests waiting now (queued delays still apply)."""
        with self._cond:
            self._releases += 1
            self._cond.notify_all()

    # -- the call log ------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every request received, in the order they were answered."""
        with self._cond:
            return list(self._calls)

    def calls_to(self, *routes: str) -> list[Call]:
        """The calls to any of ``routes``."""
        return [call for call in self.calls if call.route in routes]

    def routes(self) -> list[tuple[str, int]]:
        """(route, status) of every call, in order."""
        return [(call.route, call.status) for call in self.calls]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` holds, re-checked whenever a request comes or goes."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"{type(self).__name__}: condition not met within {timeout} s")

    # -- for the emulators -------------------------------------------------------------------

    def _handle(self, incoming: Incoming) -> Reply:
        """Answer one request as the platform would (on the connection's thread)."""
        raise NotImplementedError

    def _failure(self, status: int, retry_after: str | None) -> Reply:
        """What ``fail(status)`` answers without a body: the platform's error for ``status``."""
        try:
            phrase = f" {HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        return Reply(status, json.dumps({"error": f"scripted {status}{phrase}"}).encode())

    def _http_error(self, exc: HttpError) -> Reply:
        """The answer to an :class:`HttpError` from ``_handle`` (a body that cannot be read,
        say): ``{"error": message}``, unless the platform words it in its own format."""
        return Reply(exc.status, json.dumps({"error": exc.message}).encode())

    def _take(self, incoming: Incoming) -> Turn:
        """This valid request's scripted answer and delay, used up now."""
        with self._cond:
            wait = self._waiter(self._delays.popleft() if self._delays else 0.0)
            scripted = next((s for s in self._scripted if s.matches(incoming)), None)
            if scripted is None:
                return Turn(None, wait)
            if scripted.after > 0:
                scripted.after -= 1
                return Turn(None, wait)
            scripted.times -= 1
            if scripted.times <= 0:
                self._scripted.remove(scripted)
            incoming.scripted = True
            return Turn(scripted.reply, wait)

    def _waiter(self, seconds: float) -> Callable[[], None]:
        releases = self._releases  # a release() from now on ends this wait, even before it starts

        def wait() -> None:
            if seconds > 0:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._closing or self._releases != releases, seconds
                    )

        return wait

    def _receive(self, incoming: Incoming) -> Reply:
        try:
            reply = self._handle(incoming)
        except PlatformError as exc:
            reply = exc.reply()
        except HttpError as exc:
            reply = self._http_error(exc)
        call = Call(
            method=incoming.method,
            path=incoming.path,
            query=incoming.query,
            headers=incoming.headers,
            body=incoming.body or b"",
            status=reply.status,
            answer=reply.body,
            route=incoming.route,
            principal=incoming.principal,
            scripted=incoming.scripted,
        )
        with self._cond:
            self._calls.append(call)
            self._cond.notify_all()
        return reply


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True

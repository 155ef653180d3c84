"""A real signed-webhook receiver on 127.0.0.1, for the delivery tests.

It checks what a careful receiver checks (signature, freshness, body shape), keeps every
chunk it accepts in arrival order, and can be scripted per test to fail or to answer late
(the ``Emulator`` base: ``fail()``, ``delay()``, ``release()``, ``calls``). Signatures are
checked by the package's own receiver logic: ``verify_signature`` and ``sign`` live in
``audience_server.providers.webhook``, beside the sender (re-exported here for the tests that
still import them from this module).

    with WebhookEmulator(secret=b"s3cret") as hook:
        hook.fail(503, times=2, retry_after="1")
        ...  # configure a webhook destination with url=hook.url and run the delivery
        assert hook.wait_for_segment("1708531200") == users
        assert hook.max_in_flight("1708531200") == 1
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from audience_server.providers.webhook import (
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE,
    signature_problem,
)
from audience_server.providers.webhook import sign as sign  # re-exported for the tests
from audience_server.providers.webhook import verify_signature as verify_signature
from tests.emulators.base import Call, Emulator
from tests.emulators.loopback import HttpError, Incoming, Reply

DEFAULT_TOLERANCE = SIGNATURE_TOLERANCE
_BODY_KEYS = frozenset({"segmentName", "name", "type", "sessionId", "chunk", "users"})
_CHUNK_KEYS = frozenset({"index", "last"})


class SegmentError(AssertionError):
    """What the receiver got does not make a whole segment."""


class NoCompleteAttempt(SegmentError):
    """No attempt ran from chunk 1 to a chunk marked last."""


class ChunkOrderError(SegmentError):
    """Chunk indexes inside one attempt skip, repeat or go on after the last chunk."""


def body_problem(
    content_type: str | None, raw: bytes, allow_extra_keys: bool = False
) -> tuple[dict[str, Any] | None, str | None]:
    """The parsed webhook body and None, or None and what is wrong with it."""
    media_type, *params = (content_type or "").split(";")
    if media_type.strip().lower() != "application/json":
        return None, f"Content-Type must be application/json, got {content_type!r}"
    for param in params:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value.strip('"').lower() not in ("utf-8", "utf8"):
            return None, f"charset must be utf-8, got {value!r}"
    try:
        body = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"body is not UTF-8 JSON: {exc}"
    if not isinstance(body, dict):
        return None, "body must be a JSON object"
    problem = _shape_problem(body, allow_extra_keys)
    return (None, problem) if problem else (body, None)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _keys_problem(
    value: dict[str, Any], keys: frozenset[str], allow_extra_keys: bool, where: str = ""
) -> str | None:
    missing = sorted(keys - value.keys())
    if missing:
        return f"missing key(s){where}: {', '.join(missing)}"
    extra = sorted(value.keys() - keys)
    if extra and not allow_extra_keys:
        return f"unexpected key(s){where}: {', '.join(extra)}"
    return None


def _shape_problem(body: dict[str, Any], allow_extra_keys: bool) -> str | None:
    problem = _keys_problem(body, _BODY_KEYS, allow_extra_keys)
    if problem:
        return problem
    for key in ("segmentName", "name", "sessionId"):
        if not isinstance(body[key], str) or not body[key]:
            return f"{key} must be a non-empty string"
    if body["type"] not in ("custom", "primary"):
        return f"type must be 'custom' or 'primary', got {body['type']!r}"
    chunk = body["chunk"]
    if not isinstance(chunk, dict):
        return "chunk must be an object"
    problem = _keys_problem(chunk, _CHUNK_KEYS, allow_extra_keys, " in chunk")
    if problem:
        return problem
    index = chunk["index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        return f"chunk.index must be an integer >= 1, got {index!r}"
    if not isinstance(chunk["last"], bool):
        return f"chunk.last must be a boolean, got {chunk['last']!r}"
    if not isinstance(body["users"], list):
        return "users must be a list"
    for position, user in enumerate(body["users"]):
        if not isinstance(user, dict):
            return f"users[{position}] must be an object"
    return None


@dataclass(frozen=True)
class Received:
    """One request that passed the signature and body checks."""

    body: dict[str, Any]
    headers: Mapping[str, str]  # names lower-cased
    raw: bytes
    path: str
    status: int  # what it was answered with
    arrived_at: float = field(default_factory=time.time)  # wall clock, as the signature's t

    @property
    def session_id(self) -> str:
        return str(self.body["sessionId"])

    @property
    def segment_name(self) -> str:
        return str(self.body["segmentName"])

    @property
    def index(self) -> int:
        return int(self.body["chunk"]["index"])

    @property
    def last(self) -> bool:
        return bool(self.body["chunk"]["last"])

    @property
    def users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self.body["users"]
        return users


class WebhookEmulator(Emulator):
    """A signed-webhook receiver on 127.0.0.1 that records, checks, and misbehaves on request.

    Checks run in this order: method and path, body framing, signature (401), body shape
    (400); only then do scripted answers and delays apply (its one route is "chunk"). A
    delayed request is recorded on arrival, as a receiver that is slow to answer has still
    processed it; a non-2xx scripted answer puts it in ``rejected``, not ``requests``.
    """

    def __init__(
        self,
        secret: bytes | str,
        *,
        path: str = "/hook",
        tolerance: float = DEFAULT_TOLERANCE,
        clock: Callable[[], float] = time.time,
        allow_extra_keys: bool = False,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(name="webhook-emulator")
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.path = path
        self.tolerance = tolerance
        self.clock = clock
        self.allow_extra_keys = allow_extra_keys
        self.max_body_bytes = max_body_bytes
        self._requests: list[Received] = []
        self._rejected: list[Received] = []
        self._in_flight: dict[str | None, int] = {}
        self._max_in_flight: dict[str | None, int] = {}

    @property
    def url(self) -> str:
        """Where to POST chunks."""
        return f"{self.base_url}{self.path}"

    # -- what was received -------------------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """Accepted chunks (answered 2xx), in arrival order."""
        with self._cond:
            return list(self._requests)

    @property
    def rejected(self) -> list[Received]:
        """Valid requests answered with a scripted non-2xx status, in arrival order."""
        with self._cond:
            return list(self._rejected)

    @property
    def invalid(self) -> list[Call]:
        """Requests refused by the receiver's own checks (401, 400, 404, ...), in order."""
        return [call for call in self.calls if not call.scripted and call.status >= 300]

    def attempts(self, session_id: str, segment_name: str | None = None) -> int:
        """How many delivery attempts got chunk 1 accepted here."""
        return sum(1 for chunk in self._chunks(session_id, segment_name) if chunk.index == 1)

    def segment(self, session_id: str, segment_name: str | None = None) -> list[dict[str, Any]]:
        """The users of the last complete attempt, in chunk order.

        Raises NoCompleteAttempt when no attempt ran from chunk 1 to ``last``, and
        ChunkOrderError when any attempt skips or repeats an index.
        """
        runs = self._runs(session_id, segment_name)
        complete = [run for run in runs if run[-1].last]
        if not complete:
            seen = [[chunk.index for chunk in run] for run in runs]
            raise NoCompleteAttempt(
                f"session {session_id!r}: no complete attempt; chunk indexes per attempt: {seen}"
            )
        return [user for chunk in complete[-1] for user in chunk.users]

    def wait_for_segment(
        self, session_id: str, segment_name: str | None = None, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """``segment()`` as soon as an attempt is complete; NoCompleteAttempt after timeout."""

        def ready() -> bool:
            try:
                self.segment(session_id, segment_name)
            except NoCompleteAttempt:
                return False
            return True

        with self._cond:
            self._cond.wait_for(ready, timeout)
            return self.segment(session_id, segment_name)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` holds, re-checked whenever a request comes or goes."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"webhook emulator: condition not met within {timeout} s")

    def in_flight(self, session_id: str | None = None) -> int:
        """Requests being handled now, for one session or (None) in all."""
        with self._cond:
            return self._in_flight.get(session_id, 0)

    def max_in_flight(self, session_id: str | None = None) -> int:
        """Most requests ever handled at once, for one session or (None) in all."""
        with self._cond:
            return self._max_in_flight.get(session_id, 0)

    def _chunks(self, session_id: str, segment_name: str | None) -> list[Received]:
        return [
            chunk
            for chunk in self.requests
            if chunk.session_id == session_id
            and (segment_name is None or chunk.segment_name == segment_name)
        ]

    def _runs(self, session_id: str, segment_name: str | None) -> list[list[Received]]:
        runs: list[list[Received]] = []
        for chunk in self._chunks(session_id, segment_name):
            if chunk.index == 1:
                runs.append([chunk])
                continue
            if not runs:
                raise ChunkOrderError(f"session {session_id!r}: first chunk is {chunk.index}")
            where = f"session {session_id!r}, attempt {len(runs)}"
            previous = runs[-1][-1]
            if previous.last:
                raise ChunkOrderError(f"{where}: chunk {chunk.index} after the last chunk")
            if chunk.index != previous.index + 1:
                raise ChunkOrderError(f"{where}: chunk {chunk.index} follows {previous.index}")
            first = runs[-1][0].body
            for key in ("segmentName", "name", "type"):
                if chunk.body[key] != first[key]:
                    raise ChunkOrderError(f"{where}: {key} changes at chunk {chunk.index}")
            runs[-1].append(chunk)
        return runs

    # -- serving (one call per request, on the connection's thread) ---------------------------

    def _handle(self, incoming: Incoming) -> Reply:
        body = self._check(incoming)
        turn = self._take(incoming)
        reply = turn.reply or Reply(200, b'{"received": true}')
        raw = incoming.body or b""
        received = Received(body, incoming.headers, raw, incoming.path, reply.status)
        with self._cond:
            (self._requests if 200 <= reply.status < 300 else self._rejected).append(received)
            self._enter(received.session_id)
        try:
            turn.wait()
        finally:
            # Leave before answering: once the sender has this answer it may send the next
            # chunk, which must not count as overlapping this one.
            with self._cond:
                self._leave(received.session_id)
        return reply

    def _check(self, incoming: Incoming) -> dict[str, Any]:
        if incoming.method != "POST":
            raise HttpError(405, f"{incoming.method} not allowed; POST chunks here")
        if incoming.path != self.path:
            raise HttpError(404, f"no webhook at {incoming.path}; it is at {self.path}")
        incoming.route = "chunk"
        raw = incoming.read_body(self.max_body_bytes)
        signatures = incoming.header_values(SIGNATURE_HEADER)
        if len(signatures) > 1:
            raise HttpError(401, f"several {SIGNATURE_HEADER} headers")
        header = signatures[0] if signatures else None
        problem = signature_problem(self.secret, header, raw, self.clock(), self.tolerance)
        if problem:
            raise HttpError(401, problem)
        content_type = incoming.headers.get("content-type")
        body, problem = body_problem(content_type, raw, self.allow_extra_keys)
        if body is None:
            raise HttpError(400, problem or "bad body")
        return body

    def _enter(self, session: str) -> None:
        for key in (session, None):
            count = self._in_flight.get(key, 0) + 1
            self._in_flight[key] = count
            self._max_in_flight[key] = max(self._max_in_flight.get(key, 0), count)
        self._cond.notify_all()

    def _leave(self, session: str) -> None:
        for key in (session, None):
            self._in_flight[key] -= 1
        self._cond.notify_all()

"""``webhook``: POSTs the segment as signed JSON chunks.

Body: ``{"segmentName", "name", "type", "sessionId", "chunk": {"index", "last"}, "users"}``
(users as received, duplicates removed; ``index`` from 1). Header
``X-Audience-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` keyed
with ``secret``, as Stripe signs its webhooks: a receiver recomputes it over the raw body,
compares in constant time, and rejects a ``t`` too far from its clock (replays) —
:func:`verify_signature` does all three, for receivers written in Python.

Options: ``url`` (http or https), ``secret``, ``chunk_size`` (default 1,000),
``timeout`` seconds (default 30), ``headers`` (extra request headers).
2xx succeeds; 408, 429, 5xx, timeouts and connection errors are retried (``Retry-After``
honoured); other statuses fail the delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping

import orjson

from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, Segment
from .http import HttpAdapter, excerpt, status_error

SIGNATURE_HEADER = "X-Audience-Signature"
SIGNATURE_TOLERANCE = 300.0  # seconds a signature's t may be from the receiver's clock
_TIMESTAMP = re.compile(r"[0-9]{1,18}")


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Audience-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes,
    header: str | None,
    body: bytes,
    now: float | None = None,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """True when ``header`` is a valid signature of the raw ``body`` under ``secret``, made
    within ``tolerance`` seconds of ``now`` (the receiver's clock; the wall clock if None)."""
    now = time.time() if now is None else now
    return signature_problem(secret, header, body, now, tolerance) is None


def signature_problem(
    secret: bytes, header: str | None, body: bytes, now: float, tolerance: float
) -> str | None:
    """Why ``header`` does not authenticate ``body`` at ``now`` (unix seconds) within
    ``tolerance`` seconds, or None when it does."""
    if not header:
        return f"missing {SIGNATURE_HEADER} header"
    timestamps: list[str] = []
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return f"malformed {SIGNATURE_HEADER} header"
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            candidates.append(value)
        # Other schemes are ignored, so a sender can add one next to v1 during a migration.
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        return f"{SIGNATURE_HEADER} needs exactly one t=<unix seconds>"
    if not candidates:
        return f"{SIGNATURE_HEADER} has no v1 signature"
    # The signed text uses the timestamp exactly as sent, not a re-rendering of its value.
    message = timestamps[0].encode() + b"." + body
    expected = hmac.new(secret, message, hashlib.sha256).hexdigest().encode()
    # A list, not a generator: every candidate is compared, so timing reveals nothing.
    if not any([hmac.compare_digest(expected, c.encode()) for c in candidates]):
        return "signature does not match"
    if abs(now - int(timestamps[0])) > tolerance:
        return f"signature timestamp is more than {tolerance:g} s from now"
    return None


class WebhookProvider(HttpAdapter):
    """POSTs each chunk to one URL, signed with the destination's secret."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        chunk_size: int,
        timeout: float,
        headers: Mapping[str, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.secret = secret
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.headers = dict(headers)
        self.clock = clock  # dates the signatures

    @classmethod
    def from_config(cls, config: DestinationConfig) -> WebhookProvider:
        options = config.options
        url = check.http_url(options, "url")
        secret = options.get("secret")
        if not isinstance(secret, str) or not secret:
            raise OptionError("secret", "is required: the HMAC-SHA256 signing key")
        timeout = check.seconds(options, "timeout", 30)
        headers = options.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise OptionError("headers", "must be a table of header names to string values")
        return cls(
            url,
            secret.encode(),
            chunk_size=check.positive_int(options, "chunk_size", 1_000, 100_000),
            timeout=timeout,
            headers=headers,
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        head = orjson.dumps(
            {
                "segmentName": segment.segment_name,
                "name": segment.name,
                "type": segment.type,
                "sessionId": segment.session_id,
                "chunk": {"index": chunk.index, "last": chunk.last},
            }
        )
        # The users as received, spliced in as the last key: no decoding, no re-encoding.
        body = b"".join((head[:-1], b',"users":[', b",".join(chunk.encoded), b"]}"))
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(self.clock())),
        }
        response = await self.request("POST", self.url, content=body, headers=headers)
        status = response.status_code
        if 200 <= status < 300:
            return ChunkResult(status=status)
        raise status_error(f"HTTP {status}: {excerpt(response.text)}", status, response.headers)

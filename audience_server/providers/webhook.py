"""``webhook``: POSTs the segment as signed JSON chunks.

Body: ``{"segmentName", "name", "type", "sessionId", "chunk": {"index", "last"}, "users"}``
(users as received, duplicates removed; ``index`` from 1). Header
``X-Audience-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` keyed
with ``secret``, as Stripe signs its webhooks: a receiver recomputes it over the raw body,
compares in constant time, and rejects a ``t`` too far from its clock (replays).

Options: ``url`` (http or https), ``secret``, ``chunk_size`` (default 1,000),
``timeout`` seconds (default 30), ``headers`` (extra request headers).
2xx succeeds; 408, 429, 5xx, timeouts and connection errors are retried (``Retry-After``
honoured); other statuses fail the delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
import orjson

from ..destinations import DestinationConfig, OptionError
from .base import (
    Chunk,
    ChunkResult,
    PermanentError,
    RetryableError,
    Segment,
    parse_retry_after,
    positive_int_option,
    retryable_status,
)

SIGNATURE_HEADER = "X-Audience-Signature"


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Audience-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookProvider:
    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        chunk_size: int,
        timeout: float,
        headers: Mapping[str, str],
    ) -> None:
        self.url = url
        self.secret = secret
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.headers = dict(headers)
        self._client: httpx2.AsyncClient | None = None

    @classmethod
    def from_config(cls, config: DestinationConfig) -> WebhookProvider:
        options = config.options
        url = options.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise OptionError("url", "must be an http:// or https:// URL")
        secret = options.get("secret")
        if not isinstance(secret, str) or not secret:
            raise OptionError("secret", "is required: the HMAC-SHA256 signing key")
        timeout = options.get("timeout", 30)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise OptionError("timeout", "must be a number of seconds greater than zero")
        headers = options.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise OptionError("headers", "must be a table of header names to string values")
        return cls(
            url,
            secret.encode(),
            chunk_size=positive_int_option(options, "chunk_size", 1_000, 100_000),
            timeout=float(timeout),
            headers=headers,
        )

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=self.timeout, follow_redirects=False)
        return self._client

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        body = orjson.dumps(
            {
                "segmentName": segment.segment_name,
                "name": segment.name,
                "type": segment.type,
                "sessionId": segment.session_id,
                "chunk": {"index": chunk.index, "last": chunk.last},
                "users": chunk.users,
            }
        )
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
        }
        try:
            response = await self._http().post(self.url, content=body, headers=headers)
        except httpx2.TimeoutException:
            raise RetryableError(f"no answer within {self.timeout:g} s") from None
        except httpx2.TransportError as exc:
            raise RetryableError(f"connection failed: {type(exc).__name__}") from None
        status = response.status_code
        if 200 <= status < 300:
            return ChunkResult(status=status)
        reason = f"HTTP {status}: {_excerpt(response.text)}"
        if retryable_status(status):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise RetryableError(reason, status=status, retry_after=retry_after)
        raise PermanentError(reason, status=status)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _excerpt(text: Any, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"

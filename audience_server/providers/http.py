"""The HTTP edge every platform adapter shares: one client, and httpx2's errors and the
platforms' statuses translated into the provider errors, the cause kept.

    httpx2.TimeoutException    RetryableError  "<platform>: no answer within <timeout> s"
    httpx2.TransportError      RetryableError  "<platform>: connection failed: <error type>"
    HTTP 408, 429, 5xx         RetryableError  ``Retry-After`` honoured
    any other non-2xx          PermanentError

Error bodies reach reasons (and so logs and ``lastError``) only through :func:`excerpt`,
which masks what looks like an email or a phone number: platforms quote rejected values.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import httpx2
import orjson

from .base import DeliveryError, PermanentError, RetryableError

EXCERPT_LIMIT = 200
_EMAIL_LIKE = re.compile(r"[^\s'\"<>(),;]+@[^\s'\"<>(),;]+")
_PHONE_LIKE = re.compile(r"\+\d[\d ().-]{5,}\d")  # E.164 as sent, maybe spaced


def excerpt(text: object, limit: int = EXCERPT_LIMIT) -> str:
    """``text`` on one line, emails and phone numbers masked, at most ``limit`` characters."""
    flat = redact(" ".join(str(text).split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def redact(text: str) -> str:
    """``text`` with every email-like and phone-like run replaced by ``<email>``/``<phone>``."""
    return _PHONE_LIKE.sub("<phone>", _EMAIL_LIKE.sub("<email>", text))


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt: 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def status_error(reason: str, status: int, headers: Mapping[str, str]) -> DeliveryError:
    """The error for a non-2xx answer judged by its status alone."""
    if retryable_status(status):
        retry_after = parse_retry_after(headers.get("retry-after"))
        return RetryableError(reason, status=status, retry_after=retry_after)
    return PermanentError(reason, status=status)


@contextlib.contextmanager
def transport_errors(platform: str, timeout: float, what: str | None = None) -> Iterator[None]:
    """Turn httpx2's timeouts and transport errors inside the block into RetryableError.

    ``platform`` prefixes the reason, ``what`` (the call) follows it in parentheses.
    """
    try:
        yield
    except httpx2.TimeoutException as exc:
        raise RetryableError(_reason(platform, f"no answer within {timeout:g} s", what)) from exc
    except httpx2.TransportError as exc:
        failure = f"connection failed: {type(exc).__name__}"
        raise RetryableError(_reason(platform, failure, what)) from exc


def _reason(platform: str, text: str, what: str | None) -> str:
    prefix = f"{platform}: " if platform else ""
    suffix = f" ({what})" if what else ""
    return prefix + text + suffix


class HttpAdapter:
    """Base of the HTTP adapters: a client made on first use and closed by ``aclose``,
    every exchange through :meth:`request`. Subclasses set ``timeout`` in ``__init__``;
    a test may set ``transport`` (an ``httpx2.MockTransport``) before the first request."""

    platform: ClassVar[str] = ""  # prefixes the reasons of transport errors
    timeout: float
    transport: httpx2.AsyncBaseTransport | None = None
    _client: httpx2.AsyncClient | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx2.Response:
        """One exchange, ``json`` (when not None) sent as an application/json body; a timeout
        or transport error raises RetryableError (``what`` names the call in its reason)."""
        if json is not None:
            content = orjson.dumps(json)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        if self._client is None:
            # Redirects are not followed: a credential must not go to a host it was not for.
            self._client = httpx2.AsyncClient(
                timeout=self.timeout, follow_redirects=False, transport=self.transport
            )
        with transport_errors(self.platform, self.timeout, what):
            return await self._client.request(
                method, url, params=params, content=content, headers=headers
            )

    async def aclose(self) -> None:
        """Close the client; a later request opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

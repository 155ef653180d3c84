"""Where a Google destination's access token comes from: a static ``access_token``, or a
credentials JSON (``credentials_file``) that google-auth refreshes.

Google access tokens live about an hour; a server that runs for weeks needs credentials it
can refresh. google-auth does the OAuth work (the refresh-token grant of an
``authorized_user`` file, the signed JWT-bearer grant of a ``service_account`` key); its
refresh is synchronous and wants a ``google.auth.transport.Request``, so :class:`HttpxRequest`
implements that over a synchronous httpx2 client and the refresh runs in a thread. The token
is refreshed before it expires (within :data:`REFRESH_MARGIN`, on the provider's clock) and
once more when Google answers UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx2
import orjson
from google.auth import exceptions as auth_errors
from google.auth import transport
from google.auth.credentials import Credentials
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from ...clock import Clock, utcnow
from ...destinations import OptionError
from ..base import PermanentError, RetryableError
from ..http import excerpt

log = logging.getLogger("audience_server.providers.google")

SCOPE = "https://www.googleapis.com/auth/datamanager"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
REFRESH_MARGIN = dt.timedelta(minutes=5)
KINDS = {
    "authorized_user": ("client_id", "client_secret", "refresh_token"),
    "service_account": ("client_email", "private_key", "token_uri"),
}


class TokenSource(Protocol):
    """The bearer token of the next call; ``refreshable``: whether ``refresh`` can help."""

    refreshable: bool

    async def token(self) -> str: ...

    async def refresh(self, stale: str) -> str: ...

    def close(self) -> None: ...


class StaticToken:
    """An operator-supplied token: used as it is until the server restarts."""

    refreshable = False

    def __init__(self, value: str) -> None:
        self.value = value

    async def token(self) -> str:
        return self.value

    async def refresh(self, stale: str) -> str:
        return self.value

    def close(self) -> None:
        pass


class HttpxRequest(transport.Request):
    """google-auth's transport interface over a synchronous httpx2 client (no redirects:
    a refresh token must not go to a host it was not for)."""

    def __init__(self, timeout: float, http: httpx2.BaseTransport | None = None) -> None:
        self.timeout = timeout
        self._client = httpx2.Client(timeout=timeout, follow_redirects=False, transport=http)

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> transport.Response:
        try:
            answer = self._client.request(
                method, url, content=body, headers=headers, timeout=timeout or self.timeout
            )
        except httpx2.HTTPError as exc:
            failure = f"token endpoint: {type(exc).__name__}"
            raise auth_errors.TransportError(failure) from exc  # type: ignore[no-untyped-call]
        return _Response(answer)

    def close(self) -> None:
        self._client.close()


class _Response(transport.Response):
    def __init__(self, answer: httpx2.Response) -> None:
        self._answer = answer

    @property
    def status(self) -> int:
        return self._answer.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._answer.headers

    @property
    def data(self) -> bytes:
        return self._answer.content


class RefreshingToken:
    """A google-auth credential, refreshed before expiry and on demand, one refresh at a
    time (concurrent chunks share it)."""

    refreshable = True

    def __init__(
        self,
        credentials: Credentials,
        *,
        destination: str,
        timeout: float = 30.0,
        clock: Clock = utcnow,
        http: httpx2.BaseTransport | None = None,
    ) -> None:
        self.credentials = credentials
        self.destination = destination
        self.clock = clock
        self.timeout = timeout
        self.http = http
        self._request: HttpxRequest | None = None
        self._lock: asyncio.Lock | None = None
        self._token: str | None = None
        self._expires_at: dt.datetime | None = None  # on self.clock
        self.refreshes = 0

    async def token(self) -> str:
        async with self._guard():
            if self._token is None or self._expiring():
                await self._refresh()
            assert self._token is not None
            return self._token

    async def refresh(self, stale: str) -> str:
        """A new token after Google refused ``stale`` (unless another call already got one)."""
        async with self._guard():
            if self._token is None or self._token == stale:
                await self._refresh()
            assert self._token is not None
            return self._token

    def close(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            request.close()

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _expiring(self) -> bool:
        return self._expires_at is not None and self.clock() >= self._expires_at - REFRESH_MARGIN

    async def _refresh(self) -> None:
        if self._request is None:
            self._request = HttpxRequest(self.timeout, self.http)
        request = self._request
        try:
            await asyncio.to_thread(self.credentials.refresh, request)
        except auth_errors.RefreshError as exc:
            reason = _refresh_reason(exc)
            text = f"Google Data Manager: destination {self.destination}: {reason}"
            if getattr(exc, "retryable", False):
                raise RetryableError(text) from None
            raise PermanentError(text) from None
        except auth_errors.TransportError as exc:
            text = f"Google Data Manager: destination {self.destination}: {exc}"
            raise RetryableError(text) from None
        token = self.credentials.token
        if not isinstance(token, str) or not token:
            raise PermanentError(
                f"Google Data Manager: destination {self.destination}: the token endpoint "
                "answered no access token"
            )
        self._token = token
        self.refreshes += 1
        log.info("google access token refreshed", extra={"destination": self.destination})
        expiry = self.credentials.expiry  # naive UTC, on the real clock
        if expiry is None:
            self._expires_at = None
        else:
            lifetime = expiry.replace(tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)
            self._expires_at = self.clock() + lifetime


def _refresh_reason(exc: auth_errors.RefreshError) -> str:
    """The OAuth error of a refused refresh (RFC 6749 ``error``/``error_description``),
    never the request: it held the refresh token or the signed assertion."""
    body = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(body, Mapping) and isinstance(body.get("error"), str):
        described = body.get("error_description")
        detail = f" ({excerpt(described, 120)})" if isinstance(described, str) else ""
        return f"refreshing the access token failed: {excerpt(body['error'], 60)}{detail}"
    return "refreshing the access token failed"


def load(path_text: object, *, destination: str, timeout: float, clock: Clock) -> RefreshingToken:
    """The refreshing token of a credentials JSON; OptionError names what is wrong in one
    line (never a value from the file)."""
    field = "credentials_file"
    if not isinstance(path_text, str) or not path_text.strip():
        raise OptionError(field, "must be the path of a Google credentials JSON file")
    path = Path(path_text.strip()).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OptionError(field, f"no such file: {path}") from None
    except OSError as exc:
        raise OptionError(field, f"cannot be read: {path} ({type(exc).__name__})") from None
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise OptionError(field, f"is not JSON: {path}") from None
    if not isinstance(info, dict) or info.get("type") not in KINDS:
        raise OptionError(
            field, f"{path}: type must be authorized_user or service_account"
        ) from None
    kind = info["type"]
    missing = [key for key in KINDS[kind] if not isinstance(info.get(key), str) or not info[key]]
    if missing:
        raise OptionError(field, f"{path}: {kind} credentials lack {', '.join(missing)}")
    token_uri = info.get("token_uri")
    if token_uri is not None and (
        not isinstance(token_uri, str) or urlsplit(token_uri).scheme not in ("http", "https")
    ):
        raise OptionError(field, f"{path}: token_uri must be an http:// or https:// URL")
    credentials: Credentials
    try:
        if kind == "authorized_user":
            # Built directly: from_authorized_user_info replaces the file's token_uri with
            # Google's ("always overrides"), and the file's is the one to honour.
            credentials = user_credentials.Credentials(  # type: ignore[no-untyped-call]
                token=None,
                refresh_token=info["refresh_token"],
                token_uri=token_uri or GOOGLE_TOKEN_URI,
                client_id=info["client_id"],
                client_secret=info["client_secret"],
                scopes=[SCOPE],
                quota_project_id=info.get("quota_project_id"),
            )
        else:
            robot = service_account.Credentials.from_service_account_info
            credentials = robot(info, scopes=[SCOPE])  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):  # a private key that does not parse, say
        raise OptionError(field, f"{path}: {kind} credentials cannot be read") from None
    return RefreshingToken(credentials, destination=destination, timeout=timeout, clock=clock)

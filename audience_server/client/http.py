"""The HTTP API of one server, as the client sees it: one request per batch, with retries.

Transient failures (connection errors, timeouts, 429, 5xx) are retried with capped
exponential backoff, ``Retry-After`` honoured; re-sending a batch the server already has is
harmless. What is left becomes the errors of ``errors.py``::

    transport error, 429, 5xx, past the retry policy  -> Unreachable
    any other 4xx                                      -> Rejected (status, messages, batch)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson

from ..retry import RetryPolicy
from .errors import Rejected, Unreachable

DEFAULT_URL = "http://127.0.0.1:8000"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Batch:
    """One request's worth of a session: ``users`` already encoded as a JSON array."""

    sequence: int
    users: int
    users_json: bytes


def _messages(response: httpx2.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return [response.text.strip() or response.reason_phrase]
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [str(message) for message in body["errors"]]
    return [response.text.strip()]


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None


class AudienceClient:
    """The HTTP API of one server. Thread-safe: batches may be sent from several threads."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 300.0,
        transport: httpx2.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry or RetryPolicy(base=0.5, cap=30.0, max_attempts=10)
        self.sleep = sleep
        self.http = httpx2.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> AudienceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(
        self, method: str, path: str, *, sequence: int | None = None, **kwargs: Any
    ) -> httpx2.Response:
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx2.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    return response
                problem = f"{response.status_code} {' '.join(_messages(response))}"
                retry_after = _retry_after(response)
            if not self.retry.allows_another(attempt):
                where = f"batch {sequence}" if sequence is not None else f"{method} {path}"
                raise Unreachable(f"{where} failed {attempt} times; last: {problem}")
            self.sleep(self.retry.delay(attempt, retry_after))

    def send_batch(
        self,
        *,
        name: str,
        type: str,
        session_id: str,
        total_batches: int,
        total_users: int,
        batch: Batch,
        sync: bool = False,
        disable_prefix: bool = False,
    ) -> None:
        """POST /audience with EdgeTag's form fields; returns once the batch is committed."""
        meta = {
            "sessionId": session_id,
            "sequence": batch.sequence,
            "totalBatches": total_batches,
            "totalUsers": total_users,
        }
        files: dict[str, tuple[None, str | bytes]] = {
            "name": (None, name),
            "type": (None, type),
            "batch": (None, orjson.dumps(meta)),
            "users": (None, batch.users_json),
        }
        params = {"sync": str(sync).lower(), "disablePrefix": str(disable_prefix).lower()}
        response = self._request(
            "POST", "/audience", sequence=batch.sequence, files=files, params=params
        )
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response), batch.sequence)

    def status(self, session_id: str) -> dict[str, Any] | None:
        """GET /audience/sessions/{id}; None when the server has no such session."""
        response = self._request("GET", f"/audience/sessions/{session_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

    def sessions(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of GET /audience/sessions: ``{"sessions": [...], "nextCursor": ...}``."""
        params = {"limit": str(limit)}
        params.update(
            {k: v for k, v in (("state", state), ("name", name), ("cursor", cursor)) if v}
        )
        response = self._request("GET", "/audience/sessions", params=params)
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

    def abort(self, session_id: str) -> dict[str, Any]:
        """DELETE /audience/sessions/{id}: the session as it now stands (``aborted``, or the
        state an ended session keeps). Any other answer, 404 included, is ``Rejected`` with
        the server's message. Retrying it is harmless: a second abort finds it aborted."""
        response = self._request("DELETE", f"/audience/sessions/{session_id}")
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

    def retry_deliveries(self, session_id: str) -> dict[str, Any]:
        """POST /audience/sessions/{id}/retry: ``{"sessionId", "retried": [destinations]}``.
        Any other answer (404; 409: nothing failed, or the users were purged) is ``Rejected``
        with the server's message."""
        response = self._request("POST", f"/audience/sessions/{session_id}/retry")
        if response.status_code != 202:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

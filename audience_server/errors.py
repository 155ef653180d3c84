"""Every error a client can see, and how each is rendered.

    AudienceError                     JSON {"success": false, "errors": [...]}
    ├── MalformedBody        400      text/plain, EdgeTag's wording
    ├── CorruptedPayload     400      EdgeTag's wording, JSON
    ├── EmptyUsers           400      text/plain, EdgeTag's wording
    ├── InvalidField         400      one sentence per bad field
    ├── ProviderErrors       400      sync mode: "<destination>: <message>" per failure
    ├── Unauthorized         401
    ├── NotFound             404
    ├── Conflict             409
    ├── SessionGone          410
    ├── PayloadTooLarge      413
    └── SyncTimeout          504      sync mode gave up waiting; delivery goes on

The four EdgeTag-compatible bodies are reproduced byte for byte, so they are built here
and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

TEXT_PLAIN = "text/plain; charset=utf-8"
APPLICATION_JSON = "application/json"

SUCCESS_BODY = b'{"success": true}'


def errors_body(errors: Sequence[str]) -> bytes:
    """EdgeTag's error envelope, spaced as EdgeTag spaces it."""
    return json.dumps({"success": False, "errors": list(errors)}, ensure_ascii=False).encode()


class AudienceError(Exception):
    """A request the server refuses; ``status`` and ``messages`` say how."""

    status = 400

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages: tuple[str, ...] = messages

    @property
    def content_type(self) -> str:
        return APPLICATION_JSON

    def body(self) -> bytes:
        return errors_body(self.messages)


class MalformedBody(AudienceError):
    """The body or its content type is not form data."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details

    @property
    def content_type(self) -> str:
        return TEXT_PLAIN

    def body(self) -> bytes:
        return f"Malformed request body, must be form data ({self.details})".encode()


class CorruptedPayload(AudienceError):
    """``batch`` or ``users`` is missing, not JSON, or not of the right JSON type."""

    def __init__(self, details: str) -> None:
        super().__init__(f"Payload is corrupted or missing. Please send JSON string. {details}")


class EmptyUsers(AudienceError):
    """``users`` is an empty array."""

    def __init__(self) -> None:
        super().__init__("No users in the segment. Segment cannot be created.")

    @property
    def content_type(self) -> str:
        return TEXT_PLAIN

    def body(self) -> bytes:
        return self.messages[0].encode()


class InvalidField(AudienceError):
    """One or more fields have values the server cannot accept."""


class ProviderErrors(AudienceError):
    """Sync mode: one or more destinations failed."""


class Unauthorized(AudienceError):
    """Missing or wrong API key."""

    status = 401


class NotFound(AudienceError):
    """No such resource for this caller."""

    status = 404


class Conflict(AudienceError):
    """The batch contradicts what the session already holds."""

    status = 409


class SessionGone(AudienceError):
    """The session expired or was aborted; it takes no more batches."""

    status = 410


class PayloadTooLarge(AudienceError):
    """The body or the batch is over a configured limit."""

    status = 413


class SyncTimeout(AudienceError):
    """Sync mode waited its limit; the deliveries go on."""

    status = 504

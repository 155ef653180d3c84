"""What stops an upload, as one tree; ``str()`` of each is the message for the operator::

    UploadError
    ├── InputError      the input cannot be read as users, or differs from its resume state
    ├── Rejected        the server refused a request with a 4xx (its message, the batch)
    ├── Unreachable     transient failures outlasted the retry policy; re-run to resume
    └── SessionFailed   the session ended inconsistent, expired, aborted, or undelivered

No message quotes a user: an input error names the line or element, never its content.
"""

from __future__ import annotations


class UploadError(Exception):
    """Something stopped the upload; ``str()`` is the message for the operator."""


class InputError(UploadError):
    """The input cannot be read as users, or does not match its resume state."""


class Rejected(UploadError):
    """The server answered a 4xx other than 429: retrying the same request cannot help."""

    def __init__(self, status: int, messages: list[str], sequence: int | None = None) -> None:
        self.status = status
        self.messages = messages
        self.sequence = sequence
        where = f"batch {sequence}" if sequence is not None else "the request"
        super().__init__(f"server refused {where} with {status}: {' '.join(messages)}")


class Unreachable(UploadError):
    """Transient failures outlasted the retry policy; the upload can be resumed."""


class SessionFailed(UploadError):
    """Every batch was acknowledged but the session did not end as it should."""

"""What every provider is: one async method that delivers a chunk of a segment.

    DeliveryError              the delivery stops this attempt
    ├── RetryableError         408, 429, 5xx, timeouts, connection errors: try again later
    └── PermanentError         anything else: the delivery fails now

Providers translate their platform's errors (and httpx2's, through ``http.py``) into these
at their edge; the dispatcher never sees a foreign exception type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import msgspec

from ..destinations import DestinationConfig

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[dict[str, Any]]).decode


Member = tuple[int, bytes]  # an identifier's kind (its place in the platform's schema), digest


class MemberLedger(Protocol):
    """What a ``primary`` delivery put at the destination last time (``members.Ledger``):
    a provider that replaces by difference stages each chunk's members and reads, at the
    end, those who left. What it stages becomes the ledger's only once the attempt succeeds.
    """

    async def begin(self, target: str) -> object:
        """Start this attempt for the platform's list ``target`` (the audience id)."""
        ...

    async def add(self, members: Sequence[Member]) -> list[Member]:
        """Stage a chunk's members; returns those the destination may not hold yet."""
        ...

    async def leavers(self, after: Member | None, limit: int) -> list[Member]:
        """A page of members the destination may hold that this attempt did not stage."""
        ...


@dataclass
class Segment:
    """One delivery attempt of a session to a destination; ``state`` is the provider's
    scratch space for this attempt (an audience id, an upload session, a temp file)."""

    destination: str
    tenant: str
    session_id: str
    name: str  # the trimmed name the client sent
    segment_name: str  # the name at the destination (prefix rules applied)
    type: str  # custom | primary
    total_users: int  # users this attempt will send (duplicates removed)
    state: dict[str, Any] = field(default_factory=dict)
    ledger: MemberLedger | None = None  # the attempt's member ledger, for replace by difference


class Chunk:
    """One chunk of a delivery: ``index`` from 1, whether it is the ``last``, and its users,
    each both as the JSON object it was received as (``encoded``) and decoded (``users``).
    Either is made from the other on first use, so a provider that sends users as
    received (file, webhook) never pays for decoding them."""

    __slots__ = ("_encoded", "_users", "index", "last")

    def __init__(
        self,
        index: int,
        last: bool,
        users: Sequence[Mapping[str, Any]] | None = None,
        *,
        encoded: Sequence[bytes] | None = None,
    ) -> None:
        if (users is None) == (encoded is None):
            raise TypeError("a Chunk takes its users either decoded or encoded")
        self.index = index
        self.last = last
        self._users = users
        self._encoded = encoded

    def __len__(self) -> int:
        users = self._users if self._users is not None else self._encoded
        assert users is not None
        return len(users)

    @property
    def users(self) -> Sequence[Mapping[str, Any]]:
        if self._users is None:
            assert self._encoded is not None
            self._users = _decode(b"[" + b",".join(self._encoded) + b"]")
        return self._users

    @property
    def encoded(self) -> Sequence[bytes]:
        """Each user's JSON object, on one line."""
        if self._encoded is None:
            assert self._users is not None
            self._encoded = [_encode(user) for user in self._users]
        return self._encoded

    def __repr__(self) -> str:
        return f"Chunk({self.index}, last={self.last}, {len(self)} users)"


@dataclass(frozen=True)
class ChunkResult:
    invalid: int = 0  # users the destination could not use
    status: int | None = None  # HTTP status of the platform's answer, when there is one


class DeliveryError(Exception):
    """The attempt stopped; ``str()`` is a short reason safe to show operators."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(DeliveryError):
    """Worth trying again later, no sooner than ``retry_after`` seconds when given."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """Trying again will not help (bad request, auth, permissions)."""


class Provider(Protocol):
    """A configured destination. ``chunk_size`` is the most users one ``send`` takes."""

    chunk_size: int

    @classmethod
    def from_config(cls, config: DestinationConfig) -> Self:
        """The provider of one ``[[destinations]]`` table; OptionError names a bad option."""
        ...

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        """Deliver one chunk; chunks of an attempt come in order, the last flagged."""
        ...

    async def aclose(self) -> None:
        """Release connections; called when the worker stops."""
        ...

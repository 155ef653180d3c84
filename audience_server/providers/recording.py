"""An in-memory provider for tests of the worker, as httpx ships ``MockTransport``: it keeps
every chunk it is sent and answers as scripted, with no platform behind it.

    provider = RecordingProvider(chunk_size=2)
    provider.script(RetryableError("down for a moment"))   # the first chunk fails, then ok
    ...  # run the worker with destinations={"rec": (config, provider)}
    assert provider.delivered("session-1") == users
    assert len(provider.attempts("session-1")) == 2

It is not a kind of the destinations file: tests construct it directly.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from ..destinations import DestinationConfig
from . import options as check
from .base import Chunk, ChunkResult, DeliveryError, Segment

Answer = ChunkResult | DeliveryError


@dataclass(frozen=True)
class Sent:
    """One chunk as the provider received it (its users copied), and how it was answered."""

    segment: Segment
    chunk: Chunk
    answer: Answer

    @property
    def ok(self) -> bool:
        return not isinstance(self.answer, DeliveryError)


class RecordingProvider:
    """Records every (segment, chunk) sent to it; answers each from its script, in order,
    and with an empty ChunkResult once the script is used up."""

    def __init__(self, *, chunk_size: int = 1_000) -> None:
        self.chunk_size = chunk_size
        self.closed = False
        # The worker sends from its own thread; tests read from theirs.
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._script: deque[Answer] = deque()

    @classmethod
    def from_config(cls, config: DestinationConfig) -> Self:
        return cls(chunk_size=check.positive_int(config.options, "chunk_size", 1_000, 1_000_000))

    def script(self, *answers: Answer) -> None:
        """Answer the next chunks with these, one each, in order: a ChunkResult is returned,
        a DeliveryError (RetryableError, PermanentError) raised."""
        with self._lock:
            self._script.extend(answers)

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        with self._lock:
            answer = self._script.popleft() if self._script else ChunkResult()
            copy = Chunk(chunk.index, chunk.last, list(chunk.users))
            self._sent.append(Sent(segment, copy, answer))
        if isinstance(answer, DeliveryError):
            raise answer
        return answer

    async def aclose(self) -> None:
        self.closed = True

    @property
    def sent(self) -> list[Sent]:
        """Every chunk received, in arrival order."""
        with self._lock:
            return list(self._sent)

    def attempts(self, session_id: str) -> list[list[Sent]]:
        """What each attempt at a session was sent, in order; an attempt starts at chunk 1."""
        attempts: list[list[Sent]] = []
        for sent in self.sent:
            if sent.segment.session_id != session_id:
                continue
            if sent.chunk.index == 1 or not attempts:
                attempts.append([])
            attempts[-1].append(sent)
        return attempts

    def delivered(self, session_id: str) -> list[Mapping[str, Any]] | None:
        """The users of the last attempt at a session whose every chunk, down to the last,
        was answered with a result; None when no attempt got that far."""
        for attempt in reversed(self.attempts(session_id)):
            if attempt[-1].chunk.last and all(sent.ok for sent in attempt):
                return [user for sent in attempt for user in sent.chunk.users]
        return None

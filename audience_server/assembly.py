"""Assembly: a complete session's users in sequence order, exact duplicates dropped, in chunks.

Pure over the batches it is handed (the worker reads them and stores what is found):
memory is bounded by one batch plus one chunk whatever the segment's size. Users already
seen are remembered on disk (``seen.SeenUsers``, in the worker's scratch folder), and what
assembly finds is kept per batch (indexes of repeated users), so every delivery of the
session streams the same users without redoing it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .digests import canonical_digest, user_key
from .providers.base import Chunk
from .seen import SeenUsers


class UsersPurged(Exception):
    """The session's users were purged (aborted or expired) while it was being read."""


class Batch(NamedTuple):
    """One stored batch, decoded: its users, and the indexes of those assembly found
    repeating an earlier user of the session (empty before assembly)."""

    sequence: int
    users: Sequence[Any]
    repeated: Sequence[int]


@dataclass(frozen=True)
class Findings:
    """What assembly found in one batch."""

    sequence: int
    repeated: list[int]  # indexes of users met before, in this batch or an earlier one
    canonical_digest: bytes  # of the batch's users: recognises a re-send after a purge
    unique: int  # users of the batch not met before


def find_duplicates(
    batches: Iterable[Batch], scratch: Path | None = None
) -> Generator[Findings, None, None]:
    """What each batch holds that an earlier user of the session already was, batch by
    batch in the order given (sequence order). Safe to run again from the start."""
    seen = SeenUsers(scratch)
    try:
        for batch in batches:
            repeated = seen.repeated([user_key(user) for user in batch.users])
            found = Findings(
                batch.sequence,
                repeated,
                canonical_digest(batch.users),
                len(batch.users) - len(repeated),
            )
            del batch  # one batch in memory at a time: the next is read while this yields
            yield found
    finally:
        seen.close()


def unique_users(batches: Iterable[Batch]) -> Iterator[Mapping[str, Any]]:
    """The users of the batches in order, without the repeats assembly found."""
    for batch in batches:
        skip = set(batch.repeated)
        for index, user in enumerate(batch.users):
            if index not in skip:
                yield user
        del batch  # before the next one is read


def chunked(
    users: Iterator[Mapping[str, Any]], size: int, total: int
) -> Generator[Chunk, None, None]:
    """Chunks of ``size`` users, numbered from 1; ``total`` users in all marks the last."""
    index = sent = 0
    chunk: list[Mapping[str, Any]] = []
    for user in users:
        chunk.append(user)
        if len(chunk) == size:
            index += 1
            sent += size
            yield Chunk(index, sent == total, chunk)
            chunk = []
    if chunk or index == 0:
        yield Chunk(index + 1, True, chunk)

"""Assembly: a complete session's users in sequence order, exact duplicates dropped, in chunks.

Pure over the batches it is handed (the worker reads them and stores what is found). The
batches are read once: each user's key goes to a partitioned spill (``seen.SeenUsers``, in
the worker's scratch folder), then the repeats come back in order and are handed out batch
by batch. Memory is bounded by one batch, one chunk and the spill's constant budget
whatever the segment's size, and the cost per user does not grow with it. What assembly
finds is kept per batch (indexes of repeated users), so every delivery of the session
streams the same users without redoing it.
"""

from __future__ import annotations

import secrets
import struct
import tempfile
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

from .digests import batch_keys
from .providers.base import Chunk
from .seen import SeenUsers

_READ = struct.Struct("<q32sq")  # a batch read: its sequence, canonical digest, size
_items = msgspec.json.Decoder(list[msgspec.Raw]).decode
_compact = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class UsersPurged(Exception):
    """The session's users were purged (aborted or expired) while it was being read."""


class Batch(NamedTuple):
    """One stored batch: its users field as received (a JSON array), and the indexes of
    the users assembly found repeating an earlier user of the session (empty before)."""

    sequence: int
    users_json: bytes
    repeated: Sequence[int]
    size: int  # how many users


class Findings(NamedTuple):
    """What assembly found in one batch."""

    sequence: int
    repeated: list[int]  # indexes of users met before, in this batch or an earlier one
    canonical_digest: bytes  # of the batch's users: recognises a re-send after a purge
    unique: int  # users of the batch not met before


def find_duplicates(
    batches: Iterable[Batch], scratch: Path | None = None
) -> Generator[Findings, None, None]:
    """What each batch holds that an earlier user of the session already was, batch by
    batch in the order given (sequence order). The batches are read once, all of them
    before the first findings. Safe to run again from the start."""
    seed = secrets.randbits(64)  # the keys' hash is keyed afresh on every run
    seen = SeenUsers(scratch)
    try:
        # One record per batch (its sequence, canonical digest and size), kept on disk too:
        # a session may have many small batches. Unnamed, so it leaves nothing behind.
        with tempfile.TemporaryFile(dir=scratch) as read:
            for batch in batches:
                digest, keys = batch_keys(batch.users_json, seed)
                seen.add(keys)
                read.write(_READ.pack(batch.sequence, digest, len(keys) // 16))
                del batch, keys  # one batch in memory at a time
            read.seek(0)
            repeats = seen.repeats()
            upcoming = next(repeats, None)
            start = 0  # the position of the batch's first user among the session's users
            while record := read.read(_READ.size):
                sequence, digest, size = _READ.unpack(record)
                end = start + size
                repeated: list[int] = []
                while upcoming is not None and upcoming < end:
                    repeated.append(upcoming - start)
                    upcoming = next(repeats, None)
                yield Findings(sequence, repeated, digest, size - len(repeated))
                start = end
    finally:
        seen.close()


def unique_users(batches: Iterable[Batch]) -> Iterator[list[bytes]]:
    """Each batch's users in order, without the repeats assembly found, each as the JSON
    object it was received as (made compact when it spans lines: NDJSON needs one line)."""
    for batch in batches:
        items = _items(batch.users_json)
        if batch.repeated:
            skip = set(batch.repeated)
            items = [item for index, item in enumerate(items) if index not in skip]
        users = list(map(bytes, items))
        if b"\n" in batch.users_json or b"\r" in batch.users_json:  # rare: pretty-printed
            users = [_one_line(user) for user in users]
        del batch, items  # before the next one is read
        yield users


def _one_line(user: bytes) -> bytes:
    return _compact(_decode(user)) if b"\n" in user or b"\r" in user else user


def chunked(batches: Iterator[list[bytes]], size: int, total: int) -> Generator[Chunk, None, None]:
    """The users of ``batches`` in chunks of ``size``, numbered from 1; ``total`` users in
    all marks the last."""
    index = sent = 0
    pending: list[bytes] = []
    for users in batches:
        pending += users
        start = 0
        while len(pending) - start >= size:
            index += 1
            sent += size
            yield Chunk(index, sent == total, encoded=pending[start : start + size])
            start += size
        pending = pending[start:]
    if pending or index == 0:
        yield Chunk(index + 1, True, encoded=pending)

"""Assembly: a complete session's users in sequence order, exact duplicates dropped, in chunks.

Pure over the batches it is handed (the worker reads them and stores what is found):
memory is bounded by one batch plus one chunk whatever the segment's size. Users already
seen are remembered on disk (a throwaway SQLite file of 16-byte keys), and what assembly
finds is kept per batch (indexes of repeated users), so every delivery of the session
streams the same users without redoing it.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .digests import canonical_digest, user_key
from .providers.base import Chunk


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


class SeenUsers:
    """The keys of every user met so far in one session, kept in a temporary SQLite file."""

    def __init__(self, directory: Path | None = None, cache_kib: int = 16_384) -> None:
        # A folder of its own: SQLite keeps a journal beside the file, and close() removes
        # whatever is there.
        self.folder = Path(tempfile.mkdtemp(prefix="seen-", dir=directory))
        self.path = self.folder / "seen.db"
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.executescript(
            f"""
            PRAGMA journal_mode=TRUNCATE;  -- on disk: a rollback must work, and cost no memory
            PRAGMA synchronous=OFF;
            PRAGMA cache_size=-{cache_kib};
            CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TEMP TABLE batch (i INTEGER PRIMARY KEY, k BLOB NOT NULL);
            """
        )

    def repeated(self, keys: Sequence[bytes]) -> list[int]:
        """Indexes of keys met before (earlier batches or earlier in ``keys``); remembers all."""
        first: dict[bytes, int] = {}
        repeats: list[int] = []
        for index, key in enumerate(keys):
            if key in first:
                repeats.append(index)
            else:
                first[key] = index
        # Usual case first: none of this batch's users was met before. Inserting the keys in
        # order and counting what went in tells, at half the cost of looking each one up.
        self.db.execute("BEGIN")
        before = self.db.total_changes
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((k,) for k in sorted(first)))
        if self.db.total_changes - before == len(first):
            self.db.execute("COMMIT")
            return repeats
        self.db.execute("ROLLBACK")
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM batch")
        self.db.executemany("INSERT INTO batch VALUES (?, ?)", ((i, k) for k, i in first.items()))
        repeats += [
            row[0] for row in self.db.execute("SELECT i FROM batch WHERE k IN (SELECT k FROM seen)")
        ]
        self.db.execute("INSERT OR IGNORE INTO seen SELECT k FROM batch")
        self.db.execute("COMMIT")
        return sorted(repeats)

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)


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

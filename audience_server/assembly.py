"""Assembly: a complete session's users in sequence order, exact duplicates dropped, in chunks.

Memory is bounded by one batch plus one chunk whatever the segment's size: users already
seen are remembered on disk (a throwaway SQLite file of 16-byte keys), and what assembly
finds is stored per batch (indexes of repeated users), so every delivery of the session
streams the same users without redoing it.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson
from sqlalchemy import Engine, select, update

from . import db
from .models import batches
from .parsing import decode_users
from .providers.base import Chunk
from .store import unpack_users

_canonical = msgspec.json.Encoder(order="sorted").encode


class UsersPurged(Exception):
    """The session's users were purged (aborted or expired) while it was being read."""


def user_key(user: Any) -> bytes:
    """Equal for users that are equal JSON values, key order ignored."""
    return hashlib.blake2b(_canonical(user), digest_size=16).digest()


def canonical_digest(users: Any) -> bytes:
    """sha256 of the users in canonical JSON: how a re-send is recognised after a purge."""
    return hashlib.sha256(_canonical(users)).digest()


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


def _sequences(engine: Engine, tenant: str, key: str) -> list[int]:
    with db.read_transaction(engine) as conn:
        stmt = (
            select(batches.c.sequence)
            .where(batches.c.tenant == tenant, batches.c.session_key == key)
            .order_by(batches.c.sequence)
        )
        return list(conn.execute(stmt).scalars())


def _read_batch(engine: Engine, tenant: str, key: str, sequence: int) -> tuple[Any, list[int]]:
    with db.read_transaction(engine) as conn:
        row = conn.execute(
            select(batches.c.users, batches.c.duplicates).where(
                batches.c.tenant == tenant,
                batches.c.session_key == key,
                batches.c.sequence == sequence,
            )
        ).one()
    if row.users is None:
        raise UsersPurged(f"session {key}'s users were purged")
    duplicates = orjson.loads(row.duplicates) if row.duplicates else []
    return decode_users(unpack_users(row.users)), duplicates


def find_duplicates(engine: Engine, tenant: str, key: str, scratch: Path | None = None) -> int:
    """Record each batch's repeated users and canonical digest; returns the unique count.

    Safe to run again from the start (a crashed assembly is simply redone)."""
    seen = SeenUsers(scratch)
    unique = 0
    try:
        for sequence in _sequences(engine, tenant, key):
            users, _ = _read_batch(engine, tenant, key, sequence)
            repeats = seen.repeated([user_key(user) for user in users])
            unique += len(users) - len(repeats)
            with db.write_transaction(engine) as conn:
                conn.execute(
                    update(batches)
                    .where(
                        batches.c.tenant == tenant,
                        batches.c.session_key == key,
                        batches.c.sequence == sequence,
                    )
                    .values(
                        duplicates=orjson.dumps(repeats).decode() if repeats else None,
                        canonical_digest=canonical_digest(users),
                    )
                )
            del users
    finally:
        seen.close()
    return unique


def unique_users(engine: Engine, tenant: str, key: str) -> Iterator[Mapping[str, Any]]:
    """The session's users in sequence order without the repeats assembly found."""
    for sequence in _sequences(engine, tenant, key):
        users, duplicates = _read_batch(engine, tenant, key, sequence)
        skip = set(duplicates)
        for index, user in enumerate(users):
            if index not in skip:
                yield user
        del users


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

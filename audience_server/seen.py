"""The keys of the users met so far in one session's assembly: a throwaway on-disk set.

A temporary SQLite file of 16-byte keys (not the server's database) in a folder of its
own under the worker's scratch folder, so memory stays flat whatever the segment's size;
``close()`` removes the folder with everything SQLite kept beside the file.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path


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

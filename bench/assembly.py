"""Duplicate detection alone: users/s and peak RSS of ``find_duplicates`` over synthetic
batches of 10,000 users (~1% exact duplicates, within and across batches, their keys
reordered), today's partitioned spill ("new") against the SQLite B-tree set it replaced
("old", as it was in 20024cb, BLAKE2b keys made user by user). Each run is a child
process of its own, so its peak RSS is the assembly's alone; rounds interleave the two,
the figures are medians.
"floor" only generates the batches: what both pay before any duplicate is looked for.

    .venv/bin/python -m bench.assembly [--sizes 200000,2000000,10000000] [--rounds 3]
        [--old-up-to 2000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson

from audience_server.assembly import Batch, Findings, find_duplicates
from audience_server.digests import canonical_digest

_canonical = msgspec.json.Encoder(order="sorted").encode  # the old keys: BLAKE2b of this

BATCH_USERS = 10_000
REPEAT_SHARE = 0.01


def synthetic_batches(total: int, seed: int = 7) -> Iterator[Batch]:
    """Batches of distinct users with ~1% copies of an earlier one (half from the same
    batch, half from anywhere before), keys in another order; made as they are read."""
    rng = random.Random(seed)
    for start in range(0, total, BATCH_USERS):
        users: list[Any] = []
        for n in range(start, min(start + BATCH_USERS, total)):
            if n > start and rng.random() < REPEAT_SHARE:
                low = start if rng.random() < 0.5 else 0
                original = _user(rng.randrange(low, n))
                users.append(dict(reversed(original.items())))
            else:
                users.append(_user(n))
        yield Batch(start // BATCH_USERS + 1, orjson.dumps(users), [], len(users))


def _user(n: int) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "phone": f"+1415{n:07d}", "tier": n % 5}


# --- the SQLite B-tree set assembly used before (audience_server/seen.py at 20024cb) -----


class OldSeenUsers:
    """The keys of every user met so far in one session, kept in a temporary SQLite file."""

    def __init__(self, directory: Path | None = None, cache_kib: int = 16_384) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="seen-", dir=directory))
        self.db = sqlite3.connect(self.folder / "seen.db", isolation_level=None)
        self.db.executescript(
            f"""
            PRAGMA journal_mode=TRUNCATE;
            PRAGMA synchronous=OFF;
            PRAGMA cache_size=-{cache_kib};
            CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TEMP TABLE batch (i INTEGER PRIMARY KEY, k BLOB NOT NULL);
            """
        )

    def repeated(self, keys: Sequence[bytes]) -> list[int]:
        first: dict[bytes, int] = {}
        repeats: list[int] = []
        for index, key in enumerate(keys):
            if key in first:
                repeats.append(index)
            else:
                first[key] = index
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


def old_find_duplicates(
    batches: Iterable[Batch], scratch: Path | None = None
) -> Generator[Findings, None, None]:
    seen = OldSeenUsers(scratch)
    try:
        for batch in batches:
            users = orjson.loads(batch.users_json)
            keys = [hashlib.blake2b(_canonical(u), digest_size=16).digest() for u in users]
            repeated = seen.repeated(keys)
            yield Findings(
                batch.sequence, repeated, canonical_digest(users), len(users) - len(repeated)
            )
    finally:
        seen.close()


def floor(batches: Iterable[Batch], scratch: Path | None = None) -> Iterator[Findings]:
    for batch in batches:
        yield Findings(batch.sequence, [], b"", batch.size)


FINDERS: dict[str, Callable[[Iterable[Batch], Path | None], Iterator[Findings]]] = {
    "new": find_duplicates,
    "old": old_find_duplicates,
    "floor": floor,
}


# --- one run, in a child process ---------------------------------------------------------


def child(finder: str, total: int) -> None:
    """Print one run's figures as JSON: seconds, repeats found, a digest of the findings."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_SCRATCH")) as scratch:
        digest = hashlib.blake2b(digest_size=8)
        repeats = 0
        started = time.perf_counter()
        for found in FINDERS[finder](synthetic_batches(total), Path(scratch)):
            repeats += len(found.repeated)
            digest.update(json.dumps([found.sequence, found.repeated]).encode())
        seconds = time.perf_counter() - started
        left = list(Path(scratch).iterdir())
    print(json.dumps({"seconds": seconds, "repeats": repeats, "digest": digest.hexdigest()}))
    if left:
        raise SystemExit(f"left in the scratch folder: {left}")


def run(finder: str, total: int) -> dict[str, Any]:
    """One child run: its figures and its peak RSS in MiB."""
    command = [sys.executable, "-m", "bench.assembly", "--child", finder, str(total)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{finder} at {total} failed ({status})")
    figures: dict[str, Any] = json.loads(out)
    figures["rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="200000,2000000,10000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old-up-to", type=int, default=2_000_000, help="old is slow beyond")
    parser.add_argument("--child", nargs=2, metavar=("FINDER", "USERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_number in range(args.rounds):
        for total in sizes:
            finders = ["new", "old"] if total <= args.old_up_to else ["new"]
            if round_number % 2:
                finders.reverse()
            if round_number == 0:
                finders.append("floor")
            for finder in finders:
                figures = run(finder, total)
                runs.setdefault((finder, total), []).append(figures)
                print(
                    f"round {round_number + 1} {finder:>5} {total:>10,}: "
                    f"{total / figures['seconds']:>9,.0f} users/s, "
                    f"{figures['rss_mib']:6.1f} MiB",
                    flush=True,
                )
    for total in sizes:
        digests = {f["digest"] for name in ("new", "old") for f in runs.get((name, total), [])}
        if len(digests) != 1:
            raise SystemExit(f"findings differ at {total:,} users")
    print(f"\n{'':>5} {'users':>10} {'users/s':>9} {'peak RSS':>9}  runs  repeats")
    for (finder, total), measured in sorted(runs.items()):
        speed = statistics.median(total / f["seconds"] for f in measured)
        rss = statistics.median(f["rss_mib"] for f in measured)
        print(
            f"{finder:>5} {total:>10,} {speed:>9,.0f} {rss:>7.1f}Mi  {len(measured):>4}  "
            f"{measured[0]['repeats']:,}"
        )
    for finder in ("new", "old"):
        totals = [total for total in sizes if (finder, total) in runs]
        if len(totals) < 2:
            continue
        small = runs[(finder, totals[0])]
        base_speed = statistics.median(totals[0] / f["seconds"] for f in small)
        base_rss = statistics.median(f["rss_mib"] for f in small)
        for total in totals[1:]:
            speed = statistics.median(total / f["seconds"] for f in runs[(finder, total)])
            rss = statistics.median(f["rss_mib"] for f in runs[(finder, total)])
            print(
                f"{finder} at {total:,} vs {totals[0]:,}: users/s x{speed / base_speed:.2f} "
                f"(target >= 0.8), peak RSS x{rss / base_rss:.2f} (target <= 1.3)"
            )


if __name__ == "__main__":
    main()

"""The seen-keys set of assembly: exact, and nothing left on disk after it."""

from __future__ import annotations

import random
from pathlib import Path

from audience_server.seen import SeenUsers


def test_seen_users_finds_repeats_within_and_across_batches(tmp_path: Path) -> None:
    seen = SeenUsers(tmp_path)
    try:
        k = [bytes([i]) * 16 for i in range(6)]
        assert seen.repeated([k[0], k[1], k[0], k[2]]) == [2]
        assert seen.repeated([k[3], k[1], k[3], k[4], k[0]]) == [1, 2, 4]
        assert seen.repeated([k[5]]) == []
        assert seen.path.exists()
    finally:
        seen.close()
    assert list(tmp_path.iterdir()) == []  # its SQLite journal too


def test_seen_users_stays_exact_over_many_large_batches(tmp_path: Path) -> None:
    """Batches of 10,000 new keys, every other one carrying a single earlier key: the fast
    path inserts a whole batch before it learns of the repeat and must undo that cleanly
    (it once corrupted its file: SQLite cannot roll back with journal_mode=OFF)."""
    rng = random.Random(11)
    # a small cache spills pages to disk, as 2M users would
    seen = SeenUsers(tmp_path, cache_kib=64)
    earlier: list[bytes] = []
    try:
        for batch_number in range(16):
            keys = [rng.randbytes(16) for _ in range(10_000)]
            expected = []
            if batch_number % 2 and earlier:
                keys[1234] = earlier[rng.randrange(len(earlier))]
                expected = [1234]
            assert seen.repeated(keys) == expected
            earlier += keys[:100]
    finally:
        seen.close()

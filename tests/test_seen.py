"""The seen-keys spill of assembly: exact whatever its memory budget, and nothing left on
disk after it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from audience_server import seen as seen_module
from audience_server.seen import SeenUsers


def repeats_by_batch(seen: SeenUsers, batches: Sequence[Sequence[bytes]]) -> list[list[int]]:
    """The batches added in order, then the repeats as indexes within each batch."""
    for keys in batches:
        seen.add(b"".join(keys))
    found = list(seen.repeats())
    assert found == sorted(set(found))
    result: list[list[int]] = []
    start = 0
    for keys in batches:
        result.append([p - start for p in found if start <= p < start + len(keys)])
        start += len(keys)
    return result


def reference(batches: Sequence[Sequence[bytes]]) -> list[list[int]]:
    met: set[bytes] = set()
    result: list[list[int]] = []
    for keys in batches:
        result.append([])
        for index, key in enumerate(keys):
            if key in met:
                result[-1].append(index)
            met.add(key)
    return result


def test_seen_users_finds_repeats_within_and_across_batches(tmp_path: Path) -> None:
    seen = SeenUsers(tmp_path)
    try:
        k = [bytes([i]) * 16 for i in range(6)]
        batches = [[k[0], k[1], k[0], k[2]], [k[3], k[1], k[3], k[4], k[0]], [k[5]]]
        for keys in batches:
            seen.add(b"".join(keys))
        assert seen.folder.exists() and seen.count == 10
        assert list(seen.repeats()) == [2, 5, 6, 8]  # [2], then [1, 2, 4], then []
    finally:
        seen.close()
    assert list(tmp_path.iterdir()) == []  # its partitions and buckets too


@pytest.mark.parametrize(
    ("keys_in_memory", "buffer_bytes", "size"),
    # the default; sets that split and buffers flushed often (smaller: many tiny files)
    [(1 << 16, 4 << 20, 10_000), (100, 4096, 1_000)],
)
def test_seen_users_stays_exact_over_many_large_batches(
    tmp_path: Path, keys_in_memory: int, buffer_bytes: int, size: int
) -> None:
    """Batches of new keys, every other one carrying a single earlier key (it once
    corrupted the SQLite set this replaced); with a small budget partitions are split."""
    rng = random.Random(11)
    seen = SeenUsers(tmp_path, keys_in_memory=keys_in_memory, buffer_bytes=buffer_bytes)
    earlier: list[bytes] = []
    batches: list[list[bytes]] = []
    expected: list[list[int]] = []
    try:
        for batch_number in range(16):
            keys = [rng.randbytes(16) for _ in range(size)]
            expected.append([])
            if batch_number % 2 and earlier:
                keys[size // 3] = earlier[rng.randrange(len(earlier))]
                expected[-1] = [size // 3]
            batches.append(keys)
            earlier += keys[:100]
        assert repeats_by_batch(seen, batches) == expected
    finally:
        seen.close()
    assert list(tmp_path.iterdir()) == []


def test_seen_users_is_exact_when_keys_share_all_but_their_last_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splits down to the last byte, heavy repeats, and repeats' buckets of 16 positions."""
    monkeypatch.setattr(seen_module, "_SPAN_BITS", 4)
    rng = random.Random(5)
    pool = [bytes(15) + bytes([i]) for i in range(40)] + [rng.randbytes(16) for _ in range(40)]
    batches = [[rng.choice(pool) for _ in range(rng.randrange(0, 60))] for _ in range(30)]
    seen = SeenUsers(tmp_path, keys_in_memory=3, buffer_bytes=256)
    try:
        assert repeats_by_batch(seen, batches) == reference(batches)
    finally:
        seen.close()
    assert list(tmp_path.iterdir()) == []


def test_seen_users_closed_midway_leaves_nothing(tmp_path: Path) -> None:
    seen = SeenUsers(tmp_path, buffer_bytes=64)
    with pytest.raises(RuntimeError):
        try:
            seen.add(b"".join(bytes([i % 7]) * 16 for i in range(100)))
            assert next(seen.repeats()) == 7
            raise RuntimeError("the reader went away")
        finally:
            seen.close()
    assert list(tmp_path.iterdir()) == []

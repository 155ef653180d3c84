"""Unit tests of the pure parts of delivery: duplicate keys, the on-disk seen set, chunking,
segment names and the retry policy."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from audience_server.assembly import SeenUsers, chunked
from audience_server.digests import user_key
from audience_server.retry import RetryPolicy
from audience_server.states import segment_name


def test_user_key_ignores_key_order_but_not_values() -> None:
    a = {"email": "a@example.com", "purchase": [{"sku": 1, "n": 2}], "country": "US"}
    b = {"country": "US", "purchase": [{"n": 2, "sku": 1}], "email": "a@example.com"}
    assert user_key(a) == user_key(b)
    assert user_key(a) != user_key({**a, "country": "us"})
    assert user_key({"x": 1}) != user_key({"x": 1.0}) != user_key({"x": True})
    assert user_key({"x": [1, 2]}) != user_key({"x": [2, 1]})  # arrays keep their order


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


@pytest.mark.parametrize(("total", "size"), [(1, 10), (10, 10), (25, 10), (30, 7)])
def test_chunked_numbers_from_one_and_flags_the_last(total: int, size: int) -> None:
    users: list[dict[str, Any]] = [{"i": i} for i in range(total)]
    chunks = list(chunked(iter(users), size, total))
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [u for c in chunks for u in c.users] == users
    assert all(len(c.users) <= size for c in chunks)
    assert len(chunks) == -(-total // size)


@pytest.mark.parametrize(
    ("name", "prefix", "disable", "expected"),
    [
        ("High Value Customers Q1", "blotout_", False, "blotout_High_Value_Customers_Q1"),
        ("High Value Customers Q1", "blotout_", True, "High Value Customers Q1"),
        ("Lapsed \t\n buyers", "", False, "Lapsed_buyers"),
        ("Ünïcode  näme", "x_", False, "x_Ünïcode_näme"),
    ],
)
def test_segment_name(name: str, prefix: str, disable: bool, expected: str) -> None:
    assert segment_name(name, prefix, disable) == expected


def test_retry_policy_backs_off_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=300.0, max_attempts=10)
    rng = random.Random(7)
    for attempt, backoff in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (20, 300)]:
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert backoff / 2 <= min(delays) and max(delays) <= backoff
        assert max(delays) - min(delays) > backoff / 4  # jitter spreads retries out
    assert policy.allows_another(9) and not policy.allows_another(10)


def test_retry_policy_honours_retry_after() -> None:
    policy = RetryPolicy(base=1.0, cap=300.0)
    assert policy.delay(1, retry_after=30) == 30
    assert 8 <= policy.delay(5, retry_after=0) <= 16
    assert policy.delay(1, retry_after=10**9) == 24 * 3600


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

"""Assembly, pure: duplicates found across batches, the unique users streamed back, and
chunking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audience_server.assembly import Batch, chunked, find_duplicates, unique_users
from audience_server.digests import canonical_digest


@pytest.mark.parametrize(("total", "size"), [(1, 10), (10, 10), (25, 10), (30, 7)])
def test_chunked_numbers_from_one_and_flags_the_last(total: int, size: int) -> None:
    users: list[dict[str, Any]] = [{"i": i} for i in range(total)]
    chunks = list(chunked(iter(users), size, total))
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [u for c in chunks for u in c.users] == users
    assert all(len(c.users) <= size for c in chunks)
    assert len(chunks) == -(-total // size)


def test_duplicates_are_found_across_batches_and_dropped_when_streamed(tmp_path: Path) -> None:
    a, b, c, d = ({"email": f"{name}@example.com", "n": [1, 2]} for name in "abcd")
    b_reordered = {"n": [1, 2], "email": "b@example.com"}
    batches = [Batch(1, [a, b, a], []), Batch(2, [c, b_reordered], []), Batch(3, [d, c, a], [])]
    findings = list(find_duplicates(iter(batches), tmp_path))
    assert [(f.sequence, f.repeated, f.unique) for f in findings] == [
        (1, [2], 2),
        (2, [1], 1),
        (3, [1, 2], 1),
    ]
    assert findings[1].canonical_digest == canonical_digest([c, b])
    assert list(tmp_path.iterdir()) == []  # the seen set went when it ended
    recorded = [
        Batch(batch.sequence, batch.users, found.repeated)
        for batch, found in zip(batches, findings, strict=True)
    ]
    assert list(unique_users(iter(recorded))) == [a, b, c, d]
    assert list(unique_users(iter(batches))) == [a, b, a, c, b_reordered, d, c, a]  # none found yet


def test_finding_duplicates_again_finds_the_same(tmp_path: Path) -> None:
    users: list[Any] = [{"i": i % 3} for i in range(7)]
    first = list(find_duplicates(iter([Batch(1, users, [])]), tmp_path))
    again = list(find_duplicates(iter([Batch(1, users, [])]), tmp_path))
    assert first == again and first[0].repeated == [3, 4, 5, 6]


def test_a_reader_failing_midway_leaves_no_seen_set(tmp_path: Path) -> None:
    def batches() -> Any:
        yield Batch(1, [{"i": 1}], [])
        raise RuntimeError("users purged")

    found = find_duplicates(batches(), tmp_path)
    assert next(found).unique == 1
    with pytest.raises(RuntimeError):
        next(found)
    assert list(tmp_path.iterdir()) == []

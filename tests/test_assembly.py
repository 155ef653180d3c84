"""Assembly, pure: duplicates found across batches, the unique users streamed back, and
chunking."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from audience_server import assembly
from audience_server.assembly import Batch, Findings, chunked, find_duplicates, unique_users
from audience_server.digests import canonical_digest
from audience_server.seen import SeenUsers


def batch(sequence: int, users: list[Any], repeated: list[int] | None = None) -> Batch:
    """A batch as the worker reads it back: its users field as sent."""
    return Batch(sequence, orjson.dumps(users), repeated or [], len(users))


def users_of(batch: Batch) -> list[Any]:
    decoded: list[Any] = orjson.loads(batch.users_json)
    return decoded


def flat(batches: Any) -> list[bytes]:
    return [user for users in batches for user in users]


def decoded(users: Any) -> list[Any]:
    return [orjson.loads(user) for user in users]


@pytest.mark.parametrize(("total", "size"), [(1, 10), (10, 10), (25, 10), (30, 7)])
def test_chunked_numbers_from_one_and_flags_the_last(total: int, size: int) -> None:
    users = [orjson.dumps({"i": i}) for i in range(total)]
    batches = [users[i : i + 3] for i in range(0, total, 3)]  # batches smaller than chunks
    chunks = list(chunked(iter(batches), size, total))
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [u for c in chunks for u in c.encoded] == users
    assert [u for c in chunks for u in c.users] == decoded(users)
    assert all(len(c.users) <= size for c in chunks)
    assert len(chunks) == -(-total // size)


def test_duplicates_are_found_across_batches_and_dropped_when_streamed(tmp_path: Path) -> None:
    a, b, c, d = ({"email": f"{name}@example.com", "n": [1, 2]} for name in "abcd")
    b_reordered = {"n": [1, 2], "email": "b@example.com"}
    batches = [batch(1, [a, b, a]), batch(2, [c, b_reordered]), batch(3, [d, c, a])]
    findings = list(find_duplicates(iter(batches), tmp_path))
    assert [(f.sequence, f.repeated, f.unique) for f in findings] == [
        (1, [2], 2),
        (2, [1], 1),
        (3, [1, 2], 1),
    ]
    assert findings[1].canonical_digest == canonical_digest([c, b])
    assert list(tmp_path.iterdir()) == []  # the seen set went when it ended
    recorded = [
        stored._replace(repeated=found.repeated)
        for stored, found in zip(batches, findings, strict=True)
    ]
    assert decoded(flat(unique_users(iter(recorded)))) == [a, b, c, d]
    everyone = decoded(flat(unique_users(iter(batches))))  # none found yet
    assert everyone == [a, b, a, c, b_reordered, d, c, a]
    assert list(everyone[4]) == ["n", "email"]  # sent on as received: key order kept


def test_finding_duplicates_again_finds_the_same(tmp_path: Path) -> None:
    users: list[Any] = [{"i": i % 3} for i in range(7)]
    first = list(find_duplicates(iter([batch(1, users)]), tmp_path))
    again = list(find_duplicates(iter([batch(1, users)]), tmp_path))
    assert first == again and first[0].repeated == [3, 4, 5, 6]


def test_a_reader_failing_midway_leaves_no_seen_set(tmp_path: Path) -> None:
    """The batches are all read before the first findings: the failure comes first, and
    nothing of it is found or left on disk."""

    def batches() -> Any:
        yield batch(1, [{"i": 1}])
        raise RuntimeError("users purged")

    found = find_duplicates(batches(), tmp_path)
    with pytest.raises(RuntimeError):
        next(found)
    assert list(tmp_path.iterdir()) == []


def test_findings_abandoned_midway_leave_nothing(tmp_path: Path) -> None:
    batches = [batch(s, [{"i": i % 5} for i in range(20)]) for s in (1, 2, 3)]
    found = find_duplicates(iter(batches), tmp_path)
    assert next(found).repeated == list(range(5, 20))
    found.close()  # as the worker does when storing what it found fails
    assert list(tmp_path.iterdir()) == []


def reference(batches: list[Batch]) -> list[Findings]:
    """First occurrences in a plain in-memory set, keyed by json's own canonical form."""
    met: set[str] = set()
    findings = []
    for one in batches:
        users = users_of(one)
        repeated = []
        for index, user in enumerate(users):
            canonical = json.dumps(user, sort_keys=True)
            if canonical in met:
                repeated.append(index)
            met.add(canonical)
        unique = len(users) - len(repeated)
        findings.append(Findings(one.sequence, repeated, canonical_digest(users), unique))
    return findings


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: shuffled(item, rng) for key, item in items}
    if isinstance(value, list):
        return [shuffled(item, rng) for item in value]
    return value


def random_batches(rng: random.Random, count: int) -> list[Batch]:
    """Batches with repeats within and across them, sent with their keys reordered, and
    near misses (one value changed) that are not repeats."""
    made: list[dict[str, Any]] = []
    batches = []
    for sequence in range(1, count + 1):
        users: list[Any] = []
        for _ in range(rng.randrange(0, 400)):
            roll = rng.random()
            if made and roll < 0.15:
                users.append(shuffled(rng.choice(made), rng))
            elif users and roll < 0.25:
                users.append(shuffled(rng.choice(users), rng))
            elif made and roll < 0.3:
                near = dict(rng.choice(made))
                near["tags"] = [*near["tags"], "x"]
                users.append(near)
            else:
                n = len(made)
                user = {"email": f"u{n}@example.com", "tags": ["a", str(n % 3)], "attrs": {}}
                user["attrs"] = {"tier": n % 4, "country": "US", "n": n}
                made.append(user)
                users.append(user)
        batches.append(batch(sequence, users))
    return batches


@pytest.mark.parametrize("budget", ["default", "tiny"])
def test_findings_match_a_plain_in_memory_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    if budget == "tiny":  # partitions split, buffers flushed every few records
        spill = functools.partial(SeenUsers, keys_in_memory=8, buffer_bytes=512)
        monkeypatch.setattr(assembly, "SeenUsers", spill)
    rng = random.Random(2026)
    count = 50 if budget == "default" else 20  # a tiny budget makes many tiny files: slow
    batches = random_batches(rng, count)
    expected = reference(batches)
    assert sum(len(f.repeated) for f in expected) > 20 * count  # both kinds are there
    found = list(find_duplicates(iter(batches), tmp_path))
    assert found == expected
    assert list(tmp_path.iterdir()) == []
    again = find_duplicates(iter(batches), tmp_path)
    next(again)
    again.close()  # a crash midway: the run after it starts over and finds the same
    assert list(find_duplicates(iter(batches), tmp_path)) == expected
    assert list(tmp_path.iterdir()) == []


def test_users_are_streamed_as_received_and_on_one_line_each() -> None:
    sent = b'[{"b": 1,  "a": "\\u00e9"}, {\n  "a": 2\n}, {"a": 3}\r\n]'
    (users,) = unique_users(iter([Batch(1, sent, [2], 3)]))
    assert users == [b'{"b": 1,  "a": "\\u00e9"}', b'{"a":2}']


def test_keys_equal_for_equal_users_written_differently(tmp_path: Path) -> None:
    one = Batch(1, b'[{"a": 1, "b": [1, {"c": null}]}]', [], 1)
    two = Batch(2, b'[ {"b":[1,{"c":null}],"a":1} , {"a": 1.0, "b": [1, {"c": null}]} ]', [], 2)
    found = list(find_duplicates(iter([one, two]), tmp_path))
    assert [(f.repeated, f.unique) for f in found] == [([], 1), ([0], 1)]  # 1.0 is not 1

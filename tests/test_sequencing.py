from audience_server.sequencing import (
    base_settled_by,
    fits_base,
    inconsistency,
    missing_sequences,
)


def test_base_is_settled_by_zero_or_total() -> None:
    assert base_settled_by(0, 3) == 0
    assert base_settled_by(3, 3) == 1
    assert base_settled_by(1, 3) is None and base_settled_by(2, 3) is None
    assert base_settled_by(1, 1) == 1 and base_settled_by(0, 1) == 0


def test_ranges_per_base() -> None:
    assert [s for s in range(-1, 5) if fits_base(s, None, 3)] == [0, 1, 2, 3]
    assert [s for s in range(-1, 5) if fits_base(s, 0, 3)] == [0, 1, 2]
    assert [s for s in range(-1, 5) if fits_base(s, 1, 3)] == [1, 2, 3]


def test_missing_sequences_count_from_one_until_settled() -> None:
    assert missing_sequences(None, 3, [2]) == [1, 3]
    assert missing_sequences(0, 3, [0, 2]) == [1]
    assert missing_sequences(1, 3, [1, 2, 3]) == []


def test_inconsistency_reason() -> None:
    assert inconsistency(10, 10, 2) is None
    assert (
        inconsistency(10, 9, 2)
        == "all 2 batches arrived with 9 users in total, but totalUsers is 10"
    )

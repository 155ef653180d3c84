"""Sequence numbering rules: a session numbers its batches from 0 or from 1.

Pure logic. With ``totalBatches = N`` a sequence is one of ``0..N``; the first batch that
is 0 (base 0) or N (base 1) settles the base, after which the valid range is
``base..base+N-1``. Until then, ``1..N-1`` fit either base.
"""

from __future__ import annotations

from collections.abc import Iterable


def base_settled_by(sequence: int, total_batches: int) -> int | None:
    """The base this sequence settles, or None if it fits both."""
    if sequence == 0:
        return 0
    if sequence == total_batches:
        return 1
    return None


def fits_base(sequence: int, base: int | None, total_batches: int) -> bool:
    """Whether the sequence is valid once the session's base is ``base``."""
    if base is None:
        return 0 <= sequence <= total_batches
    return base <= sequence < base + total_batches


def missing_sequences(base: int | None, total_batches: int, received: Iterable[int]) -> list[int]:
    """Sequences not yet received; an unsettled base counts as 1."""
    first = 1 if base is None else base
    have = set(received)
    return [seq for seq in range(first, first + total_batches) if seq not in have]


def inconsistency(total_users: int, received_users: int, total_batches: int) -> str | None:
    """Why a session with every batch in is not whole, or None when it is."""
    if received_users == total_users:
        return None
    return (
        f"all {total_batches} batches arrived with {received_users} users in total, "
        f"but totalUsers is {total_users}"
    )

"""Digests of users in canonical JSON (sorted keys, compact): equal JSON values, equal
digests, whatever spacing or key order they were sent with. Pure."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

_canonical = msgspec.json.Encoder(order="sorted").encode


def user_key(user: Any) -> bytes:
    """Equal for users that are equal JSON values, key order ignored."""
    return hashlib.blake2b(_canonical(user), digest_size=16).digest()


def canonical_digest(users: Any) -> bytes:
    """sha256 of the users in canonical JSON: how a re-send is recognised after a purge."""
    return hashlib.sha256(_canonical(users)).digest()

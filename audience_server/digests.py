"""Digests of users in canonical JSON (sorted keys, compact): equal JSON values, equal
digests, whatever spacing or key order they were sent with. Pure."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import xxhash

_canonical = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.Decoder().decode
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode  # an array's items, as they are written
_key = xxhash.xxh3_128_digest


def user_key(user: Any, seed: int = 0) -> bytes:
    """16 bytes, equal for users that are equal JSON values (key order ignored)."""
    return _key(_canonical(user), seed)


def batch_keys(users_json: bytes, seed: int) -> tuple[bytes, bytes]:
    """The ``canonical_digest`` of a batch's users (a JSON array) and each user's
    ``user_key``, end to end (16 bytes each), from one canonical encoding of the whole
    batch (several times cheaper than encoding and hashing user by user with a
    cryptographic hash). Pure, and cheap to send between processes.

    The key is XXH3-128 with ``seed``: a fast hash, not a cryptographic one, so a seed
    chosen at random per assembly keeps a client from crafting users whose keys collide
    (a collision would drop a user as a repeat; by chance it is ~2^-128 per pair)."""
    canonical = _canonical(_decode(users_json))
    keys = b"".join([_key(user, seed) for user in _split(canonical)])
    return hashlib.sha256(canonical).digest(), keys


def canonical_digest(users: Any) -> bytes:
    """sha256 of the users in canonical JSON: how a re-send is recognised after a purge."""
    return hashlib.sha256(_canonical(users)).digest()

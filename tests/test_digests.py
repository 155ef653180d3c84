"""Digests of users in canonical JSON. Pure."""

from __future__ import annotations

from audience_server.digests import canonical_digest, user_key


def test_user_key_ignores_key_order_but_not_values() -> None:
    a = {"email": "a@example.com", "purchase": [{"sku": 1, "n": 2}], "country": "US"}
    b = {"country": "US", "purchase": [{"n": 2, "sku": 1}], "email": "a@example.com"}
    assert user_key(a) == user_key(b)
    assert user_key(a) != user_key({**a, "country": "us"})
    assert user_key({"x": 1}) != user_key({"x": 1.0}) != user_key({"x": True})
    assert user_key({"x": [1, 2]}) != user_key({"x": [2, 1]})  # arrays keep their order


def test_canonical_digest_ignores_spacing_and_key_order_but_not_user_order() -> None:
    users = [{"email": "a@example.com", "country": "US"}, {"email": "b@example.com"}]
    same = [{"country": "US", "email": "a@example.com"}, {"email": "b@example.com"}]
    assert canonical_digest(users) == canonical_digest(same)
    assert len(canonical_digest(users)) == 32
    assert canonical_digest(users) != canonical_digest(list(reversed(users)))

"""Normalization and hashing over the reference's test vectors and edge cases."""

from __future__ import annotations

import pytest

from audience_server import normalize as n

# From reference/providers.md §1b: sha256 of normalized values.
VECTORS = {
    "jane.doe@example.com": "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d",
    "15551234567": "d6736136ea896c1bfdc553e0e86e702c70d060d805696ca3e4e9e0961353860a",
    "jane": "81f8f6dde88365f3928796ec7aa53f72820b06db8664f5fe76a7eb13e24546a2",
    "doe": "799ef92a11af918e3fb741df42934f3b568ed2d93ac1df74f1b8d41a27932a6f",
    "94105": "e73ac16e69f060ee98b0fda5f66f48c4648ee26950e9bab3a097389853fd859e",
    "us": "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
    "+15551234567": "8a59780bb8cd2ba022bfa5ba2ea3b6e07af17a7d8b30c1f9b3390e36f69019e4",
    "cust-001": "13631d3124c03f82c852ced91df498e474a91023badf893c39bc0d7308db07e0",
}


@pytest.mark.parametrize(("value", "digest"), VECTORS.items())
def test_reference_vectors(value: str, digest: str) -> None:
    assert n.sha256(value) == digest
    assert n.hash_value(value) == digest


def test_normalized_inputs_hash_to_the_reference_vectors() -> None:
    assert n.hash_value(n.email("  Jane.Doe@Example.COM ")) == VECTORS["jane.doe@example.com"]
    assert n.hash_value(n.name(" Jane ")) == VECTORS["jane"]
    assert n.hash_value(n.name("DOE")) == VECTORS["doe"]
    assert n.hash_value(n.postal_code("94105-1234", "US")) == VECTORS["94105"]
    assert n.hash_value(n.country(" US")) == VECTORS["us"]


def test_already_hashed_values_are_not_hashed_twice() -> None:
    digest = VECTORS["+15551234567"]
    assert n.is_sha256(digest) and n.is_sha256(digest.upper())
    assert n.hash_value(digest.upper()) == digest
    assert n.email(digest.upper()) == digest
    assert n.phone_e164(digest) == n.phone_digits(digest.upper()) == digest
    assert n.name(digest) == n.postal_code(digest, "US") == digest
    assert not n.is_sha256(digest[:-1]) and not n.is_sha256(digest + "0")


@pytest.mark.parametrize(
    ("raw", "kwargs", "expected"),
    [
        ("  Jane.Doe@Example.com ", {}, "jane.doe@example.com"),
        ("jane doe@example.com", {}, "janedoe@example.com"),
        ("J.Ane.Doe+Shop@Gmail.com", {"dots": "gmail", "drop_plus": True}, "janedoe@gmail.com"),
        ("j.a.n.e@googlemail.com", {"dots": "gmail"}, "jane@googlemail.com"),
        ("user.name+NYC@Example.com", {"dots": "gmail"}, "user.name+nyc@example.com"),
        ("user.name+NYC@Example.com", {"drop_plus": True}, "user.name@example.com"),
        ("first.last@example.com", {"dots": "all"}, "firstlast@example.com"),
        ("not-an-email", {}, None),
        ("@example.com", {}, None),
        ("jane@localhost", {}, None),
        ("+tag@gmail.com", {"drop_plus": True}, None),
        (42, {}, None),
        ("   ", {}, None),
    ],
)
def test_email(raw: object, kwargs: dict[str, object], expected: str | None) -> None:
    assert n.email(raw, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("+1 (415) 555-0100", None, "+14155550100"),
        ("(415) 555-0100", "US", "+14155550100"),
        ("415.555.0100", "us", "+14155550100"),
        (14155550100, None, "+14155550100"),
        ("1 415 555 0100", "US", "+14155550100"),
        ("07911 123456", "GB", "+447911123456"),
        ("447911123456", "GB", "+447911123456"),
        ("0044 7911 123456", None, "+447911123456"),
        ("+447911123456", "US", "+447911123456"),  # an explicit + wins over the country
        ("030 123456", "DE", "+4930123456"),
        ("4155550100", None, None),  # national digits without a country: unknown
        ("12", "US", None),
        ("call me", "US", None),
        (True, "US", None),
        ("", "US", None),
    ],
)
def test_phone_e164(raw: object, country: str | None, expected: str | None) -> None:
    assert n.phone_e164(raw, country) == expected
    assert n.phone_digits(raw, country) == (expected[1:] if expected else None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Jane ", "jane"),
        ("O'Brien", "obrien"),
        ("Jean-Luc", "jeanluc"),
        ("José", "josé"),
        ("JOSÉ", "josé"),
        ("Jose\u0301", "josé"),  # decomposed input comes out composed (NFC)
        ("Zoë", "zoë"),
        ("李", "李"),
        ("Müller 3rd", "müllerrd"),
        ("...", None),
        (None, None),
    ],
)
def test_name(raw: object, expected: str | None) -> None:
    assert n.name(raw) == expected


def test_unicode_names_hash_as_utf8() -> None:
    assert n.hash_value(n.name("José")) == n.sha256("josé")
    assert n.sha256("josé") != n.sha256("jose")


@pytest.mark.parametrize(
    ("raw", "expected"), [("US", "us"), (" gb ", "gb"), ("USA", None), ("U1", None), (1, None)]
)
def test_country(raw: object, expected: str | None) -> None:
    assert n.country(raw) == expected


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("94105", "US", "94105"),
        ("94105-1234", "US", "94105"),
        ("941051234", None, "94105"),
        (94105, "US", "94105"),
        ("SW1A 1AA", "GB", "sw1a1aa"),
        ("10115", "DE", "10115"),
        (" ", "US", None),
    ],
)
def test_postal_code(raw: object, country: str | None, expected: str | None) -> None:
    assert n.postal_code(raw, country) == expected


def test_external_ids_are_kept_as_sent() -> None:
    assert n.external_id(" cust-001 ") == "cust-001"
    assert n.external_id(1234) == "1234"
    assert n.external_id("") is None

"""Normalizing and hashing identifiers the way ad platforms match them.

Pure functions. Each takes a raw value as received (any JSON type) and returns the
normalized string, or None when the value cannot be used (the adapter then counts the
user as invalid if nothing usable is left). Platform-specific choices (gmail dots, the
``+`` on phones, what is hashed) are the adapters' to make, through the parameters here.

A value that already is a SHA-256 hex digest is passed through (lowercased) by every
function here and by :func:`hash_value`, never hashed twice: clients often send
pre-hashed emails and phones.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Literal

import phonenumbers

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_WHITESPACE = re.compile(r"\s+")
_US_ZIP = re.compile(r"(\d{5})(?:-?\d{4})?")
_COUNTRY = re.compile(r"[A-Za-z]{2}")
GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})

DotRule = Literal["keep", "gmail", "all"]


def is_sha256(value: object) -> bool:
    """Whether the value already is a SHA-256 hex digest (64 hex characters)."""
    return isinstance(value, str) and _SHA256.fullmatch(value.strip()) is not None


def sha256(value: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 bytes."""
    return hashlib.sha256(value.encode()).hexdigest()


def hash_value(value: str | None) -> str | None:
    """SHA-256 of a normalized value; a value that already is a digest passes as is."""
    if value is None:
        return None
    if is_sha256(value):
        return value.strip().lower()
    return sha256(value)


def hashed(value: object, normalizer: Callable[[object], str | None]) -> str | None:
    """SHA-256 of ``normalizer(value)``; a digest passes through (lowercased) before the
    normalizer sees it, even one that would reject it (``country``)."""
    if is_sha256(value):
        return str(value).strip().lower()
    return hash_value(normalizer(value))


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text or None


def email(value: object, *, dots: DotRule = "keep", drop_plus: bool = False) -> str | None:
    """Trimmed, lowercase, no whitespace inside. ``dots``: remove the local part's dots on
    Gmail domains only (Google) or on every domain (TikTok); ``drop_plus`` removes a
    ``+tag``. A SHA-256 digest is returned lowercased, untouched otherwise."""
    text = _text(value)
    if text is None:
        return None
    if is_sha256(text):
        return text.lower()
    text = _WHITESPACE.sub("", text).lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or "." not in domain or domain.startswith(".") or "@" in local:
        return None
    if dots == "all" or (dots == "gmail" and domain in GMAIL_DOMAINS):
        local = local.replace(".", "")
    if drop_plus:
        local = local.split("+", 1)[0]
    if not local:
        return None
    return f"{local}@{domain}"


def phone_e164(value: object, country: str | None = None) -> str | None:
    """``+14155550100``: the number in E.164. A national number needs ``country`` (ISO
    alpha-2) for its calling code; digits without ``+`` and without a country are read as
    already international. Numbers that cannot be valid are None. A SHA-256 digest is
    returned lowercased (it was normalized before it was hashed, one hopes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    text = _text(value)
    if text is None:
        return None
    if is_sha256(text):
        return text.lower()
    region = country.strip().upper() if country and _COUNTRY.fullmatch(country.strip()) else None
    candidates = [text]
    if not text.startswith("+"):
        digits = re.sub(r"\D", "", text)
        if text.startswith("00"):
            candidates = ["+" + digits[2:]]
        elif region is None:
            candidates = ["+" + digits]
        else:  # national, or international written without its +
            candidates = [text, "+" + digits]
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None


def phone_digits(value: object, country: str | None = None) -> str | None:
    """E.164 without the ``+`` (``14155550100``), as Meta and TikTok match phones."""
    e164 = phone_e164(value, country)
    if e164 is None or not e164.startswith("+"):
        return e164  # None, or a digest passed through
    return e164[1:]


def name(value: object) -> str | None:
    """Lowercase letters only: punctuation, digits, symbols and spaces removed; accented
    and non-Latin letters kept (UTF-8), in NFC."""
    text = _text(value)
    if text is None:
        return None
    if is_sha256(text):
        return text.lower()
    text = unicodedata.normalize("NFC", text.lower())
    kept = "".join(ch for ch in text if unicodedata.category(ch).startswith(("L", "M")))
    return kept or None


def country(value: object) -> str | None:
    """ISO 3166-1 alpha-2, lowercase (``us``); anything else is None."""
    text = _text(value)
    if text is None or not _COUNTRY.fullmatch(text):
        return None
    return text.lower()


def postal_code(value: object, country_code: str | None = None) -> str | None:
    """Lowercase, no whitespace; a US ZIP keeps its first 5 digits (ZIP+4 dropped)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _text(value)
    if text is None:
        return None
    if is_sha256(text):
        return text.lower()
    text = _WHITESPACE.sub("", text).lower()
    us = country_code is None or country_code.strip().lower() == "us"
    if us and (match := _US_ZIP.fullmatch(text)):
        return match.group(1)
    return text


def external_id(value: object) -> str | None:
    """The advertiser's own id, trimmed; never hashed by these functions."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)

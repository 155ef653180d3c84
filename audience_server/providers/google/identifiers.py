"""Pure: a user as received -> the Data Manager ``AudienceMember``, normalized as Google's
own formatter does before SHA-256.

The rules, and where each comes from (``format.py`` is ``googleads/data-manager-python``
@014f7115bb3b54c3be90a7955be36da9f11fa679 ``google/ads/datamanager_util/format.py``; "the
page" is https://developers.google.com/data-manager/api/get-started/formatting):

- email: trimmed, lowercase (format.py ``format_email_address``); inner whitespace removed
  (the page: "trim leading, trailing and intermediate whitespace"; format.py refuses such an
  address instead); on gmail.com / googlemail.com only, the local part loses every ``.`` and
  a ``+tag`` (format.py); other domains keep both;
- phone: E.164 with ``+`` (format.py ``format_phone_number`` keeps the digits after a
  ``+``); a national number is read in the user's ``country`` first (the page:
  "include the plus sign and the country code", ``(800)555-0100`` -> ``+18005550100``);
- givenName / familyName: trimmed, lowercase (format.py ``format_given_name`` /
  ``format_family_name``), inner spaces kept, a run of them as one (format.py hashes the
  string as it is since it stopped removing whitespace in ``hash_string``); no prefix such
  as Mrs. nor suffix such as Jr. (the page); punctuation removed (the December 2026 reading
  in providers.md; format.py itself leaves punctuation in names);
- regionCode: ISO alpha-2, upper case, NOT hashed (format.py ``format_region_code``);
- postalCode: trimmed, otherwise as given, NOT hashed (format.py ``format_postal_code``; the
  page: a US ZIP+4 "may improve your match rate", so it is kept).

A value that already is a SHA-256 hex digest passes through, lowercased.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from ... import normalize

_HONORIFICS = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr"})
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv"})
MAX_POSTAL = 16  # longer is no postal code anywhere


def email(value: object) -> str | None:
    """Google's email form: gmail.com / googlemail.com lose local-part dots and ``+tag``;
    other domains keep both (``normalize.email(drop_plus=True)`` would strip every domain)."""
    text = normalize.email(value, dots="gmail")
    if text is None or normalize.is_sha256(text):
        return text
    local, _, domain = text.rpartition("@")
    if domain in normalize.GMAIL_DOMAINS:
        local = local.split("+", 1)[0]
        if not local:
            return None
    return f"{local}@{domain}"


def name(value: object) -> str | None:
    """Lowercase words one space apart, punctuation, digits and symbols dropped, a leading
    honorific (Mrs.) and trailing generational suffixes (Jr.) too; a lone word is kept
    whatever it is. Accented and non-Latin letters stay (NFC)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if normalize.is_sha256(text):
        return text.lower()
    text = unicodedata.normalize("NFC", text.lower())
    kept = "".join(
        ch if unicodedata.category(ch)[0] in "LM" else " " if ch.isspace() else "" for ch in text
    )
    words = kept.split()
    while len(words) > 1 and words[0] in _HONORIFICS:
        words.pop(0)
    while len(words) > 1 and words[-1] in _SUFFIXES:
        words.pop()
    return " ".join(words) or None


def postal_code(value: object) -> str | None:
    """Trimmed and otherwise as given (format.py); not hashed, so Google reads it itself."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > MAX_POSTAL or normalize.is_sha256(text):
        return None
    return text


def region_code(value: object) -> str | None:
    """ISO 3166-1 alpha-2, upper case (format.py ``format_region_code``)."""
    region = normalize.country(value)
    return None if region is None else region.upper()


def phone(value: object, country: str | None) -> str | None:
    """E.164 with ``+``; a national number read in ``country``."""
    return normalize.phone_e164(value, country)


def audience_member(user: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``AudienceMember`` for one user as received, or None when nothing is usable."""
    identifiers: list[dict[str, Any]] = []
    hashed_email = normalize.hashed(user.get("email"), email)
    if hashed_email is not None:
        identifiers.append({"emailAddress": hashed_email})
    raw_country = user.get("country")
    country = raw_country if isinstance(raw_country, str) else None
    hashed_phone = normalize.hashed(user.get("phone"), lambda value: phone(value, country))
    if hashed_phone is not None:
        identifiers.append({"phoneNumber": hashed_phone})
    address = _address(user)
    if address is not None:
        identifiers.append({"address": address})
    if not identifiers:
        return None
    return {"userData": {"userIdentifiers": identifiers}}


def _address(user: Mapping[str, Any]) -> dict[str, str] | None:
    region = region_code(user.get("country"))
    if region is None:
        return None
    given = normalize.hashed(user.get("firstName"), name)
    family = normalize.hashed(user.get("lastName"), name)
    postal = postal_code(user.get("postalCode"))
    if given is None or family is None or postal is None:
        return None
    return {"givenName": given, "familyName": family, "regionCode": region, "postalCode": postal}


def audience_members(users: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The members to send and how many users had nothing usable."""
    members: list[dict[str, Any]] = []
    invalid = 0
    for user in users:
        member = audience_member(user)
        if member is None:
            invalid += 1
        else:
            members.append(member)
    return members, invalid

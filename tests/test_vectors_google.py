"""Google normalization vectors: input -> normalized string -> SHA-256, each row citing the
rule it comes from. The digests were computed once and are written here; the test checks the
adapter's output against them, so a change of rule fails here before it fails a match.

Sources: ``format.py`` is googleads/data-manager-python@014f7115bb3b54c3be90a7955be36da9f11fa679
``google/ads/datamanager_util/format.py`` (and ``tests/formatter_test.py``, whose own digests
four rows below reproduce: marked "Google's digest"); "page" is the Data Manager "Format user
data" page, https://developers.google.com/data-manager/api/get-started/formatting.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from audience_server.providers.google import audience_member

# (field, input, country, normalized, sha256 hex or None when Google takes it in clear, rule)
Row = tuple[str, str, str | None, str, str | None, str]

VECTORS: list[Row] = [
    # -- emailAddress ------------------------------------------------------------------------
    (
        "email",
        " alexz@example.com\t",
        None,
        "alexz@example.com",
        "509e933019bb285a134a9334b8bb679dff79d0ce023d529af4bd744d47b4fd8a",
        "format.py format_email_address: strip (Google's digest)",
    ),
    (
        "email",
        "QuinnY@EXAMPLE.com",
        None,
        "quinny@example.com",
        "d00d0a7c6d491b3782fd78b410748048859e16467faa0651f060978d4bb343cc",
        "format.py format_email_address: lower()",
    ),
    (
        "email",
        "  Cloudy.SanFrancisco+Shopping@Gmail.com ",
        None,
        "cloudysanfrancisco@gmail.com",
        "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4",
        "format.py: gmail.com drops '+' and what follows, then every '.'",
    ),
    (
        "email",
        "Jefferson.LOVES.Hiking@googlemail.com",
        None,
        "jeffersonloveshiking@googlemail.com",
        "2824967181c781aced84c32bf8bb51fc6401202eeff88263776f63c99df9314c",
        "format.py: googlemail.com is a Gmail domain too",
    ),
    (
        "email",
        "User.Name+NYC@Example.com",
        None,
        "user.name+nyc@example.com",
        "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac",
        "format.py / page: other domains keep dots and '+'",
    ),
    (
        "email",
        "jane.doe+news@gmail.co.uk",
        None,
        "jane.doe+news@gmail.co.uk",
        "ea139237c278c251ec3a368460a22ec96c72c1991ccc489bb61d762f001e913d",
        "format.py: only gmail.com and googlemail.com exactly",
    ),
    # -- phoneNumber -------------------------------------------------------------------------
    (
        "phone",
        "+1 800-555-0100",
        None,
        "+18005550100",
        "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30",
        "format.py format_phone_number: '+' then digits only (Google's digest)",
    ),
    (
        "phone",
        "1-800-555-0100   ",
        None,
        "+18005550100",
        "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30",
        "format.py: digits without '+' and without a country are international",
    ),
    (
        "phone",
        "(800) 555-0100",
        "US",
        "+18005550100",
        "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30",
        "page: E.164 with the country code; a national number read in the user's country",
    ),
    (
        "phone",
        "+44-113-496-0987",
        None,
        "+441134960987",
        "0fac52d27ec377f8ad2f9de75d1f9bace693237e31868ae6f4616b8bbd0e94fb",
        "format.py (formatter_test: '+44-113-496-0987' -> '+441134960987')",
    ),
    (
        "phone",
        "441134960987",
        None,
        "+441134960987",
        "0fac52d27ec377f8ad2f9de75d1f9bace693237e31868ae6f4616b8bbd0e94fb",
        "format.py (formatter_test: '441134960987' -> '+441134960987')",
    ),
    (
        "phone",
        "0113 496 0987",
        "GB",
        "+441134960987",
        "0fac52d27ec377f8ad2f9de75d1f9bace693237e31868ae6f4616b8bbd0e94fb",
        "page: the trunk 0 goes, the country code comes (E.164)",
    ),
    (
        "phone",
        "030 901820",
        "DE",
        "+4930901820",
        "4db5829924ee5c466cbd9ac69b2a6af527f758614fa3b3aec8c89b16a709a678",
        "page: E.164 with the country code (Germany)",
    ),
    (
        "phone",
        "(613) 555-0101",
        "CA",
        "+16135550101",
        "60a5de978ce104fa13abbab1a34d693b3ad48d3b082ff4e58c6e485bf4f751a4",
        "page: E.164 with the country code (Canada)",
    ),
    # -- givenName / familyName ----------------------------------------------------------------
    (
        "firstName",
        "  GivenName  ",
        None,
        "givenname",
        "128a07bfe2df877c52076e60d7774cf5baaa046c5a6c48daf30ff43ecca2f814",
        "format.py format_given_name: strip().lower() (Google's digest)",
    ),
    (
        "lastName",
        "  FamilyName ",
        None,
        "familyname",
        "77762c287e61ce065bee5c15464012c6fbe088398b8057627d5577249430d574",
        "format.py format_family_name: strip().lower() (Google's digest)",
    ),
    (
        "firstName",
        "Mary  Ann",
        None,
        "mary ann",
        "343b97011010c3549fe7fcd6c226ed9431ea37b0b77ed78f6300a0098925faf1",
        "format.py: inner spaces kept (hash_string hashes as is); a run of them as one",
    ),
    (
        "firstName",
        "Mrs. Anne-Marie",
        None,
        "annemarie",
        "67495eb5715de43c26f7c18b25cc7f62a7540236516bd59d5162a6f743598083",
        "page: no prefixes such as Mrs.; punctuation removed (providers.md corrections)",
    ),
    (
        "lastName",
        "O'Neil Jr.",
        None,
        "oneil",
        "67a42a846e98e3c1a96cd6ba14883a5ea05990cd93964ce8b832aa9497ca785c",
        "page: no suffixes such as Jr.; punctuation removed (providers.md corrections)",
    ),
    (
        "firstName",
        "Zoë",
        None,
        "zoë",
        "2752b88686847fa5c86f47b94ce652b7b3f22a91c37617d451a4db9afa431450",
        "format.py: lower() keeps accents; hashed as UTF-8 (hash_string encode())",
    ),
    (
        "lastName",
        "García Márquez",
        None,
        "garcía márquez",
        "036e1ce1018d8d118f3233156f651ac0e844371425539e1542a5466cb116a7e8",
        "format.py: accents and the inner space kept",
    ),
    (
        "firstName",
        "JOSÉ",
        None,
        "josé",
        "d994e1d001886fe5b45b1267bd1fa2b752ac50742579bd3dad7b2a2aa0ed6866",
        "format.py: lower() of an accented capital",
    ),
    # -- postalCode / regionCode: in clear -----------------------------------------------------
    (
        "postalCode",
        "94105-1234",
        "US",
        "94105-1234",
        None,
        "format.py format_postal_code: strip only; page: ZIP+4 may improve the match rate",
    ),
    ("postalCode", " SW1A 1AA ", "GB", "SW1A 1AA", None, "format.py: strip, nothing else"),
    ("postalCode", "K1A 0B1", "CA", "K1A 0B1", None, "format.py: strip, nothing else"),
    ("postalCode", "10115", "DE", "10115", None, "format.py: strip; not hashed (page)"),
    ("postalCode", " 1229-076  ", "PT", "1229-076", None, "format.py (formatter_test)"),
    ("country", " us", None, "US", None, "format.py format_region_code: strip().upper()"),
]


def test_the_table_is_big_enough() -> None:
    assert len(VECTORS) >= 20
    hashed = [row for row in VECTORS if row[4] is not None]
    for _, _, _, normalized, digest, _ in hashed:  # the literals are what they say
        assert hashlib.sha256(normalized.encode()).hexdigest() == digest


def _user(field: str, raw: str, country: str | None) -> dict[str, Any]:
    address = {"firstName": "Al", "lastName": "Doe", "country": country or "US"}
    if field in ("email", "phone"):
        return {field: raw, **({"country": country} if country else {})}
    if field == "country":
        return {**address, "country": raw, "postalCode": "94105"}
    if field == "postalCode":
        return {**address, "postalCode": raw}
    return {**address, "postalCode": "94105", field: raw}


_KEYS = {
    "email": "emailAddress",
    "phone": "phoneNumber",
    "firstName": "givenName",
    "lastName": "familyName",
    "postalCode": "postalCode",
    "country": "regionCode",
}


@pytest.mark.parametrize(
    ("field", "raw", "country", "normalized", "digest", "rule"),
    VECTORS,
    ids=[f"{row[0]}:{row[1].strip()}" for row in VECTORS],
)
def test_google_vector(
    field: str, raw: str, country: str | None, normalized: str, digest: str | None, rule: str
) -> None:
    member = audience_member(_user(field, raw, country))
    assert member is not None, rule
    identifiers = member["userData"]["userIdentifiers"]
    key = _KEYS[field]
    if field in ("email", "phone"):
        (sent,) = [item[key] for item in identifiers if key in item]
    else:
        (address,) = [item["address"] for item in identifiers if "address" in item]
        sent = address[key]
    assert sent == (digest if digest is not None else normalized), rule

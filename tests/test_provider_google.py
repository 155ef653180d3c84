"""The ``google`` provider (Customer Match via the Data Manager API): its user -> member
mapping, its options and error mapping, the emulator's strictness, and delivery through
the real app and worker to the emulator on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from audience_server.destinations import DestinationConfig, DestinationsError, OptionError
from audience_server.models import delivery_attempts
from audience_server.providers import configured_destinations
from audience_server.providers.base import (
    Chunk,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.google import (
    GoogleProvider,
    audience_member,
    audience_members,
    email,
    name,
    outcomes,
    platform_error,
)
from audience_server.settings import Settings
from tests.emulators.google import GoogleEmulator, Member
from tests.helpers import NAME, destinations, errors, form, send, serve, status

TOKEN = "ya29.token-main"
ACCOUNT = "1234567890"
SEGMENT = "blotout_High_Value_Customers_Q1"
GOOGLE_ERRORS = "Google Data Manager"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def email_id(normalized: str) -> tuple[str, ...]:
    return ("emailAddress", sha(normalized))


def phone_id(e164: str) -> tuple[str, ...]:
    return ("phoneNumber", sha(e164))


def address_id(given: str, family: str, region: str, postal: str) -> tuple[str, ...]:
    return ("address", sha(given), sha(family), region, postal)


@pytest.fixture
def google() -> Iterator[GoogleEmulator]:
    with GoogleEmulator() as emulator:
        emulator.grant(TOKEN, ACCOUNT)
        yield emulator


def options(google: GoogleEmulator, **extra: Any) -> dict[str, Any]:
    return {"base_url": google.base_url, "access_token": TOKEN, "account_id": ACCOUNT, **extra}


def provider(google: GoogleEmulator, **extra: Any) -> GoogleProvider:
    config = DestinationConfig("google-ads", "google", options(google, **extra), line=1)
    return GoogleProvider.from_config(config)


# --- users with known normalized forms --------------------------------------------------------


def mixed_users(count: int, start: int = 0) -> tuple[list[dict[str, Any]], set[Member]]:
    """Users of five shapes, and the members Google should hold for them."""
    users: list[dict[str, Any]] = []
    expected: set[Member] = set()
    for i in range(start, start + count):
        kind = i % 5
        if kind == 0:  # email only, untidy
            user: dict[str, Any] = {"edgeTagId": f"et_{i}", "email": f"  Person.{i}@Example.COM "}
            held = {email_id(f"person.{i}@example.com")}
        elif kind == 1:  # national phone only, read in the user's country
            user = {"phone": f"(415) {200 + i // 10_000}-{i % 10_000:04d}", "country": "US"}
            held = {phone_id(f"+1415{200 + i // 10_000}{i % 10_000:04d}")}
        elif kind == 2:  # gmail with dots and a +tag, and a whole address
            user = {
                "email": f"First.Last{i}+promo@GMail.com",
                "firstName": " Mrs. Anne-Marie ",
                "lastName": "O'Neil Jr.",
                "country": "us",
                "postalCode": f"{10_000 + i:05d}-1234",
                "purchase": [{"sku": "a", "amount": 3}],
            }
            held = {
                email_id(f"firstlast{i}@gmail.com"),
                address_id("annemarie", "oneil", "US", f"{10_000 + i:05d}-1234"),
            }
        elif kind == 3:  # integer phone and an address abroad, no email
            user = {
                "phone": 7_911_000_000 + i,
                "firstName": "Zoë",
                "lastName": "Brontë",
                "country": "GB",
                "postalCode": "SW1A 1AA",
            }
            held = {
                phone_id(f"+44{7_911_000_000 + i}"),
                address_id("zoë", "brontë", "GB", "SW1A 1AA"),
            }
        else:  # a pre-hashed email; the address lacks its postal code, so it is left out
            user = {
                "email": sha(f"hashed{i}@example.com").upper(),
                "firstName": "Al",
                "lastName": "Smith",
                "country": "US",
            }
            held = {email_id(f"hashed{i}@example.com")}
        users.append(user)
        expected.add(frozenset(held))
    return users, expected


UNUSABLE: list[dict[str, Any]] = [
    {"email": "not-an-email"},
    {"phone": "12"},
    {"firstName": "Jane", "lastName": "Doe", "country": "US"},
    {"externalId": "crm-7"},
    {"email": None, "phone": None},
    {"edgeTagId": "et_only"},
    {
        "email": "@gmail.com",
        "country": "USA",
        "postalCode": "94105",
        "firstName": "A",
        "lastName": "B",
    },
    {"phone": "not a phone", "country": "US"},
    {"email": "+promo@gmail.com"},
    {"phone": 12},
    {"email": "jane@localhost"},
    {"postalCode": "94105", "country": "US", "lastName": "Doe"},
    {"firstName": "...", "lastName": "Doe", "country": "US", "postalCode": "94105"},
]


def deliver(
    client: TestClient,
    key: str,
    users: list[dict[str, Any]],
    *,
    kind: str = "custom",
    batch: int = 10_000,
    query: str = "?sync=true",
) -> httpx2.Response:
    """Upload ``users`` as one session; the answer to its completing (last) batch."""
    parts = [users[i : i + batch] for i in range(0, len(users), batch)]
    response = None
    for sequence, part in enumerate(parts, 1):
        fields = form(key, sequence, len(parts), len(users), part, name=NAME, type=kind)
        response = send(client, fields, query if sequence == len(parts) else "")
        if sequence != len(parts):
            assert response.status_code == 200, response.text
    assert response is not None
    return response


STATUS = ("retrieveRequestStatus", 200)


def calls_made(google: GoogleEmulator) -> list[tuple[str, int]]:
    """(route, status) of the calls that act, the outcome polls left out."""
    return [item for item in google.routes() if item[0] != "retrieveRequestStatus"]


def the_list(google: GoogleEmulator, account: str = ACCOUNT) -> str:
    lists = google.lists(account)
    assert list(lists) == [SEGMENT]
    return lists[SEGMENT]


# --- normalization and mapping ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("  Cloudy.SanFrancisco+Shopping@Gmail.com ", "cloudysanfrancisco@gmail.com"),
        ("first.last@googlemail.com", "firstlast@googlemail.com"),
        ("User.Name+NYC@Example.com", "user.name+nyc@example.com"),
        ("jane doe @example.com", "janedoe@example.com"),
        ("+promo@gmail.com", None),
        ("not-an-email", None),
        ("", None),
        (None, None),
        (42, None),
        (sha("a@b.co").upper(), sha("a@b.co")),
    ],
)
def test_email_follows_googles_format_page(raw: object, normalized: str | None) -> None:
    assert email(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (" Mrs. Anne-Marie ", "annemarie"),
        ("O'Neil Jr.", "oneil"),
        ("Smith, III", "smith"),
        ("Dr", "dr"),  # a lone word is a name, whatever it looks like
        ("Mary  Ann", "mary ann"),  # inner spaces kept, a run as one
        ("José", "josé"),
        ("...", None),
        (None, None),
    ],
)
def test_names_lose_punctuation_honorifics_and_suffixes(
    raw: object, normalized: str | None
) -> None:
    assert name(raw) == normalized


def test_a_whole_user_becomes_three_identifiers() -> None:
    user = {
        "email": " Jane.Doe@Example.com",
        "phone": "(415) 555-0123",
        "firstName": "Jane",
        "lastName": "Doe",
        "country": "us",
        "postalCode": "94105-1234",
        "externalId": "crm-1",
        "purchase": 12,
    }
    assert audience_member(user) == {
        "userData": {
            "userIdentifiers": [
                {"emailAddress": sha("jane.doe@example.com")},
                {"phoneNumber": sha("+14155550123")},
                {
                    "address": {
                        "givenName": sha("jane"),
                        "familyName": sha("doe"),
                        "regionCode": "US",
                        "postalCode": "94105-1234",
                    }
                },
            ]
        }
    }


def test_partial_users() -> None:
    def ids_of(user: dict[str, Any]) -> list[dict[str, Any]] | None:
        found = audience_member(user)
        return None if found is None else list(found["userData"]["userIdentifiers"])

    # a national phone is read in the user's country; an integer phone is a phone
    assert ids_of({"phone": "020 7946 0018", "country": "GB"}) == [
        {"phoneNumber": sha("+442079460018")}
    ]
    assert ids_of({"phone": 14155550123}) == [{"phoneNumber": sha("+14155550123")}]
    # pre-hashed values pass through, lowercased; postal codes and regions never hash
    digest = sha("x").upper()
    assert ids_of(
        {
            "phone": digest,
            "firstName": digest,
            "lastName": "Doe",
            "country": "FR",
            "postalCode": "75001",
        }
    ) == [
        {"phoneNumber": sha("x")},
        {
            "address": {
                "givenName": sha("x"),
                "familyName": sha("doe"),
                "regionCode": "FR",
                "postalCode": "75001",
            }
        },
    ]
    # an address needs all four parts; alone it is enough to be usable
    whole = {"firstName": "A", "lastName": "B", "country": "US", "postalCode": "10001"}
    assert ids_of(whole) == [
        {
            "address": {
                "givenName": sha("a"),
                "familyName": sha("b"),
                "regionCode": "US",
                "postalCode": "10001",
            }
        }
    ]
    for part in whole:
        assert ids_of({k: v for k, v in whole.items() if k != part}) is None
    assert ids_of({**whole, "country": "United States"}) is None
    for user in [*UNUSABLE, {"phone": True}, {"email": 12345}]:
        assert ids_of(user) is None, user


def test_invalid_users_are_counted_not_sent() -> None:
    users, _ = mixed_users(10)
    members, invalid = audience_members([*users[:4], *UNUSABLE, *users[4:]])
    assert (len(members), invalid) == (10, len(UNUSABLE))


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"access_token": None}, "access_token"),
        ({"access_token": " "}, "access_token"),
        ({"account_id": None}, "account_id"),
        ({"account_id": "act_123"}, "account_id"),
        ({"account_type": "GOOGLE_ANALYTICS"}, "account_type"),
        ({"login_account_type": "GOOGLE_ADS"}, "login_account_id"),
        ({"login_account_id": "12-x"}, "login_account_id"),
        ({"linked_account_id": "1", "linked_account_type": "YOUTUBE"}, "linked_account_type"),
        ({"user_list_id": "abc"}, "user_list_id"),
        ({"user_lists": ["1"]}, "user_lists"),
        ({"user_lists": {"blotout_a": "x"}}, "user_lists.blotout_a"),
        ({"consent": "granted"}, "consent"),
        ({"consent": {"adUserData": "GRANTED"}}, "consent.adUserData"),
        ({"consent": {"adStorage": "CONSENT_GRANTED"}}, "consent.adStorage"),
        ({"chunk_size": 10_001}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"membership_days": 541}, "membership_days"),
        ({"timeout": 0}, "timeout"),
        ({"base_url": "ftp://x"}, "base_url"),
    ],
)
def test_bad_options_name_their_field(change: dict[str, Any], field: str) -> None:
    base = {"access_token": "t", "account_id": "1234567890"}
    raw = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(OptionError) as caught:
        GoogleProvider.from_config(DestinationConfig("g", "google", raw, line=1))
    assert caught.value.field == field


def test_options_are_read() -> None:
    config = DestinationConfig(
        "g",
        "google",
        {
            "access_token": " tok ",
            "account_id": "123-456-7890",
            "login_account_id": 9_876_543_210,
            "user_lists": {"blotout_vip": 555},
            "user_list_id": "777",
            "consent": {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_DENIED"},
            "chunk_size": 5_000,
        },
        line=1,
    )
    google = GoogleProvider.from_config(config)
    assert (google.access_token, google.account_id) == ("tok", "1234567890")
    assert google.login_account == ("GOOGLE_ADS", "9876543210")
    assert (google.user_lists, google.user_list_id) == ({"blotout_vip": "555"}, "777")
    assert google.consent == {
        "adUserData": "CONSENT_GRANTED",
        "adPersonalization": "CONSENT_DENIED",
    }
    assert google.chunk_size == 5_000
    assert (
        GoogleProvider.from_config(
            DestinationConfig("g", "google", {"access_token": "t", "account_id": 1}, line=1)
        ).chunk_size
        == 10_000
    )


def test_a_destinations_file_configures_it(tmp_path: Path) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(
        """
[[destinations]]
id = "google-ads"
kind = "google"
account_id = "123-456-7890"
access_token = "${GOOGLE_TOKEN}"
user_lists = { "blotout_VIP" = "5551234" }
consent = { adUserData = "CONSENT_GRANTED", adPersonalization = "CONSENT_GRANTED" }

[[destinations]]
id = "google-dv"
kind = "google"
account_type = "DISPLAY_VIDEO_ADVERTISER"
account_id = "42"
access_token = "${GOOGLE_TOKEN}"
chunk_size = 20000
"""
    )
    with pytest.raises(DestinationsError) as caught:
        configured_destinations(path, explicit=True, environ={"GOOGLE_TOKEN": "ya29.secret"})
    assert str(caught.value) == (
        f'{path} line 16: destination "google-dv" field chunk_size: '
        "must be an integer from 1 to 10000"
    )
    path.write_text(path.read_text().replace("chunk_size = 20000", ""))
    built = configured_destinations(path, explicit=True, environ={"GOOGLE_TOKEN": "ya29.secret"})
    ads = built["google-ads"][1]
    assert isinstance(ads, GoogleProvider)
    assert (ads.access_token, ads.account_id, ads.user_lists) == (
        "ya29.secret",
        "1234567890",
        {"blotout_VIP": "5551234"},
    )


# --- error mapping ----------------------------------------------------------------------------


def rpc(code: int, status_name: str, message: str, *details: dict[str, Any]) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status_name}
    if details:
        error["details"] = list(details)
    return json.dumps({"error": error}).encode()


def test_google_errors_are_mapped() -> None:
    limited = platform_error(
        429,
        rpc(429, "RESOURCE_EXHAUSTED", "Quota exceeded."),
        {"retry-after": "7"},
    )
    assert isinstance(limited, RetryableError)
    assert (str(limited), limited.retry_after, limited.status) == (
        "Google Data Manager 429 RESOURCE_EXHAUSTED: Quota exceeded.",
        7.0,
        429,
    )
    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}
    delayed = platform_error(503, rpc(503, "UNAVAILABLE", "Try later.", info))
    assert isinstance(delayed, RetryableError) and delayed.retry_after == 30.0
    aborted = platform_error(409, rpc(409, "ABORTED", "Concurrent change."))
    assert isinstance(aborted, RetryableError)
    exists = platform_error(409, rpc(409, "ALREADY_EXISTS", "Exists."))
    assert isinstance(exists, PermanentError)
    gateway = platform_error(502, b"<html>Bad Gateway</html>")
    assert isinstance(gateway, RetryableError)
    assert str(gateway) == "Google Data Manager HTTP 502: <html>Bad Gateway</html>"
    denied = platform_error(
        403, rpc(403, "PERMISSION_DENIED", "The caller does not have permission")
    )
    assert isinstance(denied, PermanentError) and not isinstance(denied, RetryableError)
    assert (
        str(denied)
        == "Google Data Manager 403 PERMISSION_DENIED: The caller does not have permission"
    )
    bad = platform_error(
        400,
        rpc(
            400,
            "INVALID_ARGUMENT",
            "There was a problem with the request.",
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "INVALID_SHA256_FORMAT",
            },
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "audience_members[3].user_data", "description": "malformed"}
                ],
            },
        ),
    )
    assert isinstance(bad, PermanentError)
    assert str(bad) == (
        "Google Data Manager 400 INVALID_ARGUMENT: There was a problem with the request. "
        "[INVALID_SHA256_FORMAT] (audience_members[3].user_data: malformed)"
    )


# --- the emulator is strict -------------------------------------------------------------------


def member(**identifiers: Any) -> dict[str, Any]:
    return {"userData": {"userIdentifiers": [{k: v} for k, v in identifiers.items()]}}


GOOD_ADDRESS = {
    "givenName": sha("jane"),
    "familyName": sha("doe"),
    "regionCode": "US",
    "postalCode": "94105",
}


def ingest_body(list_id: str, members: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "destinations": [
            {
                "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": ACCOUNT},
                "productDestinationId": list_id,
            }
        ],
        "audienceMembers": members or [member(emailAddress=sha("a@example.com"))],
        "encoding": "HEX",
        "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
    }


def call(
    google: GoogleEmulator, route: str, body: Any, token: str | None = TOKEN
) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.post(f"{google.base_url}/v1/audienceMembers:{route}", json=body, headers=headers)


def rpc_error(response: httpx2.Response) -> tuple[int, str, list[str]]:
    error = response.json()["error"]
    reasons = [d["reason"] for d in error.get("details", []) if "reason" in d]
    return error["code"], error["status"], reasons


def test_emulator_wants_a_granted_bearer_token(google: GoogleEmulator) -> None:
    list_id = google.create_list(ACCOUNT, "vip")
    for token in (None, "ya29.unknown"):
        response = call(google, "ingest", ingest_body(list_id), token)
        assert response.status_code == 401
        assert rpc_error(response)[:2] == (401, "UNAUTHENTICATED")
    google.grant("ya29.other", "5555555555")
    response = call(google, "ingest", ingest_body(list_id), "ya29.other")
    assert rpc_error(response) == (403, "PERMISSION_DENIED", ["PERMISSION_DENIED"])
    # through a manager account linked to the operating account
    google.grant("ya29.manager", "4444444444")
    body = ingest_body(list_id)
    body["destinations"][0]["loginAccount"] = {
        "accountType": "GOOGLE_ADS",
        "accountId": "4444444444",
    }
    assert call(google, "ingest", body, "ya29.manager").status_code == 403
    google.link("4444444444", ACCOUNT)
    assert call(google, "ingest", body, "ya29.manager").status_code == 200
    assert google.members(ACCOUNT, list_id) == {frozenset({email_id("a@example.com")})}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return change


_DELETE = object()


def identifiers(*items: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Replace the members with one member of these raw identifiers."""
    return _set("audienceMembers", [{"userData": {"userIdentifiers": list(items)}}])


def address(**change: str) -> Callable[[dict[str, Any]], None]:
    whole = {**GOOD_ADDRESS, **change}
    return identifiers({"address": {k: v for k, v in whole.items() if v != "-"}})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (identifiers({"emailAddress": "a@example.com"}), "INVALID_HEX_ENCODING"),
        (identifiers({"emailAddress": "abc123"}), "INVALID_SHA256_FORMAT"),
        (identifiers({"emailAddress": sha("a"), "phoneNumber": sha("b")}), "INVALID_FORMAT"),
        (
            identifiers(*({"emailAddress": sha(str(i))} for i in range(11))),
            "TOO_MANY_USER_IDENTIFIERS",
        ),
        (identifiers(), "REQUIRED_FIELD_MISSING"),
        (address(regionCode="us"), "INVALID_COUNTRY_CODE"),
        (address(regionCode=sha("US")), "INVALID_COUNTRY_CODE"),
        (address(postalCode=sha("94105")), "INVALID_POSTAL_CODE"),
        (address(givenName="jane"), "INVALID_HEX_ENCODING"),
        (address(postalCode="-"), "REQUIRED_FIELD_MISSING"),
        (
            _set("audienceMembers", [member(emailAddress=sha("a"))] * 10_001),
            "TOO_MANY_AUDIENCE_MEMBERS",
        ),
        (_set("audienceMembers", []), "REQUIRED_FIELD_MISSING"),
        (_set("encoding", _DELETE), "REQUIRED_FIELD_MISSING"),
        (_set("encoding", "UTF8"), "INVALID_ENUM_VALUE"),
        (_set("termsOfService", _DELETE), "TERMS_AND_CONDITIONS_NOT_SIGNED"),
        (_set("consent", {"adUserData": "GRANTED"}), "INVALID_ENUM_VALUE"),
        (_set("destinations.0.productDestinationId", _DELETE), "REQUIRED_FIELD_MISSING"),
        (_set("destinations.0.productDestinationId", "999"), "INVALID_USER_LIST_ID"),
        (_set("destinations.0.operatingAccount.accountType", "ADS"), "INVALID_ENUM_VALUE"),
        (_set("destinations", [ingest_body("1")["destinations"][0]] * 11), "TOO_MANY_DESTINATIONS"),
        (_set("userList", "1"), None),  # an unknown field
        (_set("audienceMembers.0.userData.addressInfo", {}), None),  # RudderStack's old name
    ],
)
def test_emulator_refuses_what_google_refuses(
    google: GoogleEmulator, change: Callable[[dict[str, Any]], None], reason: str | None
) -> None:
    list_id = google.create_list(ACCOUNT, "vip")
    body = ingest_body(list_id)
    change(body)
    response = call(google, "ingest", body)
    code, status_name, reasons = rpc_error(response)
    assert (response.status_code, code, status_name) == (400, 400, "INVALID_ARGUMENT")
    if reason is None:
        assert "Unknown name" in response.json()["error"]["message"]
    else:
        assert reason in reasons
    assert google.members(ACCOUNT, list_id) == set()


def test_emulator_remove_and_remove_all(google: GoogleEmulator) -> None:
    list_id = google.create_list(ACCOUNT, "vip")
    a, b, c = (member(emailAddress=sha(x)) for x in "abc")
    assert call(google, "ingest", ingest_body(list_id, [a, b, c])).status_code == 200
    # remove carries no consent or terms
    removal = ingest_body(list_id, [b])
    assert call(google, "remove", removal).status_code == 400
    del removal["termsOfService"]
    assert call(google, "remove", removal).status_code == 200
    assert google.members(ACCOUNT, list_id) == {
        frozenset({email_id("a")}),
        frozenset({email_id("c")}),
    }
    destinations_only = {"destinations": ingest_body(list_id)["destinations"]}
    past = {**destinations_only, "removeAsOfTime": "2020-01-01T00:00:00Z"}
    assert call(google, "removeAll", past).status_code == 200  # nothing was added before then
    assert len(google.members(ACCOUNT, list_id)) == 2
    future = {**destinations_only, "removeAsOfTime": "2999-01-01T00:00:00.123456789Z"}
    assert rpc_error(call(google, "removeAll", future))[:2] == (400, "INVALID_ARGUMENT")
    assert call(google, "removeAll", {**destinations_only, "validateOnly": True}).status_code == 200
    assert len(google.members(ACCOUNT, list_id)) == 2
    answer = call(google, "removeAll", destinations_only)
    assert answer.status_code == 200 and set(answer.json()) == {"requestId"}
    assert google.members(ACCOUNT, list_id) == set()
    # members last added before removeAsOfTime go; those (re-)added since stay
    assert call(google, "ingest", ingest_body(list_id, [a, b])).status_code == 200
    between = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    assert call(google, "ingest", ingest_body(list_id, [b, c])).status_code == 200
    cut = {**destinations_only, "removeAsOfTime": between}
    assert call(google, "removeAll", cut).status_code == 200
    assert google.members(ACCOUNT, list_id) == {
        frozenset({email_id("b")}),
        frozenset({email_id("c")}),
    }
    assert [size for _, size in google.sizes(ACCOUNT, list_id)][-3:] == [2, 3, 2]


def test_emulator_user_lists(google: GoogleEmulator) -> None:
    url = f"{google.base_url}/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    tricky = 'blotout_say "hi" \\ there'
    body = {"displayName": tricky, "ingestedUserListInfo": {"uploadKeyTypes": ["CONTACT_ID"]}}
    created = httpx2.post(url, json=body, headers=auth)
    assert created.status_code == 200
    assert (
        created.json()["name"]
        == f"accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists/{created.json()['id']}"
    )
    assert rpc_error(httpx2.post(url, json=body, headers=auth))[:2] == (400, "INVALID_ARGUMENT")
    no_keys = {"displayName": "x", "ingestedUserListInfo": {"uploadKeyTypes": []}}
    assert httpx2.post(url, json=no_keys, headers=auth).status_code == 400
    for index in range(3):
        google.create_list(ACCOUNT, f"other {index}")
    literal = tricky.replace("\\", "\\\\").replace('"', '\\"')
    found = httpx2.get(url, params={"filter": f'display_name = "{literal}"'}, headers=auth)
    assert [item["id"] for item in found.json()["userLists"]] == [created.json()["id"]]
    first = httpx2.get(url, params={"pageSize": "3"}, headers=auth).json()
    assert len(first["userLists"]) == 3
    second = httpx2.get(
        url, params={"pageSize": "3", "pageToken": first["nextPageToken"]}, headers=auth
    )
    assert len(second.json()["userLists"]) == 1 and "nextPageToken" not in second.json()
    assert httpx2.get(url, params={"filter": "id > 3"}, headers=auth).status_code == 400
    assert httpx2.get(url).status_code == 401


def test_emulator_scripted_failures(google: GoogleEmulator) -> None:
    list_id = google.create_list(ACCOUNT, "vip")
    google.fail(429, on="ingest", after=1, retry_after="1")
    google.fail(503, times=2)
    assert call(google, "ingest", ingest_body(list_id)).status_code == 200  # skipped
    limited = call(google, "ingest", ingest_body(list_id))
    assert rpc_error(limited) == (429, "RESOURCE_EXHAUSTED", ["RATE_LIMIT_EXCEEDED"])
    assert limited.headers["retry-after"] == "1"
    assert [call(google, "removeAll", {"destinations": []}).status_code for _ in range(3)] == [
        503,
        503,
        400,
    ]
    with pytest.raises(ValueError, match="no Google error for HTTP 418"):
        google.fail(418)


# --- the adapter against the emulator, without the app ----------------------------------------


def segment(kind: str = "custom", title: str = SEGMENT) -> Segment:
    return Segment("google-ads", "", "s1", NAME, title, kind, total_users=0)


def run(google_provider: GoogleProvider, *chunks: tuple[Segment, Chunk]) -> list[Any]:
    async def go() -> list[Any]:
        try:
            return [await google_provider.send(s, c) for s, c in chunks]
        finally:
            await google_provider.aclose()

    return asyncio.run(go())


def chunk(users: list[dict[str, Any]], index: int = 1, last: bool = True) -> Chunk:
    return Chunk(index=index, last=last, users=users)


def test_list_is_found_by_name_created_once_and_remembered(google: GoogleEmulator) -> None:
    users, expected = mixed_users(10)
    first = provider(google)
    attempt = segment()
    results = run(first, (attempt, chunk(users[:5], 1, False)), (attempt, chunk(users[5:], 2)))
    assert [(r.invalid, r.status) for r in results] == [(0, 200), (0, 200)]
    assert google.routes() == [
        ("listUserLists", 200),
        ("createUserList", 200),
        ("ingest", 200),
        ("ingest", 200),
        STATUS,  # after the last chunk, the outcome of each ingest of the attempt
        STATUS,
    ]
    list_id = the_list(google)
    run(first, (segment(), chunk(users[:1])))  # a new attempt, the list remembered
    assert google.routes()[6:] == [("ingest", 200), STATUS]
    fresh = provider(google)  # another process: empty cache, finds the list, no duplicate
    run(fresh, (segment(), chunk(users[:1])))
    assert google.routes()[-3:] == [("listUserLists", 200), ("ingest", 200), STATUS]
    assert google.members(ACCOUNT, list_id) == expected
    created = next(c for c in google.calls if c.route == "createUserList")
    assert created.json() == {
        "displayName": SEGMENT,
        "description": "Customer list delivered by Audience Server",
        "ingestedUserListInfo": {"uploadKeyTypes": ["CONTACT_ID"]},
    }


def test_a_name_with_quotes_is_found_again(google: GoogleEmulator) -> None:
    title = 'blotout_"Best" \\ buyers'
    users, expected = mixed_users(2)
    run(provider(google), (segment(title=title), chunk(users)))
    run(provider(google), (segment(title=title), chunk(users)))  # empty cache: found by name
    assert [route for route, _ in google.routes()].count("createUserList") == 1
    assert google.members(ACCOUNT, google.lists(ACCOUNT)[title]) == expected


def test_a_list_deleted_since_is_looked_up_again(google: GoogleEmulator) -> None:
    users, expected = mixed_users(3)
    google_provider = provider(google, membership_days=30)
    run(google_provider, (segment(), chunk(users)))
    old = the_list(google)
    google.delete_list(ACCOUNT, old)
    with pytest.raises(RetryableError, match="INVALID_USER_LIST_ID"):
        run(google_provider, (segment(), chunk(users)))
    run(google_provider, (segment(), chunk(users)))  # the next attempt
    new = the_list(google)
    assert new != old and google.members(ACCOUNT, new) == expected
    created = [c.json() for c in google.calls_to("createUserList")]
    assert [body["membershipDuration"] for body in created] == ["2592000s", "2592000s"]


def test_configured_lists_are_used_as_they_are(google: GoogleEmulator) -> None:
    vips, vip_expected = mixed_users(2)
    users, expected = mixed_users(3, start=2)
    vip = google.create_list(ACCOUNT, "VIP (made in the UI)")
    default = google.create_list(ACCOUNT, "Everyone else")
    google_provider = provider(google, user_lists={"blotout_vip": vip}, user_list_id=default)
    run(
        google_provider,
        (segment(title="blotout_vip"), chunk(vips)),
        (segment(), chunk(users)),
    )
    assert calls_made(google) == [("ingest", 200), ("ingest", 200)]
    assert google.members(ACCOUNT, vip) == vip_expected
    assert google.members(ACCOUNT, default) == expected
    # a configured list Google does not know fails at once: nothing to look up again
    gone = provider(google, user_list_id="31337")
    with pytest.raises(PermanentError, match="INVALID_USER_LIST_ID") as caught:
        run(gone, (segment(), chunk(users)))
    assert not isinstance(caught.value, RetryableError)


def test_login_account_consent_and_all_invalid_chunks(google: GoogleEmulator) -> None:
    google.grant("ya29.manager", "4444444444")
    google.link("4444444444", ACCOUNT)
    consent = {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_DENIED"}
    google_provider = provider(
        google, access_token="ya29.manager", login_account_id="444-444-4444", consent=consent
    )
    users, expected = mixed_users(5)
    results = run(
        google_provider,
        (segment(), chunk(UNUSABLE[:4], 1, False)),
        (segment(), chunk(users, 2)),
    )
    assert [(r.invalid, r.status) for r in results] == [(4, None), (0, 200)]
    listed = next(c for c in google.calls if c.route == "listUserLists")
    assert listed.headers["login-account"] == "accountTypes/GOOGLE_ADS/accounts/4444444444"
    (ingest,) = google.calls_to("ingest")
    assert ingest.json()["consent"] == consent
    assert ingest.json()["destinations"] == [
        {
            "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": ACCOUNT},
            "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "4444444444"},
            "productDestinationId": the_list(google),
        }
    ]
    assert google.members(ACCOUNT, the_list(google)) == expected
    # without a consent option, no consent is claimed
    run(provider(google, user_list_id=the_list(google)), (segment(), chunk(users)))
    assert "consent" not in google.calls_to("ingest")[-1].json()


def test_connection_errors_are_retryable(google: GoogleEmulator) -> None:
    url = google.base_url
    google.close()
    config = DestinationConfig(
        "g", "google", {"base_url": url, "access_token": TOKEN, "account_id": ACCOUNT}, line=1
    )
    with pytest.raises(RetryableError, match="connection failed"):
        run(GoogleProvider.from_config(config), (segment(), chunk(mixed_users(1)[0])))


# --- end to end: the app, its worker and the emulator -----------------------------------------


def test_a_25000_user_session_lands_exactly(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    users, expected = mixed_users(25_000)
    near = {"email": "PERSON.0@example.com "}  # another record, the same person for Google
    sent = [*users, *UNUSABLE, *users[:5], near]  # five exact duplicates
    random.Random(4).shuffle(sent)
    with serve(fast, engine, destinations(("google-ads", "google", options(google)))) as client:
        response = deliver(client, "big", sent)
        assert (response.status_code, response.json()) == (200, {"success": True})
        body = status(client, "big")
    assert body["state"] == "delivered"
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "google-ads",
        "kind": "google",
        "segmentName": SEGMENT,
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 25_000 + len(UNUSABLE) + 1,
        "invalidUsers": len(UNUSABLE),
        "lastError": None,
    }
    list_id = the_list(google)
    assert google.members(ACCOUNT, list_id) == expected
    assert (
        google.routes()
        == [("listUserLists", 200), ("createUserList", 200)] + [("ingest", 200)] * 3 + [STATUS] * 3
    )
    sizes = [len(c.json()["audienceMembers"]) for c in google.calls_to("ingest")]
    assert max(sizes) <= 10_000 and sum(sizes) == 25_001


def test_primary_replaces_and_custom_adds(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    first, first_expected = mixed_users(60)
    kept, kept_expected = mixed_users(20)
    added, added_expected = mixed_users(7, start=1_000)
    replacement = [*kept, *added]
    where = destinations(("google-ads", "google", options(google, chunk_size=10)))
    with serve(fast, engine, where) as client:
        assert deliver(client, "s1", first, batch=25).status_code == 200
        list_id = the_list(google)
        assert google.members(ACCOUNT, list_id) == first_expected
        before = len(google.calls)

        assert deliver(client, "s2", replacement, kind="primary", batch=10).status_code == 200
        assert google.members(ACCOUNT, list_id) == kept_expected | added_expected
        # the list is remembered; the replace ingests every chunk, reads their outcomes, and
        # only then removes what was last added before the attempt began
        assert google.routes()[before:] == [("ingest", 200)] * 3 + [STATUS] * 3 + [
            ("removeAll", 200)
        ]
        # never empty on the way: 60 before, 67 with the newcomers, 27 after removeAll
        sizes = google.sizes(ACCOUNT, list_id)
        assert [size for _, size in sizes][-4:] == [60, 60, 67, 27]
        assert min(size for _, size in sizes) > 0
        # removeAsOfTime is the attempt's start: before its first ingest reached Google
        (remove_all,) = google.calls_to("removeAll")
        stamp = remove_all.json()["removeAsOfTime"]
        assert stamp.endswith("Z")
        with engine.connect() as conn:
            started = conn.execute(
                select(delivery_attempts.c.started_at)
                .order_by(delivery_attempts.c.started_at.desc())
                .limit(1)
            ).scalar_one()
        cutoff = dt.datetime.fromisoformat(stamp)
        assert started.replace(tzinfo=dt.UTC) <= cutoff <= dt.datetime.now(dt.UTC)

        extra, extra_expected = mixed_users(5, start=2_000)
        assert deliver(client, "s3", extra).status_code == 200
        assert status(client, "s3")["deliveries"][0]["state"] == "succeeded"
    assert google.members(ACCOUNT, list_id) == kept_expected | added_expected | extra_expected
    assert the_list(google) == list_id


def test_rate_limits_and_transient_errors_are_retried_to_success(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    users, expected = mixed_users(30)
    google.fail(429, on="ingest", after=1)  # the second chunk of the first attempt
    google.fail(503, on="removeAll")  # the third attempt's replace, after its ingests
    google.fail(500, on="listUserLists")
    where = destinations(("google-ads", "google", options(google, chunk_size=10)))
    with serve(fast, engine, where) as client:
        response = deliver(client, "flaky", users, kind="primary", batch=15)
        assert response.status_code == 200, response.text
        body = status(client, "flaky")
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        4,
        None,
    )
    assert google.members(ACCOUNT, the_list(google)) == expected
    assert google.routes() == [
        ("listUserLists", 500),
        ("listUserLists", 200),
        ("createUserList", 200),
        ("ingest", 200),
        ("ingest", 429),
        *[("ingest", 200)] * 3,
        *[STATUS] * 3,
        ("removeAll", 503),
        *[("ingest", 200)] * 3,
        *[STATUS] * 3,
        ("removeAll", 200),
    ]


def test_retry_after_is_honoured(fast: Settings, engine: Engine, google: GoogleEmulator) -> None:
    google.fail(429, on="ingest", retry_after="1")
    where = destinations(("google-ads", "google", options(google)))
    with serve(fast, engine, where) as client:
        assert deliver(client, "slow", mixed_users(3)[0]).status_code == 200
    with engine.connect() as conn:
        rows = conn.execute(select(delivery_attempts).order_by(delivery_attempts.c.number)).all()
    assert [(r.outcome, r.http_status) for r in rows] == [("retry", 429), ("succeeded", 200)]
    assert rows[0].error == (
        f"{GOOGLE_ERRORS} 429 RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'Ingestion "
        "requests' and limit 'Ingestion requests per minute per project' of service "
        "'datamanager.googleapis.com'. [RATE_LIMIT_EXCEEDED]"
    )
    assert rows[1].started_at - rows[0].finished_at >= dt.timedelta(seconds=1)


def test_permanent_errors_fail_with_googles_message(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    google.fail(403, on="ingest")
    where = destinations(
        ("google-ads", "google", options(google)),
        ("google-old", "google", options(google, access_token="ya29.expired")),
    )
    message = (
        f"{GOOGLE_ERRORS} 403 PERMISSION_DENIED: The caller does not have permission "
        "[PERMISSION_DENIED]"
    )
    expired = (
        f"{GOOGLE_ERRORS} 401 UNAUTHENTICATED: Request had invalid authentication credentials."
    )
    with serve(fast, engine, where) as client:
        response = deliver(client, "denied", mixed_users(4)[0])
        body = status(client, "denied")
    assert response.status_code == 400
    denied, unauthenticated = errors(response)
    assert denied == f"google-ads: {message}"
    assert unauthenticated.startswith(f"google-old: {expired}")
    assert body["state"] == "failed"
    first, second = body["deliveries"]
    assert (first["state"], first["attempts"], first["lastError"]) == ("failed", 1, message)
    assert (second["state"], second["attempts"]) == ("failed", 1)
    assert second["lastError"].startswith(expired)
    assert google.members(ACCOUNT, the_list(google)) == set()


def test_two_accounts_each_receive_the_segment(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    google.grant("ya29.token-eu", "2222222222")
    users, expected = mixed_users(40)
    where = destinations(
        ("google-us", "google", options(google)),
        (
            "google-eu",
            "google",
            options(google, access_token="ya29.token-eu", account_id="222-222-2222"),
        ),
    )
    with serve(fast, engine, where) as client:
        assert deliver(client, "two", users, batch=15).status_code == 200
        body = status(client, "two")
    assert sorted((d["destination"], d["state"]) for d in body["deliveries"]) == [
        ("google-eu", "succeeded"),
        ("google-us", "succeeded"),
    ]
    us, eu = the_list(google, ACCOUNT), the_list(google, "2222222222")
    assert google.members(ACCOUNT, us) == expected
    assert google.members("2222222222", eu) == expected


# --- credentials that last: a credentials JSON refreshed by google-auth ---------------------

CLIENT_ID = "123-emulated.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-emulated-secret"
REFRESH_TOKEN = "1//emulated-refresh-token"
ROBOT = "audience@project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    """A service account's key, made for these tests."""
    return rsa.generate_private_key(public_exponent=65_537, key_size=2048)


def public_pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def user_file(tmp_path: Path, google: GoogleEmulator, **change: Any) -> Path:
    """An ``authorized_user`` JSON as ``gcloud auth application-default login`` writes it."""
    info = {
        "type": "authorized_user",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "token_uri": f"{google.base_url}/token",
        **change,
    }
    path = tmp_path / "google-user.json"
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))
    return path


def robot_file(tmp_path: Path, google: GoogleEmulator, private: rsa.RSAPrivateKey) -> Path:
    """A ``service_account`` key JSON, as the Cloud console downloads it."""
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": ROBOT,
        "client_id": "1001",
        "token_uri": f"{google.base_url}/token",
    }
    path = tmp_path / "google-robot.json"
    path.write_text(json.dumps(info))
    return path


def file_options(google: GoogleEmulator, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": google.base_url,
        "credentials_file": str(path),
        "account_id": ACCOUNT,
        "status_poll": 0.01,
        **extra,
    }


def from_file(
    google: GoogleEmulator, path: Path, clock: Callable[[], dt.datetime] | None = None
) -> GoogleProvider:
    config = DestinationConfig("google-ads", "google", file_options(google, path), line=1)
    if clock is None:
        return GoogleProvider.from_config(config)
    return GoogleProvider.from_config(config, clock=clock)


def chunks_of(users: list[dict[str, Any]], size: int, kind: str = "custom") -> list[Any]:
    attempt = segment(kind)
    return [
        (attempt, chunk(users[i : i + size], i // size + 1, i + size >= len(users)))
        for i in range(0, len(users), size)
    ]


def test_a_segment_outlives_its_first_token_refreshed_before_expiry(
    google: GoogleEmulator, tmp_path: Path
) -> None:
    google.oauth_client(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, ACCOUNT)
    google.age_per_call = 1_000  # every call takes 1,000 s of Google's (and our) time

    def clock() -> dt.datetime:
        return dt.datetime.fromtimestamp(google.now(), dt.UTC)

    users, expected = mixed_users(50)
    run(from_file(google, user_file(tmp_path, google), clock), *chunks_of(users, 10))
    assert google.members(ACCOUNT, the_list(google)) == expected
    # the first token served four calls; the fifth came within five minutes of its expiry
    # (3,600 s) on our clock, so a new one was minted first: Google refused nothing
    assert all(status < 400 for _, status in google.routes())
    assert google.tokens_issued() >= 2
    tokens = [c.principal for c in google.calls_to("ingest")]
    assert tokens[0] != tokens[-1] and tokens[0] is not None
    grant = google.calls_to("token")[0]
    form = dict(item.split("=", 1) for item in grant.body.decode().split("&"))
    assert form["grant_type"] == "refresh_token"


def test_an_expired_token_is_refreshed_once_and_the_call_retried(
    fast: Settings, engine: Engine, google: GoogleEmulator, tmp_path: Path
) -> None:
    google.oauth_client(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, ACCOUNT)
    google.age_per_call = 1_000  # on Google's clock only: ours does not see the hour pass
    users, expected = mixed_users(50)
    path = user_file(tmp_path, google)
    where = destinations(("google-ads", "google", file_options(google, path, chunk_size=10)))
    with serve(fast, engine, where) as client:
        assert deliver(client, "long", users, batch=10).status_code == 200
        (delivery,) = status(client, "long")["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("succeeded", 1)
    assert google.members(ACCOUNT, the_list(google)) == expected
    routes = calls_made(google)
    refused = routes.index(("ingest", 401))
    assert routes[refused : refused + 3] == [("ingest", 401), ("token", 200), ("ingest", 200)]
    answer = google.calls_to("ingest")[refused - 3].answer_json()
    assert answer["error"]["status"] == "UNAUTHENTICATED"
    assert answer["error"]["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"


def test_a_service_account_key_signs_its_grant(
    google: GoogleEmulator, tmp_path: Path, key: rsa.RSAPrivateKey
) -> None:
    google.service_account(ROBOT, public_pem(key), ACCOUNT)
    users, expected = mixed_users(5)
    run(from_file(google, robot_file(tmp_path, google, key)), *chunks_of(users, 5))
    assert google.members(ACCOUNT, the_list(google)) == expected
    (grant,) = google.calls_to("token")
    assert b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in grant.body
    # signed by another key: Google cannot verify it, and says so; the delivery fails
    google.service_account(ROBOT, public_pem(rsa.generate_private_key(65_537, 2048)), ACCOUNT)
    with pytest.raises(PermanentError) as caught:
        run(from_file(google, robot_file(tmp_path, google, key)), *chunks_of(users, 5))
    assert not isinstance(caught.value, RetryableError)
    assert str(caught.value) == (
        "Google Data Manager: destination google-ads: refreshing the access token failed: "
        "invalid_grant (Invalid JWT Signature.)"
    )


def test_a_refused_refresh_fails_naming_the_destination_not_the_secret(
    google: GoogleEmulator, tmp_path: Path
) -> None:
    google.oauth_client(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, ACCOUNT)
    google.age_per_call = 4_000
    users, _ = mixed_users(20)
    google_provider = from_file(google, user_file(tmp_path, google))
    run(google_provider, *chunks_of(users[:5], 5))  # a first token, now an hour old
    google.revoke(REFRESH_TOKEN)
    with pytest.raises(PermanentError) as caught:
        run(google_provider, *chunks_of(users, 10))
    message = str(caught.value)
    assert message == (
        "Google Data Manager: destination google-ads: refreshing the access token failed: "
        "invalid_grant (Token has been expired or revoked.)"
    )
    assert CLIENT_SECRET not in message and REFRESH_TOKEN not in message
    assert calls_made(google)[-2:] == [("ingest", 401), ("token", 400)]
    wrong = user_file(tmp_path, google, client_secret="GOCSPX-wrong")
    with pytest.raises(PermanentError, match=r"invalid_client \(Unauthorized\)"):
        run(from_file(google, wrong), *chunks_of(users, 10))


def test_the_token_endpoint_is_strict(google: GoogleEmulator, key: rsa.RSAPrivateKey) -> None:
    google.oauth_client(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, ACCOUNT)
    google.service_account(ROBOT, public_pem(key), ACCOUNT)
    url = f"{google.base_url}/token"

    def post(**form: str) -> tuple[int, Any]:
        answer = httpx2.post(url, data=form)
        return answer.status_code, answer.json()

    good = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
    }
    status_code, body = post(**good)
    assert status_code == 200 and body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600 and body["access_token"].startswith("ya29.")
    assert post(**{**good, "client_id": "other"})[1]["error"] == "invalid_client"
    assert post(**{**good, "refresh_token": "1//other"}) == (
        400,
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    assert post(**{**good, "grant_type": "password"})[1]["error"] == "unsupported_grant_type"
    assert httpx2.post(url, json=good).status_code == 400  # a form, not JSON

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    signer = crypt.RSASigner.from_string(pem)  # type: ignore[no-untyped-call]
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {
        "iss": ROBOT,
        "aud": "https://oauth2.googleapis.com/token",
        "scope": "https://www.googleapis.com/auth/datamanager",
        "iat": now,
        "exp": now + 3600,
    }

    def assertion(**change: Any) -> str:
        signed: bytes = jwt.encode(signer, {**claims, **change})  # type: ignore[no-untyped-call]
        return signed.decode()

    bearer = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert post(grant_type=bearer, assertion=assertion())[0] == 200
    for change in ({"exp": now + 7200}, {"iat": now - 7200, "exp": now - 3600}):
        assert post(grant_type=bearer, assertion=assertion(**change))[1]["error"] == (
            "invalid_grant"
        )
    assert post(grant_type=bearer, assertion=assertion(aud=url))[0] == 400
    assert post(grant_type=bearer, assertion=assertion(scope="email"))[0] == 400
    assert post(grant_type=bearer, assertion=assertion(iss="x@y.com"))[0] == 400
    forged = assertion().rsplit(".", 1)[0] + ".AAAA"
    assert post(grant_type=bearer, assertion=forged)[1] == {
        "error": "invalid_grant",
        "error_description": "Invalid JWT Signature.",
    }


@pytest.mark.parametrize(
    ("content", "change", "message"),
    [
        (None, {}, "credentials_file: no such file: "),
        ("{not json", {}, "credentials_file: is not JSON: "),
        ('{"type": "external_account"}', {}, "type must be authorized_user or service_account"),
        (
            '{"type": "authorized_user", "client_id": "x"}',
            {},
            "authorized_user credentials lack client_secret, refresh_token",
        ),
        (
            '{"type": "service_account", "client_email": "a@b", "private_key": "x",'
            ' "token_uri": "https://oauth2.googleapis.com/token"}',
            {},
            "service_account credentials cannot be read",
        ),
        (
            '{"type": "authorized_user", "client_id": "a", "client_secret": "b",'
            ' "refresh_token": "c", "token_uri": "file:///etc"}',
            {},
            "token_uri must be an http:// or https:// URL",
        ),
        ("{}", {"access_token": "ya29.x"}, "give access_token or credentials_file, not both"),
    ],
)
def test_bad_credentials_stop_the_server_in_one_line(
    tmp_path: Path, content: str | None, change: dict[str, Any], message: str
) -> None:
    path = tmp_path / "google.json"
    if content is not None:
        path.write_text(content)
    toml = tmp_path / "destinations.toml"
    extra = "".join(f'{key} = "{value}"\n' for key, value in change.items())
    toml.write_text(
        f'[[destinations]]\nid = "google-ads"\nkind = "google"\naccount_id = "1"\n'
        f'credentials_file = "{path}"\n{extra}'
    )
    with pytest.raises(DestinationsError) as caught:
        configured_destinations(toml, explicit=True, environ={})
    text = str(caught.value)
    assert "\n" not in text and message in text
    assert text.startswith(f'{toml} line 5: destination "google-ads" field credentials_file: ')


# --- outcomes: requestStatus:retrieve after the ingests ------------------------------------


def test_outcomes_are_read_from_googles_status_shape() -> None:
    assert outcomes.read({}) == outcomes.RequestOutcome(done=False)
    partial = {
        "requestStatusPerDestination": [
            {
                "requestStatus": "PARTIAL_SUCCESS",
                "errorInfo": {
                    "errorCounts": [
                        {"recordCount": "2", "reason": "PROCESSING_ERROR_REASON_NO_CONSENT"},
                        {"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_INVALID_FORMAT"},
                    ]
                },
            }
        ]
    }
    assert outcomes.read(partial) == outcomes.RequestOutcome(done=True, rejected=3)
    for pending in ("PROCESSING", "REQUEST_STATUS_UNKNOWN"):
        answer = {"requestStatusPerDestination": [{"requestStatus": pending}]}
        assert not outcomes.read(answer).done
    failed = {
        "requestStatusPerDestination": [
            {
                "requestStatus": "FAILED",
                "errorInfo": {"errorCounts": [{"recordCount": "10", "reason": "R"}]},
            }
        ]
    }
    assert outcomes.read(failed).failure == "R: 10"


def test_records_google_refused_count_as_invalid(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    google.processing_polls = 2  # each request is still processing when first asked
    google.fail_next_ingest("PROCESSING_ERROR_REASON_UNKNOWN_CONSENT", count=3)
    users, expected = mixed_users(30)
    where = destinations(("google-ads", "google", options(google, chunk_size=10, status_poll=0.01)))
    with serve(fast, engine, where) as client:
        assert deliver(client, "partial", [*users, *UNUSABLE]).status_code == 200
        (delivery,) = status(client, "partial")["deliveries"]
    assert (delivery["state"], delivery["invalidUsers"]) == ("succeeded", 3 + len(UNUSABLE))
    held = google.members(ACCOUNT, the_list(google))
    assert held < expected and len(held) == len(expected) - 3
    ids = [c.json() for c in google.calls_to("ingest")]
    polled = [c.params["requestId"] for c in google.calls_to("retrieveRequestStatus")]
    # the three chunks of users were ingested (the unusable ones, last, were not sent); each
    # request was asked three times: two PROCESSING answers, then its outcome
    assert len(ids) == 3 and len(polled) == 3 * 3
    answers = [c.answer_json()["requestId"] for c in google.calls_to("ingest")]
    assert sorted(set(polled)) == sorted(answers)


def test_a_failed_request_fails_the_delivery_and_a_replace_removes_nothing(
    fast: Settings, engine: Engine, google: GoogleEmulator
) -> None:
    old, old_expected = mixed_users(20, start=5_000)
    users, _ = mixed_users(30)
    where = destinations(("google-ads", "google", options(google, chunk_size=10, status_poll=0.01)))
    with serve(fast, engine, where) as client:
        assert deliver(client, "before", old).status_code == 200
        google.fail_next_ingest()  # the first ingest of the replace is processed as FAILED
        response = deliver(client, "replace", users, kind="primary")
        (delivery,) = status(client, "replace")["deliveries"]
    assert response.status_code == 400
    assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
    assert delivery["lastError"].startswith("Google Data Manager request ")
    assert delivery["lastError"].endswith(" FAILED: PROCESSING_ERROR_REASON_INTERNAL_ERROR: 10")
    assert google.calls_to("removeAll") == []
    list_id = the_list(google)
    held = google.members(ACCOUNT, list_id)
    assert old_expected <= held and len(held) == 20 + 20  # the old, and two chunks of the new
    assert min(size for _, size in google.sizes(ACCOUNT, list_id)) > 0


def test_a_request_still_processing_is_not_waited_for(
    google: GoogleEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    google.processing_polls = 10**6
    users, expected = mixed_users(4)
    google_provider = provider(google, status_wait=0.3, status_poll=0.05)
    with caplog.at_level("WARNING", "audience_server.providers.google"):
        (result,) = run(google_provider, (segment(), chunk(users)))
    assert result.invalid == 0
    polls = len(google.calls_to("retrieveRequestStatus"))
    assert 2 <= polls <= 5  # 0.05, 0.1, then the rest of 0.3 s: bounded, backing off
    (record,) = [r for r in caplog.records if "still processing" in r.getMessage()]
    assert record.__dict__["requestIds"] == [
        google.calls_to("ingest")[0].answer_json()["requestId"]
    ]
    assert google.members(ACCOUNT, the_list(google)) == expected
    # status_wait = 0: the outcome is not read at all
    run(provider(google, status_wait=0), (segment(), chunk(users)))
    assert len(google.calls_to("retrieveRequestStatus")) == polls


def test_missing_consent_is_not_claimed_and_google_may_refuse_it(
    google: GoogleEmulator,
) -> None:
    google.require_consent(ACCOUNT)  # an account whose settings do not settle consent
    users, expected = mixed_users(5)
    with pytest.raises(PermanentError, match="FAILED: PROCESSING_ERROR_REASON_UNKNOWN_CONSENT: 5"):
        run(provider(google, status_poll=0.01), (segment(), chunk(users)))
    assert "consent" not in google.calls_to("ingest")[-1].json()
    granted = {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"}
    run(provider(google, status_poll=0.01, consent=granted), (segment(), chunk(users)))
    assert google.members(ACCOUNT, the_list(google)) == expected
    denied = {"adUserData": "CONSENT_DENIED"}
    with pytest.raises(PermanentError, match="PROCESSING_ERROR_REASON_DENIED_CONSENT: 5"):
        run(provider(google, status_poll=0.01, consent=denied), (segment(), chunk(users)))


def test_an_unreadable_status_does_not_send_the_segment_again(
    google: GoogleEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    users, expected = mixed_users(4)
    google.fail(429, on="retrieveRequestStatus")  # over the project's quota
    with caplog.at_level("WARNING", "audience_server.providers.google"):
        (result,) = run(provider(google, status_poll=0.01), (segment("primary"), chunk(users)))
    assert result.invalid == 0
    assert calls_made(google)[-2:] == [("ingest", 200), ("removeAll", 200)]
    assert any("status unreadable" in r.getMessage() for r in caplog.records)
    assert google.members(ACCOUNT, the_list(google)) == expected

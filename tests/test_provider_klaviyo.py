"""The ``klaviyo`` provider: its user -> profile mapping, the Klaviyo emulator's strictness, and
deliveries over the real app and worker (SQLite and PostgreSQL) into the emulator, asserting on
the profiles and list memberships the emulated account ends up holding."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, select

from audience_server.destinations import DestinationConfig, OptionError
from audience_server.models import delivery_attempts
from audience_server.providers.base import (
    Chunk,
    ChunkResult,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.klaviyo import (
    MAX_JOB_BYTES,
    KlaviyoProvider,
    encode_profiles,
    job_bodies,
    profile_attributes,
)
from audience_server.settings import Settings
from tests.emulators.klaviyo import MEDIA_TYPE, KlaviyoEmulator, errors_document
from tests.helpers import NAME, destinations, errors, serve, status, upload

KEY = "pk_live_one"
OTHER_KEY = "pk_live_two"
LIST = "blotout_High_Value_Customers_Q1"
FORBIDDEN = "You do not have permission to perform this action."


@pytest.fixture
def klaviyo() -> Iterator[KlaviyoEmulator]:
    with KlaviyoEmulator(KEY, OTHER_KEY) as emulator:
        yield emulator


def options(klaviyo: KlaviyoEmulator, api_key: str = KEY, **extra: Any) -> dict[str, Any]:
    return {"base_url": klaviyo.base_url, "api_key": api_key, "poll_interval": 0.005, **extra}


def canonical(profiles: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in profiles)


def simple_users(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {"email": f"person{i}@example.com", "firstName": "Ann"} for i in range(start, start + count)
    ]


def simple_profiles(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {"email": f"person{i}@example.com", "first_name": "Ann"}
        for i in range(start, start + count)
    ]


def ids_by_email(klaviyo: KlaviyoEmulator) -> dict[str, str]:
    """The list's members, profile id by email, in joining order."""
    emails = [profile["email"] for profile in klaviyo.members(LIST)]
    return dict(zip(emails, klaviyo.member_ids(LIST), strict=True))


def mixed_users(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Users of every shape; the profiles Klaviyo should hold for them; how many are invalid."""
    users: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    invalid = 0
    for i in range(count):
        exchange, line = 200 + i // 10_000, i % 10_000
        if i % 1000 == 999:  # nothing usable: a broken email, a too-short phone
            users.append({"email": f"not-an-email-{i}", "phone": "12", "firstName": "Nobody"})
            invalid += 1
            continue
        if i % 1000 == 998:  # well formed here, refused by Klaviyo while importing
            users.append({"email": f"user{i}@example.c", "edgeTagId": f"et_{i}"})
            invalid += 1
            continue
        kind = i % 8
        if kind == 0:  # email only, untidy
            users.append({"edgeTagId": f"et_{i}", "email": f"  User{i}@Example.COM "})
            profiles.append({"email": f"user{i}@example.com"})
        elif kind == 1:  # a national phone, read with the user's country
            users.append({"phone": f"(650) {exchange}-{line:04d}", "country": "US"})
            profiles.append(
                {"phone_number": f"+1650{exchange}{line:04d}", "location": {"country": "US"}}
            )
        elif kind == 2:  # a phone sent as a number, international without its +
            users.append({"phone": 16_503_000_000 + i})
            profiles.append({"phone_number": f"+{16_503_000_000 + i}"})
        elif kind == 3:  # everything, with names and address
            users.append(
                {
                    "email": f"Jane.{i}@Example.org",
                    "phone": f"+1 415 {exchange} {line:04d}",
                    "firstName": "  Jane ",
                    "lastName": "O'Neil  Smith",
                    "country": "us",
                    "postalCode": "94105-1234",
                    "purchase": [{"sku": "a", "amount": 1}],
                }
            )
            profiles.append(
                {
                    "email": f"jane.{i}@example.org",
                    "phone_number": f"+1415{exchange}{line:04d}",
                    "first_name": "Jane",
                    "last_name": "O'Neil Smith",
                    "location": {"country": "US", "zip": "94105-1234"},
                }
            )
        elif kind == 4:  # an external id only
            users.append({"externalId": f" crm-{i} ", "firstName": "Émile", "postalCode": " 10115"})
            profiles.append(
                {"external_id": f"crm-{i}", "first_name": "Émile", "location": {"zip": "10115"}}
            )
        elif kind == 5:  # email and a numeric external id
            users.append({"email": f"e{i}@example.net", "externalId": str(i), "lastName": "Ng"})
            profiles.append(
                {"email": f"e{i}@example.net", "external_id": str(i), "last_name": "Ng"}
            )
        elif kind == 6:  # a pre-hashed email (useless to Klaviyo) and a phone
            digest = hashlib.sha256(f"h{i}@example.com".encode()).hexdigest()
            users.append({"email": digest, "phone": f"+1 212 {exchange} {line:04d}"})
            profiles.append({"phone_number": f"+1212{exchange}{line:04d}"})
        else:  # an email and a phone that cannot be a number
            users.append({"email": f"f{i}@example.com", "phone": "call me", "country": "FR"})
            profiles.append({"email": f"f{i}@example.com", "location": {"country": "FR"}})
    return users, profiles, invalid


def segment(type: str = "custom", name: str = LIST) -> Segment:
    return Segment("kl", "default", "s1", NAME, name, type, 0)


async def deliver(
    provider: KlaviyoProvider, chunks: Sequence[Sequence[dict[str, Any]]], seg: Segment
) -> list[ChunkResult]:
    """Send ``chunks`` as one attempt, as the worker does, then close the client."""
    try:
        return [
            await provider.send(seg, Chunk(index, index == len(chunks), users))
            for index, users in enumerate(chunks, start=1)
        ]
    finally:
        await provider.aclose()


def provider(klaviyo: KlaviyoEmulator, **extra: Any) -> KlaviyoProvider:
    config = DestinationConfig("kl", "klaviyo", options(klaviyo, **extra), line=1)
    return KlaviyoProvider.from_config(config)


# --- users -> profiles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"email": " A.B+x@Gmail.COM "}, {"email": "a.b+x@gmail.com"}),
        (
            {"phone": "(415) 555-0100", "country": "US"},
            {"phone_number": "+14155550100", "location": {"country": "US"}},
        ),
        (
            {"phone": "020 7946 0123", "country": "gb"},
            {"phone_number": "+442079460123", "location": {"country": "GB"}},
        ),
        (
            {"phone": "+44 20 7946 0123", "country": "US"},
            {"phone_number": "+442079460123", "location": {"country": "US"}},
        ),
        ({"phone": 14155550100}, {"phone_number": "+14155550100"}),
        ({"email": "x@example.com", "phone": "555"}, {"email": "x@example.com"}),
        (
            {"externalId": 42, "firstName": " Zoë  Anne ", "lastName": "de la Cruz"},
            {"external_id": "42", "first_name": "Zoë Anne", "last_name": "de la Cruz"},
        ),
        ({"email": "x@example.com", "externalId": "y" * 256}, {"email": "x@example.com"}),
        (
            {"email": "x@example.com", "country": "USA", "postalCode": " SW1A 1AA "},
            {"email": "x@example.com", "location": {"zip": "SW1A 1AA"}},
        ),
        (
            {"email": "x@example.com", "firstName": "", "lastName": None, "country": None},
            {"email": "x@example.com"},
        ),
    ],
)
def test_profile_attributes(user: dict[str, Any], expected: dict[str, Any]) -> None:
    assert profile_attributes(user) == expected


@pytest.mark.parametrize(
    "user",
    [
        {},
        {"firstName": "Jane", "lastName": "Doe", "country": "US", "postalCode": "94105"},
        {"email": "not an email", "phone": "12"},
        {"email": hashlib.sha256(b"a@example.com").hexdigest()},  # plaintext only
        {"phone": hashlib.sha256(b"+14155550100").hexdigest()},
        {"phone": "4155550100"},  # national, and no country to read it with
        {"externalId": "z" * 256},
        {"email": True, "phone": False, "externalId": {"id": 1}},
    ],
)
def test_users_without_a_usable_identifier_are_invalid(user: dict[str, Any]) -> None:
    assert profile_attributes(user) is None


def test_a_profile_over_100kb_is_invalid() -> None:
    users = [{"email": "a@example.com", "firstName": "x" * 100_000}, {"email": "b@example.com"}]
    encoded, invalid = encode_profiles(users)
    assert invalid == 1
    assert [json.loads(p) for p in encoded] == [
        {"type": "profile", "attributes": {"email": "b@example.com"}}
    ]


def test_job_bodies_split_by_count_and_by_size() -> None:
    profiles = [
        json.dumps({"type": "profile", "attributes": {"email": f"{i}@x.io"}}).encode()
        for i in range(25)
    ]
    by_count = job_bodies(profiles, "L1", max_profiles=10)
    assert [len(json.loads(b)["data"]["attributes"]["profiles"]["data"]) for b in by_count] == [
        10,
        10,
        5,
    ]
    limit = 400
    by_size = job_bodies(profiles, "L1", max_bytes=limit)
    assert all(len(body) <= limit for body in by_size) and len(by_size) > 1
    documents = [json.loads(body) for body in by_size]
    sent = [p for d in documents for p in d["data"]["attributes"]["profiles"]["data"]]
    assert sent == [json.loads(p) for p in profiles]
    assert {json.dumps(d["data"]["relationships"]) for d in documents} == {
        json.dumps({"lists": {"data": [{"type": "list", "id": "L1"}]}})
    }
    assert job_bodies([], "L1") == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"api_key": None}, "api_key"),
        ({"api_key": ""}, "api_key"),
        ({"api_key": "pk with space"}, "api_key"),
        ({"base_url": "a.klaviyo.com"}, "base_url"),
        ({"revision": "2026-7-15"}, "revision"),
        ({"revision": "2026-02-30"}, "revision"),
        ({"revision": 20260715}, "revision"),
        ({"chunk_size": 10_001}, "chunk_size"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"job_timeout": "soon"}, "job_timeout"),
        ({"timeout": True}, "timeout"),
        ({"list_read_timeout": 0}, "list_read_timeout"),
        ({"list_read_burst": 0}, "list_read_burst"),
        ({"list_read_steady": 1.5}, "list_read_steady"),
    ],
)
def test_options_are_validated(changes: dict[str, Any], field: str) -> None:
    raw = {"api_key": "pk_x", **changes}
    config = DestinationConfig("kl", "klaviyo", {k: v for k, v in raw.items() if v is not None}, 1)
    with pytest.raises(OptionError) as caught:
        KlaviyoProvider.from_config(config)
    assert caught.value.field == field


def test_option_defaults() -> None:
    made = KlaviyoProvider.from_config(DestinationConfig("kl", "klaviyo", {"api_key": "pk_x"}, 1))
    assert (made.base_url, made.revision, made.chunk_size) == (
        "https://a.klaviyo.com",
        "2026-07-15",
        10_000,
    )
    assert (made.poll_interval, made.job_timeout, made.list_read_timeout) == (1.0, 300.0, 3600.0)
    assert (made._read_pace.burst, made._read_pace.steady) == (75, 700)
    revised = {"api_key": "pk_x", "revision": "2025-01-15.pre"}
    assert KlaviyoProvider.from_config(DestinationConfig("k", "klaviyo", revised, 1)).revision


# --- the emulator is as strict as Klaviyo ---------------------------------------------------------


@pytest.fixture
def http(klaviyo: KlaviyoEmulator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=klaviyo.base_url, timeout=30) as client:
        yield client


def headers(api_key: str = KEY, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Klaviyo-API-Key {api_key}",
        "revision": "2026-07-15",
        "Content-Type": MEDIA_TYPE,
        "Accept": MEDIA_TYPE,
        **extra,
    }


def import_body(profiles: list[dict[str, Any]], list_id: str) -> dict[str, Any]:
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {
                "profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}
            },
            "relationships": {"lists": {"data": [{"type": "list", "id": list_id}]}},
        }
    }


def first_error(response: httpx2.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["errors"][0]
    assert {"id", "code", "title", "detail"} <= error.keys()
    return error


def test_emulator_refuses_bad_auth_and_revision(http: httpx2.Client) -> None:
    missing = http.get("/api/lists", headers={"revision": "2026-07-15"})
    assert (missing.status_code, first_error(missing)["code"]) == (401, "not_authenticated")
    wrong = http.get("/api/lists", headers=headers("pk_unknown"))
    assert (wrong.status_code, first_error(wrong)["code"]) == (401, "authentication_failed")
    bearer = http.get("/api/lists", headers=headers(Authorization=f"Bearer {KEY}"))
    assert bearer.status_code == 401
    no_revision = {k: v for k, v in headers().items() if k != "revision"}
    response = http.get("/api/lists", headers=no_revision)
    assert response.status_code == 400
    assert first_error(response)["source"] == {"parameter": "revision"}
    assert http.get("/api/lists", headers=headers(revision="July 2026")).status_code == 400
    assert http.get("/api/lists", headers=headers(revision="2026-07-15.pre")).status_code == 200


def test_emulator_refuses_malformed_imports(http: httpx2.Client, klaviyo: KlaviyoEmulator) -> None:
    list_id = klaviyo.create_list("L")

    def post(body: Any, **extra: str) -> httpx2.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http.post("/api/profile-bulk-import-jobs", content=raw, headers=headers(**extra))

    good = {"email": "a@example.com"}
    assert post(import_body([good], list_id), **{"Content-Type": "text/plain"}).status_code == 415
    assert post(b"{not json").status_code == 400
    at = "/data/attributes/profiles/data"
    cases: list[tuple[list[dict[str, Any]], str]] = [
        ([good, {"first_name": "Jane"}], f"{at}/1/attributes"),
        ([{"phone_number": "4155550100"}], f"{at}/0/attributes/phone_number"),
        ([{"email": "no-at-sign"}], f"{at}/0/attributes/email"),
        ([{"email": "a@example.com", "shoe_size": 9}], f"{at}/0/attributes/shoe_size"),
        ([{"external_id": "x" * 256}], f"{at}/0/attributes/external_id"),
        ([{"email": 7}], f"{at}/0/attributes/email"),
        ([], at),
    ]
    for profiles, pointer in cases:
        response = post(import_body(profiles, list_id))
        assert response.status_code == 400, profiles
        assert first_error(response)["source"] == {"pointer": pointer}
    wrong_type = import_body([good], list_id)
    wrong_type["data"]["type"] = "profile-import-job"
    assert post(wrong_type).status_code == 400
    unknown_list = post(import_body([good], "nope"))
    assert unknown_list.status_code == 404
    too_many = [{"email": f"u{i}@example.com"} for i in range(10_001)]
    assert "10000" in first_error(post(import_body(too_many, list_id)))["detail"]
    huge = [{"email": f"u{i}@example.com", "first_name": "x" * 600} for i in range(8_000)]
    too_big = post(import_body(huge, list_id))
    assert too_big.status_code == 413
    assert klaviyo.jobs() == []


def test_emulator_jobs_complete_over_polls_and_upsert_people(
    http: httpx2.Client, klaviyo: KlaviyoEmulator
) -> None:
    list_id = klaviyo.create_list("L")
    body = import_body(
        [
            {"email": "a@example.com", "first_name": "A"},
            {"phone_number": "+14155550100"},
            {"email": "bad@example.c"},
        ],
        list_id,
    )
    created = http.post("/api/profile-bulk-import-jobs", json=body, headers=headers())
    assert created.status_code == 202
    job = created.json()["data"]
    assert (job["type"], job["attributes"]["status"]) == ("profile-bulk-import-job", "queued")
    path = f"/api/profile-bulk-import-jobs/{job['id']}"
    assert http.get(path, headers=headers()).json()["data"]["attributes"]["status"] == "processing"
    assert klaviyo.members("L") == []  # nothing happens before the job is done
    done = http.get(path, headers=headers()).json()["data"]["attributes"]
    assert (done["status"], done["total_count"], done["failed_count"]) == ("complete", 3, 1)
    assert klaviyo.members("L") == [
        {"email": "a@example.com", "first_name": "A"},
        {"phone_number": "+14155550100"},
    ]
    errors_page = http.get(f"{path}/import-errors", headers=headers()).json()
    assert [e["attributes"]["detail"] for e in errors_page["data"]] == ["Invalid email address."]
    # The same people again: matched by email, then by phone; still two profiles.
    again = import_body(
        [
            {"email": "a@example.com", "phone_number": "+14155550199", "last_name": "B"},
            {"phone_number": "+14155550100", "external_id": "c-1"},
        ],
        list_id,
    )
    second = http.post("/api/profile-bulk-import-jobs", json=again, headers=headers()).json()
    for _ in range(2):
        http.get(f"/api/profile-bulk-import-jobs/{second['data']['id']}", headers=headers())
    assert len(klaviyo.profiles()) == 2
    assert klaviyo.members("L") == [
        {
            "email": "a@example.com",
            "first_name": "A",
            "phone_number": "+14155550199",
            "last_name": "B",
        },
        {"phone_number": "+14155550100", "external_id": "c-1"},
    ]
    touched = http.get(
        f"/api/profile-bulk-import-jobs/{second['data']['id']}/relationships/profiles",
        headers=headers(),
    ).json()
    assert [item["id"] for item in touched["data"]] == klaviyo.member_ids("L")


def test_emulator_pages_and_limits_relationships(
    http: httpx2.Client, klaviyo: KlaviyoEmulator
) -> None:
    list_id = klaviyo.create_list("L")
    members = f"/api/lists/{list_id}/relationships/profiles"
    assert http.get(members, params={"page[size]": "101"}, headers=headers()).status_code == 400
    assert http.get(members, params={"page[sise]": "10"}, headers=headers()).status_code == 400
    removal = {"data": [{"type": "profile", "id": f"p{i}"} for i in range(1_001)]}
    assert http.request("DELETE", members, json=removal, headers=headers()).status_code == 400
    assert http.get("/api/lists", params={"page[size]": "11"}, headers=headers()).status_code == 400
    assert (
        http.get(
            "/api/lists", params={"filter": "contains(name,'L')"}, headers=headers()
        ).status_code
        == 400
    )
    assert http.get("/api/nothing", headers=headers()).status_code == 404
    assert http.request("PATCH", "/api/lists", json={}, headers=headers()).status_code == 405


def test_emulator_pages_members_by_a_cursor_that_removals_do_not_shift(
    http: httpx2.Client, klaviyo: KlaviyoEmulator
) -> None:
    list_id = klaviyo.create_list("L")
    klaviyo.fill_list(list_id, simple_profiles(0, 250))
    members = f"/api/lists/{list_id}/relationships/profiles"
    first = http.get(members, headers=headers()).json()
    assert len(first["data"]) == 20  # the spec's default page size
    page = http.get(members, params={"page[size]": "100"}, headers=headers()).json()
    ids = [item["id"] for item in page["data"]]
    assert ids == klaviyo.member_ids("L")[:100]
    gone = {"data": [{"type": "profile", "id": pid} for pid in ids[50:]]}
    assert http.request("DELETE", members, json=gone, headers=headers()).status_code == 204
    following = httpx2.URL(page["links"]["next"])
    second = http.get(following.path, params=following.params, headers=headers()).json()
    assert [item["id"] for item in second["data"]] == klaviyo.member_ids("L")[50:150]
    assert set(page["links"]) == {"self", "next"}
    bad = http.get(members, params={"page[cursor]": "nonsense"}, headers=headers())
    assert (bad.status_code, first_error(bad)["source"]) == (400, {"parameter": "page[cursor]"})


def test_emulator_throttles_member_reads_per_fixed_window(klaviyo: KlaviyoEmulator) -> None:
    with (
        KlaviyoEmulator(KEY, rate_scale=0.04) as strict,  # 3 a second, 30 a minute
        httpx2.Client(base_url=strict.base_url, timeout=30) as client,
    ):
        list_id = strict.create_list("L")
        members = f"/api/lists/{list_id}/relationships/profiles"
        # Seven at once: whichever second boundary they straddle, one window gets four.
        answers = [client.get(members, headers=headers()) for _ in range(7)]
        lists = client.get("/api/lists", headers=headers())  # another endpoint: its own quota
    statuses = [answer.status_code for answer in answers]
    assert 429 in statuses and statuses[:2] == [200, 200]  # at most 3 in one 1 s window
    throttled = next(answer for answer in answers if answer.status_code == 429)
    assert throttled.headers["retry-after"] == "1"  # whole seconds to the window's end
    assert first_error(throttled)["code"] == "throttled"
    assert lists.status_code == 200


def test_emulator_keeps_accounts_apart(http: httpx2.Client, klaviyo: KlaviyoEmulator) -> None:
    body = {"data": {"type": "list", "attributes": {"name": "Mine"}}}
    created = http.post("/api/lists", json=body, headers=headers(OTHER_KEY))
    assert created.status_code == 201
    assert klaviyo.lists(OTHER_KEY) == [(created.json()["data"]["id"], "Mine")]
    assert klaviyo.lists(KEY) == []


# --- the provider against the emulator ------------------------------------------------------


def test_a_chunk_over_5mb_goes_in_several_jobs(klaviyo: KlaviyoEmulator) -> None:
    users = [{"email": f"u{i}@example.com", "firstName": "x" * 600} for i in range(9_000)]
    results = asyncio.run(deliver(provider(klaviyo), [users], segment()))
    assert results == [ChunkResult(invalid=0, status=202)]
    jobs = klaviyo.jobs()
    assert len(jobs) == 2 and all(job.body_bytes <= MAX_JOB_BYTES for job in jobs)
    assert sum(len(job.profiles) for job in jobs) == 9_000
    assert len(klaviyo.members(LIST)) == 9_000


def test_failed_profiles_count_as_invalid(klaviyo: KlaviyoEmulator) -> None:
    users = [{"email": "ok@example.com"}, {"email": "bad@example.c"}, {"firstName": "none"}]
    results = asyncio.run(deliver(provider(klaviyo), [users], segment()))
    assert [r.invalid for r in results] == [2]
    assert klaviyo.members(LIST) == [{"email": "ok@example.com"}]


def test_an_existing_list_is_found_by_name_whatever_its_quotes(klaviyo: KlaviyoEmulator) -> None:
    for i in range(25):  # more than two pages of lists
        klaviyo.create_list(f"other {i}")
    tricky = 'Fans of "Rock" n\' roll'
    plain = "Fans of 'Jazz'"
    tricky_id = klaviyo.create_list(tricky)
    plain_id = klaviyo.create_list(plain)
    made = provider(klaviyo)
    asyncio.run(deliver(made, [simple_users(0, 2)], segment(name=tricky)))
    asyncio.run(deliver(made, [simple_users(0, 2)], segment(name=plain)))
    assert klaviyo.member_ids(tricky) == klaviyo.member_ids(plain)
    assert (klaviyo.list_id(tricky), klaviyo.list_id(plain)) == (tricky_id, plain_id)
    lookups = klaviyo.calls_to("get_lists")
    assert len(lookups) == 3 + 1  # all lists in pages of 10; then one filtered page
    assert "filter" not in lookups[0].query and "filter" in lookups[3].query
    asyncio.run(deliver(made, [simple_users(2, 1)], segment(name=plain)))
    assert len(klaviyo.calls_to("get_lists")) == 4  # remembered


def test_a_list_deleted_at_klaviyo_is_looked_up_again(klaviyo: KlaviyoEmulator) -> None:
    made = provider(klaviyo)
    asyncio.run(deliver(made, [simple_users(0, 3)], segment()))
    klaviyo.delete_list(klaviyo.list_id(LIST))
    with pytest.raises(RetryableError, match=r"HTTP 404 .*looked up again"):
        asyncio.run(deliver(made, [simple_users(0, 3)], segment()))
    asyncio.run(deliver(made, [simple_users(0, 3)], segment()))  # the worker's next attempt
    assert klaviyo.members(LIST) == simple_profiles(0, 3)


def test_jobs_cancelled_or_too_slow_are_retried(klaviyo: KlaviyoEmulator) -> None:
    klaviyo.cancel_jobs()
    with pytest.raises(RetryableError, match="ended 'cancelled'"):
        asyncio.run(deliver(provider(klaviyo), [simple_users(0, 2)], segment()))
    with (
        KlaviyoEmulator(KEY, polls_to_complete=10_000) as slow,
        pytest.raises(RetryableError, match=r"still processing after 0\.05 s"),
    ):
        asyncio.run(deliver(provider(slow, job_timeout=0.05), [simple_users(0, 2)], segment()))


def test_a_throttled_read_is_waited_out_when_it_fits(klaviyo: KlaviyoEmulator) -> None:
    made = provider(klaviyo, job_timeout=0.5)
    asyncio.run(deliver(made, [simple_users(0, 3)], segment()))
    reads = {"get_lists", "get_list_members", "get_job", "get_job_profiles", "get_job_errors"}
    klaviyo.fail(429, times=3, retry_after="0", on=reads)  # three in a row
    asyncio.run(deliver(made, [simple_users(1, 3)], segment("primary")))
    assert klaviyo.members(LIST) == simple_profiles(1, 3)
    assert [c.method for c in klaviyo.calls if c.status == 429] == ["GET"] * 3
    job_reads = {"get_job", "get_job_profiles", "get_job_errors"}
    klaviyo.fail(429, retry_after="1", on=job_reads)  # longer than the chunk may wait
    with pytest.raises(RetryableError) as caught:
        asyncio.run(deliver(made, [simple_users(1, 3)], segment("primary")))
    assert (caught.value.status, caught.value.retry_after) == (429, 1.0)
    # The list's members are read within list_read_timeout, not the chunk's job_timeout.
    klaviyo.fail(429, retry_after="1", on="get_list_members")
    asyncio.run(deliver(made, [simple_users(2, 3)], segment("primary")))
    assert klaviyo.members(LIST) == simple_profiles(2, 3)
    assert klaviyo.member_cursors()[-2:] == [(None, 429), (None, 200)]
    writes = {"post_list", "add_list_members", "post_job"}
    klaviyo.fail(429, retry_after="0", on=writes)  # an import is not repeated in place
    with pytest.raises(RetryableError, match=r"HTTP 429 \(import profiles\)"):
        asyncio.run(deliver(made, [simple_users(1, 3)], segment()))


def test_errors_keep_klaviyo_detail_but_not_user_data(klaviyo: KlaviyoEmulator) -> None:
    detail = "Invalid email jane@example.com or phone +1 (415) 555-0100 in profile"
    klaviyo.fail(400, errors_document(400, detail), on="post_job")
    with pytest.raises(PermanentError) as caught:
        asyncio.run(deliver(provider(klaviyo), [simple_users(0, 2)], segment()))
    assert str(caught.value) == (
        "Klaviyo HTTP 400 (import profiles): Invalid email <email> or phone <phone> in profile"
    )
    assert caught.value.status == 400


def test_unreachable_klaviyo_is_retryable() -> None:
    with KlaviyoEmulator(KEY) as gone:
        url = gone.base_url
    config = DestinationConfig("kl", "klaviyo", {"api_key": KEY, "base_url": url}, 1)
    with pytest.raises(RetryableError, match="connection failed"):
        asyncio.run(deliver(KlaviyoProvider.from_config(config), [simple_users(0, 1)], segment()))


def test_primary_over_a_big_list_pages_and_removes_in_batches(klaviyo: KlaviyoEmulator) -> None:
    made = provider(klaviyo)
    asyncio.run(deliver(made, [simple_users(0, 1_500)], segment()))
    chunks = [simple_users(1_300, 200), simple_users(9_000, 5)]
    asyncio.run(deliver(made, chunks, segment("primary")))
    assert canonical(klaviyo.members(LIST)) == canonical(
        [*simple_profiles(1_300, 200), *simple_profiles(9_000, 5)]
    )
    members = f"/api/lists/{klaviyo.list_id(LIST)}/relationships/profiles"
    on_members = [c for c in klaviyo.calls if c.path.rstrip("/") == members]
    assert [c.route for c in on_members].count("get_list_members") == 15  # 100 a page
    assert [c.route for c in on_members].count("remove_list_members") == 2  # 1,000 a call
    assert len(klaviyo.profiles()) == 1_505  # removed from the list, not deleted


def read_again_in_place(cursors: Sequence[tuple[str | None, int]], status: int) -> str | None:
    """The cursor of the one read answered ``status``, checked to be asked again next, and
    answered: the page after an error is the same page, not page 1."""
    (at,) = [i for i, (_, answered) in enumerate(cursors) if answered == status]
    assert cursors[at + 1] == (cursors[at][0], 200)
    return cursors[at][0]


def test_member_reads_keep_to_the_rate_limits(klaviyo: KlaviyoEmulator) -> None:
    new = [*simple_users(2_900, 100), *simple_users(50_000, 100)]
    expected = canonical([*simple_profiles(2_900, 100), *simple_profiles(50_000, 100)])
    with KlaviyoEmulator(KEY, rate_scale=0.27) as strict:  # 20 a second, 202 a minute
        list_id = strict.create_list(LIST)
        strict.fill_list(list_id, simple_profiles(0, 3_000))
        # Paced at the limits: never throttled.
        paced = provider(strict, list_read_burst=20, list_read_steady=202)
        asyncio.run(deliver(paced, [new], segment("primary")))
        assert canonical(strict.members(LIST)) == expected
        cursors = strict.member_cursors()
        # 30 pages, and one more when the read reaches the end after the import added 100.
        assert len(cursors) in (30, 31) and {answered for _, answered in cursors} == {200}
        # Paced far above them: throttled, and each Retry-After (1 s: the window's end) is
        # waited out, for the same page; no page is read twice, none is skipped.
        strict.fill_list(list_id, simple_profiles(0, 3_000))
        eager = provider(strict, list_read_burst=1_000)
        asyncio.run(deliver(eager, [new], segment("primary")))
        assert canonical(strict.members(LIST)) == expected
        cursors = strict.member_cursors()[len(cursors) :]
    throttled = [i for i, (_, answered) in enumerate(cursors) if answered == 429]
    assert throttled  # 31 pages in windows of 20
    for at in throttled:
        assert cursors[at + 1] == (cursors[at][0], 200)  # a second 429: asked too soon
    read = [cursor for cursor, answered in cursors if answered == 200]
    assert len(read) == len(set(read)) == 31  # the 3,000 and the 100 imported meanwhile


def test_a_failing_member_read_backs_off_in_place_then_gives_up(klaviyo: KlaviyoEmulator) -> None:
    list_id = klaviyo.create_list(LIST)
    klaviyo.fill_list(list_id, simple_profiles(0, 1_000))
    made = provider(klaviyo, list_read_timeout=1.0)
    klaviyo.fail(503, on="get_list_members", after=3)  # the fourth page, once
    asyncio.run(deliver(made, [simple_users(990, 20)], segment("primary")))
    assert canonical(klaviyo.members(LIST)) == canonical(simple_profiles(990, 20))
    assert read_again_in_place(klaviyo.member_cursors(), 503) is not None
    # Down for longer than list_read_timeout: the attempt is retried (status 503), and the
    # read it gave up is not carried on: the next attempt starts from page 1.
    klaviyo.fill_list(list_id, simple_profiles(0, 1_000))  # 1,010 members: 11 pages
    before = len(klaviyo.member_cursors())
    down = [True]
    klaviyo.fail(
        503,
        on=lambda incoming: incoming.route == "get_list_members" and down[0],
        times=1_000,
        after=2,
    )
    with pytest.raises(RetryableError, match=r"HTTP 503 \(read list\)") as caught:
        asyncio.run(deliver(made, [simple_users(990, 20)], segment("primary")))
    assert caught.value.status == 503
    failed = klaviyo.member_cursors()[before:]
    assert [answered for _, answered in failed[:3]] == [200, 200, 503]
    assert 3 <= len(failed) - 2 <= 5  # backing off 0.25, 0.5, 1 s: the third is too long
    assert {cursor for cursor, _ in failed[2:]} == {failed[2][0]}  # the same page each time
    assert len(klaviyo.members(LIST)) == 1_010  # nobody removed
    down[0] = False
    asyncio.run(deliver(made, [simple_users(990, 20)], segment("primary")))
    again = klaviyo.member_cursors()[before + len(failed) :]
    assert again[0] == (None, 200) and len(again) == 11
    assert canonical(klaviyo.members(LIST)) == canonical(simple_profiles(990, 20))


def test_a_member_read_slower_than_its_deadline_is_retried(klaviyo: KlaviyoEmulator) -> None:
    list_id = klaviyo.create_list(LIST)
    klaviyo.fill_list(list_id, simple_profiles(0, 500))  # 5 pages, one a second
    made = provider(klaviyo, list_read_timeout=1.5, list_read_burst=1)
    with pytest.raises(RetryableError, match=r"read list: its rate limits leave no turn"):
        asyncio.run(deliver(made, [simple_users(0, 10)], segment("primary")))
    assert klaviyo.member_cursors()[0] == (None, 200) and len(klaviyo.member_cursors()) == 2
    assert len(klaviyo.members(LIST)) == 500  # nobody removed


# --- end to end: the app, its worker and the emulator -------------------------------------


# SQLite only: the read lives in the provider, the database plays no part in it (the other
# end-to-end tests here run on both), and the test takes some 20 s.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_primary_over_300k_members_outlasts_the_chunk_timeout(
    fast: Settings, engine: Engine
) -> None:
    """A replace over a list of 300,000 members (3,000 pages: some 13 s here, paced at 750 a
    second with the emulator's limits scaled by 10; 4 to 5 minutes at Klaviyo's) with a 3 s
    chunk timeout: the read is not a chunk's, so the attempts cut short by the timeout leave it
    running and the next one carries on with it; it is read once, one 503 and one 429 on the
    way asked again in place, and the list ends up holding the new segment exactly."""
    settings = dataclasses.replace(
        fast, chunk_timeout=dt.timedelta(seconds=3), delivery_max_attempts=20
    )
    kept, new = simple_users(299_500, 500), simple_users(1_000_000, 500)
    with KlaviyoEmulator(KEY, rate_scale=10) as klaviyo:
        list_id = klaviyo.create_list(LIST)
        klaviyo.fill_list(list_id, simple_profiles(0, 300_000))
        klaviyo.fail(503, on="get_list_members", after=1_000)
        klaviyo.fail(429, retry_after="1", on="get_list_members", after=1_000)
        paced = options(klaviyo, chunk_size=500, list_read_burst=750, list_read_steady=7_500)
        with serve(settings, engine, destinations(("kl-main", "klaviyo", paced))) as client:
            response = upload(client, "big", [*kept, *new], 500, "?sync=true", type="primary")
            assert response.status_code == 200
            body = status(client, "big")
        (delivery,) = body["deliveries"]
        assert (delivery["state"], delivery["lastError"]) == ("succeeded", None)
        members = klaviyo.members(LIST)
        assert len(members) == 1_000
        assert canonical(members) == canonical(
            [*simple_profiles(299_500, 500), *simple_profiles(1_000_000, 500)]
        )
        assert len(klaviyo.profiles()) == 300_500  # removed from the list, not deleted
        cursors = klaviyo.member_cursors()
        throttled = [c for c in klaviyo.calls if c.status == 429 and not c.scripted]
    assert cursors[0] == (None, 200) and [c for c, _ in cursors].count(None) == 1
    assert read_again_in_place(cursors, 503) != read_again_in_place(cursors, 429)
    read = [cursor for cursor, answered in cursors if answered == 200]
    assert len(read) == len(set(read)) >= 3_000  # each page once, across attempts
    assert throttled == []  # the pacing kept to the limits
    with engine.connect() as conn:
        rows = conn.execute(
            select(delivery_attempts)
            .where(delivery_attempts.c.session_key == "big")
            .order_by(delivery_attempts.c.number)
        ).all()
    assert rows[-1].outcome == "succeeded"
    assert {r.error for r in rows[:-1]} == {"chunk not done within 3 s"}
    assert len(rows) >= 2  # the read took longer than a chunk may


def test_mixed_25k_session_lands_exactly(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    users, expected, invalid = mixed_users(25_000)
    sent = [*users, users[0], users[3], dict(reversed(list(users[11].items())))]  # exact repeats
    where = destinations(("kl-main", "klaviyo", options(klaviyo)))
    with serve(fast, engine, where) as client:
        response = upload(client, "mixed", sent, 5_000, "?sync=true")
        assert (response.status_code, response.content) == (200, b'{"success": true}')
        body = status(client, "mixed")
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "kl-main",
        "kind": "klaviyo",
        "segmentName": LIST,
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 25_000,
        "invalidUsers": invalid,
        "lastError": None,
    }
    assert invalid == 50
    members = klaviyo.members(LIST)
    assert len(members) == len(expected) == 24_950
    assert canonical(members) == canonical(expected)
    assert [len(job.profiles) for job in klaviyo.jobs()] == [
        9_990,
        9_990,
        4_995,
    ]  # the refused emails are sent
    calls = klaviyo.calls
    assert {c.headers["revision"] for c in calls} == {"2026-07-15"}
    assert {c.headers["content-type"] for c in calls if c.method == "POST"} == {MEDIA_TYPE}


def test_primary_replaces_and_custom_adds(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    where = destinations(("kl-main", "klaviyo", options(klaviyo)))
    with serve(fast, engine, where) as client:
        assert upload(client, "first", simple_users(0, 300), 100, "?sync=true").status_code == 200
        first_ids = ids_by_email(klaviyo)
        assert upload(client, "more", simple_users(300, 50), 100, "?sync=true").status_code == 200
        assert canonical(klaviyo.members(LIST)) == canonical(simple_profiles(0, 350))

        kept = simple_users(250, 100)  # 50 from the first upload, 50 from the second
        replacement = [*kept, *simple_users(1_000, 20)]
        replaced = upload(client, "replace", replacement, 50, "?sync=true", type="primary")
        assert replaced.status_code == 200
        body = status(client, "replace")
    assert body["deliveries"][0]["state"] == "succeeded"
    assert canonical(klaviyo.members(LIST)) == canonical(
        [*simple_profiles(250, 100), *simple_profiles(1_000, 20)]
    )
    assert len(klaviyo.lists()) == 1
    # The same people are the same profiles: none was created twice.
    now_ids = ids_by_email(klaviyo)
    again = [f"person{i}@example.com" for i in range(250, 300)]
    assert [now_ids[email] for email in again] == [first_ids[email] for email in again]
    assert len(klaviyo.profiles()) == 370


def test_primary_with_nobody_usable_empties_the_list(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    where = destinations(("kl-main", "klaviyo", options(klaviyo)))
    with serve(fast, engine, where) as client:
        assert upload(client, "first", simple_users(0, 30), 30, "?sync=true").status_code == 200
        users = [{"firstName": "Nobody"}, {"email": "broken"}]
        assert upload(client, "empty", users, 2, "?sync=true", type="primary").status_code == 200
        assert status(client, "empty")["deliveries"][0]["invalidUsers"] == 2
    assert klaviyo.members(LIST) == []


def test_rate_limits_and_outages_are_retried_to_success(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    where = destinations(("kl-main", "klaviyo", options(klaviyo, chunk_size=20)))
    with serve(fast, engine, where) as client:
        assert upload(client, "before", simple_users(0, 30), 30, "?sync=true").status_code == 200
        # A 429 on the first import; then a 503 on the second chunk's import: each retried
        # attempt starts over from chunk 1. A 503 at the very end, on the removal of members
        # who are not in the new segment, is asked again in place (removing is idempotent).
        klaviyo.fail(429, retry_after="1", on="post_job")
        klaviyo.fail(503, on="post_job", after=1)
        klaviyo.fail(503, on="remove_list_members")
        users = [*simple_users(20, 10), *simple_users(100, 30)]
        assert upload(client, "flaky", users, 20, "?sync=true", type="primary").status_code == 200
        body = status(client, "flaky")
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        3,
        None,
    )
    assert canonical(klaviyo.members(LIST)) == canonical(
        [*simple_profiles(20, 10), *simple_profiles(100, 30)]
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(delivery_attempts)
            .where(delivery_attempts.c.session_key == "flaky")
            .order_by(delivery_attempts.c.number)
        ).all()
    assert [(r.outcome, r.http_status) for r in rows] == [
        ("retry", 429),
        ("retry", 503),
        ("succeeded", 202),
    ]
    assert rows[0].error == (
        "Klaviyo HTTP 429 (import profiles): "
        "Request was throttled. Expected available in 1 second(s)."
    )
    assert rows[1].started_at - rows[0].finished_at >= dt.timedelta(seconds=1)  # Retry-After
    assert rows[1].error == "Klaviyo HTTP 503 (import profiles): Service unavailable."
    removals = [c.status for c in klaviyo.calls if c.route == "remove_list_members"]
    assert removals == [503, 204]


def test_permanent_errors_fail_with_klaviyos_message(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    klaviyo.fail(403, on="post_job")
    where = destinations(
        ("kl-main", "klaviyo", options(klaviyo)),
        ("kl-typo", "klaviyo", options(klaviyo, api_key="pk_revoked")),
    )
    with serve(fast, engine, where) as client:
        response = upload(client, "denied", simple_users(0, 10), 5, "?sync=true")
        body = status(client, "denied")
    assert response.status_code == 400
    assert errors(response) == [
        f"kl-main: Klaviyo HTTP 403 (import profiles): {FORBIDDEN}",
        "kl-typo: Klaviyo HTTP 401 (find list): Incorrect authentication credentials.",
    ]
    assert body["state"] == "failed"
    failed = {d["destination"]: d for d in body["deliveries"]}
    assert (failed["kl-main"]["attempts"], failed["kl-main"]["lastError"]) == (
        1,
        f"Klaviyo HTTP 403 (import profiles): {FORBIDDEN}",
    )
    assert failed["kl-typo"]["attempts"] == 1
    assert klaviyo.members(LIST) == []


def test_two_accounts_each_receive_the_segment(
    fast: Settings, engine: Engine, klaviyo: KlaviyoEmulator
) -> None:
    users = simple_users(0, 25)
    where = destinations(
        ("kl-us", "klaviyo", options(klaviyo, KEY)),
        ("kl-eu", "klaviyo", options(klaviyo, OTHER_KEY, revision="2025-01-15")),
    )
    with serve(fast, engine, where) as client:
        assert upload(client, "both", users, 10, "?sync=true").status_code == 200
        body = status(client, "both")
    assert [d["state"] for d in body["deliveries"]] == ["succeeded", "succeeded"]
    for api_key in (KEY, OTHER_KEY):
        assert canonical(klaviyo.members(LIST, api_key)) == canonical(simple_profiles(0, 25))
    assert {c.headers["revision"] for c in klaviyo.calls if c.principal == OTHER_KEY} == {
        "2025-01-15"
    }

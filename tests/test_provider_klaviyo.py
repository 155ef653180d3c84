"""The ``klaviyo`` provider: its user -> profile mapping, the Klaviyo emulator's strictness, and
deliveries over the real app and worker (SQLite and PostgreSQL) into the emulator, asserting on
the profiles and list memberships the emulated account ends up holding."""

from __future__ import annotations

import asyncio
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
    assert (made.poll_interval, made.job_timeout) == (1.0, 300.0)
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
    klaviyo.fail(429, retry_after="1", on=reads)  # longer than the chunk may wait
    with pytest.raises(RetryableError) as caught:
        asyncio.run(deliver(made, [simple_users(1, 3)], segment("primary")))
    assert (caught.value.status, caught.value.retry_after) == (429, 1.0)
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


# --- end to end: the app, its worker and the emulator -------------------------------------


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
        # A 429 on the first import; then a 503 at the very end, on the removal of members
        # who are not in the new segment: each retried attempt starts over from chunk 1.
        klaviyo.fail(429, retry_after="1", on="post_job")
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
    assert rows[1].error == "Klaviyo HTTP 503 (remove from list): Service unavailable."


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

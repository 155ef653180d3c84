"""The ``tiktok`` provider: its user -> row mapping, its options, the emulator's strictness,
its error mapping and audience handling against the emulator, and delivery end to end over
the real app with its in-process worker on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx2
import pytest
from sqlalchemy import Engine, func, select

from audience_server import db, members
from audience_server.destinations import DestinationConfig, OptionError
from audience_server.members import Ledger
from audience_server.models import delivery_attempts, ledger_members, member_ledgers
from audience_server.providers.base import (
    Chunk,
    ChunkResult,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.tiktok import TikTokProvider, batch_data, identifiers
from audience_server.settings import Settings
from tests.emulators.tiktok import (
    AUDIENCE,
    DELETE,
    LIST,
    MAPPING,
    TikTokEmulator,
    envelope_error,
)
from tests.helpers import NAME, destinations, errors, form, send, serve, status, upload

ADVERTISER = "7000000000000000001"
OTHER_ADVERTISER = "7000000000000000002"
TOKEN = "tok-main"
OTHER_TOKEN = "tok-other"
AUDIENCE_NAME = "blotout_High_Value_Customers_Q1"
EMAIL, PHONE = "EMAIL_SHA256", "PHONE_SHA256"
T = TypeVar("T")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def tiktok() -> Iterator[TikTokEmulator]:
    accounts = {TOKEN: [ADVERTISER], OTHER_TOKEN: [OTHER_ADVERTISER]}
    with TikTokEmulator(accounts) as emulator:
        yield emulator


def options(emulator: TikTokEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "access_token": TOKEN,
        "advertiser_id": ADVERTISER,
        "base_url": emulator.base_url,
        **extra,
    }


def contacts(count: int, start: int = 0) -> list[dict[str, Any]]:
    """Users with a plain email and a US phone each."""
    return [
        {"email": f"c{i}@example.com", "phone": f"+1 415 300 {i:04d}"}
        for i in range(start, start + count)
    ]


def expected_members(count: int, start: int = 0) -> dict[str, set[str]]:
    return {
        EMAIL: {sha(f"c{i}@example.com") for i in range(start, start + count)},
        PHONE: {sha(f"1415300{i:04d}") for i in range(start, start + count)},
    }


# --- user -> row --------------------------------------------------------------------------

PREHASHED = sha("pre@example.com")


@pytest.mark.parametrize(
    ("user", "email", "phone"),
    [
        ({"email": "  Jane.Doe@Example.COM "}, "jane.doe@example.com", None),
        ({"email": "Jane.Doe+Promo@Example.com"}, "jane.doe@example.com", None),
        ({"email": "first.last@gmail.com"}, "first.last@gmail.com", None),  # dots kept
        ({"email": PREHASHED.upper()}, PREHASHED, None),
        ({"email": f" {PREHASHED} "}, PREHASHED, None),
        ({"phone": "+1 (415) 555-0100"}, None, "14155550100"),
        ({"phone": "(415) 555-0100", "country": "US"}, None, "14155550100"),
        ({"phone": "020 7946 0018", "country": "gb"}, None, "442079460018"),
        ({"phone": "0049 30 123456"}, None, "4930123456"),
        ({"phone": 14155550100}, None, "14155550100"),
        ({"phone": PREHASHED.upper()}, None, PREHASHED),
        ({"email": "a@b.co", "phone": "+14155550100"}, "a@b.co", "14155550100"),
    ],
)
def test_identifiers_are_normalized_then_hashed(
    user: dict[str, Any], email: str | None, phone: str | None
) -> None:
    expected = tuple(
        None if value is None else value if value == PREHASHED else sha(value)
        for value in (email, phone)
    )
    assert identifiers(user) == expected


@pytest.mark.parametrize(
    "user",
    [
        {},
        {"email": None, "phone": None},
        {"email": "not-an-email", "phone": "12"},
        {"email": "+promo@example.com"},  # nothing left once the +tag is dropped
        {"phone": "4155550100"},  # national, and no country to read it with
        {"phone": True, "email": 42},
        {"firstName": "Jane", "lastName": "Doe", "country": "US", "postalCode": "94105"},
        {"externalId": "cust-1", "edgeTagId": "et_1"},
    ],
)
def test_users_without_email_or_phone_are_unusable(user: dict[str, Any]) -> None:
    assert identifiers(user) == (None, None)


def test_batch_data_rows_follow_id_schema_and_count_invalid() -> None:
    users = [
        {"email": "a@example.com", "phone": "+14155550100"},
        {"email": "b@example.com"},
        {"email": "nope"},
        {"phone": "+14155550101", "firstName": "Jo"},
    ]
    rows, invalid = batch_data(users, "42")
    assert invalid == 1
    assert rows == [
        [
            {"id": sha("a@example.com"), "audience_ids": ["42"]},
            {"id": sha("14155550100"), "audience_ids": ["42"]},
        ],
        [{"id": sha("b@example.com"), "audience_ids": ["42"]}, {}],
        [{}, {"id": sha("14155550101"), "audience_ids": ["42"]}],
    ]


# --- options ------------------------------------------------------------------------------


def test_options_have_defaults() -> None:
    config = DestinationConfig("tt", "tiktok", {"access_token": "t", "advertiser_id": "7"}, 1)
    provider = TikTokProvider.from_config(config)
    assert provider.base_url == "https://business-api.tiktok.com"
    assert (provider.chunk_size, provider.timeout) == (1_000, 30.0)


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({"advertiser_id": "7"}, "access_token"),
        ({"access_token": " ", "advertiser_id": "7"}, "access_token"),
        ({"access_token": "t"}, "advertiser_id"),
        ({"access_token": "t", "advertiser_id": 7000000000000000001}, "advertiser_id"),
        ({"access_token": "t", "advertiser_id": "act_7"}, "advertiser_id"),
        ({"access_token": "t", "advertiser_id": "7", "base_url": "ftp://x"}, "base_url"),
        ({"access_token": "t", "advertiser_id": "7", "chunk_size": 10_001}, "chunk_size"),
        ({"access_token": "t", "advertiser_id": "7", "chunk_size": 0}, "chunk_size"),
        ({"access_token": "t", "advertiser_id": "7", "timeout": 0}, "timeout"),
        ({"access_token": "t", "advertiser_id": "7", "phone_format": "plus"}, "phone_format"),
    ],
)
def test_bad_options_are_named(opts: dict[str, Any], field: str) -> None:
    with pytest.raises(OptionError) as caught:
        TikTokProvider.from_config(DestinationConfig("tt", "tiktok", opts, 1))
    assert caught.value.field == field
    value = opts.get(field)
    if isinstance(value, str) and value.strip():
        assert value not in str(caught.value)  # option values may be secrets


# --- the emulator is strict ---------------------------------------------------------------


def call(
    emulator: TikTokEmulator,
    endpoint: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    method: str = "POST",
    params: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> httpx2.Response:
    headers = {} if token is None else {"Access-Token": token}
    if body is not None:
        headers["Content-Type"] = content_type
    with httpx2.Client(base_url=emulator.base_url) as http:
        return http.request(
            method,
            f"/open_api/v1.3/{endpoint}",
            json=body,
            params=params,
            headers=headers,
        )


def mapping(audience_id: str, digest: str = PREHASHED, **overrides: Any) -> dict[str, Any]:
    return {
        "advertiser_ids": [ADVERTISER],
        "action": "add",
        "id_schema": [EMAIL, PHONE],
        "batch_data": [[{"id": digest, "audience_ids": [audience_id]}, {}]],
        **overrides,
    }


def test_emulator_creates_lists_adds_and_deletes(tiktok: TikTokEmulator) -> None:
    created = call(tiktok, AUDIENCE, {"advertiser_id": ADVERTISER, "custom_audience_name": "a"})
    assert created.json()["code"] == 40002  # no action
    created = call(
        tiktok,
        AUDIENCE,
        {"advertiser_id": ADVERTISER, "custom_audience_name": "a", "action": "create"},
    )
    assert created.status_code == 200
    envelope = created.json()
    assert (envelope["code"], envelope["message"]) == (0, "OK")
    assert envelope["request_id"]
    audience_id = envelope["data"]["audience_id"]
    assert call(tiktok, MAPPING, mapping(audience_id)).json()["code"] == 0
    assert tiktok.members(ADVERTISER, "a") == {EMAIL: {PREHASHED}}
    listed = call(
        tiktok, LIST, method="GET", params={"advertiser_id": ADVERTISER, "page_size": "100"}
    ).json()["data"]
    assert [(a["audience_id"], a["name"]) for a in listed["list"]] == [(audience_id, "a")]
    assert listed["page_info"] == {"page": 1, "page_size": 100, "total_number": 1, "total_page": 1}
    removed = call(tiktok, MAPPING, mapping(audience_id, action="delete")).json()
    assert removed["code"] == 0 and tiktok.members(ADVERTISER, "a") == {}
    undocumented = call(
        tiktok,
        AUDIENCE,
        {"advertiser_id": ADVERTISER, "audience_id": audience_id, "action": "delete"},
    ).json()
    assert (undocumented["code"], undocumented["message"]) == (
        40002,
        "Parameter error: action must be create",
    )
    assert len(tiktok.audiences(ADVERTISER)) == 1
    deleted = call(
        tiktok, DELETE, {"advertiser_id": ADVERTISER, "custom_audience_ids": [audience_id]}
    )
    assert deleted.json()["code"] == 0 and tiktok.audiences(ADVERTISER) == []
    gone = call(tiktok, MAPPING, mapping(audience_id)).json()
    assert (gone["code"], gone["message"]) == (40002, "Parameter error: invalid audience ID")


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"token": None}, 40104, "Access token is null"),
        ({"token": "stolen"}, 40105, "Access token is incorrect or has been revoked."),
        ({"token": OTHER_TOKEN}, 40001, "No permission to operate advertiser"),
        ({"content_type": "text/plain"}, 40002, "Content-Type must be application/json"),
        ({"body": {"advertiser_ids": ADVERTISER}}, 40002, "advertiser_ids must be"),
        ({"body": {"action": "replace"}}, 40002, "action must be one of add, delete"),
        ({"body": {"id_schema": ["EMAIL"]}}, 40002, "id_schema: 'EMAIL' is not one of"),
        ({"body": {"id_schema": [EMAIL, EMAIL]}}, 40002, "id_schema has a repeated id type"),
        ({"body": {"batch_data": []}}, 40002, "batch_data must be a non-empty list"),
        ({"row": [{}]}, 40002, "must be a list of 2 items, as id_schema"),
        ({"row": [{}, {}]}, 40002, "batch_data[0] has no id"),
        ({"row": [{"id": PREHASHED.upper(), "audience_ids": ["A"]}, {}]}, 40002, "invalid"),
        ({"row": [{"id": "jane@example.com", "audience_ids": ["A"]}, {}]}, 40002, "invalid"),
        ({"row": [{"id": PREHASHED}, {}]}, 40002, "exactly the keys id and audience_ids"),
        ({"row": [{"id": PREHASHED, "audience_ids": []}, {}]}, 40002, "non-empty list"),
        ({"row": [{"id": PREHASHED, "audience_ids": ["OTHER"]}, {}]}, 40002, "audience ID"),
        ({"rows": 3}, 40002, "batch_data has 3 rows; at most 2 allowed"),
    ],
)
def test_emulator_refuses_bad_mapping_requests_and_changes_nothing(
    change: dict[str, Any], code: int, message: str
) -> None:
    accounts = {TOKEN: [ADVERTISER], OTHER_TOKEN: [OTHER_ADVERTISER]}
    with TikTokEmulator(accounts, max_batch=2) as tiktok:
        mine = tiktok.add_audience(ADVERTISER, "mine")
        theirs = tiktok.add_audience(OTHER_ADVERTISER, "theirs")
        body = mapping(mine)
        if "row" in change:
            ids = {"A": mine, "OTHER": theirs}
            row = [
                {**cell, "audience_ids": [ids[a] for a in cell["audience_ids"]]}
                if "audience_ids" in cell
                else cell
                for cell in change["row"]
            ]
            body["batch_data"] = [row]
        body.update(change.get("body", {}))
        body["batch_data"] = body["batch_data"] * change.get("rows", 1)
        response = call(
            tiktok,
            MAPPING,
            body,
            token=change.get("token", TOKEN),
            content_type=change.get("content_type", "application/json"),
        )
        assert response.status_code == 200
        envelope = response.json()
        assert envelope["code"] == code
        assert message in envelope["message"]
        assert tiktok.members(ADVERTISER, "mine") == {}
        assert tiktok.members(OTHER_ADVERTISER, "theirs") == {}


def test_emulator_checks_audience_calls_and_routes(tiktok: TikTokEmulator) -> None:
    long_name = {"advertiser_id": ADVERTISER, "custom_audience_name": "x" * 129}
    answer = call(tiktok, AUDIENCE, {**long_name, "action": "create"}).json()
    assert answer["code"] == 40002 and "128" in answer["message"]
    theirs = tiktok.add_audience(OTHER_ADVERTISER, "theirs")
    answer = call(
        tiktok, DELETE, {"advertiser_id": ADVERTISER, "custom_audience_ids": [theirs]}
    ).json()
    assert answer["message"] == "Parameter error: invalid audience ID"
    for ids in ([], [theirs] * 101, [7400000000000000001], None):
        answer = call(tiktok, DELETE, {"advertiser_id": ADVERTISER, "custom_audience_ids": ids})
        assert answer.json()["code"] == 40002
    answer = call(tiktok, DELETE, {"custom_audience_ids": [theirs]}).json()
    assert answer["code"] == 40002
    assert len(tiktok.audiences(OTHER_ADVERTISER)) == 1
    answer = call(
        tiktok, LIST, method="GET", params={"advertiser_id": ADVERTISER, "page_size": "101"}
    ).json()
    assert answer["code"] == 40002
    answer = call(tiktok, LIST, method="GET", params={"advertiser_id": OTHER_ADVERTISER}).json()
    assert answer["code"] == 40001
    assert call(tiktok, LIST, {"advertiser_id": ADVERTISER}).status_code == 405
    assert call(tiktok, "segment/nothing/", {}).status_code == 404
    assert tiktok.audiences(ADVERTISER) == []


def test_emulator_scripted_answers_apply_to_valid_requests_only(tiktok: TikTokEmulator) -> None:
    mine = tiktok.add_audience(ADVERTISER, "mine")
    tiktok.fail(200, envelope_error(40100), on=MAPPING)
    tiktok.fail(429, retry_after="1", on=MAPPING)
    assert call(tiktok, MAPPING, mapping(mine), token="bad").json()["code"] == 40105
    assert (
        call(tiktok, LIST, method="GET", params={"advertiser_id": ADVERTISER}).json()["code"] == 0
    )
    throttled = call(tiktok, MAPPING, mapping(mine)).json()
    assert (throttled["code"], throttled["message"]) == (
        40100,
        "Too many requests. Please retry in some time.",
    )
    raw = call(tiktok, MAPPING, mapping(mine))
    assert (raw.status_code, raw.headers["retry-after"]) == (429, "1")
    assert tiktok.members(ADVERTISER, "mine") == {}
    assert call(tiktok, MAPPING, mapping(mine)).json()["code"] == 0
    assert tiktok.members(ADVERTISER, "mine") == {EMAIL: {PREHASHED}}


# --- the provider against the emulator, without the app -----------------------------------


def run(provider: TikTokProvider, work: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await work()
        finally:
            await provider.aclose()

    return asyncio.run(main())


def provider_for(emulator: TikTokEmulator, **extra: Any) -> TikTokProvider:
    config = DestinationConfig("tt", "tiktok", options(emulator, **extra), 1)
    return TikTokProvider.from_config(config)


def attempt(name: str = AUDIENCE_NAME, type: str = "custom") -> Segment:
    return Segment("tt", "default", "s1", NAME, name, type, total_users=1)


async def deliver(
    provider: TikTokProvider, segment: Segment, users: list[dict[str, Any]], size: int
) -> list[ChunkResult]:
    parts = [users[i : i + size] for i in range(0, len(users), size)] or [[]]
    results = []
    for index, part in enumerate(parts, start=1):
        chunk = Chunk(index, index == len(parts), part)
        results.append(await provider.send(segment, chunk))
    return results


def test_audience_is_found_across_pages_not_created_again(tiktok: TikTokEmulator) -> None:
    for number in range(140):
        tiktok.add_audience(ADVERTISER, f"other {number}")
    existing = tiktok.add_audience(ADVERTISER, AUDIENCE_NAME)
    provider = provider_for(tiktok)
    run(provider, lambda: deliver(provider, attempt(), contacts(3), 10))
    assert tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id == existing
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(3)
    pages = [call.params["page"] for call in tiktok.answered(LIST)]
    assert pages == ["1", "2"]
    assert tiktok.answered(AUDIENCE) == []
    assert {call.params["page_size"] for call in tiktok.answered(LIST)} == {"100"}


def test_remembered_audience_is_reused_and_looked_up_again_when_gone(
    tiktok: TikTokEmulator,
) -> None:
    provider = provider_for(tiktok)

    async def three_attempts() -> None:
        await deliver(provider, attempt(), contacts(2), 10)
        await deliver(provider, attempt(), contacts(2, 2), 10)  # remembered: no lookup
        assert len(tiktok.answered(LIST)) == 1
        # Someone deletes the audience in Ads Manager; the remembered id is stale.
        tiktok.delete_audience(ADVERTISER, provider.audience_ids[AUDIENCE_NAME])
        await deliver(provider, attempt(), contacts(2, 4), 10)

    run(provider, three_attempts)
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(2, 4)
    assert len(tiktok.answered(MAPPING, 40002)) == 1
    assert (
        provider.audience_ids[AUDIENCE_NAME]
        == tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id
    )


# --- primary: one audience, the difference from the last success ------------------------

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def ledger_for(engine: Engine, name: str = AUDIENCE_NAME, destination: str = "tt") -> Ledger:
    return Ledger(engine, "default", destination, name, lambda: NOW)


async def replace(
    provider: TikTokProvider,
    engine: Engine,
    users: list[dict[str, Any]],
    size: int,
    *,
    succeed: bool = True,
) -> list[ChunkResult]:
    """One primary attempt, recorded as the attempt would: confirmed once it succeeded."""
    ledger = ledger_for(engine)
    segment = Segment("tt", "default", "s1", NAME, AUDIENCE_NAME, "primary", 1, ledger=ledger)
    results = await deliver(provider, segment, users, size)
    if succeed:
        with db.write_transaction(engine) as conn:
            assert ledger.confirm(conn, NOW)
        ledger.collect()
    return results


def rows_sent(emulator: TikTokEmulator, action: str) -> list[int]:
    """The batch_data sizes of the successful mapping requests of ``action``."""
    return [
        len(call.json()["batch_data"])
        for call in emulator.answered(MAPPING)
        if call.json()["action"] == action
    ]


def members_minus(kept: dict[str, set[str]], *removed: dict[str, set[str]]) -> dict[str, set[str]]:
    out = {kind: set(digests) for kind, digests in kept.items()}
    for gone in removed:
        for kind, digests in gone.items():
            out[kind] -= digests
    return {kind: digests for kind, digests in out.items() if digests}


def union(*parts: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for part in parts:
        for kind, digests in part.items():
            out.setdefault(kind, set()).update(digests)
    return out


def test_first_primary_adds_everyone_in_requests_of_at_most_1000_rows(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    existing = tiktok.add_audience(ADVERTISER, AUDIENCE_NAME)
    provider = provider_for(tiktok, chunk_size=2_500)
    results = run(provider, lambda: replace(provider, engine, contacts(2_600), 2_500))
    assert [r.invalid for r in results] == [0, 0]
    assert tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id == existing
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(2_600)
    assert rows_sent(tiktok, "add") == [1_000, 1_000, 500, 100]
    assert rows_sent(tiktok, "delete") == []
    assert tiktok.calls_to(AUDIENCE, DELETE) == []


def test_primary_keeps_the_audience_and_sends_only_the_difference(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    provider = provider_for(tiktok, chunk_size=7)

    async def two() -> None:
        await replace(provider, engine, contacts(30), 7)
        first = tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id
        marker = len(tiktok.calls)
        await replace(provider, engine, contacts(30, 20), 7)
        assert tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id == first
        second = [c.json() for c in tiktok.calls[marker:] if c.route == MAPPING]
        added = sum(len(body["batch_data"]) for body in second if body["action"] == "add")
        removed = [body["batch_data"] for body in second if body["action"] == "delete"]
        assert added == 20  # users 30..49: only they are new
        # Users 0..19 left: their 20 emails and 20 phones, one identifier a row.
        assert sum(len(rows) for rows in removed) == 40
        assert all(sum(cell != {} for cell in row) == 1 for rows in removed for row in rows)

    run(provider, two)
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(30, 20)
    assert len(tiktok.audiences(ADVERTISER)) == 1
    assert [c.json()["action"] for c in tiktok.answered(AUDIENCE)] == ["create"]
    assert tiktok.calls_to(DELETE) == []


def test_primary_with_no_usable_user_empties_the_audience_it_keeps(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    provider = provider_for(tiktok)

    async def two() -> list[ChunkResult]:
        await replace(provider, engine, contacts(3), 5)
        return await replace(provider, engine, [{}, {}], 5)

    assert run(provider, two) == [ChunkResult(invalid=2, status=200)]
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == {}
    assert len(tiktok.audiences(ADVERTISER)) == 1


def test_failed_primary_attempts_leave_the_next_one_exact(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    """A failed attempt may have added members the next segment lacks, and (when it failed
    deleting) removed members the next segment has: the next attempt deletes the first and
    re-adds everyone, as the ledger no longer knows the audience exactly."""
    provider = provider_for(tiktok, chunk_size=5)

    async def four() -> None:
        await replace(provider, engine, contacts(20), 5)
        tiktok.fail(500, on=MAPPING, after=1)  # the second add of the next attempt
        with pytest.raises(RetryableError):
            await replace(provider, engine, contacts(20, 10), 5, succeed=False)
        deletes = lambda incoming: incoming.route == MAPPING and b'"delete"' in incoming.body  # noqa: E731
        tiktok.fail(200, envelope_error(40002), on=deletes)
        with pytest.raises(PermanentError):
            await replace(provider, engine, contacts(20, 10), 5, succeed=False)
        await replace(provider, engine, [*contacts(10, 5), *contacts(5, 60)], 5)

    run(provider, four)
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == union(
        expected_members(10, 5), expected_members(5, 60)
    )
    assert len(tiktok.audiences(ADVERTISER)) == 1


def test_an_audience_deleted_in_ads_manager_is_recreated_and_filled_whole(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    provider = provider_for(tiktok)

    async def two() -> None:
        await replace(provider, engine, contacts(4), 10)
        tiktok.delete_audience(ADVERTISER, tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id)
        await replace(provider, engine, contacts(4, 2), 10)

    run(provider, two)
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(4, 2)


def test_a_later_attempt_of_the_segment_supersedes_the_running_one(
    engine: Engine, tiktok: TikTokEmulator
) -> None:
    provider = provider_for(tiktok)
    older, newer = ledger_for(engine), ledger_for(engine)

    async def race() -> None:
        segment = Segment("tt", "default", "s1", NAME, AUDIENCE_NAME, "primary", 1, ledger=older)
        await provider.send(segment, Chunk(1, False, contacts(2)))
        await newer.begin(segment.state["audience_id"])
        with pytest.raises(RetryableError, match="a later delivery of"):
            await provider.send(segment, Chunk(2, True, contacts(2, 2)))

    run(provider, race)
    with db.write_transaction(engine) as conn:
        assert not older.confirm(conn, NOW)


def test_primary_without_a_ledger_is_refused(tiktok: TikTokEmulator) -> None:
    provider = provider_for(tiktok)
    with pytest.raises(PermanentError, match="needs the member ledger"):
        run(provider, lambda: deliver(provider, attempt(type="primary"), contacts(1), 5))
    assert tiktok.calls == []


# --- the member ledger --------------------------------------------------------------------

E, P = 0, 1


def digest(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def ledger_rows(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(member_ledgers.c.destination, func.count(ledger_members.c.digest))
            .select_from(member_ledgers)
            .join(
                ledger_members,
                (ledger_members.c.tenant == member_ledgers.c.tenant)
                & (ledger_members.c.ledger == member_ledgers.c.ledger),
                isouter=True,
            )
            .group_by(member_ledgers.c.destination)
            .order_by(member_ledgers.c.destination)
        ).all()
    return [(row[0], row[1]) for row in rows]


def test_ledger_stages_per_attempt_and_swaps_on_success(engine: Engine) -> None:
    async def steps() -> None:
        first = ledger_for(engine)
        await first.begin("A")
        assert await first.add([(E, digest(1)), (P, digest(1)), (E, digest(2))]) == sorted(
            [(E, digest(1)), (P, digest(1)), (E, digest(2))]
        )
        assert await first.leavers(None, 10) == []
        with db.write_transaction(engine) as conn:
            assert first.confirm(conn, NOW)

        failed = ledger_for(engine)
        await failed.begin("A")  # trusted: skips who is surely there
        assert await failed.add([(E, digest(1)), (E, digest(3))]) == [(E, digest(3))]
        assert await failed.leavers(None, 10) == sorted([(P, digest(1)), (E, digest(2))])
        # ... and fails: never confirmed. The confirmed set is intact; the next attempt
        # trusts nothing and deletes what the failed one may have added too.
        third = ledger_for(engine)
        await third.begin("A")
        assert await third.add([(E, digest(1))]) == [(E, digest(1))]
        page = await third.leavers(None, 2)
        assert page == sorted([(E, digest(2)), (E, digest(3))])
        assert await third.leavers(page[-1], 2) == [(P, digest(1))]
        assert await third.leavers((P, digest(1)), 2) == []
        with db.write_transaction(engine) as conn:
            assert third.confirm(conn, NOW)
        assert third.collect() == 5  # the first and the failed attempt's rows

        moved = ledger_for(engine)
        await moved.begin("B")  # another audience than the ledger knew: adds everyone
        assert await moved.add([(E, digest(1))]) == [(E, digest(1))]

    asyncio.run(steps())
    assert ledger_rows(engine) == [("tt", 2)]


def test_ledger_purge_rule(engine: Engine) -> None:
    """Purged: the ledgers of destinations no longer configured, and of segments with no
    attempt for 180 days; in pages, each ledger removed once its rows are."""

    async def fill(destination: str, name: str, count: int, at: dt.datetime) -> None:
        ledger = Ledger(engine, "default", destination, name, lambda: at)
        await ledger.begin("A")
        await ledger.add([(E, digest(n)) for n in range(count)])
        with db.write_transaction(engine) as conn:
            assert ledger.confirm(conn, at)

    old = NOW - members.STALE_AFTER - dt.timedelta(days=1)
    recent = NOW - members.STALE_AFTER + dt.timedelta(days=1)
    asyncio.run(fill("gone", "s", 5, NOW))
    asyncio.run(fill("tt", "stale", 3, old))
    asyncio.run(fill("tt", "fresh", 4, recent))
    asyncio.run(fill("tt", "now", 2, NOW))
    removed = []
    while True:
        with db.write_transaction(engine) as conn:
            done = members.purge(conn, ["tt", "meta"], NOW, limit=3)
        removed.append(done)
        if done == 0:
            break
    assert sum(removed) == 8 and max(removed) <= 3
    with engine.connect() as conn:
        left = conn.execute(
            select(member_ledgers.c.destination, member_ledgers.c.segment_name).order_by(
                member_ledgers.c.segment_name
            )
        ).all()
    assert [tuple(row) for row in left] == [("tt", "fresh"), ("tt", "now")]
    assert sorted(ledger_rows(engine)) == [("tt", 6)]


REQUEST_ID = r" \(request_id \d+\)"


@pytest.mark.parametrize(
    ("script", "error", "pattern", "retry_after"),
    [
        (
            ("code", 40100),
            RetryableError,
            r"TikTok 40100: Too many requests\. .*" + REQUEST_ID,
            None,
        ),
        (("code", 50002), RetryableError, r"TikTok 50002: Error 50002\." + REQUEST_ID, None),
        (("code", 40001), PermanentError, r"TikTok 40001: No permission .*" + REQUEST_ID, None),
        (("code", 40002), PermanentError, r"TikTok 40002: Parameter error\." + REQUEST_ID, None),
        (("code", 41000), PermanentError, r"TikTok 41000: Error 41000\." + REQUEST_ID, None),
        (("status", 429), RetryableError, r"TikTok HTTP 429: scripted HTTP 429", 1.0),
        (("status", 503), RetryableError, r"TikTok HTTP 503: scripted HTTP 503", None),
        (("status", 403), PermanentError, r"TikTok HTTP 403: scripted HTTP 403", None),
    ],
)
def test_platform_answers_map_to_retryable_or_permanent(
    tiktok: TikTokEmulator,
    script: tuple[str, int],
    error: type[Exception],
    pattern: str,
    retry_after: float | None,
) -> None:
    kind, value = script
    if kind == "code":
        tiktok.fail(200, envelope_error(value), on=MAPPING)
    else:
        tiktok.fail(value, on=MAPPING, retry_after="1" if retry_after else None)
    provider = provider_for(tiktok)
    with pytest.raises(error) as caught:
        run(provider, lambda: deliver(provider, attempt(), contacts(1), 10))
    assert re.fullmatch(pattern, str(caught.value)), str(caught.value)
    assert getattr(caught.value, "retry_after", None) == retry_after
    assert "example.com" not in str(caught.value)


def test_unreachable_platform_is_retryable() -> None:
    with TikTokEmulator({}) as gone:
        url = gone.base_url  # a port nothing listens on once closed
    opts = {"access_token": "t", "advertiser_id": "7", "base_url": url}
    provider = TikTokProvider.from_config(DestinationConfig("tt", "tiktok", opts, 1))
    with pytest.raises(RetryableError, match="TikTok: connection failed"):
        run(provider, lambda: deliver(provider, attempt(), contacts(1), 10))


# --- end to end: the app, its worker, the emulator ----------------------------------------


def mixed_users(count: int) -> tuple[list[dict[str, Any]], dict[str, set[str]], int]:
    """``count`` distinct users of every shape, the members TikTok must end up with (by
    hand, not through the adapter's code), and how many users are unusable."""
    users: list[dict[str, Any]] = []
    emails: set[str] = set()
    phones: set[str] = set()
    invalid = 0
    for i in range(count):
        shape = i % 20
        us_phone = f"(415) {200 + i // 10000}-{i % 10000:04d}"
        us_digits = f"1415{200 + i // 10000}{i % 10000:04d}"
        if shape < 8:  # everything, email with a +tag and odd case
            users.append(
                {
                    "edgeTagId": f"et_{i}",
                    "externalId": f"cust-{i}",
                    "email": f"  Shopper.{i}+Promo@Example.COM ",
                    "phone": us_phone,
                    "firstName": "Jane",
                    "lastName": "Doe",
                    "country": "US",
                    "postalCode": "94105",
                }
            )
            emails.add(sha(f"shopper.{i}@example.com"))
            phones.add(sha(us_digits))
        elif shape < 12:  # email only, gmail dots kept
            users.append({"email": f"First.Last{i}@gmail.com", "firstName": "Al"})
            emails.add(sha(f"first.last{i}@gmail.com"))
        elif shape < 15:  # phone only: an international integer
            users.append({"phone": 16502000000 + i, "lastName": "Roe"})
            phones.add(sha(str(16502000000 + i)))
        elif shape < 17:  # pre-hashed email (upper case hex), national GB phone
            users.append(
                {
                    "email": sha(f"hashed{i}@example.com").upper(),
                    "phone": f"020 7946 {i % 10000:04d}",
                    "country": "GB",
                }
            )
            emails.add(sha(f"hashed{i}@example.com"))
            phones.add(sha(f"44207946{i % 10000:04d}"))
        elif shape < 19:  # a bad email but a good phone
            users.append(
                {"email": f"nobody{i}", "phone": f"+1 415 {200 + i // 10000} {i % 10000:04d}"}
            )
            phones.add(sha(us_digits))
        elif i % 40 == 19:  # nothing TikTok matches on
            users.append({"firstName": "Only", "lastName": f"Name{i}", "postalCode": "10001"})
            invalid += 1
        else:  # unusable email and phone
            users.append({"email": "n/a", "phone": "12", "externalId": f"x{i}"})
            invalid += 1
    return users, {EMAIL: emails, PHONE: phones}, invalid


def test_mixed_session_of_25000_users_is_delivered_exactly(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    users, expected, invalid = mixed_users(25_000)
    sent = [*users, *users[100:110], users[24_999]]  # exact duplicates, dropped before us
    with serve(fast, engine, destinations(("tt", "tiktok", options(tiktok)))) as client:
        response = upload(client, "big", sent, 5_000, "?sync=true")
        assert (response.status_code, response.content) == (200, b'{"success": true}')
        body = status(client, "big")
    assert body["state"] == "delivered"
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "tt",
        "kind": "tiktok",
        "segmentName": AUDIENCE_NAME,
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 25_000,
        "invalidUsers": invalid,
        "lastError": None,
    }
    assert invalid == 1_250
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected
    rows = [len(call.json()["batch_data"]) for call in tiktok.answered(MAPPING)]
    assert len(rows) == 25 and max(rows) <= 1_000 and sum(rows) == 25_000 - invalid
    assert all(call.json()["id_schema"] == [EMAIL, PHONE] for call in tiktok.answered(MAPPING))
    assert len(tiktok.answered(AUDIENCE)) == 1  # created once


def test_custom_adds_and_primary_keeps_the_audience(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    with serve(fast, engine, destinations(("tt", "tiktok", options(tiktok)))) as client:
        assert upload(client, "first", contacts(30), 10, "?sync=true").status_code == 200
        first = tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id
        assert upload(client, "more", contacts(10, 30), 10, "?sync=true").status_code == 200
        assert tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id == first
        assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(40)

        response = upload(client, "whole", contacts(8, 5), 3, "?sync=true", type="primary")
        assert response.status_code == 200, response.text
        assert status(client, "whole")["deliveries"][0]["state"] == "succeeded"
        kept = tiktok.audience(ADVERTISER, AUDIENCE_NAME)
        assert kept.audience_id == first
        # Members added by custom deliveries are not in the ledger: a primary keeps them.
        assert kept.members == expected_members(40)
        response = upload(client, "less", contacts(3, 8), 3, "?sync=true", type="primary")
        assert response.status_code == 200, response.text
        assert tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id == first

        assert upload(client, "after", contacts(2, 100), 2, "?sync=true").status_code == 200
    left = union(expected_members(5), expected_members(3, 8), expected_members(27, 13))
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == union(left, expected_members(2, 100))
    assert tiktok.calls_to(DELETE) == []
    assert len(tiktok.audiences(ADVERTISER)) == 1


def test_rate_limits_and_transient_errors_are_retried_to_success(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    tiktok.fail(200, envelope_error(40100), on=LIST)
    tiktok.fail(200, envelope_error(50000), on=MAPPING)
    tiktok.fail(500, on=MAPPING)
    where = destinations(("tt", "tiktok", options(tiktok, chunk_size=5)))
    with serve(fast, engine, where) as client:
        assert upload(client, "flaky", contacts(12), 6, "?sync=true").status_code == 200
        body = status(client, "flaky")
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        4,
        None,
    )
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(12)
    assert len(tiktok.audiences(ADVERTISER)) == 1
    with engine.connect() as conn:
        rows = conn.execute(select(delivery_attempts).order_by(delivery_attempts.c.number)).all()
    assert [r.outcome for r in rows] == ["retry", "retry", "retry", "succeeded"]
    assert rows[0].error.startswith("TikTok 40100: Too many requests.")
    assert rows[1].error.startswith("TikTok 50000: Internal service error.")
    assert rows[2].error == "TikTok HTTP 500: scripted HTTP 500"


def test_retry_after_of_a_raw_429_is_honoured(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    tiktok.fail(429, retry_after="1", on=MAPPING)
    with serve(fast, engine, destinations(("tt", "tiktok", options(tiktok)))) as client:
        assert upload(client, "slow", contacts(3), 3, "?sync=true").status_code == 200
    with engine.connect() as conn:
        rows = conn.execute(select(delivery_attempts).order_by(delivery_attempts.c.number)).all()
    assert [(r.outcome, r.http_status) for r in rows] == [("retry", 429), ("succeeded", 200)]
    assert rows[1].started_at - rows[0].finished_at >= dt.timedelta(seconds=1)
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(3)


def test_permanent_error_fails_the_delivery_with_tiktoks_message(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    message = "Advertiser does not grant you Audience Management permission."
    tiktok.fail(200, envelope_error(40001, message), on=MAPPING)
    with serve(fast, engine, destinations(("tt", "tiktok", options(tiktok)))) as client:
        response = upload(client, "denied", contacts(4), 2, "?sync=true")
        assert response.status_code == 400
        (error,) = errors(response)
        body = status(client, "denied")
        assert body["state"] == "failed"
        (delivery,) = body["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
        assert re.fullmatch(
            rf"TikTok 40001: {re.escape(message)}{REQUEST_ID}", delivery["lastError"]
        )
        assert error == f"tt: {delivery['lastError']}"
        assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == {}

        # The operator fixes the permission and retries: the same audience is filled.
        assert client.post("/audience/sessions/denied/retry").status_code == 202
        fields = form("denied", 1, 2, 4, contacts(2), name=NAME)
        assert send(client, fields, "?sync=true").status_code == 200
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(4)
    assert len(tiktok.audiences(ADVERTISER)) == 1


def test_wrong_token_fails_with_the_auth_error(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    where = destinations(("tt", "tiktok", options(tiktok, access_token="expired")))
    with serve(fast, engine, where) as client:
        response = upload(client, "auth", contacts(2), 2, "?sync=true")
    assert response.status_code == 400
    (error,) = errors(response)
    assert re.fullmatch(
        rf"tt: TikTok 40105: Access token is incorrect or has been revoked\.{REQUEST_ID}", error
    )
    assert "expired" not in error


def test_two_accounts_each_receive_the_segment(
    fast: Settings, engine: Engine, tiktok: TikTokEmulator
) -> None:
    where = destinations(
        ("tt-us", "tiktok", options(tiktok)),
        (
            "tt-eu",
            "tiktok",
            options(tiktok, access_token=OTHER_TOKEN, advertiser_id=OTHER_ADVERTISER),
        ),
    )
    with serve(fast, engine, where) as client:
        assert upload(client, "both", contacts(7), 4, "?sync=true").status_code == 200
        body = status(client, "both")
    assert [d["state"] for d in body["deliveries"]] == ["succeeded", "succeeded"]
    assert tiktok.members(ADVERTISER, AUDIENCE_NAME) == expected_members(7)
    assert tiktok.members(OTHER_ADVERTISER, AUDIENCE_NAME) == expected_members(7)
    mine = tiktok.audience(ADVERTISER, AUDIENCE_NAME).audience_id
    theirs = tiktok.audience(OTHER_ADVERTISER, AUDIENCE_NAME).audience_id
    assert mine != theirs

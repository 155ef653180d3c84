"""The Meta provider (Custom Audiences; config kind ``facebook``): how users become rows, how
Graph errors are classified, what the Meta emulator refuses, and delivery over the real app and
worker on SQLite and PostgreSQL, asserting on the membership the emulator holds."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx2
import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from audience_server.destinations import DestinationConfig, OptionError
from audience_server.providers.base import (
    Chunk,
    ChunkResult,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.meta import MetaProvider, graph_error, payload, user_row
from audience_server.settings import Settings
from tests.conftest import make_users
from tests.emulators.meta import (
    UPLOAD_EDGES,
    Member,
    MetaEmulator,
    graph_code,
    graph_error_body,
    member,
    usage_header,
)
from tests.helpers import NAME, destinations, errors, form, send, serve, status, upload

SEGMENT = "blotout_High_Value_Customers_Q1"
ACCOUNT_A, TOKEN_A = "1234567890", "token-a"
ACCOUNT_B, TOKEN_B = "2345678901", "token-b"

T = TypeVar("T")


def h(text: str) -> str:
    """SHA-256 hex, computed here rather than by the code under test."""
    return hashlib.sha256(text.encode()).hexdigest()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture
def meta() -> Iterator[MetaEmulator]:
    with MetaEmulator() as emulator:
        emulator.add_account(ACCOUNT_A, token=TOKEN_A)
        emulator.add_account(ACCOUNT_B, token=TOKEN_B)
        yield emulator


@pytest.fixture
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as client:
        yield client


def options(meta: MetaEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "ad_account_id": f"act_{ACCOUNT_A}",
        "access_token": TOKEN_A,
        "base_url": meta.base_url,
        **extra,
    }


def provider(meta: MetaEmulator, **extra: Any) -> MetaProvider:
    config = DestinationConfig("meta", "facebook", options(meta, **extra), line=1)
    return MetaProvider.from_config(config)


def segment(kind: str = "custom", total: int = 0) -> Segment:
    return Segment("meta", "default", "s1", NAME, SEGMENT, kind, total)


async def deliver(
    made: MetaProvider, seg: Segment, users: list[dict[str, Any]], size: int
) -> list[ChunkResult]:
    """One attempt, as the worker runs it: chunks in order, the last flagged."""
    parts = [users[i : i + size] for i in range(0, len(users), size)] or [[]]
    try:
        return [
            await made.send(seg, Chunk(index, index == len(parts), part))
            for index, part in enumerate(parts, start=1)
        ]
    finally:
        await made.aclose()


def standard_member(user: dict[str, Any]) -> Member:
    """The stored row of a ``make_users`` user (+1415555xxxx, Jane Doe, US 90202)."""
    return member(
        EMAIL=h(user["email"].lower()),
        PHONE=h(user["phone"].removeprefix("+")),
        FN=h("jane"),
        LN=h("doe"),
        ZIP=h("90202"),
        COUNTRY=h("us"),
    )


# --- users to rows ----------------------------------------------------------------------------


def test_a_full_user_becomes_meta_keys_hashed_except_extern_id() -> None:
    row = user_row(
        {
            "edgeTagId": "et_1",
            "externalId": "cust-001",
            "email": "  Jane.Doe@Example.COM ",
            "phone": "(415) 555-0100",  # a national number: the user's country gives +1
            "firstName": " Jane ",
            "lastName": "Doe.",
            "postalCode": "94105-1234",
            "country": "US",
            "purchase": [{"sku": "x"}],
        }
    )
    # The vectors of reference/providers.md §1b, computed independently of this code.
    assert row == {
        "EXTERN_ID": "cust-001",
        "EMAIL": "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d",
        "PHONE": h("14155550100"),
        "FN": "81f8f6dde88365f3928796ec7aa53f72820b06db8664f5fe76a7eb13e24546a2",
        "LN": "799ef92a11af918e3fb741df42934f3b568ed2d93ac1df74f1b8d41a27932a6f",
        "ZIP": "e73ac16e69f060ee98b0fda5f66f48c4648ee26950e9bab3a097389853fd859e",
        "COUNTRY": "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
    }


def test_phone_is_hashed_without_its_plus() -> None:
    row = user_row({"phone": "+14155550100"})
    assert row == {"PHONE": h("14155550100")} and row["PHONE"] != h("+14155550100")


@pytest.mark.parametrize(
    ("phone", "country", "digits"),
    [
        ("+44 20 7946 0958", None, "442079460958"),
        ("020 7946 0958", "GB", "442079460958"),  # national, read in the user's country
        ("020 7946 0958", "gb", "442079460958"),
        ("0044 20 7946 0958", None, "442079460958"),
        ("+1 415 555 0100", "GB", "14155550100"),  # an international number keeps its code
        (4155550100, "US", "14155550100"),  # phones may come as JSON numbers
        ("(415) 555-0100", "US", "14155550100"),
    ],
)
def test_phone_is_digits_with_the_country_code(
    phone: Any, country: str | None, digits: str
) -> None:
    user: dict[str, Any] = {"phone": phone}
    if country is not None:
        user["country"] = country
    row = user_row(user)
    assert row is not None and row["PHONE"] == h(digits)


def test_names_zip_and_country_follow_metas_rules() -> None:
    row = user_row(
        {
            "externalId": 42,
            "firstName": "José-María",
            "lastName": "O'Neil Jr.",
            "postalCode": " sw1a 1aa ",
            "country": " gb ",
        }
    )
    assert row == {
        "EXTERN_ID": "42",
        "FN": h("josémaría"),
        "LN": h("oneiljr"),
        "ZIP": h("sw1a1aa"),
        "COUNTRY": h("gb"),
    }


def test_digests_pass_through_and_extern_id_is_never_hashed() -> None:
    email, phone, name = h("a@example.com"), h("14155550100"), h("jane")
    row = user_row(
        {"email": email.upper(), "phone": f" {phone} ", "firstName": name, "externalId": email}
    )
    # normalize.phone_digits alone would read a digest's digits as a phone number.
    assert row == {"EMAIL": email, "PHONE": phone, "FN": name, "EXTERN_ID": email}


@pytest.mark.parametrize(
    "user",
    [
        {},
        {"edgeTagId": "et_1", "purchase": []},
        {"email": "not-an-email"},
        {"email": "not-an-email", "phone": "12"},
        {"email": None, "phone": None, "externalId": None},
        {"externalId": "   "},
        {"firstName": "Jane", "lastName": "Doe", "country": "US"},  # no ZIP to go with them
        {"firstName": "Jane", "postalCode": "94105", "country": "US"},
        {"phone": True},
    ],
)
def test_users_meta_cannot_match_are_dropped(user: dict[str, Any]) -> None:
    assert user_row(user) is None


def test_names_with_a_zip_are_enough() -> None:
    row = user_row({"firstName": "Jane", "lastName": "Doe", "postalCode": "94105"})
    assert row == {"FN": h("jane"), "LN": h("doe"), "ZIP": h("94105")}


def test_payload_has_the_keys_present_in_the_chunk_in_order() -> None:
    rows = [{"PHONE": "p1", "EMAIL": "e1"}, {"EXTERN_ID": "x2"}]
    assert payload(rows) == {
        "schema": ["EXTERN_ID", "EMAIL", "PHONE"],
        "is_raw": True,
        "data": [["", "e1", "p1"], ["x2", "", ""]],
    }


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("account", ["act_1234", "1234", 1234, " act_1234 "])
def test_ad_account_id_is_normalized_to_act_prefix(account: Any) -> None:
    config = DestinationConfig("m", "facebook", {"ad_account_id": account, "access_token": "t"}, 1)
    made = MetaProvider.from_config(config)
    assert made.account_id == "act_1234"
    assert (made.graph_version, made.customer_file_source) == ("v25.0", "USER_PROVIDED_ONLY")
    assert (made.base_url, made.chunk_size, made.timeout) == (
        "https://graph.facebook.com",
        10_000,
        30,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"ad_account_id": None}, "ad_account_id"),
        ({"ad_account_id": "act_"}, "ad_account_id"),
        ({"ad_account_id": "acct_12"}, "ad_account_id"),
        ({"ad_account_id": True}, "ad_account_id"),
        ({"access_token": None}, "access_token"),
        ({"access_token": " "}, "access_token"),
        ({"customer_file_source": "EVERYONE"}, "customer_file_source"),
        ({"graph_version": "25.0"}, "graph_version"),
        ({"base_url": "graph.facebook.com"}, "base_url"),
        ({"chunk_size": 10_001}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_options_name_their_field(changes: dict[str, Any], field: str) -> None:
    values = {"ad_account_id": "act_1", "access_token": "s3cret-token", **changes}
    values = {key: value for key, value in values.items() if value is not None}
    with pytest.raises(OptionError) as caught:
        MetaProvider.from_config(DestinationConfig("m", "facebook", values, 1))
    assert caught.value.field == field
    assert "s3cret-token" not in str(caught.value)


def test_other_options_are_taken() -> None:
    values = {
        "ad_account_id": "9",
        "access_token": "t",
        "graph_version": "v24.0",
        "customer_file_source": "BOTH_USER_AND_PARTNER_PROVIDED",
        "base_url": "http://proxy.internal/graph/",
        "chunk_size": 5_000,
        "timeout": 2.5,
    }
    made = MetaProvider.from_config(DestinationConfig("m", "facebook", values, 1))
    assert (made.graph_version, made.customer_file_source) == (
        "v24.0",
        values["customer_file_source"],
    )
    assert (made.base_url, made.chunk_size, made.timeout) == (
        "http://proxy.internal/graph",
        5_000,
        2.5,
    )


# --- errors -----------------------------------------------------------------------------------


def graph_body(code: int, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    error = {"message": f"(#{code}) something", "type": "OAuthException", "code": code, **extra}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


@pytest.mark.parametrize("code", [4, 17, 613, 80003, 1, 2, 341, 368, 5000, 21009])
def test_rate_limit_and_transient_codes_are_retried_whatever_the_status(code: int) -> None:
    error = graph_error(400, graph_body(code), {}, "")
    assert isinstance(error, RetryableError)
    assert str(error) == f"Meta error {code}: (#{code}) something"


@pytest.mark.parametrize("code", [190, 200, 294, 100, 105, 1487301, 1487366, 2650, 2655, 104, 2635])
@pytest.mark.parametrize("http_status", [400, 403, 500])
def test_token_permission_and_parameter_codes_fail(code: int, http_status: int) -> None:
    error = graph_error(http_status, graph_body(code), {}, "")
    assert isinstance(error, PermanentError) and not isinstance(error, RetryableError)
    assert error.status == http_status


def test_messages_carry_metas_words_and_trace_id() -> None:
    body = graph_body(
        100,
        33,
        message="Unsupported post request. Object with ID '1' does not exist",
        fbtrace_id="AbC",
    )
    error = graph_error(400, body, {}, json.dumps(body))
    assert str(error) == (
        "Meta error 100/33: Unsupported post request. Object with ID '1' does not exist "
        "(fbtrace_id AbC)"
    )


@pytest.mark.parametrize(
    ("http_status", "body", "retry"),
    [
        (400, graph_body(99999), False),  # a code we do not know: the status decides
        (503, graph_body(99999), True),
        (400, graph_body(99999, is_transient=True), True),
        (502, None, True),
        (504, None, True),
        (429, None, True),
        (404, None, False),
        (401, None, False),
        (200, {"error": {"code": 190, "message": "expired"}}, False),
    ],
)
def test_answers_without_a_known_code_go_by_status(
    http_status: int, body: Any, retry: bool
) -> None:
    error = graph_error(http_status, body, {}, "<html>bad gateway</html>")
    assert isinstance(error, RetryableError) is retry


def test_rate_limits_honour_metas_wait_hints() -> None:
    usage = {"1": [{"type": "ads_management", "estimated_time_to_regain_access": 3}]}
    headers = {"x-business-use-case-usage": json.dumps(usage)}
    error = graph_error(400, graph_body(80003), headers, "")
    assert isinstance(error, RetryableError) and error.retry_after == 180.0
    usage["1"][0]["estimated_time_to_regain_access"] = 0
    headers = {"x-business-use-case-usage": json.dumps(usage)}
    error = graph_error(400, graph_body(17), headers, "")
    assert isinstance(error, RetryableError) and error.retry_after is None
    error = graph_error(400, graph_body(17), {"retry-after": "1"}, "")
    assert isinstance(error, RetryableError) and error.retry_after == 1.0
    error = graph_error(429, None, {"retry-after": "1"}, "")
    assert isinstance(error, RetryableError) and error.retry_after == 1.0


# --- the emulator -----------------------------------------------------------------------------


def graph(
    http: httpx2.Client,
    meta: MetaEmulator,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN_A,
    **params: Any,
) -> httpx2.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    content = None if body is None else json.dumps(body).encode()
    if content is not None:
        headers["Content-Type"] = "application/json"
    url = f"{meta.base_url}/v25.0/{path}"
    return http.request(method, url, params=params, content=content, headers=headers)


def error_of(response: httpx2.Response) -> tuple[int, int, int | None]:
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["fbtrace_id"]
    return response.status_code, error["code"], error.get("error_subcode")


def create(http: httpx2.Client, meta: MetaEmulator, name: str = SEGMENT) -> str:
    body = {"name": name, "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"}
    response = graph(http, meta, "POST", f"act_{ACCOUNT_A}/customaudiences", body)
    assert response.status_code == 200, response.text
    audience_id: str = response.json()["id"]
    return audience_id


def rows_body(
    data: list[list[Any]],
    schema: Any = ("EMAIL", "EXTERN_ID"),
    session: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"payload": {"schema": list(schema), "is_raw": True, "data": data}}
    body["payload"].update(extra)
    if session is not None:
        body["session"] = session
    return body


def test_emulator_refuses_a_missing_or_unknown_token_with_code_190(
    http: httpx2.Client, meta: MetaEmulator
) -> None:
    path = f"act_{ACCOUNT_A}/customaudiences"
    assert error_of(graph(http, meta, "GET", path, token=None)) == (400, 190, None)
    assert error_of(graph(http, meta, "GET", path, token="expired")) == (400, 190, None)
    response = graph(http, meta, "GET", path, token=None, access_token=TOKEN_A)
    assert response.status_code == 200 and response.json() == {"data": []}
    bad_scheme = http.get(f"{meta.base_url}/v25.0/{path}", headers={"Authorization": TOKEN_A})
    assert error_of(bad_scheme) == (400, 190, None)


def test_emulator_wants_act_prefix_and_an_account_the_token_manages(
    http: httpx2.Client, meta: MetaEmulator
) -> None:
    assert error_of(graph(http, meta, "GET", f"{ACCOUNT_A}/customaudiences")) == (400, 100, 33)
    assert error_of(graph(http, meta, "GET", "act_999/customaudiences")) == (400, 100, 33)
    other = graph(http, meta, "GET", f"act_{ACCOUNT_B}/customaudiences")
    assert error_of(other)[:2] == (400, 200)
    old_version = http.get(
        f"{meta.base_url}/v19.0/act_{ACCOUNT_A}/customaudiences",
        headers={"Authorization": f"Bearer {TOKEN_A}"},
    )
    assert error_of(old_version) == (400, 2635, None)
    assert error_of(graph(http, meta, "GET", f"act_{ACCOUNT_A}/adsets")) == (400, 2500, None)


def test_emulator_audiences_belong_to_their_account(
    http: httpx2.Client, meta: MetaEmulator
) -> None:
    audience_id = create(http, meta)
    body = rows_body([[h("a@example.com"), "c1"]])
    foreign = graph(http, meta, "POST", f"{audience_id}/users", body, token=TOKEN_B)
    assert error_of(foreign)[:2] == (400, 200)
    assert error_of(graph(http, meta, "POST", "999/users", body)) == (400, 100, 33)
    assert meta.members(ACCOUNT_A, SEGMENT) == set()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (rows_body([[h("a@example.com")]], schema=["EMAIL_ADDRESS"]), "unknown key"),
        (rows_body([[h("a@example.com"), h("b@example.com")]], ["EMAIL", "EMAIL"]), "repeat"),
        (rows_body([[h("a@example.com")]]), "row shorter than schema"),
        (rows_body([[h("a@example.com"), "c1", ""]]), "row longer than schema"),
        (rows_body([["a@example.com", "c1"]]), "email not hashed"),
        (rows_body([[h("a@example.com").upper(), "c1"]]), "uppercase hex"),
        (rows_body([[h("a@example.com")[:63], "c1"]]), "short hex"),
        (rows_body([[h("a@example.com"), 1]]), "not a string"),
        (rows_body([[h("a@example.com"), "c1"]], is_raw=False), "is_raw false"),
        (rows_body([]), "no data"),
        (rows_body([[h(f"{i}@x.com"), ""] for i in range(10_001)]), "over 10,000 rows"),
        ({"payload": "{not json"}, "payload not JSON"),
        ({"session": {"session_id": 1, "batch_seq": 1}}, "no payload"),
        (rows_body([[h("a@example.com"), "c1"]], session={"session_id": 0, "batch_seq": 1}), "id"),
        (rows_body([[h("a@example.com"), "c1"]], session={"session_id": 5, "batch_seq": 0}), "seq"),
    ],
)
def test_emulator_refuses_bad_payloads_with_code_100(
    http: httpx2.Client, meta: MetaEmulator, body: dict[str, Any], why: str
) -> None:
    audience_id = create(http, meta)
    response = graph(http, meta, "POST", f"{audience_id}/users", body)
    assert error_of(response)[:2] == (400, 100), why
    assert meta.members(ACCOUNT_A, SEGMENT) == set()
    assert meta.uploads() == []


def test_emulator_stores_extern_id_raw_and_skips_empty_keys(
    http: httpx2.Client, meta: MetaEmulator
) -> None:
    audience_id = create(http, meta)
    data = [[h("a@example.com"), "cust-001"], ["", "cust-002"], ["", ""]]
    response = graph(http, meta, "POST", f"{audience_id}/users", rows_body(data))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "audience_id": audience_id,
        "session_id": None,
        "num_received": 3,
        "num_invalid_entries": 1,  # a row with no key at all
        "invalid_entry_samples": {},
    }
    assert meta.members(ACCOUNT_A, SEGMENT) == {
        member(EMAIL=h("a@example.com"), EXTERN_ID="cust-001"),
        member(EXTERN_ID="cust-002"),
    }
    removal = graph(http, meta, "DELETE", f"{audience_id}/users", rows_body([["", "cust-002"]]))
    assert removal.status_code == 200, removal.text
    assert meta.members(ACCOUNT_A, SEGMENT) == {
        member(EMAIL=h("a@example.com"), EXTERN_ID="cust-001")
    }


def test_emulator_takes_form_encoded_bodies_too(http: httpx2.Client, meta: MetaEmulator) -> None:
    audience_id = create(http, meta)
    body = rows_body([[h("a@example.com"), "c1"]])
    form_body = {"payload": json.dumps(body["payload"]), "access_token": TOKEN_A}
    response = http.post(f"{meta.base_url}/v25.0/{audience_id}/users", data=form_body)
    assert response.status_code == 200, response.text
    assert meta.members(ACCOUNT_A, SEGMENT) == {member(EMAIL=h("a@example.com"), EXTERN_ID="c1")}


def test_emulator_replace_session_rules(http: httpx2.Client, meta: MetaEmulator) -> None:
    audience_id = create(http, meta)
    old, new1, new2 = ([[h(f"{who}@example.com"), who]] for who in ("old", "new1", "new2"))
    assert graph(http, meta, "POST", f"{audience_id}/users", rows_body(old)).status_code == 200
    replace = f"{audience_id}/usersreplace"

    def batch(data: list[list[str]], seq: int, last: bool, session_id: int = 77) -> Any:
        session = {"session_id": session_id, "batch_seq": seq, "last_batch_flag": last}
        return graph(http, meta, "POST", replace, rows_body(data, session=session))

    assert error_of(graph(http, meta, "POST", replace, rows_body(new1)))[:2] == (400, 100)
    assert error_of(batch(new1, 2, False))[:2] == (400, 100)  # a session starts at 1
    assert batch(new1, 1, False).status_code == 200
    assert meta.members(ACCOUNT_A, SEGMENT) == {member(EMAIL=h("old@example.com"), EXTERN_ID="old")}
    assert error_of(batch(new2, 3, True))[:2] == (400, 100)  # no gap
    assert error_of(batch(new2, 1, True))[:2] == (400, 100)  # no repeat
    session = {"session_id": 77, "batch_seq": 2}
    as_add = graph(http, meta, "POST", f"{audience_id}/users", rows_body(new2, session=session))
    assert error_of(as_add)[:2] == (400, 100)  # a replace session stays a replace session
    assert batch(new2, 2, True).json()["session_id"] == "77"
    assert meta.members(ACCOUNT_A, SEGMENT) == {
        member(EMAIL=h("new1@example.com"), EXTERN_ID="new1"),
        member(EMAIL=h("new2@example.com"), EXTERN_ID="new2"),
    }
    assert error_of(batch(old, 3, True))[:2] == (400, 100)  # the session is over


def test_emulator_users_sessions_add_batch_by_batch(
    http: httpx2.Client, meta: MetaEmulator
) -> None:
    audience_id = create(http, meta)
    for seq, who in enumerate(("a", "b"), start=1):
        session = {"session_id": 5, "batch_seq": seq, "last_batch_flag": seq == 2}
        body = rows_body([[h(f"{who}@example.com"), who]], session=session)
        assert graph(http, meta, "POST", f"{audience_id}/users", body).status_code == 200
        assert len(meta.members(ACCOUNT_A, SEGMENT)) == seq


def test_emulator_pages_audiences_with_cursors(http: httpx2.Client) -> None:
    with MetaEmulator(max_page_size=10) as meta:
        meta.add_account(ACCOUNT_A, token=TOKEN_A)
        ids = [meta.add_audience(ACCOUNT_A, f"audience {i}") for i in range(23)]
        page = graph(http, meta, "GET", f"act_{ACCOUNT_A}/customaudiences", fields="id,name")
        seen = []
        while True:
            body = page.json()
            seen += [item["id"] for item in body["data"]]
            assert all(set(item) == {"id", "name"} for item in body["data"])
            if "next" not in body["paging"]:
                break
            page = http.get(body["paging"]["next"], headers={"Authorization": f"Bearer {TOKEN_A}"})
        assert seen == ids
        after = graph(
            http, meta, "GET", f"act_{ACCOUNT_A}/customaudiences", limit=5, after="bm9wZQ"
        )
        assert error_of(after)[:2] == (400, 100)


# --- the made against the emulator, one attempt at a time ---------------------------------


def test_an_existing_audience_is_found_on_a_later_page_and_remembered() -> None:
    with MetaEmulator(max_page_size=10) as meta:
        meta.add_account(ACCOUNT_A, token=TOKEN_A)
        for i in range(22):
            meta.add_audience(ACCOUNT_A, f"someone else's {i}")
        audience_id = meta.add_audience(ACCOUNT_A, SEGMENT)
        meta.add_audience(ACCOUNT_A, "after it")
        made = provider(meta)
        users = make_users(3)
        results = run(deliver(made, segment(total=3), users, 10))
        assert results == [ChunkResult(invalid=0, status=200)]
        assert [c.route for c in meta.calls] == ["list", "list", "list", "users"]
        assert {u.audience_id for u in meta.uploads()} == {audience_id}
        run(deliver(made, segment(total=3), users, 10))  # the id is remembered
        assert [c.route for c in meta.calls][4:] == ["users"]
        assert len(meta.audiences(ACCOUNT_A)) == 24
        assert meta.members(ACCOUNT_A, SEGMENT) == {standard_member(u) for u in users}
        assert all(c.principal == TOKEN_A and "access_token" not in c.query for c in meta.calls)


def test_an_audience_deleted_at_meta_is_created_again(meta: MetaEmulator) -> None:
    made = provider(meta)
    users = make_users(4)
    run(deliver(made, segment(total=4), users[:2], 10))
    meta.delete_audience(meta.audience(ACCOUNT_A, SEGMENT).id)
    run(deliver(made, segment(total=2), users[2:], 10))
    (audience,) = meta.audiences(ACCOUNT_A)
    assert audience.members == {standard_member(u) for u in users[2:]}
    assert audience.customer_file_source == "USER_PROVIDED_ONLY"
    assert [c.route for c in meta.calls] == [
        "list",
        "create",
        "users",
        "users",
        "list",
        "create",
        "users",
    ]


def test_one_session_per_attempt_and_a_final_chunk_with_nobody_usable_still_closes_it(
    meta: MetaEmulator,
) -> None:
    made = provider(meta, chunk_size=2)
    meta.add_audience(ACCOUNT_A, SEGMENT, members=[member(EMAIL=h("old@example.com"))])
    users = [*make_users(3), {"email": "nope"}, {"firstName": "Jane"}]
    seg = segment("primary", total=5)
    results = run(deliver(made, seg, users, 2))
    assert [r.invalid for r in results] == [0, 1, 1]
    uploads = meta.uploads()
    assert [(u.edge, u.batch_seq, u.last, u.rows) for u in uploads] == [
        ("usersreplace", 1, False, 2),
        ("usersreplace", 2, False, 1),
        ("usersreplace", 3, True, 1),  # the previous row again, to close the session
    ]
    assert {u.session_id for u in uploads} == {seg.state["session_id"]}
    assert {u.estimated_num_total for u in uploads} == {5}
    assert 0 < seg.state["session_id"] < 2**63
    assert meta.members(ACCOUNT_A, SEGMENT) == {standard_member(u) for u in users[:3]}

    again = segment("primary", total=5)
    run(deliver(made, again, users, 2))
    assert again.state["session_id"] != seg.state["session_id"]


def test_a_primary_segment_with_nobody_usable_fails_and_keeps_the_audience(
    meta: MetaEmulator,
) -> None:
    meta.add_audience(ACCOUNT_A, SEGMENT, members=[member(EMAIL=h("old@example.com"))])
    with pytest.raises(PermanentError, match="cannot be replaced with an empty list"):
        run(deliver(provider(meta), segment("primary", 2), [{"email": "x"}, {}], 10))
    assert meta.members(ACCOUNT_A, SEGMENT) == {member(EMAIL=h("old@example.com"))}


def test_a_custom_chunk_with_nobody_usable_sends_nothing(meta: MetaEmulator) -> None:
    results = run(deliver(provider(meta), segment("custom", 2), [{"email": "x"}, {}], 10))
    assert results == [ChunkResult(invalid=2)]
    assert meta.members(ACCOUNT_A, SEGMENT) == set()  # created, so later sessions find it
    assert meta.uploads() == []


def test_rows_meta_rejects_count_as_invalid(meta: MetaEmulator) -> None:
    users = make_users(5)
    meta.invalid_values(h(users[1]["email"]), h(users[3]["email"]))
    results = run(deliver(provider(meta), segment(total=6), [*users, {}], 10))
    assert results == [ChunkResult(invalid=3, status=200)]
    expected = {standard_member(u) for i, u in enumerate(users) if i not in (1, 3)}
    assert meta.members(ACCOUNT_A, SEGMENT) == expected


def test_a_slow_answer_is_retryable(meta: MetaEmulator) -> None:
    meta.delay(5)
    with pytest.raises(RetryableError, match=r"no answer within 0\.2 s"):
        run(deliver(provider(meta, timeout=0.2), segment(total=1), make_users(1), 10))


def test_a_proxy_error_page_is_retryable(meta: MetaEmulator) -> None:
    meta.fail(502, b"<html><body>Service Unavailable</body></html>", on="list")
    with pytest.raises(RetryableError, match="HTTP 502"):
        run(deliver(provider(meta), segment(total=1), make_users(1), 10))


# --- delivery through the app and its worker --------------------------------------------------


def mixed_users(count: int) -> tuple[list[dict[str, Any]], set[Member], int]:
    """Users with every mix of fields, the rows Meta should hold for them (derived by hand
    from Meta's rules, not by the made), and how many have nothing Meta can match."""
    users: list[dict[str, Any]] = []
    expected: set[Member] = set()
    invalid = 0
    for i in range(count):
        user: dict[str, Any] = {"edgeTagId": f"et_{i}"}
        match i % 10:
            case 0 | 1 | 2:  # email only, untidy
                user["email"] = f"  User.{i}@Example.COM "
                expected.add(member(EMAIL=h(f"user.{i}@example.com")))
            case 3:  # a national US phone, read with the user's country
                user |= {"phone": f"(415) 2{i // 10000:02d}-{i % 10000:04d}", "country": "US"}
                digits = f"14152{i // 10000:02d}{i % 10000:04d}"
                expected.add(member(PHONE=h(digits), COUNTRY=h("us")))
            case 4:  # a national UK phone
                user |= {"phone": f"020 7{i:07d}", "country": "gb"}
                expected.add(member(PHONE=h(f"4420 7{i:07d}".replace(" ", "")), COUNTRY=h("gb")))
            case 5 | 6:  # everything
                user |= {
                    "externalId": f"cust-{i}",
                    "email": f"buyer{i}@shop.example",
                    "phone": f"+1 415 3{i // 10000:02d} {i % 10000:04d}",
                    "firstName": " Jane-Marie ",
                    "lastName": "O'Neil",
                    "postalCode": "94105-1234",
                    "country": "US",
                    "purchase": [{"sku": f"sku-{i % 7}", "amount": 12.5}],
                }
                expected.add(
                    member(
                        EXTERN_ID=f"cust-{i}",
                        EMAIL=h(f"buyer{i}@shop.example"),
                        PHONE=h(f"14153{i // 10000:02d}{i % 10000:04d}"),
                        FN=h("janemarie"),
                        LN=h("oneil"),
                        ZIP=h("94105"),
                        COUNTRY=h("us"),
                    )
                )
            case 7:  # name and address only
                user |= {
                    "firstName": "José",
                    "lastName": "Núñez",
                    "postalCode": str(10000 + i),
                    "country": "US",
                }
                expected.add(
                    member(FN=h("josé"), LN=h("núñez"), ZIP=h(str(10000 + i)), COUNTRY=h("us"))
                )
            case 8:  # the advertiser's id, and an email hashed by the client
                user |= {"externalId": f"{900000 + i}", "email": h(f"pre{i}@example.com").upper()}
                expected.add(member(EXTERN_ID=str(900000 + i), EMAIL=h(f"pre{i}@example.com")))
            case _:  # nothing Meta can match
                invalid += 1
                if i % 20 == 9:
                    user |= {"email": "not-an-email", "firstName": "Jane"}
                else:
                    user |= {"phone": "12345", "firstName": "Jane", "lastName": "Doe"}
        users.append(user)
    return users, expected, invalid


def test_25k_mixed_session_is_delivered_exactly(
    fast: Settings, engine: Engine, meta: MetaEmulator
) -> None:
    distinct, expected, invalid = mixed_users(24_990)
    users = [
        *distinct,
        *(dict(distinct[i]) for i in (0, 3, 5, 7, 8, 9, 100, 2_000, 20_000, 24_989)),
    ]
    assert len(users) == 25_000
    where = destinations(("meta-a", "facebook", options(meta)))
    with serve(fast, engine, where) as client:
        response = upload(client, "big", users, 10_000, "?sync=true")
        assert (response.status_code, response.content) == (200, b'{"success": true}')
        body = status(client, "big")
    assert body["state"] == "delivered"
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "meta-a",
        "kind": "facebook",
        "segmentName": SEGMENT,
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 24_990,
        "invalidUsers": invalid,
        "lastError": None,
    }
    assert meta.members(ACCOUNT_A, SEGMENT) == expected
    uploads = meta.uploads()
    assert [(u.edge, u.batch_seq, u.last) for u in uploads] == [
        ("users", 1, False),
        ("users", 2, False),
        ("users", 3, True),
    ]
    assert sum(u.rows for u in uploads) == 24_990 - invalid
    assert len({u.session_id for u in uploads}) == 1
    assert {u.estimated_num_total for u in uploads} == {24_990}
    assert uploads[0].schema == ("EXTERN_ID", "EMAIL", "PHONE", "FN", "LN", "ZIP", "COUNTRY")


def upload_one(client: TestClient, key: str, users: list[dict[str, Any]], kind: str) -> Any:
    fields = form(key, 1, 1, len(users), users, name=NAME, type=kind)
    return send(client, fields, "?sync=true")


def test_custom_adds_and_primary_replaces(
    fast: Settings, engine: Engine, meta: MetaEmulator
) -> None:
    users = make_users(30)
    where = destinations(("meta-a", "facebook", options(meta, chunk_size=10)))
    with serve(fast, engine, where) as client:
        assert upload_one(client, "c1", users[:20], "custom").status_code == 200
        assert upload_one(client, "c2", users[15:25], "custom").status_code == 200
        assert meta.members(ACCOUNT_A, SEGMENT) == {standard_member(u) for u in users[:25]}
        assert upload_one(client, "p1", users[25:], "primary").status_code == 200
        assert status(client, "p1")["deliveries"][0]["state"] == "succeeded"
    assert meta.members(ACCOUNT_A, SEGMENT) == {standard_member(u) for u in users[25:]}
    assert len(meta.audiences(ACCOUNT_A)) == 1
    assert [u.edge for u in meta.uploads()] == ["users"] * 3 + ["usersreplace"]


def test_rate_limits_and_transient_errors_are_retried_to_one_whole_replace(
    fast: Settings, engine: Engine, meta: MetaEmulator
) -> None:
    meta.add_audience(ACCOUNT_A, SEGMENT, members=[member(EMAIL=h("old@example.com"))])
    users = make_users(30)
    limited = graph_error_body(17, "(#17) User request limit reached", subcode=2446079)
    meta.fail(400, limited, headers=usage_header(), on="list")  # the lookup of attempt 1
    unexpected = "An unexpected error has occurred. Please retry your request later."
    transient = graph_error_body(2, unexpected, transient=True)
    # chunk 2 of attempt 2, half-way through its replace session
    meta.fail(400, transient, on=UPLOAD_EDGES, after=1)
    too_many = graph_error_body(80003, "(#80003) There have been too many calls to this ad-account")
    meta.fail(400, too_many, on=UPLOAD_EDGES)  # attempt 3
    where = destinations(("meta-a", "facebook", options(meta, chunk_size=10)))
    with serve(fast, engine, where) as client:
        assert upload_one(client, "r", users, "primary").status_code == 200
        body = status(client, "r")
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        4,
        None,
    )
    assert delivery["invalidUsers"] == 0
    assert meta.members(ACCOUNT_A, SEGMENT) == {standard_member(u) for u in users}
    sessions = [u.session_id for u in meta.uploads()]
    assert len(sessions) == 4 and sessions[0] != sessions[1]  # the half-done one, the whole one
    assert [u.batch_seq for u in meta.uploads()] == [1, 1, 2, 3]
    refused = [(c.route, graph_code(c)) for c in meta.calls if graph_code(c) is not None]
    assert refused == [("list", 17), ("usersreplace", 2), ("usersreplace", 80003)]


def test_a_permanent_error_fails_with_metas_message(
    fast: Settings, engine: Engine, meta: MetaEmulator
) -> None:
    denied = graph_error_body(
        200, "(#200) The current user can not update audience", transient=False
    )
    meta.fail(400, denied, on=UPLOAD_EDGES)
    where = destinations(("meta-a", "facebook", options(meta)))
    with serve(fast, engine, where) as client:
        response = upload_one(client, "denied", make_users(5), "custom")
        assert response.status_code == 400
        (message,) = errors(response)
        body = status(client, "denied")
    expected = "Meta error 200: (#200) The current user can not update audience (fbtrace_id "
    assert message.startswith(f"meta-a: {expected}")
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
    assert f"meta-a: {delivery['lastError']}" == message
    assert "user" + "0@example.com" not in message


def test_a_bad_token_fails_at_once(fast: Settings, engine: Engine, meta: MetaEmulator) -> None:
    where = destinations(("meta-a", "facebook", options(meta, access_token="expired")))
    with serve(fast, engine, where) as client:
        response = upload_one(client, "tok", make_users(2), "custom")
        body = status(client, "tok")
    assert response.status_code == 400
    (message,) = errors(response)
    assert message.startswith(
        "meta-a: Meta error 190: Invalid OAuth access token - Cannot parse access token"
    )
    assert "expired" not in message
    assert body["deliveries"][0]["attempts"] == 1
    assert meta.audiences(ACCOUNT_A) == []


def test_two_accounts_each_receive_the_segment(
    fast: Settings, engine: Engine, meta: MetaEmulator
) -> None:
    users = make_users(12)
    where = destinations(
        ("meta-a", "facebook", options(meta)),
        ("meta-b", "facebook", options(meta, ad_account_id=ACCOUNT_B, access_token=TOKEN_B)),
    )
    with serve(fast, engine, where) as client:
        assert upload_one(client, "two", users, "primary").status_code == 200
        body = status(client, "two")
    assert [d["state"] for d in body["deliveries"]] == ["succeeded", "succeeded"]
    expected = {standard_member(u) for u in users}
    assert meta.members(ACCOUNT_A, SEGMENT) == expected
    assert meta.members(ACCOUNT_B, SEGMENT) == expected
    a, b = meta.audience(ACCOUNT_A, SEGMENT), meta.audience(ACCOUNT_B, SEGMENT)
    assert a.id != b.id
    assert {c.principal for c in meta.calls if a.id in c.path} == {TOKEN_A}
    assert {c.principal for c in meta.calls if b.id in c.path} == {TOKEN_B}

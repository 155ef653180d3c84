"""Unit tests of form validation: pure, no HTTP, no database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from audience_server.errors import CorruptedPayload, EmptyUsers, InvalidField, PayloadTooLarge
from audience_server.parsing import Limits, decode_users, parse_upload, session_key
from tests.helpers import form

LIMITS = Limits(max_batch_users=100, max_total_batches=1000)


def parse(fields: dict[str, str], query: dict[str, str] | None = None) -> Any:
    return parse_upload(fields, query or {}, LIMITS)


def field_errors(fields: dict[str, str], query: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(InvalidField) as info:
        parse(fields, query)
    return list(info.value.messages)


def test_valid_batch_is_parsed_with_trimmed_name_and_default_type() -> None:
    users = [{"email": "a@example.com", "purchase": [1, 2]}, {"phone": 14155550100}]
    upload = parse(
        form(17, 2, 3, 5, users, name="  High  Value \n", type=None, pullDate="2026-01-01")
    )
    assert upload.name == "High  Value"
    assert upload.type == "custom"
    assert upload.session_key == "17"
    assert (upload.sequence, upload.total_batches, upload.total_users) == (2, 3, 5)
    assert upload.user_count == 2
    assert decode_users(upload.users_json) == users
    assert upload.batch["pullDate"] == "2026-01-01"
    assert upload.sync is False and upload.disable_prefix is False


def test_unknown_batch_keys_are_kept() -> None:
    upload = parse(form("s1", 1, 1, 1, [{}], source="warehouse"))
    assert upload.batch["source"] == "warehouse"


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (1708531200, "1708531200"),
        ("1708531200", "1708531200"),
        (0, "0"),
        ("a.B_c:d-9", "a.B_c:d-9"),
    ],
)
def test_session_id_key_is_its_string_form(value: object, key: str) -> None:
    assert session_key(value) == key


@pytest.mark.parametrize("value", [-1, 1.5, 3.0, True, None, "", "has space", "x" * 129, "é", [1]])
def test_invalid_session_ids(value: object) -> None:
    assert session_key(value) is None
    assert any(
        "batch.sessionId" in e
        for e in field_errors(
            form(1, 1, 1, 1, [{}])
            | {
                "batch": json.dumps(
                    {"sessionId": value, "sequence": 1, "totalBatches": 1, "totalUsers": 1}
                )
            }
        )
    )


@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"name": "x", "users": "[{}]"}, "Field batch is missing."),
        ({"name": "x", "batch": "{}"}, "Field users is missing."),
        ({"name": "x", "batch": "{oops", "users": "[{}]"}, "Field batch is not valid JSON"),
        ({"name": "x", "batch": "{}", "users": "[{}"}, "Field users is not valid JSON"),
        ({"name": "x", "batch": "[1]", "users": "[{}]"}, "Field batch must be a JSON object."),
        ({"name": "x", "batch": "{}", "users": '{"a": 1}'}, "Field users must be a JSON array."),
        ({"name": "x", "batch": "{}", "users": '"[]"'}, "Field users must be a JSON array."),
    ],
)
def test_corrupted_payload(fields: dict[str, str], details: str) -> None:
    with pytest.raises(CorruptedPayload) as info:
        parse(fields)
    (message,) = info.value.messages
    assert message.startswith("Payload is corrupted or missing. Please send JSON string. ")
    assert details in message


def test_empty_users_is_refused_after_corruption_checks() -> None:
    with pytest.raises(EmptyUsers):
        parse(form(1, 1, 1, 1, []))
    with pytest.raises(CorruptedPayload):
        parse({"batch": "nope", "users": "[]"})


def test_too_many_users_is_413_before_other_errors() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse({"batch": "corrupt", "users": json.dumps([{}] * 101)})
    assert "101" in info.value.messages[0] and "100" in info.value.messages[0]
    assert parse(form(1, 1, 100, 100, [{}] * 100)).user_count == 100


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"name": ""}, "name is required and must not be blank."),
        ({"name": "   "}, "name is required and must not be blank."),
        ({"name": "n" * 201}, "name must be at most 200 characters."),
        ({"type": "lookalike"}, "type must be custom or primary."),
    ],
)
def test_name_and_type_errors(changes: dict[str, str], expected: str) -> None:
    assert field_errors(form(1, 1, 1, 1, [{}]) | changes) == [expected]


def test_name_of_200_characters_after_trim_is_fine() -> None:
    assert parse(form(1, 1, 1, 1, [{}], name=" " + "n" * 200 + " ")).name == "n" * 200


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({"sequence": "1"}, "batch.sequence must be an integer."),
        ({"sequence": 1.0}, "batch.sequence must be an integer."),
        ({"sequence": True}, "batch.sequence must be an integer."),
        ({"sequence": -1}, "batch.sequence must be between 0 and totalBatches (3); got -1."),
        ({"sequence": 4}, "batch.sequence must be between 0 and totalBatches (3); got 4."),
        ({"totalBatches": 0}, "batch.totalBatches must be an integer >= 1."),
        ({"totalUsers": "25000"}, "batch.totalUsers must be an integer >= 1."),
        ({"totalBatches": 11}, "batch.totalBatches (11) cannot exceed batch.totalUsers (10)"),
        ({"totalBatches": 1001, "totalUsers": 5000}, "batch.totalBatches must be at most 1000"),
        ({"pullDate": "2026-13-01"}, "batch.pullDate must be a date written YYYY-MM-DD."),
        ({"pullDate": 20260101}, "batch.pullDate must be a date written YYYY-MM-DD."),
        ({"pullDate": "01/01/2026"}, "batch.pullDate must be a date written YYYY-MM-DD."),
    ],
)
def test_batch_field_errors(batch: dict[str, Any], expected: str) -> None:
    base = {"sessionId": 1, "sequence": 1, "totalBatches": 3, "totalUsers": 10}
    fields = form(1, 1, 1, 1, [{}]) | {"batch": json.dumps(base | batch)}
    assert any(e.startswith(expected) for e in field_errors(fields)), field_errors(fields)


def test_null_pull_date_and_null_user_fields_mean_absent() -> None:
    upload = parse(form(1, 1, 1, 1, [{"email": None, "phone": None}], pullDate=None))
    assert upload.user_count == 1


def test_user_errors_name_index_and_field_only() -> None:
    users: list[Any] = [{"email": "ok@example.com"}] * 17 + [
        {"email": 42, "phone": "+1"},
        "secret@example.com",
        {"phone": 1.5, "firstName": ["Jane"], "country": {"x": 1}},
        {"phone": True},
    ]
    errors = field_errors(form(1, 1, 1, 21, users))
    assert errors == [
        "users[17].email must be a string.",
        "users[18] must be a JSON object.",
        "users[19].firstName must be a string.",
        "users[19].country must be a string.",
        "users[19].phone must be a string or an integer.",
        "users[20].phone must be a string or an integer.",
    ]
    assert not any("secret" in e for e in errors)


def test_many_user_errors_are_capped() -> None:
    errors = field_errors(form(1, 1, 1, 50, [{"email": 1}] * 50))
    assert len(errors) == 11
    assert errors[-1] == "users has 40 more invalid fields."


def test_all_field_errors_are_reported_together() -> None:
    fields = form(1, 1, 1, 1, [{"email": 1}], name="", type="x")
    assert len(field_errors(fields, {"sync": "yes"})) == 4


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("1", True), ("TRUE", True), ("false", False), ("0", False)]
)
def test_query_flags(raw: str, value: bool) -> None:
    upload = parse(form(1, 1, 1, 1, [{}]), {"sync": raw, "disablePrefix": raw})
    assert upload.sync is value and upload.disable_prefix is value


def test_bad_query_flag() -> None:
    assert field_errors(form(1, 1, 1, 1, [{}]), {"disablePrefix": "maybe"}) == [
        "query parameter disablePrefix must be true, false, 1 or 0."
    ]


def test_digest_is_of_the_users_field_as_sent() -> None:
    a = parse(form(1, 1, 1, 1, [{"a": 1, "b": 2}]))
    b = parse(form(1, 1, 1, 1, [{"b": 2, "a": 1}]))
    assert a.digest != b.digest  # the store compares semantically when bytes differ
    assert a.users_json == b'[{"a": 1, "b": 2}]'


@pytest.mark.parametrize(
    "raw",
    ['[{"x": 123456789012345678901234567890}]', '[{"x": [1, {"y": null}], "email": "a@b.c"}]'],
)
def test_any_valid_json_is_kept_in_unknown_keys(raw: str) -> None:
    upload = parse(form(1, 1, 1, 1, [{}]) | {"users": raw})
    assert upload.user_count == 1 and upload.users_json == raw.encode()


@pytest.mark.parametrize("raw", ['[{"x": NaN}]', '[{"x": 1}] trailing', "[{'x': 1}]"])
def test_json_that_is_not_json_is_corrupted(raw: str) -> None:
    with pytest.raises(CorruptedPayload) as info:
        parse(form(1, 1, 1, 1, [{}]) | {"users": raw})
    assert "Field users is not valid JSON (JSON is malformed" in info.value.messages[0]


@pytest.mark.parametrize("raw", ["[" * 100_000, '[{"x": ' + "[" * 100_000 + "]" * 100_000 + "}]"])
def test_absurd_nesting_is_corrupted_not_a_crash(raw: str) -> None:
    with pytest.raises(CorruptedPayload):
        parse(form(1, 1, 1, 1, [{}]) | {"users": raw})

"""Turn the fields of a ``POST /audience`` form into a validated :class:`BatchUpload`.

Pure logic: no HTTP, no database. Errors are raised in the order SPEC §2 gives
(413 users per batch, corrupted payload, empty users, then every field error at once).

``users`` is read with msgspec against the typed user schema: it checks the JSON and the
types of the known fields in C without building a dict per user (ingest never needs them:
the field is stored as sent). Only when that check fails is the array decoded into Python
objects, to say exactly which index and field are wrong.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson

from .errors import CorruptedPayload, EmptyUsers, InvalidField, PayloadTooLarge

SegmentType = Literal["custom", "primary"]

STRING_FIELDS = (
    "edgeTagId",
    "externalId",
    "email",
    "firstName",
    "lastName",
    "country",
    "postalCode",
)
MAX_NAME_LENGTH = 200
MAX_REPORTED_USER_ERRORS = 10
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PULL_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}


class _User(msgspec.Struct, gc=False):
    """The known fields of a user and their JSON types; other keys are skipped."""

    edgeTagId: str | None = None
    externalId: str | None = None
    email: str | None = None
    phone: str | int | None = None
    firstName: str | None = None
    lastName: str | None = None
    country: str | None = None
    postalCode: str | None = None


_USERS = msgspec.json.Decoder(list[_User])
_ANY_JSON = msgspec.json.Decoder()


def decode_users(users_json: bytes) -> Any:
    """The users field as Python objects (msgspec reads it at ingest, so everywhere)."""
    return _ANY_JSON.decode(users_json)


def valid_user_count(users_json: bytes) -> int | None:
    """How many users, if the field is a JSON array of well-typed users; else None."""
    try:
        return len(_USERS.decode(users_json))
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None


@dataclass(frozen=True)
class Limits:
    """The per-batch limits a parse enforces."""

    max_batch_users: int = 100_000
    max_total_batches: int = 100_000


@dataclass(frozen=True)
class BatchUpload:
    """One validated batch, ready to be stored."""

    name: str
    type: SegmentType
    session_key: str
    sequence: int
    total_batches: int
    total_users: int
    batch: dict[str, Any]  # the batch object as sent, unknown keys included
    users_json: bytes  # the users field exactly as received
    user_count: int
    digest: bytes  # sha256 of users_json
    sync: bool
    disable_prefix: bool


def session_key(value: object) -> str | None:
    """The key of a ``sessionId`` (its string form), or None if it is not a valid id."""
    if type(value) is int:
        return str(value) if value >= 0 else None
    if type(value) is str and _SESSION_ID.fullmatch(value):
        return value
    return None


def parse_flag(name: str, raw: str | None, errors: list[str]) -> bool:
    if raw is None:
        return False
    value = _FLAG_VALUES.get(raw.strip().lower())
    if value is None:
        errors.append(f"query parameter {name} must be true, false, 1 or 0.")
        return False
    return value


def _load_json(field: str, raw: str | bytes | None) -> Any:
    if raw is None:
        raise CorruptedPayload(f"Field {field} is missing.")
    try:
        return orjson.loads(raw) if field == "batch" else decode_users(raw)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, msgspec.DecodeError) as exc:
        raise CorruptedPayload(f"Field {field} is not valid JSON ({exc}).") from None
    except RecursionError:
        raise CorruptedPayload(f"Field {field} is nested too deeply.") from None


def check_users(users: list[Any], errors: list[str]) -> None:
    """Type-check every user; values are not judged for format (providers do that)."""
    found = 0
    for index, user in enumerate(users):
        if type(user) is not dict:
            problems = [f"users[{index}] must be a JSON object."]
        else:
            problems = []
            for key in STRING_FIELDS:
                value = user.get(key)
                if value is not None and type(value) is not str:
                    problems.append(f"users[{index}].{key} must be a string.")
            phone = user.get("phone")
            if phone is not None and type(phone) is not str and type(phone) is not int:
                problems.append(f"users[{index}].phone must be a string or an integer.")
            if not problems:
                continue
        for problem in problems:
            found += 1
            if found <= MAX_REPORTED_USER_ERRORS:
                errors.append(problem)
    if found > MAX_REPORTED_USER_ERRORS:
        errors.append(f"users has {found - MAX_REPORTED_USER_ERRORS} more invalid fields.")


def _positive_int(value: object) -> int | None:
    # type() rather than isinstance(): a JSON true is not the integer 1 here.
    return value if type(value) is int and value >= 1 else None


def _check_batch(batch: dict[str, Any], limits: Limits, errors: list[str]) -> None:
    key = session_key(batch.get("sessionId"))
    if key is None:
        errors.append(
            "batch.sessionId must be an integer >= 0 or a string of 1-128 characters "
            "from A-Z, a-z, 0-9 and . _ : -."
        )
    total_batches = _positive_int(batch.get("totalBatches"))
    total_users = _positive_int(batch.get("totalUsers"))
    if total_batches is None:
        errors.append("batch.totalBatches must be an integer >= 1.")
    if total_users is None:
        errors.append("batch.totalUsers must be an integer >= 1.")
    if total_batches is not None and total_users is not None:
        if total_batches > limits.max_total_batches:
            errors.append(
                f"batch.totalBatches must be at most {limits.max_total_batches}; "
                "send larger batches."
            )
        if total_batches > total_users:
            errors.append(
                f"batch.totalBatches ({total_batches}) cannot exceed batch.totalUsers "
                f"({total_users}): every batch holds at least one user."
            )
    sequence = batch.get("sequence")
    if type(sequence) is not int:
        errors.append("batch.sequence must be an integer.")
    elif total_batches is not None and not 0 <= sequence <= total_batches:
        errors.append(
            f"batch.sequence must be between 0 and totalBatches ({total_batches}); got {sequence}."
        )
    pull_date = batch.get("pullDate")
    if pull_date is not None:
        valid = type(pull_date) is str and _PULL_DATE.fullmatch(pull_date)
        if valid:
            try:
                dt.date.fromisoformat(pull_date)
            except ValueError:
                valid = False
        if not valid:
            errors.append("batch.pullDate must be a date written YYYY-MM-DD.")


def _too_many(count: int, limits: Limits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"users has {count} entries; the limit is {limits.max_batch_users} per batch."
    )


def parse_upload(
    fields: Mapping[str, str], query: Mapping[str, str], limits: Limits
) -> BatchUpload:
    """Validate one form; raise the first error class that applies, with all its messages."""
    raw_users = fields.get("users")
    users_json = raw_users.encode() if raw_users is not None else None
    count = valid_user_count(users_json) if users_json is not None else None
    users: Any = None
    if count is None:  # slow path: find out what is wrong, in SPEC order
        users = _load_json("users", users_json)
        if type(users) is list and len(users) > limits.max_batch_users:
            raise _too_many(len(users), limits)
    elif count > limits.max_batch_users:
        raise _too_many(count, limits)
    batch = _load_json("batch", fields.get("batch"))
    if type(batch) is not dict:
        raise CorruptedPayload("Field batch must be a JSON object.")
    if count is None and type(users) is not list:
        raise CorruptedPayload("Field users must be a JSON array.")
    if count == 0 or users == []:
        raise EmptyUsers()

    errors: list[str] = []
    name = (fields.get("name") or "").strip()
    if not name:
        errors.append("name is required and must not be blank.")
    elif len(name) > MAX_NAME_LENGTH:
        errors.append(f"name must be at most {MAX_NAME_LENGTH} characters.")
    segment_type = (fields.get("type") or "custom").strip()
    if segment_type not in ("custom", "primary"):
        errors.append("type must be custom or primary.")
    _check_batch(batch, limits, errors)
    sync = parse_flag("sync", query.get("sync"), errors)
    disable_prefix = parse_flag("disablePrefix", query.get("disablePrefix"), errors)
    if count is None:
        check_users(users, errors)
        count = len(users)
    if errors:
        raise InvalidField(*errors)

    assert users_json is not None
    return BatchUpload(
        name=name,
        type=segment_type,  # type: ignore[arg-type]
        session_key=session_key(batch["sessionId"]),  # type: ignore[arg-type]
        sequence=batch["sequence"],
        total_batches=batch["totalBatches"],
        total_users=batch["totalUsers"],
        batch=batch,
        users_json=users_json,
        user_count=count,
        digest=hashlib.sha256(users_json).digest(),
        sync=sync,
        disable_prefix=disable_prefix,
    )

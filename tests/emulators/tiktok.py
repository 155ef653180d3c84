"""A TikTok API for Business emulator on 127.0.0.1: the audience calls of the streaming
"segment" API, as strict as TikTok, keeping each advertiser's audiences and their members.

    with TikTokEmulator({"tok-1": ["7000000000000000001"]}) as tiktok:
        tiktok.fail(200, envelope_error(40100), times=2)    # throttled twice
        ...  # a tiktok destination with base_url=tiktok.base_url, access_token="tok-1"
        assert tiktok.members("7000000000000000001", "blotout_x") == {"EMAIL_SHA256": {...}}

Served (under ``/open_api/v1.3/``): ``GET dmp/custom_audience/list/``, ``POST
segment/audience/`` (``action`` create only), ``POST segment/mapping/`` (``action`` add or
delete, applied to the members it names), ``POST dmp/custom_audience/delete/`` (TikTok's
documented delete). Audience ids never change; members are kept per audience by id type.
Like TikTok, every answer is HTTP 200 with ``{"code", "message", "request_id", "data"}``:
40104/40105 for a missing or wrong ``Access-Token``, 40001 for an advertiser the
token may not operate, 40002 ("Parameter error: …") for anything malformed. Only an unknown
path (404), a wrong method (405) or a scripted raw status answer otherwise. A request is
checked whole before anything changes; scripted answers (``fail()``: an envelope from
``envelope_error()`` at status 200, or a raw status) replace the reply of a request that
passed every check, so it changes nothing. Each request's route is its endpoint (``LIST``,
``AUDIENCE``, ``MAPPING``, ``DELETE``).

The batch limit (``max_batch`` rows of batch_data, default 1,000) and the 128-character name
limit are this emulator's assumptions: TikTok documents no row limit for segment/mapping
(1,000 is what the integrations send, Tealium's batches: ../shared/reference/providers.md
section 2a), and 128 is the limit of its customer-file audiences
(tiktok/tiktok-business-api-sdk yml_files/dmp_custom_audience_create.yml). ``segment/audience/``
with ``action: "delete"`` is refused (40002): no TikTok source documents it (integrators'
notes only); the documented delete is ``dmp/custom_audience/delete/``.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.emulators.base import Call, Emulator, JsonBody, PlatformError
from tests.emulators.loopback import HttpError, Incoming, Reply

PREFIX = "/open_api/v1.3/"
LIST = "dmp/custom_audience/list/"
AUDIENCE = "segment/audience/"
MAPPING = "segment/mapping/"
DELETE = "dmp/custom_audience/delete/"
_METHODS = {LIST: "GET", AUDIENCE: "POST", MAPPING: "POST", DELETE: "POST"}
# tiktok/tiktok-business-api-sdk@44ca338bba877bdbde906d6b0e10a5f46203f814
# yml_files/dmp_custom_audience_delete.yml: custom_audience_ids "Length range is [1, 100]"
MAX_DELETE_IDS = 100

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")
ID_TYPES: dict[str, re.Pattern[str]] = {
    "EMAIL_SHA256": _SHA256,
    "PHONE_SHA256": _SHA256,
    "IDFA_SHA256": _SHA256,
    "AAID_SHA256": _SHA256,
    "IDFA_MD5": _MD5,
    "AAID_MD5": _MD5,
}
MAX_NAME = 128
MAX_PAGE_SIZE = 100
MESSAGES = {
    40001: "No permission to operate this advertiser.",
    40002: "Parameter error.",
    40100: "Too many requests. Please retry in some time.",
    50000: "Internal service error. Please retry later.",
}


class ApiError(PlatformError):
    """An answer with a non-zero TikTok code (still HTTP 200), in the emulator's envelope."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(200, message)
        self.code = code


def _param(message: str) -> ApiError:
    return ApiError(40002, f"Parameter error: {message}")


_JSON_BODY = JsonBody(
    wrong_media=lambda _: _param("Content-Type must be application/json"),
    not_json=lambda _: _param("the body is not valid JSON"),
    not_object=lambda: _param("the body must be a JSON object"),
)


def envelope_error(code: int, message: str | None = None) -> dict[str, Any]:
    """TikTok's answer with a non-zero ``code``, for ``fail(200, ...)``: 40100 throttled,
    5xxxx server error, 4xxxx refusal."""
    request_id = f"20261128120000{secrets.randbelow(10**12):012d}"
    text = message or MESSAGES.get(code, f"Error {code}.")
    return {"code": code, "message": text, "request_id": request_id, "data": {}}


def envelope_code(call: Call) -> int | None:
    """The envelope code ``call`` was answered with; None for a raw HTTP answer."""
    answer = call.answer_json()
    code = answer.get("code") if isinstance(answer, dict) else None
    return code if isinstance(code, int) else None


@dataclass
class Audience:
    """One audience of an advertiser, its members kept as TikTok gets them: digests."""

    audience_id: str
    name: str
    created_at: float
    members: dict[str, set[str]] = field(default_factory=dict)  # id type -> digests

    def copy(self) -> Audience:
        members = {kind: set(values) for kind, values in self.members.items()}
        return Audience(self.audience_id, self.name, self.created_at, members)


class TikTokEmulator(Emulator):
    """TikTok's audience API for the advertisers each access token may operate."""

    def __init__(
        self,
        accounts: Mapping[str, Iterable[str]],
        *,
        max_batch: int = 1_000,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.tokens = {token: frozenset(ids) for token, ids in accounts.items()}
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        super().__init__(name="tiktok-emulator")
        self._audiences: dict[str, list[Audience]] = {
            advertiser: [] for ids in self.tokens.values() for advertiser in ids
        }
        self._ids = itertools.count(7_400_000_000_000_000_001)
        self._request_ids = itertools.count(1)

    # -- set-up ------------------------------------------------------------------------------

    def add_audience(self, advertiser_id: str, name: str) -> str:
        """Create an audience as Ads Manager would; returns its id."""
        with self._cond:
            return self._create(advertiser_id, name).audience_id

    def delete_audience(self, advertiser_id: str, audience_id: str) -> None:
        """Delete an audience as Ads Manager would."""
        with self._cond:
            self._audiences[advertiser_id] = [
                a for a in self._audiences[advertiser_id] if a.audience_id != audience_id
            ]

    # -- what it holds -----------------------------------------------------------------------

    def audiences(self, advertiser_id: str) -> list[Audience]:
        """The advertiser's audiences, oldest first (copies)."""
        with self._cond:
            return [audience.copy() for audience in self._audiences[advertiser_id]]

    def audience(self, advertiser_id: str, name: str) -> Audience:
        """The one audience named ``name``; AssertionError when there is none or several."""
        named = [a for a in self.audiences(advertiser_id) if a.name == name]
        if len(named) != 1:
            raise AssertionError(f"{len(named)} audiences named {name!r} at {advertiser_id}")
        return named[0]

    def members(self, advertiser_id: str, name: str) -> dict[str, set[str]]:
        """The member digests, by id type, of the one audience named ``name``."""
        return {k: v for k, v in self.audience(advertiser_id, name).members.items() if v}

    def answered(self, endpoint: str, code: int | None = 0) -> list[Call]:
        """Requests to ``endpoint`` answered with envelope ``code`` (0: the successful ones;
        None: raw HTTP answers)."""
        return [c for c in self.calls_to(endpoint) if envelope_code(c) == code]

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, incoming: Incoming) -> Reply:
        if not incoming.path.startswith(PREFIX) or incoming.path[len(PREFIX) :] not in _METHODS:
            raise HttpError(404, f"no API at {incoming.path}")
        endpoint = incoming.route = incoming.path[len(PREFIX) :]
        if incoming.method != _METHODS[endpoint]:
            raise HttpError(405, f"{incoming.method} not allowed on {incoming.path}")
        framed = "content-length" in incoming.headers or "transfer-encoding" in incoming.headers
        if incoming.method == "GET" and not framed:
            raw = incoming.body = b""  # a GET has no body; the connection stays usable
        else:
            raw = incoming.read_body(self.max_body_bytes)
        query = {key: values[-1] for key, values in parse_qs(incoming.query).items()}
        with self._cond:
            try:
                advertisers = self._authenticate(incoming)
                if endpoint == LIST:
                    apply = self._list(advertisers, query)
                else:
                    body = _JSON_BODY.parse(incoming, raw)
                    check = {
                        AUDIENCE: self._audience,
                        MAPPING: self._mapping,
                        DELETE: self._delete,
                    }[endpoint]
                    apply = check(advertisers, body)
                turn = self._take(incoming)
                turn.wait()
                if turn.reply is not None:
                    return turn.reply
                data = apply()
            except ApiError as exc:
                return self._envelope(exc.code, exc.message, None)
            return self._envelope(0, "OK", data)

    def _failure(self, status: int, retry_after: str | None) -> Reply:
        return Reply(status, f"scripted HTTP {status}".encode(), "text/plain")

    def _envelope(self, code: int, message: str, data: Any) -> Reply:
        request_id = f"20261128120000{next(self._request_ids):012d}"
        envelope = {"code": code, "message": message, "request_id": request_id, "data": data or {}}
        return Reply(200, json.dumps(envelope).encode())

    def _authenticate(self, incoming: Incoming) -> frozenset[str]:
        token = incoming.headers.get("access-token")
        if not token:
            raise ApiError(40104, "Access token is null, please check your access token.")
        if token not in self.tokens:
            raise ApiError(40105, "Access token is incorrect or has been revoked.")
        incoming.principal = token
        return self.tokens[token]

    def _advertiser(self, advertisers: frozenset[str], value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.isdigit():
            raise _param(f"{key} must be a string of digits")
        if value not in advertisers:
            raise ApiError(40001, f"No permission to operate advertiser {value}.")
        return value

    def _list(self, advertisers: frozenset[str], query: Mapping[str, str]) -> Any:
        advertiser = self._advertiser(advertisers, query.get("advertiser_id"), "advertiser_id")
        page = _int_param(query, "page", 1, 1, 10**6)
        size = _int_param(query, "page_size", 10, 1, MAX_PAGE_SIZE)

        def apply() -> dict[str, Any]:
            audiences = self._audiences[advertiser]
            shown = audiences[(page - 1) * size : page * size]
            return {
                "list": [_listed(a) for a in shown],
                "page_info": {
                    "page": page,
                    "page_size": size,
                    "total_number": len(audiences),
                    "total_page": (len(audiences) + size - 1) // size,
                },
            }

        return apply

    def _audience(self, advertisers: frozenset[str], body: dict[str, Any]) -> Any:
        advertiser = self._advertiser(advertisers, body.get("advertiser_id"), "advertiser_id")
        action = body.get("action")
        if action == "create":
            name = body.get("custom_audience_name")
            if not isinstance(name, str) or not name.strip():
                raise _param("custom_audience_name is required")
            if len(name) > MAX_NAME:
                raise _param(f"custom_audience_name is longer than {MAX_NAME} characters")
            return lambda: {"audience_id": self._create(advertiser, name).audience_id}
        # ``action: "delete"`` here is in integrators' notes only, in no TikTok source; the
        # documented delete is dmp/custom_audience/delete/ (``_delete``).
        raise _param("action must be create")

    def _delete(self, advertisers: frozenset[str], body: dict[str, Any]) -> Any:
        """dmp/custom_audience/delete/ as tiktok/tiktok-business-api-sdk@44ca338b
        yml_files/dmp_custom_audience_delete.yml has it: ``advertiser_id`` (string) and
        ``custom_audience_ids`` (strings, 1 to 100), both required; ``data`` is ``{}``.
        Refusing an id the advertiser does not own is this emulator's assumption."""
        advertiser = self._advertiser(advertisers, body.get("advertiser_id"), "advertiser_id")
        ids = body.get("custom_audience_ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_DELETE_IDS:
            raise _param(f"custom_audience_ids must be a list of 1 to {MAX_DELETE_IDS} ids")
        owned = {a.audience_id for a in self._audiences[advertiser]}
        for audience_id in ids:
            if not isinstance(audience_id, str) or audience_id not in owned:
                raise _param("invalid audience ID")

        def apply() -> None:
            for audience_id in ids:
                self.delete_audience(advertiser, audience_id)

        return apply

    def _mapping(self, advertisers: frozenset[str], body: dict[str, Any]) -> Any:
        ids = body.get("advertiser_ids")
        if not isinstance(ids, list) or not ids:
            raise _param("advertiser_ids must be a non-empty list")
        owned = {
            a.audience_id: a
            for advertiser in (self._advertiser(advertisers, i, "advertiser_ids") for i in ids)
            for a in self._audiences[advertiser]
        }
        action = body.get("action")
        if action not in ("add", "delete"):
            raise _param("action must be one of add, delete")
        schema = body.get("id_schema")
        if not isinstance(schema, list) or not schema:
            raise _param("id_schema must be a non-empty list")
        for kind in schema:
            if kind not in ID_TYPES:
                raise _param(f"id_schema: {kind!r} is not one of {', '.join(ID_TYPES)}")
        if len(set(schema)) != len(schema):
            raise _param("id_schema has a repeated id type")
        rows = body.get("batch_data")
        if not isinstance(rows, list) or not rows:
            raise _param("batch_data must be a non-empty list")
        if len(rows) > self.max_batch:
            raise _param(f"batch_data has {len(rows)} rows; at most {self.max_batch} allowed")
        changes: list[tuple[Audience, str, str]] = []
        for number, row in enumerate(rows):
            where = f"batch_data[{number}]"
            if not isinstance(row, list) or len(row) != len(schema):
                raise _param(f"{where} must be a list of {len(schema)} items, as id_schema")
            if all(cell == {} for cell in row):
                raise _param(f"{where} has no id")
            for kind, cell in zip(schema, row, strict=True):
                changes.extend(self._cell(cell, kind, owned, where))

        # Applied as TikTok documents the two actions: "add" maps each id to the audiences
        # named, "delete" unmaps it; unmapping an id that is not a member changes nothing
        # (TikTok documents no error for it). ../shared/reference/providers.md section 2a.
        def apply() -> None:
            for audience, kind, value in changes:
                members = audience.members.setdefault(kind, set())
                if action == "add":
                    members.add(value)
                else:
                    members.discard(value)

        return apply

    @staticmethod
    def _cell(
        cell: Any, kind: str, owned: Mapping[str, Audience], where: str
    ) -> list[tuple[Audience, str, str]]:
        if not isinstance(cell, dict):
            raise _param(f"{where}: each item must be an object")
        if cell == {}:
            return []
        if set(cell) != {"id", "audience_ids"}:
            raise _param(f"{where}: an item has exactly the keys id and audience_ids")
        value, audience_ids = cell["id"], cell["audience_ids"]
        if not isinstance(value, str) or not ID_TYPES[kind].fullmatch(value):
            raise _param(f"{where}: invalid {kind} id (lowercase hex digest expected)")
        if not isinstance(audience_ids, list) or not audience_ids:
            raise _param(f"{where}: audience_ids must be a non-empty list")
        changes = []
        for audience_id in audience_ids:
            if not isinstance(audience_id, str) or audience_id not in owned:
                raise _param("invalid audience ID")
            changes.append((owned[audience_id], kind, value))
        return changes

    def _create(self, advertiser: str, name: str) -> Audience:
        audience = Audience(str(next(self._ids)), name, time.time())
        self._audiences[advertiser].append(audience)
        return audience


def _int_param(query: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _param(f"{key} must be an integer from {low} to {high}")
    return int(raw)


def _listed(audience: Audience) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(audience.created_at))
    return {
        "audience_id": audience.audience_id,
        "name": audience.name,
        "audience_type": "Partner Audience",
        "cover_num": sum(len(values) for values in audience.members.values()),
        "is_valid": True,
        "is_expiring": False,
        "shared": False,
        "create_time": created,
        "calculate_type": None,
    }

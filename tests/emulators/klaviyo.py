"""A Klaviyo account server on 127.0.0.1: lists, profiles and bulk profile import jobs.

It answers the part of the Klaviyo API the ``klaviyo`` provider uses, the way Klaviyo does:
JSON:API documents, ``{"errors": [{"id", "status", "code", "title", "detail", "source"}]}`` on
failure, one account per private key. It refuses what Klaviyo refuses:

- a missing or unknown ``Authorization: Klaviyo-API-Key <key>`` (401), a missing or malformed
  ``revision`` header (400), an ``Accept`` without JSON (406), a body that is not JSON:API JSON
  (415/400);
- import bodies of the wrong shape or types, over 10,000 profiles (400) or 5 MB (413), a
  profile over 100 KB, without any of email / phone_number / external_id, with a phone number
  not in E.164 or an external_id over 255 characters (400: the whole request);
- page sizes over the endpoint's maximum, unknown query parameters, unknown lists (404);
- more requests than an endpoint's rate limits (``RATE_LIMITS``, each endpoint's
  ``x-klaviyo-ratelimit``, per account in fixed 1 s and 60 s windows): 429 with a whole-second
  ``Retry-After`` to the end of the full window. Only the list-members read is limited unless
  ``rate_limited`` says otherwise; ``rate_scale`` multiplies the limits for tests that read
  hundreds of thousands of members in seconds.

A list's members are paged in joining order by an opaque cursor naming the last member given
(a keyset: members removed meanwhile do not shift the pages after them), ``links.next`` until
the last page.

Import jobs run "asynchronously": a job is ``queued`` when created, ``processing`` at its first
poll and ``complete`` at its second (``polls_to_complete``); only then are its profiles upserted
(one profile per person: matched by email, then phone number, then external id) and added to
its lists. A profile Klaviyo would reject while processing (an email whose domain has no valid
top-level domain, identifiers that belong to two different profiles) is counted in
``failed_count`` and listed under import-errors instead.

Tests script failures with ``fail()`` (any status, in Klaviyo's envelope unless given a body,
e.g. from ``errors_document()``; ``on`` a route, named after its handler: ``get_lists``,
``post_list``, ``get_list_members``, ``add_list_members``, ``remove_list_members``,
``post_job``, ``get_job``, ``get_job_profiles``, ``get_job_errors``) and ``cancel_jobs()``,
and read what the account holds with ``lists()``, ``members()``, ``profiles()``, ``jobs()``,
``import_errors()``; ``calls`` is every request, ``member_cursors()`` the cursor and status of
each read of a list's members. ``fill_list()`` puts many profiles in a list at once.

    with KlaviyoEmulator("pk_one", "pk_two") as klaviyo:
        klaviyo.fail(429, retry_after="1")
        ...  # a klaviyo destination with base_url=klaviyo.base_url, api_key="pk_one"
        assert klaviyo.members("blotout_X", api_key="pk_one") == [...]
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

from tests.emulators.base import Emulator, JsonBody, PlatformError
from tests.emulators.loopback import HttpError, Incoming, Reply

MEDIA_TYPE = "application/vnd.api+json"
MAX_BODY_BYTES = 5_000_000
MAX_PROFILES_PER_JOB = 10_000
MAX_PROFILE_BYTES = 100_000
MAX_RELATIONSHIP_IDS = 1_000
MAX_EXTERNAL_ID = 255

_REVISION = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.[A-Za-z0-9_-]+)?")
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+")
_EMAIL_DELIVERABLE = re.compile(_EMAIL_SHAPE.pattern + r"\.[A-Za-z]{2,}")
_LIST_MEMBERS = re.compile(r"/api/lists/([^/]+)/relationships/profiles")
_JOB = re.compile(r"/api/profile-bulk-import-jobs/([^/]+)(/relationships/profiles|/import-errors)?")
_FILTER = re.compile(r"""equals\((name|id),(?:"([^"]*)"|'([^']*)')\)""")
_TITLES = {
    400: ("invalid", "Invalid input."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    406: ("not_acceptable", "Could not satisfy the request Accept header."),
    409: ("conflict", "Conflict."),
    413: ("request_too_large", "Request entity too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    429: ("throttled", "Request was throttled."),
    500: ("error", "A server error occurred."),
    502: ("bad_gateway", "Bad gateway."),
    503: ("service_unavailable", "Service unavailable."),
}
_PROFILE_FIELDS = frozenset(
    {
        "email",
        "phone_number",
        "external_id",
        "_kx",
        "anonymous_id",
        "first_name",
        "last_name",
        "organization",
        "locale",
        "title",
        "image",
        "location",
        "properties",
    }
)
_LOCATION_FIELDS = frozenset(
    {
        "address1",
        "address2",
        "city",
        "country",
        "latitude",
        "longitude",
        "region",
        "zip",
        "timezone",
        "ip",
    }
)
_IDENTIFIERS = ("email", "phone_number", "external_id")
# Requests per (burst: 1 s, steady: 60 s) fixed window, per account and endpoint. Klaviyo: "rate
# limited on a per-account basis, and use a fixed-window rate limiting algorithm with two
# distinct windows: burst (1-second window) and steady (1-minute window) ... HTTP 429 errors in
# the event either a burst or steady rate limit is reached"; a 429 carries ``Retry-After``, in
# seconds (https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling). Each
# endpoint's own limits are its ``x-klaviyo-ratelimit`` in klaviyo/openapi:
RATE_LIMITS: dict[str, tuple[int, int]] = {
    # @1440f5488c4716db114933319728a567918a7126 openapi/stable/apis/get_profile_ids_for_list.json
    "get_list_members": (75, 750),
    # bulk_import_profiles.json, add_ / remove_profiles_to|from_list.json, create_list.json, as
    # ../shared/reference/providers.md sections 3a-3c quote them:
    "post_job": (10, 150),
    "add_list_members": (10, 150),
    "remove_list_members": (10, 150),
    "post_list": (10, 150),
}
BURST_SECONDS = 1.0
STEADY_SECONDS = 60.0
_LIST_FIELDS = ("name", "created", "updated", "opt_in_process")


class KlaviyoError(PlatformError):
    """An answer in Klaviyo's error envelope."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        pointer: str | None = None,
        parameter: str | None = None,
        code: str | None = None,
    ) -> None:
        document = errors_document(status, detail, pointer=pointer, parameter=parameter, code=code)
        super().__init__(status, detail, document, content_type=MEDIA_TYPE)


@dataclass
class Profile:
    id: str
    attributes: dict[str, Any]


@dataclass
class KList:
    id: str
    name: str
    created: str
    opt_in_process: str
    # Profile id -> the number of its joining (unique, increasing), in joining order. A page
    # cursor is the number of the last member it returned (a keyset, like Klaviyo's opaque
    # cursors: removals do not shift the pages after them). ``_joined`` holds every joining
    # ever made, sorted; those of members who left are skipped and dropped once they are half.
    members: dict[str, int] = field(default_factory=dict)
    _joined: list[int] = field(default_factory=list)
    _joined_ids: list[str] = field(default_factory=list)
    _next: int = 1

    def join(self, profile_id: str) -> None:
        if profile_id not in self.members:
            self.members[profile_id] = self._next
            self._joined.append(self._next)
            self._joined_ids.append(profile_id)
            self._next += 1

    def leave(self, profile_id: str) -> None:
        if self.members.pop(profile_id, None) is not None and len(self._joined) > 2 * len(
            self.members
        ):
            self._joined = list(self.members.values())
            self._joined_ids = list(self.members)

    def after(self, number: int, size: int) -> tuple[list[tuple[int, str]], bool]:
        """Up to ``size`` members who joined after joining ``number``; whether more follow."""
        page: list[tuple[int, str]] = []
        for position in range(bisect.bisect_right(self._joined, number), len(self._joined)):
            joined, profile_id = self._joined[position], self._joined_ids[position]
            if self.members.get(profile_id) != joined:
                continue  # left since
            if len(page) == size:
                return page, True
            page.append((joined, profile_id))
        return page, False


@dataclass
class Job:
    id: str
    profiles: list[dict[str, Any]]
    list_ids: list[str]
    body_bytes: int
    created_at: str
    status: str = "queued"
    polls: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    profile_ids: list[str] = field(default_factory=list)  # created or updated, once each
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Account:
    key: str
    lists: dict[str, KList] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    index: dict[str, dict[str, str]] = field(
        default_factory=lambda: {name: {} for name in _IDENTIFIERS}
    )
    jobs: dict[str, Job] = field(default_factory=dict)


@dataclass(frozen=True)
class _Request:
    account: Account
    path_id: str | None  # the {id} in the path
    query: dict[str, str]
    body: Any  # parsed JSON, or None
    raw: bytes


def errors_document(
    status: int,
    detail: str,
    *,
    pointer: str | None = None,
    parameter: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Klaviyo's error envelope, ``{"errors": [{"id", "status", "code", "title", "detail",
    "source"}]}``, as ``fail()`` or a refusal sends it."""
    default_code, title = _TITLES.get(status, ("error", "Error."))
    source: dict[str, str] = {}
    if pointer is not None:
        source["pointer"] = pointer
    if parameter is not None:
        source["parameter"] = parameter
    error = {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code or default_code,
        "title": title,
        "detail": detail,
        "source": source,
    }
    return {"errors": [error]}


_JSON_BODY = JsonBody(  # any JSON value: the handlers say what a document must hold
    wrong_media=lambda media: KlaviyoError(415, f'Unsupported media type "{media}" in request.'),
    media_types=(MEDIA_TYPE, "application/json"),
    not_json=lambda exc: KlaviyoError(400, f"JSON parse error - {exc}"),
    utf8=True,
)


def _document(status: int, document: Any) -> Reply:
    return Reply(status, json.dumps(document).encode(), MEDIA_TYPE)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _page_size(query: Mapping[str, str], *, default: int, maximum: int) -> int:
    raw_size = query.get("page[size]", str(default))
    if not raw_size.isdigit() or not 1 <= int(raw_size) <= maximum:
        raise KlaviyoError(
            400, f"page[size] must be an integer from 1 to {maximum}.", parameter="page[size]"
        )
    return int(raw_size)


def _member_cursor(joined: int) -> str:
    return base64.urlsafe_b64encode(f"joined:{joined}".encode()).decode()


def _joined_number(cursor: str) -> int:
    try:
        prefix, _, number = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
    except ValueError:
        prefix, number = "", ""
    if prefix != "joined" or not number.isdigit():
        raise KlaviyoError(400, "Invalid page cursor.", parameter="page[cursor]")
    return int(number)


def _offset(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        prefix, _, number = text.partition(":")
        if prefix != "offset" or not number.isdigit():
            raise ValueError(cursor)
        return int(number)
    except ValueError:
        raise KlaviyoError(400, "Invalid page cursor.", parameter="page[cursor]") from None


class KlaviyoEmulator(Emulator):
    """Klaviyo accounts (one per API key) behind a real HTTP server on loopback."""

    def __init__(
        self,
        *api_keys: str,
        polls_to_complete: int = 2,
        rate_limited: Collection[str] = ("get_list_members",),
        rate_scale: float = 1.0,
    ) -> None:
        """``rate_limited``: the routes whose ``RATE_LIMITS`` are enforced (by default the
        list-members read; the others are there for tests that want them); ``rate_scale``
        multiplies those limits (the windows stay 1 s and 60 s), so that a test can read a
        list of 300,000 members in seconds and still be throttled the way Klaviyo throttles."""
        keys = api_keys or ("pk_test_key",)
        self.default_key = keys[0]
        self.polls_to_complete = max(1, polls_to_complete)
        super().__init__(name="klaviyo")
        self._accounts = {key: Account(key) for key in keys}
        self._limits = {
            route: (max(1, int(burst * rate_scale)), max(1, int(steady * rate_scale)))
            for route, (burst, steady) in RATE_LIMITS.items()
            if route in rate_limited
        }
        # (key, route) -> [burst window, requests in it, steady window, requests in it]
        self._windows: dict[tuple[str, str], list[int]] = {}
        self._cancel_jobs = 0
        self._counter = 0

    # -- set-up ------------------------------------------------------------------------------

    def cancel_jobs(self, times: int = 1) -> None:
        """The next ``times`` import jobs end ``cancelled`` at their first poll."""
        with self._cond:
            self._cancel_jobs += times

    def create_list(self, name: str, api_key: str | None = None) -> str:
        """A list made in Klaviyo's UI, say; its id. Duplicate names are allowed, as there."""
        with self._cond:
            return self._new_list(self._account(api_key), name, "single_opt_in").id

    def fill_list(
        self, list_id: str, profiles: Iterable[Mapping[str, Any]], api_key: str | None = None
    ) -> None:
        """Profiles (their attributes) upserted and added to the list, as earlier syncs or a
        CSV upload in Klaviyo's UI would have: fast, for lists of hundreds of thousands."""
        with self._cond:
            account = self._account(api_key)
            klist = account.lists[list_id]
            for attributes in profiles:
                profile_id = _upsert(account, dict(attributes), self._next_profile_id)
                assert profile_id is not None
                klist.join(profile_id)

    def delete_list(self, list_id: str, api_key: str | None = None) -> None:
        with self._cond:
            del self._account(api_key).lists[list_id]

    # -- what the account holds --------------------------------------------------------------

    def lists(self, api_key: str | None = None) -> list[tuple[str, str]]:
        """(id, name) of every list, in creation order."""
        with self._cond:
            return [(k.id, k.name) for k in self._account(api_key).lists.values()]

    def list_id(self, name: str, api_key: str | None = None) -> str:
        """The id of the one list called ``name``; AssertionError if none or several."""
        ids = [list_id for list_id, list_name in self.lists(api_key) if list_name == name]
        if len(ids) != 1:
            raise AssertionError(f"{len(ids)} lists named {name!r}: {self.lists(api_key)}")
        return ids[0]

    def members(self, name: str, api_key: str | None = None) -> list[dict[str, Any]]:
        """The profiles (their attributes) in the one list called ``name``, in joining order."""
        list_id = self.list_id(name, api_key)
        with self._cond:
            account = self._account(api_key)
            return [
                json.loads(json.dumps(account.profiles[pid].attributes))
                for pid in account.lists[list_id].members
            ]

    def member_ids(self, name: str, api_key: str | None = None) -> list[str]:
        list_id = self.list_id(name, api_key)
        with self._cond:
            return list(self._account(api_key).lists[list_id].members)

    def profiles(self, api_key: str | None = None) -> dict[str, dict[str, Any]]:
        """Every profile of the account by id."""
        with self._cond:
            account = self._account(api_key)
            return {p.id: json.loads(json.dumps(p.attributes)) for p in account.profiles.values()}

    def jobs(self, api_key: str | None = None) -> list[Job]:
        """Import jobs in creation order (live objects: read, do not change)."""
        with self._cond:
            return list(self._account(api_key).jobs.values())

    def member_cursors(self, api_key: str | None = None) -> list[tuple[str | None, int]]:
        """Each read of a list's members, in order: its ``page[cursor]`` (None: the first page)
        and the status it was answered with."""
        return [
            (call.params.get("page[cursor]"), call.status)
            for call in self.calls
            if call.route == "get_list_members" and call.principal == (api_key or self.default_key)
        ]

    def import_errors(self, api_key: str | None = None) -> list[dict[str, Any]]:
        return [error for job in self.jobs(api_key) for error in job.errors]

    def _account(self, api_key: str | None) -> Account:
        return self._accounts[api_key or self.default_key]

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, incoming: Incoming) -> Reply:  # a KlaviyoError is answered by the base
        incoming.principal = self._authenticate(incoming)
        return self._serve(incoming, incoming.principal)

    def _http_error(self, exc: HttpError) -> Reply:  # from reading the body: 411/413/400
        return KlaviyoError(exc.status, exc.message).reply()

    def _authenticate(self, incoming: Incoming) -> str:
        scheme, _, key = incoming.headers.get("authorization", "").partition(" ")
        if scheme != "Klaviyo-API-Key" or not key:
            raise KlaviyoError(401, "Missing or invalid private key.")
        if key not in self._accounts:
            raise KlaviyoError(
                401, "Incorrect authentication credentials.", code="authentication_failed"
            )
        return key

    def _serve(self, incoming: Incoming, api_key: str) -> Reply:
        revision = incoming.headers.get("revision")
        if revision is None:
            raise KlaviyoError(400, "The revision header is required.", parameter="revision")
        match = _REVISION.fullmatch(revision.strip())
        valid_date = True
        if match is not None:
            try:
                dt.date.fromisoformat(match.group(1))
            except ValueError:
                valid_date = False
        if match is None or not valid_date:
            raise KlaviyoError(
                400,
                "Invalid revision header: expected a date YYYY-MM-DD[.suffix].",
                parameter="revision",
            )
        accept = incoming.headers.get("accept", "*/*")
        if not any(
            kind.split(";")[0].strip() in (MEDIA_TYPE, "application/json", "application/*", "*/*")
            for kind in accept.split(",")
        ):
            raise KlaviyoError(406, f"Accept must allow {MEDIA_TYPE}.")
        handler, path_id = self._route(incoming.method, incoming.path)
        incoming.route = handler.__name__.lstrip("_")
        throttled = self._throttle(api_key, incoming.route)
        if throttled is not None:
            return throttled
        turn = self._take(incoming)
        turn.wait()
        if turn.reply is not None:
            return turn.reply
        query = self._query(incoming.query)
        body = self._body(incoming)
        with self._cond:
            account = self._account(api_key)
            return handler(_Request(account, path_id, query, body, incoming.body or b""))

    def _route(self, method: str, path: str) -> tuple[Callable[[_Request], Reply], str | None]:
        path = path.rstrip("/")  # Klaviyo answers with or without the trailing slash
        routes: dict[str, Callable[[_Request], Reply]] = {}
        path_id: str | None = None
        if path == "/api/lists":
            routes = {"GET": self._get_lists, "POST": self._post_list}
        elif match := _LIST_MEMBERS.fullmatch(path):
            path_id = match.group(1)
            routes = {
                "GET": self._get_list_members,
                "POST": self._add_list_members,
                "DELETE": self._remove_list_members,
            }
        elif path == "/api/profile-bulk-import-jobs":
            routes = {"POST": self._post_job}
        elif match := _JOB.fullmatch(path):
            path_id, below = match.groups()
            if below is None:
                routes = {"GET": self._get_job}
            elif below == "/import-errors":
                routes = {"GET": self._get_job_errors}
            else:
                routes = {"GET": self._get_job_profiles}
        if not routes:
            raise KlaviyoError(404, f"No endpoint at {path}.")
        if method not in routes:
            raise KlaviyoError(405, f'Method "{method}" not allowed.')
        return routes[method], path_id

    def _throttle(self, api_key: str, route: str) -> Reply | None:
        """A 429 when the route's burst or steady window is full, else None (counted)."""
        limits = self._limits.get(route)
        if limits is None:
            return None
        now = time.monotonic()
        burst_window, steady_window = int(now // BURST_SECONDS), int(now // STEADY_SECONDS)
        with self._cond:
            counts = self._windows.setdefault((api_key, route), [burst_window, 0, steady_window, 0])
            if counts[0] != burst_window:
                counts[0:2] = [burst_window, 0]
            if counts[2] != steady_window:
                counts[2:4] = [steady_window, 0]
            if counts[3] >= limits[1]:
                ends = (steady_window + 1) * STEADY_SECONDS
            elif counts[1] >= limits[0]:
                ends = (burst_window + 1) * BURST_SECONDS
            else:
                counts[1] += 1
                counts[3] += 1
                return None
        wait = max(1, math.ceil(ends - now))  # whole seconds, as Klaviyo's Retry-After
        detail = f"Request was throttled. Expected available in {wait} second(s)."
        refusal = KlaviyoError(429, detail).reply()
        return Reply(
            refusal.status,
            refusal.body,
            refusal.content_type,
            {**refusal.headers, "Retry-After": str(wait)},
        )

    def _query(self, raw: str) -> dict[str, str]:
        try:
            pairs = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw))
        except ValueError:
            raise KlaviyoError(400, "Malformed query string.") from None
        query: dict[str, str] = {}
        for name, values in pairs.items():
            if len(values) != 1:
                raise KlaviyoError(400, f"'{name}' may be given once.", parameter=name)
            query[name] = values[0]
        return query

    def _body(self, incoming: Incoming) -> Any:
        has_body = "content-length" in incoming.headers or "transfer-encoding" in incoming.headers
        if incoming.method == "GET" or not has_body:
            if has_body:
                incoming.read_body(MAX_BODY_BYTES)
            else:
                incoming.body = b""  # nothing to read: the connection can be kept
            if incoming.method in ("POST", "DELETE", "PATCH"):
                raise KlaviyoError(400, "A JSON:API request body is required.")
            return None
        length = incoming.headers.get("content-length", "").strip()
        if length.isdigit() and MAX_BODY_BYTES < int(length) <= 4 * MAX_BODY_BYTES:
            incoming.read_body(4 * MAX_BODY_BYTES)  # read, so the client hears the 413
            raise KlaviyoError(413, f"The request body may be at most {MAX_BODY_BYTES} bytes.")
        return _JSON_BODY.parse(incoming, incoming.read_body(MAX_BODY_BYTES))

    def _failure(self, status: int, retry_after: str | None) -> Reply:
        _, detail = _TITLES.get(status, ("error", "Error."))
        if status == 429 and retry_after:
            detail = f"Request was throttled. Expected available in {retry_after} second(s)."
        return KlaviyoError(status, detail).reply()

    # -- pagination --------------------------------------------------------------------------

    def _page(
        self,
        path: str,
        query: dict[str, str],
        items: Sequence[dict[str, Any]],
        *,
        default: int,
        maximum: int,
        allowed: Iterable[str] = (),
    ) -> dict[str, Any]:
        known = {"page[size]", "page[cursor]", *allowed}
        for name in query:
            if name not in known:
                raise KlaviyoError(400, f"'{name}' is not a valid query parameter.", parameter=name)
        size = _page_size(query, default=default, maximum=maximum)
        start = _offset(query["page[cursor]"]) if "page[cursor]" in query else 0
        page = list(items[start : start + size])
        links = {"self": self._link(path, query)}
        if start + size < len(items):
            links["next"] = self._link(path, {**query, "page[cursor]": _cursor(start + size)})
        if start > 0:
            previous = {**query, "page[cursor]": _cursor(max(0, start - size))}
            links["prev"] = self._link(path, previous)
        return {"data": page, "links": links}

    def _link(self, path: str, query: dict[str, str]) -> str:
        return f"{self.base_url}{path}" + (f"?{urlencode(query)}" if query else "")

    # -- lists -------------------------------------------------------------------------------

    def _new_list(self, account: Account, name: str, opt_in: str) -> KList:
        self._counter += 1
        new = KList(f"L{self._counter:05d}x", name, _now(), opt_in)
        account.lists[new.id] = new
        return new

    def _list_resource(self, klist: KList, fields: Sequence[str] = _LIST_FIELDS) -> dict[str, Any]:
        attributes = {
            "name": klist.name,
            "created": klist.created,
            "updated": klist.created,
            "opt_in_process": klist.opt_in_process,
        }
        return {
            "type": "list",
            "id": klist.id,
            "attributes": {key: attributes[key] for key in fields},
            "links": {"self": f"{self.base_url}/api/lists/{klist.id}/"},
        }

    def _get_lists(self, request: _Request) -> Reply:
        account, query = request.account, request.query
        found = list(account.lists.values())
        if "filter" in query:
            match = _FILTER.fullmatch(query["filter"])
            if match is None:
                raise KlaviyoError(400, "Invalid filter provided.", parameter="filter")
            key, double_quoted, single_quoted = match.groups()
            value = double_quoted if double_quoted is not None else single_quoted
            found = [k for k in found if (k.name if key == "name" else k.id) == value]
        sort = query.get("sort", "id")
        keys: dict[str, Callable[[KList], str]] = {
            "created": lambda k: k.created,
            "id": lambda k: k.id,
            "name": lambda k: k.name,
            "updated": lambda k: k.created,
        }
        if sort.lstrip("-") not in keys:
            raise KlaviyoError(400, f"'{sort}' is not a valid sort field.", parameter="sort")
        found.sort(key=keys[sort.lstrip("-")], reverse=sort.startswith("-"))
        fields: Sequence[str] = _LIST_FIELDS
        if "fields[list]" in query:
            fields = query["fields[list]"].split(",")
            if not set(fields) <= set(_LIST_FIELDS):
                raise KlaviyoError(400, "Invalid fields[list].", parameter="fields[list]")
        items = [self._list_resource(k, fields) for k in found]
        page = self._page(
            "/api/lists/",
            query,
            items,
            default=10,
            maximum=10,
            allowed=("filter", "sort", "fields[list]"),
        )
        return _document(200, page)

    def _post_list(self, request: _Request) -> Reply:
        account, query, body = request.account, request.query, request.body
        self._no_query(query)
        data = _resource(body, "list")
        attributes = _object(data.get("attributes"), "/data/attributes")
        _only(attributes, {"name", "opt_in_process"}, "/data/attributes", "list")
        name = attributes.get("name")
        if not isinstance(name, str) or not name.strip():
            raise KlaviyoError(400, "A list name is required.", pointer="/data/attributes/name")
        opt_in = attributes.get("opt_in_process", "single_opt_in")
        if opt_in not in ("single_opt_in", "double_opt_in"):
            raise KlaviyoError(
                400, "Invalid opt_in_process.", pointer="/data/attributes/opt_in_process"
            )
        created = self._new_list(account, name, opt_in)
        resource = self._list_resource(created)
        return _document(201, {"data": resource, "links": resource["links"]})

    def _member_list(self, account: Account, list_id: str | None) -> KList:
        return _existing(account.lists, "list", list_id)

    def _get_list_members(self, request: _Request) -> Reply:
        """A page of the list's members in joining order, keyset-paged.

        klaviyo/openapi@1440f5488c4716db114933319728a567918a7126
        openapi/stable/apis/get_profile_ids_for_list.json: ``page[size]`` "Default: 20. Min: 1.
        Max: 100.", ``page[cursor]`` opaque, the answer ``{"data": [{"type": "profile", "id"}],
        "links": {"self", "next"?, ...}}`` (CollectionLinks: only ``self`` required).
        """
        klist = self._member_list(request.account, request.path_id)
        query = request.query
        for name in query:
            if name not in ("page[size]", "page[cursor]"):
                raise KlaviyoError(400, f"'{name}' is not a valid query parameter.", parameter=name)
        size = _page_size(query, default=20, maximum=100)
        after = _joined_number(query["page[cursor]"]) if "page[cursor]" in query else 0
        page, more = klist.after(after, size)
        path = f"/api/lists/{klist.id}/relationships/profiles/"
        links = {"self": self._link(path, query)}
        if more:
            links["next"] = self._link(path, {**query, "page[cursor]": _member_cursor(page[-1][0])})
        data = [{"type": "profile", "id": profile_id} for _, profile_id in page]
        return _document(200, {"data": data, "links": links})

    def _relationship_ids(self, body: Any) -> list[str]:
        if (
            not isinstance(body, dict)
            or set(body) != {"data"}
            or not isinstance(body["data"], list)
        ):
            raise KlaviyoError(400, 'Expected {"data": [...]} of profiles.', pointer="/data")
        data = body["data"]
        if not data or len(data) > MAX_RELATIONSHIP_IDS:
            raise KlaviyoError(
                400, f"Between 1 and {MAX_RELATIONSHIP_IDS} profiles per request.", pointer="/data"
            )
        ids = []
        for position, item in enumerate(data):
            pointer = f"/data/{position}"
            if not isinstance(item, dict) or item.get("type") != "profile":
                raise KlaviyoError(400, "Each item must be of type 'profile'.", pointer=pointer)
            if not isinstance(item.get("id"), str) or set(item) != {"type", "id"}:
                raise KlaviyoError(400, "Each item needs exactly type and id.", pointer=pointer)
            ids.append(item["id"])
        return ids

    def _add_list_members(self, request: _Request) -> Reply:
        self._no_query(request.query)
        klist = self._member_list(request.account, request.path_id)
        for pid in self._relationship_ids(request.body):
            _existing(request.account.profiles, "profile", pid)
            klist.join(pid)
        return Reply(204, b"", MEDIA_TYPE)

    def _remove_list_members(self, request: _Request) -> Reply:
        self._no_query(request.query)
        klist = self._member_list(request.account, request.path_id)
        for pid in self._relationship_ids(request.body):
            klist.leave(pid)
        return Reply(204, b"", MEDIA_TYPE)

    # -- bulk import jobs --------------------------------------------------------------------

    def _post_job(self, request: _Request) -> Reply:
        account, query, body = request.account, request.query, request.body
        self._no_query(query)
        data = _resource(body, "profile-bulk-import-job")
        _only(data, {"type", "attributes", "relationships"}, "/data", "profile-bulk-import-job")
        attributes = _object(data.get("attributes"), "/data/attributes")
        _only(attributes, {"profiles"}, "/data/attributes", "profile-bulk-import-job")
        container = _object(attributes.get("profiles"), "/data/attributes/profiles")
        _only(container, {"data"}, "/data/attributes/profiles", "profiles")
        profiles = container.get("data")
        if not isinstance(profiles, list) or not profiles:
            raise KlaviyoError(
                400, "At least one profile is required.", pointer="/data/attributes/profiles/data"
            )
        if len(profiles) > MAX_PROFILES_PER_JOB:
            raise KlaviyoError(
                400,
                f"A job may hold at most {MAX_PROFILES_PER_JOB} profiles; got {len(profiles)}.",
                pointer="/data/attributes/profiles/data",
            )
        checked = [_profile(item, index) for index, item in enumerate(profiles)]
        list_ids: list[str] = []
        if "relationships" in data:
            relationships = _object(data["relationships"], "/data/relationships")
            _only(relationships, {"lists"}, "/data/relationships", "relationships")
            lists = _object(relationships.get("lists"), "/data/relationships/lists")
            items = lists.get("data")
            if not isinstance(items, list):
                raise KlaviyoError(400, "Expected a list.", pointer="/data/relationships/lists")
            for position, item in enumerate(items):
                pointer = f"/data/relationships/lists/data/{position}"
                if not isinstance(item, dict) or set(item) != {"type", "id"}:
                    raise KlaviyoError(400, "Expected {type, id}.", pointer=pointer)
                if item["type"] != "list" or not isinstance(item["id"], str):
                    raise KlaviyoError(400, "Expected a list identifier.", pointer=pointer)
                self._member_list(account, item["id"])
                list_ids.append(item["id"])
        self._counter += 1
        raw_size = len(request.raw)
        job = Job(f"J{self._counter:07d}", checked, list_ids, raw_size, _now())
        account.jobs[job.id] = job
        return _document(202, self._job_document(job))

    def _job_document(self, job: Job) -> dict[str, Any]:
        self_link = f"{self.base_url}/api/profile-bulk-import-jobs/{job.id}/"
        failed = len(job.errors)
        done = job.status == "complete"
        resource = {
            "type": "profile-bulk-import-job",
            "id": job.id,
            "attributes": {
                "status": job.status,
                "created_at": job.created_at,
                "total_count": len(job.profiles),
                "completed_count": len(job.profiles) - failed if done else 0,
                "failed_count": failed if done else 0,
                "completed_at": job.completed_at,
                "expires_at": None,
                "started_at": job.started_at,
            },
            "relationships": {
                "lists": {
                    "data": [{"type": "list", "id": list_id} for list_id in job.list_ids],
                    "links": {
                        "self": f"{self_link}relationships/lists/",
                        "related": f"{self_link}lists/",
                    },
                },
                "profiles": {
                    "links": {
                        "self": f"{self_link}relationships/profiles/",
                        "related": f"{self_link}profiles/",
                    }
                },
                "import-errors": {"links": {"related": f"{self_link}import-errors/"}},
            },
            "links": {"self": self_link},
        }
        return {"data": resource, "links": {"self": self_link}}

    def _job(self, account: Account, job_id: str | None) -> Job:
        return _existing(account.jobs, "profile-bulk-import-job", job_id)

    def _get_job(self, request: _Request) -> Reply:
        account, job_id, query = request.account, request.path_id, request.query
        self._no_query(query)
        job = self._job(account, job_id)
        job.polls += 1
        if job.status == "queued":
            if self._cancel_jobs:
                self._cancel_jobs -= 1
                job.status = "cancelled"
            else:
                job.status = "processing"
                job.started_at = _now()
        if job.status == "processing" and job.polls >= self.polls_to_complete:
            self._process(account, job)
        return _document(200, self._job_document(job))

    def _process(self, account: Account, job: Job) -> None:
        touched = set(job.profile_ids)
        for index, attributes in enumerate(job.profiles):
            pointer = f"/data/attributes/profiles/data/{index}/attributes"
            email = attributes.get("email")
            if email is not None and not _EMAIL_DELIVERABLE.fullmatch(email):
                job.errors.append(_import_error("Invalid email address.", f"{pointer}/email"))
                continue
            profile_id = _upsert(account, attributes, self._next_profile_id)
            if profile_id is None:
                detail = "The identifiers given belong to different profiles."
                job.errors.append(_import_error(detail, pointer, "duplicate_profile"))
                continue
            if profile_id not in touched:
                touched.add(profile_id)
                job.profile_ids.append(profile_id)
            for list_id in job.list_ids:
                if list_id in account.lists:
                    account.lists[list_id].join(profile_id)
        job.status = "complete"
        job.completed_at = _now()

    def _next_profile_id(self) -> str:
        self._counter += 1
        return f"01P{self._counter:023d}"

    def _get_job_profiles(self, request: _Request) -> Reply:
        job = self._job(request.account, request.path_id)
        path = f"/api/profile-bulk-import-jobs/{job.id}/relationships/profiles/"
        return self._related(request, path, _profile_refs(job.profile_ids))

    def _get_job_errors(self, request: _Request) -> Reply:
        job = self._job(request.account, request.path_id)
        items = [
            {"type": "import-error", "id": error["id"], "attributes": error} for error in job.errors
        ]
        return self._related(
            request, f"/api/profile-bulk-import-jobs/{job.id}/import-errors/", items
        )

    def _related(self, request: _Request, path: str, items: Sequence[dict[str, Any]]) -> Reply:
        """A page of what a list or a job relates to: 20 unless ``page[size]`` (at most 100)."""
        return _document(200, self._page(path, request.query, items, default=20, maximum=100))

    def _no_query(self, query: dict[str, str]) -> None:
        for name in query:
            raise KlaviyoError(400, f"'{name}' is not a valid query parameter.", parameter=name)


# -- validation helpers (pure) -------------------------------------------------------------


_T = TypeVar("_T")


def _existing(found: Mapping[str, _T], kind: str, ident: str | None) -> _T:
    """The ``kind`` (a list, a profile, a job) of id ``ident``; 404 when there is none."""
    item = found.get(ident or "")
    if item is None:
        raise KlaviyoError(404, f"A {kind} with id {ident} does not exist.")
    return item


def _object(value: Any, pointer: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KlaviyoError(400, "Expected an object.", pointer=pointer)
    return value


def _only(value: dict[str, Any], allowed: set[str], pointer: str, resource: str) -> None:
    for key in value:
        if key not in allowed:
            raise KlaviyoError(
                400,
                f"'{key}' is not a valid field for the resource '{resource}'.",
                pointer=f"{pointer}/{key}",
            )


def _resource(body: Any, kind: str) -> dict[str, Any]:
    document = _object(body, "/")
    _only(document, {"data"}, "", "document")
    data = _object(document.get("data"), "/data")
    if data.get("type") != kind:
        raise KlaviyoError(400, f"The type must be '{kind}'.", pointer="/data/type")
    return data


def _profile(item: Any, index: int) -> dict[str, Any]:
    """The attributes of one profile resource of an import; KlaviyoError when refused."""
    base = f"/data/attributes/profiles/data/{index}"
    resource = _object(item, base)
    _only(resource, {"type", "attributes", "meta"}, base, "profile")
    if resource.get("type") != "profile":
        raise KlaviyoError(400, "The type must be 'profile'.", pointer=f"{base}/type")
    size = len(json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_PROFILE_BYTES:
        raise KlaviyoError(400, "A profile may be at most 100KB.", pointer=base)
    pointer = f"{base}/attributes"
    attributes = _object(resource.get("attributes"), pointer)
    _only(attributes, set(_PROFILE_FIELDS), pointer, "profile")
    kept: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if key == "location":
            location = _object(value, f"{pointer}/location")
            _only(location, set(_LOCATION_FIELDS), f"{pointer}/location", "location")
            for name, part in location.items():
                if part is not None and not isinstance(part, str | int | float):
                    raise KlaviyoError(
                        400, "Expected a string.", pointer=f"{pointer}/location/{name}"
                    )
            kept[key] = {name: part for name, part in location.items() if part is not None}
        elif key == "properties":
            kept[key] = _object(value, f"{pointer}/properties")
        elif not isinstance(value, str):
            raise KlaviyoError(400, "Expected a string.", pointer=f"{pointer}/{key}")
        else:
            kept[key] = value
    if not any(kept.get(name) for name in _IDENTIFIERS):
        raise KlaviyoError(
            400,
            "A profile needs at least one of email, phone_number or external_id.",
            pointer=pointer,
        )
    phone = kept.get("phone_number")
    if phone is not None and not _E164.fullmatch(phone):
        raise KlaviyoError(
            400,
            "Invalid phone number format (Example of a valid phone number format: +12345678901)",
            pointer=f"{pointer}/phone_number",
        )
    email = kept.get("email")
    if email is not None and not _EMAIL_SHAPE.fullmatch(email):
        raise KlaviyoError(400, "Invalid email address.", pointer=f"{pointer}/email")
    external_id = kept.get("external_id")
    if external_id is not None and len(external_id) > MAX_EXTERNAL_ID:
        raise KlaviyoError(
            400, "external_id may be at most 255 characters.", pointer=f"{pointer}/external_id"
        )
    return kept


def _upsert(account: Account, attributes: dict[str, Any], new_id: Callable[[], str]) -> str | None:
    """The id of the profile ``attributes`` created or updated; None on an identity clash."""
    matched = {
        account.index[name][attributes[name]]
        for name in _IDENTIFIERS
        if attributes.get(name) and attributes[name] in account.index[name]
    }
    if len(matched) > 1:
        return None
    if matched:
        profile = account.profiles[matched.pop()]
    else:
        profile = Profile(new_id(), {})
        account.profiles[profile.id] = profile
    for name in _IDENTIFIERS:
        value = attributes.get(name)
        if value and profile.attributes.get(name) != value:
            old = profile.attributes.get(name)
            if old is not None:
                account.index[name].pop(old, None)
            account.index[name][value] = profile.id
    for key, value in attributes.items():
        if key in ("location", "properties"):
            profile.attributes.setdefault(key, {}).update(value)
        else:
            profile.attributes[key] = value
    return profile.id


def _profile_refs(ids: Iterable[str]) -> list[dict[str, Any]]:
    return [{"type": "profile", "id": pid} for pid in ids]


def _import_error(detail: str, pointer: str, code: str = "invalid") -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "code": code,
        "title": "Invalid input.",
        "detail": detail,
        "source": {"pointer": pointer},
    }

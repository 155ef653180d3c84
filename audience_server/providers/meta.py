"""``facebook``: Meta Custom Audiences (customer list) through the Graph API.

Endpoints, under ``{base_url}/{graph_version}/`` (default ``https://graph.facebook.com/v25.0/``):

- ``GET act_<id>/customaudiences?fields=id,name&limit=200`` finds the audience named like the
  segment, page by page (``after`` = ``paging.cursors.after`` while ``paging.next`` is given);
- ``POST act_<id>/customaudiences`` creates it when there is none (``subtype=CUSTOM``,
  ``customer_file_source``); its id is remembered per segment name, and looked up again when
  Meta says the remembered audience no longer exists;
- ``POST <audience id>/users`` adds a ``custom`` segment's users;
- ``POST <audience id>/usersreplace`` swaps the membership for a ``primary`` segment's users.

Auth: ``Authorization: Bearer <access_token>`` (a system-user token with ``ads_management``),
never the ``access_token`` parameter, so the token stays out of URLs and the logs that keep them.

Batching: at most 10,000 rows per request (``chunk_size``), JSON bodies. Each attempt is one
upload session: ``session_id`` a random 63-bit integer, ``batch_seq`` 1, 2, ...,
``last_batch_flag`` on the final chunk, ``estimated_num_total`` the segment's users. Meta
applies a replace when the flagged batch arrives, so an attempt that fails half-way leaves the
old membership whole, and the next attempt starts a new session from batch 1. A final chunk
with no usable user re-sends the previous row to close the session; a ``primary`` segment with
no usable user at all fails, as Meta cannot replace an audience with an empty list.

Rows: a multi-key schema (``is_raw: true``) of the keys present in the chunk, in the order
EXTERN_ID, EMAIL, PHONE, FN, LN, ZIP, COUNTRY, with ``""`` for a key a user lacks. EXTERN_ID
goes as is; every other key is the SHA-256 hex of the value normalized as Meta asks (email
trimmed and lowercased; phone digits with the country code and no ``+``, national numbers read
in the user's country; names letters only; US ZIP first 5 digits; country alpha-2 lowercase);
a value that already is a SHA-256 digest passes through. A user with none of EMAIL, PHONE,
EXTERN_ID (nor FN + LN + ZIP together) is not sent and counts as invalid, as do the rows Meta
reports in ``num_invalid_entries``.

Errors: Graph sends most errors with HTTP 400, so ``error.code`` decides: rate limits (4, 17,
32, 613, 80000-80014) and transient errors (1, 2, 341, 368, 5000, 21009, or ``is_transient``)
are retried, ``X-Business-Use-Case-Usage`` ``estimated_time_to_regain_access`` honoured; token,
permission, parameter and audience errors (190, 200, 294, 100, 105, 1487301, 1487366, 2650,
2655, ...) fail the delivery; a code not listed fails too unless its HTTP status is 408, 429 or
5xx. Without a Graph error body, 408/429/5xx, timeouts and connection errors are retried, the
rest fail.

Options: ``ad_account_id`` (``act_123`` or ``123``), ``access_token``, ``graph_version``
(default ``v25.0``), ``customer_file_source`` (default ``USER_PROVIDED_ONLY``), ``base_url``,
``chunk_size`` (default and most 10,000), ``timeout`` seconds (default 30).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, DeliveryError, PermanentError, RetryableError, Segment
from .http import HttpAdapter, excerpt, parse_retry_after, retryable_status, status_error

MAX_ROWS = 10_000
SCHEMA_ORDER = ("EXTERN_ID", "EMAIL", "PHONE", "FN", "LN", "ZIP", "COUNTRY")
CUSTOMER_FILE_SOURCES = (
    "USER_PROVIDED_ONLY",
    "PARTNER_PROVIDED_ONLY",
    "BOTH_USER_AND_PARTNER_PROVIDED",
)
# Codes Meta documents (RudderStack maps them the same way); 32 is the page-level limit and
# 80000-80014 the business-use-case family 80003 belongs to.
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})
TRANSIENT_CODES = frozenset({1, 2, 341, 368, 5000, 21009})
# Token (102, 104, 190), permission (10, 200-299), parameter (100, 105), audience (1487301
# not shared, 1487366 deleted, 2650 update failed, 2655 terms not accepted), version (2635).
PERMANENT_CODES = frozenset(
    {10, 100, 102, 104, 105, 190, *range(200, 300), 1487301, 1487366, 2635, 2650, 2655}
)
# The remembered audience is gone: 100/33 "object does not exist", 1487366 "deleted".
_GONE_SUBCODE = 33
_DELETED = 1487366
_ACCOUNT = re.compile(r"(?:act_)?([0-9]{1,20})")
_VERSION = re.compile(r"v[0-9]{1,3}\.[0-9]{1,2}")
_PAGE_SIZE = 200


class MetaError(PermanentError):
    """A Graph error that trying again will not fix; ``code`` and ``subcode`` as Meta sent."""

    def __init__(self, message: str, *, status: int, code: int, subcode: int | None) -> None:
        super().__init__(message, status=status)
        self.code = code
        self.subcode = subcode

    @property
    def audience_gone(self) -> bool:
        return (self.code == 100 and self.subcode == _GONE_SUBCODE) or _DELETED in (
            self.code,
            self.subcode,
        )


def user_row(user: Mapping[str, Any]) -> dict[str, str] | None:
    """The user's Meta keys, normalized and hashed (EXTERN_ID raw); None when Meta could
    match the user on nothing."""
    raw_country = user.get("country")
    country = normalize.country(raw_country)
    row: dict[str, str] = {}
    extern = normalize.external_id(user.get("externalId"))
    if extern:
        row["EXTERN_ID"] = extern
    hashed = normalize.hashed
    digests = (
        ("EMAIL", hashed(user.get("email"), normalize.email)),
        ("PHONE", hashed(user.get("phone"), lambda v: normalize.phone_digits(v, country))),
        ("FN", hashed(user.get("firstName"), normalize.name)),
        ("LN", hashed(user.get("lastName"), normalize.name)),
        ("ZIP", hashed(user.get("postalCode"), lambda v: normalize.postal_code(v, country))),
        ("COUNTRY", hashed(raw_country, normalize.country)),
    )
    row.update((key, value) for key, value in digests if value)
    if row.keys() & {"EXTERN_ID", "EMAIL", "PHONE"} or row.keys() >= {"FN", "LN", "ZIP"}:
        return row
    return None


def payload(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The multi-key ``payload`` for ``rows``: only the keys some row has, ``""`` for gaps."""
    schema = [key for key in SCHEMA_ORDER if any(key in row for row in rows)]
    return {
        "schema": schema,
        "is_raw": True,
        "data": [[row.get(key, "") for key in schema] for row in rows],
    }


def graph_error(status: int, body: Any, headers: Mapping[str, str], text: str) -> DeliveryError:
    """The error for a Graph answer that is not a success, classified by ``error.code``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return status_error(f"Meta: HTTP {status}: {excerpt(text)}", status, headers)
    code = _int(error.get("code"))
    subcode = _int(error.get("error_subcode"))
    what = f"{code}/{subcode}" if subcode else str(code)
    message = error.get("message") or error.get("error_user_msg") or error.get("type") or ""
    reason = f"Meta error {what}: {excerpt(message)}"
    if isinstance(trace := error.get("fbtrace_id"), str) and trace:
        reason += f" (fbtrace_id {excerpt(trace, 40)})"  # what Meta support asks for
    if code is not None and code in RATE_LIMIT_CODES:
        return RetryableError(reason, status=status, retry_after=_rate_limit_wait(headers))
    if (code is not None and code in TRANSIENT_CODES) or error.get("is_transient") is True:
        return RetryableError(reason, status=status)
    if (code is None or code not in PERMANENT_CODES) and retryable_status(status):
        return RetryableError(reason, status=status)  # a code we do not know, on a 5xx
    return MetaError(reason, status=status, code=code or 0, subcode=subcode)


def _rate_limit_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds Meta asks us to wait: ``Retry-After``, else the longest
    ``estimated_time_to_regain_access`` (minutes) of ``X-Business-Use-Case-Usage``."""
    retry_after = parse_retry_after(headers.get("retry-after"))
    if retry_after is not None:
        return retry_after
    try:
        usage = orjson.loads(headers.get("x-business-use-case-usage") or "null")
    except orjson.JSONDecodeError:
        return None
    minutes = [
        entry.get("estimated_time_to_regain_access")
        for entries in (usage.values() if isinstance(usage, dict) else ())
        if isinstance(entries, list)
        for entry in entries
        if isinstance(entry, dict)
    ]
    longest = max((m for m in minutes if isinstance(m, int | float) and m > 0), default=None)
    return None if longest is None else float(longest) * 60


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class MetaProvider(HttpAdapter):
    """One ad account; each segment name is a custom audience in it, found or created."""

    platform = "Meta"

    def __init__(
        self,
        *,
        account_id: str,
        access_token: str,
        graph_version: str,
        customer_file_source: str,
        base_url: str,
        chunk_size: int,
        timeout: float,
    ) -> None:
        self.account_id = account_id  # act_<digits>
        self.access_token = access_token
        self.graph_version = graph_version
        self.customer_file_source = customer_file_source
        self.base_url = base_url.rstrip("/")
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._audiences: dict[str, str] = {}  # segment name -> custom audience id
        self._resolving: dict[str, asyncio.Lock] = {}  # one lookup-or-create per name at once

    @classmethod
    def from_config(cls, config: DestinationConfig) -> MetaProvider:
        options = config.options
        account = options.get("ad_account_id")
        if isinstance(account, int) and not isinstance(account, bool):
            account = str(account)
        match = _ACCOUNT.fullmatch(account.strip()) if isinstance(account, str) else None
        if match is None:
            raise OptionError("ad_account_id", "must be the ad account id, act_<digits> or digits")
        token = check.token(options, "access_token", "a token with ads_management")
        version = options.get("graph_version", "v25.0")
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise OptionError("graph_version", "must be a Graph API version such as v25.0")
        source = check.choice(
            options, "customer_file_source", "USER_PROVIDED_ONLY", CUSTOMER_FILE_SOURCES
        )
        base_url = check.http_url(options, "base_url", "https://graph.facebook.com")
        timeout = check.seconds(options, "timeout", 30)
        return cls(
            account_id=f"act_{match.group(1)}",
            access_token=token,
            graph_version=version,
            customer_file_source=source,
            base_url=base_url,
            chunk_size=check.positive_int(options, "chunk_size", MAX_ROWS, MAX_ROWS),
            timeout=timeout,
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        state = segment.state
        if chunk.index == 1 or "session_id" not in state:  # a new attempt: a new session
            state["session_id"] = secrets.randbits(63) or 1
            state["batch_seq"] = 0
            state["last_row"] = None
            state["audience_id"], state["cached"] = await self._audience(segment.segment_name)
        rows: list[dict[str, str]] = []
        for user in chunk.users:
            if (row := user_row(user)) is not None:
                rows.append(row)
        dropped = len(chunk.users) - len(rows)
        padding = False
        if not rows:
            if not chunk.last or (state["batch_seq"] == 0 and segment.type != "primary"):
                return ChunkResult(invalid=dropped)
            if state["batch_seq"] == 0:
                raise PermanentError(
                    "Meta: no user of this primary segment has a usable identifier, "
                    "and an audience cannot be replaced with an empty list"
                )
            rows, padding = [state["last_row"]], True  # re-sent only to close the session
        answer, status = await self._upload(segment, rows, chunk.last)
        state["last_row"] = rows[-1]
        reported = _int(answer.get("num_invalid_entries")) or 0
        return ChunkResult(invalid=dropped + (0 if padding else reported), status=status)

    # --- audiences --------------------------------------------------------------------

    async def _audience(self, name: str) -> tuple[str, bool]:
        """The custom audience id for ``name``, and whether it came from memory."""
        if (known := self._audiences.get(name)) is not None:
            return known, True
        async with self._resolving.setdefault(name, asyncio.Lock()):
            if (known := self._audiences.get(name)) is not None:
                return known, False  # resolved by the attempt we waited for
            audience_id = await self._find(name) or await self._create(name)
            self._audiences[name] = audience_id
            return audience_id, False

    async def _find(self, name: str) -> str | None:
        params = {"fields": "id,name", "limit": str(_PAGE_SIZE)}
        seen: set[str] = set()
        while True:
            path = f"{self.account_id}/customaudiences"
            page, _ = await self._request("GET", path, params=params)
            for audience in page.get("data") or ():
                if not isinstance(audience, dict) or audience.get("name") != name:
                    continue
                if isinstance(found := audience.get("id"), str | int) and str(found):
                    return str(found)
            paging = page.get("paging")
            paging = paging if isinstance(paging, dict) else {}
            cursors = paging.get("cursors")
            after = cursors.get("after") if isinstance(cursors, dict) else None
            if not paging.get("next") or not isinstance(after, str) or after in seen:
                return None
            seen.add(after)
            params["after"] = after

    async def _create(self, name: str) -> str:
        body = {
            "name": name,
            "subtype": "CUSTOM",
            "customer_file_source": self.customer_file_source,
            "description": "Customer list kept by Audience Server",
        }
        answer, _ = await self._request("POST", f"{self.account_id}/customaudiences", body=body)
        audience_id = answer.get("id")
        if not isinstance(audience_id, str | int) or not str(audience_id):
            raise RetryableError("Meta: the audience was created but its id was not returned")
        return str(audience_id)

    # --- uploads ----------------------------------------------------------------------

    async def _upload(
        self, segment: Segment, rows: Sequence[Mapping[str, str]], last: bool
    ) -> tuple[dict[str, Any], int]:
        state = segment.state
        state["batch_seq"] += 1
        edge = "usersreplace" if segment.type == "primary" else "users"
        body = {
            "payload": payload(rows),
            "session": {
                "session_id": state["session_id"],
                "batch_seq": state["batch_seq"],
                "last_batch_flag": last,
                "estimated_num_total": segment.total_users,
            },
        }
        try:
            return await self._request("POST", f"{state['audience_id']}/{edge}", body=body)
        except MetaError as exc:
            if not exc.audience_gone:
                raise
            self._audiences.pop(segment.segment_name, None)
            if not state["cached"] or state["batch_seq"] != 1:
                raise
        # The remembered audience was deleted at Meta: find or create it, start over there.
        state["audience_id"], state["cached"] = await self._audience(segment.segment_name)
        return await self._request("POST", f"{state['audience_id']}/{edge}", body=body)

    # --- HTTP -------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: Any = None
    ) -> tuple[dict[str, Any], int]:
        """The answer of a Graph call and its HTTP status; errors classified."""
        url = f"{self.base_url}/{self.graph_version}/{path}"
        headers = {"Authorization": f"Bearer {self.access_token}"}
        response = await self.request(method, url, params=params, json=body, headers=headers)
        status = response.status_code
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if 200 <= status < 300 and isinstance(answer, dict) and "error" not in answer:
            return answer, status
        if 200 <= status < 300 and not isinstance(answer, dict):
            raise RetryableError(f"Meta: HTTP {status} with an unreadable body", status=status)
        raise graph_error(status, answer, response.headers, response.text)

"""``tiktok``: TikTok API for Business custom audiences, through the streaming "segment" API.

Endpoints, under ``<base_url>/open_api/v1.3/`` (``base_url`` defaults to
``https://business-api.tiktok.com``), each sent with ``Access-Token: <access_token>``:

- ``GET dmp/custom_audience/list/?advertiser_id=…&page=…&page_size=100`` finds the audience
  named ``segment_name`` (pages followed until it turns up);
- ``POST segment/audience/`` with ``{"advertiser_id", "custom_audience_name", "action":
  "create"}`` creates it (``data.audience_id``); with ``{"advertiser_id", "audience_id",
  "action": "delete"}`` deletes one;
- ``POST segment/mapping/`` with ``{"advertiser_ids": [advertiser_id], "action": "add",
  "id_schema": ["EMAIL_SHA256", "PHONE_SHA256"], "batch_data": [...]}`` adds members: one
  row per user, its cells in ``id_schema`` order, ``{"id": <hex>, "audience_ids": [id]}`` for
  an identifier and ``{}`` for a missing one.

Sent: SHA-256 hex digests only, never plaintext. Email: trimmed, lowercased, a ``+tag``
dropped, dots kept (TikTok's current help removes ``+tags``; only older versions of it also
removed dots, and an address with its dots removed is another address outside Gmail).
Phone: E.164 digits without the ``+``, the calling code added from the user's ``country``
for a national number (TikTok's newest help: no symbols, no ``+``, country code added). A
value that already is a 64-character hex digest is sent as is, lowercased. Names, address
and ids are not matched by this API and are not sent; a user with neither a usable email
nor a usable phone is counted invalid and skipped.

Batching: ``chunk_size`` users per mapping request, default 1,000, at most 10,000. TikTok
publishes no limit for this endpoint and Segment sets none; 1,000 is what Tealium sends per
request, and a request that small stays far from any body-size cap.

``custom`` adds to the audience of that name, created when missing; adding a member twice
changes nothing, so a retried attempt simply starts over. ``primary`` replaces: TikTok
cannot list an audience's members and segment/mapping has no replace, so the members to
remove cannot be known. The first chunk of a primary attempt therefore deletes every
audience of that name in the account (ours: the server names them) and creates a fresh one
that the attempt fills. The audience id changes with each primary delivery: ad groups must
be pointed at the new audience, TikTok is reported to refuse deleting one an ad group still
uses (the delivery then fails with TikTok's message, before anything was created), and the
new audience takes TikTok's usual matching time (24-48 h) to fill. A retried primary
attempt deletes its partial audience and starts afresh. (The delete body, ``audience_id``
next to ``action: "delete"``, comes from integrators' notes, not a published spec.)

The audience id is remembered per segment name in the provider; a remembered id TikTok
rejects (the audience was deleted in Ads Manager, or replaced by another worker process)
is looked up again once before the error counts.

Errors: every answer is HTTP 200 carrying ``{"code", "message", "request_id", "data"}``.
Code 0 succeeds; 40100 (throttled) and 5xxxx (server side) are retried; 40001
(permission), 40002 (parameter) and every other code fail the delivery, as
``TikTok <code>: <message> (request_id <id>)``. A non-200 status is judged by the status:
408, 429 (``Retry-After`` honoured) and 5xx retry, other 4xx fail. Timeouts and connection
errors retry.

Options: ``access_token`` (required; give it as ``${ENV}``), ``advertiser_id`` (required,
digits, quoted), ``base_url``, ``chunk_size``, ``timeout`` seconds (default 30).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, PermanentError, RetryableError, Segment
from .http import HttpAdapter, excerpt, status_error

DEFAULT_BASE_URL = "https://business-api.tiktok.com"
API_PREFIX = "/open_api/v1.3/"
ID_SCHEMA = ("EMAIL_SHA256", "PHONE_SHA256")
THROTTLED = 40100
LIST_PAGE_SIZE = 100  # TikTok's largest page, as Segment asks for
_ADVERTISER_ID = re.compile(r"[0-9]{1,32}")


def email_hash(value: object) -> str | None:
    """SHA-256 of the email as TikTok matches it: ``+tag`` dropped, dots kept."""
    return normalize.hash_value(normalize.email(value, dots="keep", drop_plus=True))


def phone_hash(value: object, country: object = None) -> str | None:
    """SHA-256 of the phone's E.164 digits without ``+``; a digest passes through."""
    region = country if isinstance(country, str) else None
    return normalize.hashed(value, lambda v: normalize.phone_digits(v, region))


def identifiers(user: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The user's (email, phone) digests in ``ID_SCHEMA`` order; None where unusable."""
    return email_hash(user.get("email")), phone_hash(user.get("phone"), user.get("country"))


def batch_data(
    users: Sequence[Mapping[str, Any]], audience_id: str
) -> tuple[list[list[dict[str, Any]]], int]:
    """The ``batch_data`` rows for ``users`` and how many users had no usable identifier."""
    rows: list[list[dict[str, Any]]] = []
    invalid = 0
    for user in users:
        ids = identifiers(user)
        if all(value is None for value in ids):
            invalid += 1
            continue
        rows.append(
            [{} if value is None else {"id": value, "audience_ids": [audience_id]} for value in ids]
        )
    return rows, invalid


class TikTokProvider(HttpAdapter):
    """One TikTok advertiser account; audiences are found or created by segment name."""

    platform = "TikTok"

    def __init__(
        self,
        access_token: str,
        advertiser_id: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        chunk_size: int = 1_000,
        timeout: float = 30.0,
    ) -> None:
        self.access_token = access_token
        self.advertiser_id = advertiser_id
        self.base_url = base_url.rstrip("/")
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.audience_ids: dict[str, str] = {}  # segment name -> audience id, once known
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, config: DestinationConfig) -> TikTokProvider:
        options = config.options
        token = check.token(options, "access_token", "the TikTok API for Business token")
        advertiser = options.get("advertiser_id")
        if not isinstance(advertiser, str) or not _ADVERTISER_ID.fullmatch(advertiser):
            raise OptionError(
                "advertiser_id", "is required: the advertiser id as a string of digits"
            )
        base_url = check.http_url(options, "base_url", DEFAULT_BASE_URL)
        timeout = check.seconds(options, "timeout", 30)
        return cls(
            token,
            advertiser,
            base_url=base_url,
            chunk_size=check.positive_int(options, "chunk_size", 1_000, 10_000),
            timeout=timeout,
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        state = segment.state
        if chunk.index == 1 or "audience_id" not in state:
            replace = segment.type == "primary" and chunk.index == 1
            state["audience_id"], state["from_cache"] = await self._audience(
                segment.segment_name, replace=replace
            )
        rows, invalid = batch_data(chunk.users, state["audience_id"])
        if not rows:
            return ChunkResult(invalid=invalid)
        try:
            await self._add(rows)
        except PermanentError:
            if not state["from_cache"]:
                raise
            # The remembered id may be stale: TikTok forgot it. Look the name up once.
            stale = state["audience_id"]
            self.audience_ids.pop(segment.segment_name, None)
            state["audience_id"], state["from_cache"] = await self._audience(
                segment.segment_name, replace=False
            )
            if state["audience_id"] == stale:
                raise
            rows, invalid = batch_data(chunk.users, state["audience_id"])
            await self._add(rows)
        state["from_cache"] = False
        return ChunkResult(invalid=invalid, status=200)

    # --- the audience -------------------------------------------------------------------

    async def _audience(self, name: str, *, replace: bool) -> tuple[str, bool]:
        """The audience id for ``name`` and whether it came from memory unchecked.

        ``replace`` deletes every audience of that name first and creates a fresh one.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # two lanes must not both create the audience
            if replace:
                self.audience_ids.pop(name, None)
                for audience_id in await self._find(name, every=True):
                    await self._call(
                        "POST",
                        "segment/audience/",
                        {
                            "advertiser_id": self.advertiser_id,
                            "audience_id": audience_id,
                            "action": "delete",
                        },
                    )
            elif name in self.audience_ids:
                return self.audience_ids[name], True
            else:
                found = await self._find(name, every=False)
                if found:
                    self.audience_ids[name] = found[0]
                    return found[0], False
            data = await self._call(
                "POST",
                "segment/audience/",
                {
                    "advertiser_id": self.advertiser_id,
                    "custom_audience_name": name,
                    "action": "create",
                },
            )
            created = data.get("audience_id")
            if not isinstance(created, str | int) or isinstance(created, bool):
                raise PermanentError("TikTok created the audience but sent no audience_id")
            self.audience_ids[name] = str(created)
            return str(created), False

    async def _find(self, name: str, *, every: bool) -> list[str]:
        """Ids of the audiences named ``name``: the first one only unless ``every``."""
        found: list[str] = []
        page = 1
        while True:
            data = await self._call(
                "GET",
                "dmp/custom_audience/list/",
                params={
                    "advertiser_id": self.advertiser_id,
                    "page": str(page),
                    "page_size": str(LIST_PAGE_SIZE),
                },
            )
            audiences = data.get("list") or []
            for audience in audiences:
                if not isinstance(audience, dict) or audience.get("name") != name:
                    continue
                audience_id = audience.get("audience_id")
                if isinstance(audience_id, str | int) and not isinstance(audience_id, bool):
                    found.append(str(audience_id))
                    if not every:
                        return found
            page_info = data.get("page_info") or {}
            total_pages = page_info.get("total_page") if isinstance(page_info, dict) else None
            if not audiences or not isinstance(total_pages, int) or page >= total_pages:
                return found
            page += 1

    async def _add(self, rows: list[list[dict[str, Any]]]) -> None:
        await self._call(
            "POST",
            "segment/mapping/",
            {
                "advertiser_ids": [self.advertiser_id],
                "action": "add",
                "id_schema": list(ID_SCHEMA),
                "batch_data": rows,
            },
        )

    # --- the wire -----------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One API call; its ``data`` on code 0, else the mapped error."""
        headers = {"Access-Token": self.access_token}
        url = f"{self.base_url}{API_PREFIX}{path}"
        response = await self.request(method, url, json=body, params=params, headers=headers)
        status = response.status_code
        if status != 200:
            reason = f"TikTok HTTP {status}: {excerpt(response.text)}"
            raise status_error(reason, status, response.headers)
        try:
            envelope = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            envelope = None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("code"), int):
            # A proxy's page, most likely: worth another try.
            raise RetryableError("TikTok: an answer without its JSON envelope", status=status)
        code: int = envelope["code"]
        if code == 0:
            data = envelope.get("data")
            return data if isinstance(data, dict) else {}
        reason = f"TikTok {code}: {excerpt(envelope.get('message') or 'no message')}"
        if envelope.get("request_id"):
            reason += f" (request_id {excerpt(envelope['request_id'], 64)})"
        if code == THROTTLED or 50000 <= code < 60000:
            raise RetryableError(reason, status=status)
        raise PermanentError(reason, status=status)

"""``tiktok``: TikTok API for Business custom audiences, through the streaming "segment" API.

Endpoints, under ``<base_url>/open_api/v1.3/`` (``base_url`` defaults to
``https://business-api.tiktok.com``), each sent with ``Access-Token: <access_token>``:

- ``GET dmp/custom_audience/list/?advertiser_id=…&page=…&page_size=100`` finds the audience
  named ``segment_name`` (pages followed until it turns up);
- ``POST segment/audience/`` with ``{"advertiser_id", "custom_audience_name", "action":
  "create"}`` creates it (``data.audience_id``);
- ``POST segment/mapping/`` with ``{"advertiser_ids": [advertiser_id], "action": "add" |
  "delete", "id_schema": ["EMAIL_SHA256", "PHONE_SHA256"], "batch_data": [...]}`` adds or
  removes members: one row per user, its cells in ``id_schema`` order, ``{"id": <hex>,
  "audience_ids": [id]}`` for an identifier and ``{}`` for a missing one; at most
  ``MAX_ROWS`` (1,000) rows a request. TikTok publishes no limit; 1,000 is what the
  integrations send (Tealium's batches), and a request that small is far from any size cap.

No audience is ever deleted. Should one have to be, TikTok's documented call is ``POST
dmp/custom_audience/delete/`` with ``{"advertiser_id", "custom_audience_ids": [1-100 ids]}``
(tiktok/tiktok-business-api-sdk ``yml_files/dmp_custom_audience_delete.yml``), not
``segment/audience/`` with ``action: "delete"``, which no TikTok source documents.

Sent: SHA-256 hex digests only, never plaintext. Email: trimmed, lowercased, a ``+tag``
dropped, dots kept (TikTok's current help removes ``+tags``; only older versions of it also
removed dots, and an address with its dots removed is another address outside Gmail).
Phone: TikTok's help pages disagree. "List of supported IDs and formats for a customer
file" (https://ads.tiktok.com/help/article/list-of-supported-ids-and-formats-for-a-customer-file)
in its August 2025 version says: remove symbols, ``+`` included, letters and leading zeros,
and add the country code (``(657)777-0000`` -> ``16577770000``); an older version of the
help says E.164 with the ``+`` (``+16577770000``), "without +" also accepted. Option
``phone_format``: ``"digits"`` (the default, today's behaviour: E.164 digits without the
``+``, the calling code added from the user's ``country`` for a national number) or
``"e164"`` (the same number with its ``+``). A value that already is a 64-character hex
digest is sent as is, lowercased. Names, address and ids are not matched by this API and are
not sent; a user with neither a usable email nor a usable phone is counted invalid.

``custom`` adds to the audience of that name, created when missing; adding a member twice
changes nothing, so a retried attempt simply starts over. ``chunk_size`` users are taken a
chunk (default 1,000, at most 10,000), sent in requests of at most 1,000 rows.

``primary`` keeps the one audience of that name (looked up by name at the start of every
attempt, created once; its id never changes, so ad groups keep targeting it) and sends the
difference from the segment's last successful delivery to this destination, read from the
member ledger (``audience_server.members``: the digests per tenant, destination and segment
name): ``add`` for the identifiers that are new, then, after the last chunk, ``delete`` for
those no longer in the segment. Adds come first, so members who stay are never removed, even
for a moment. The first delivery of a segment, and any whose previous state is unknown (an
attempt failed or was interrupted since the last success, or the audience is not the one the
ledger knew), adds every identifier; the deletes then cover every identifier a previous
delivery or failed attempt may have added. Identifiers added by ``custom`` deliveries are
not in the ledger and are never deleted. TikTok cannot list an audience's members, so
someone removed or added in Ads Manager is not seen.

The audience id of a ``custom`` delivery is remembered per segment name in the provider; a
remembered id TikTok rejects (the audience was deleted in Ads Manager) is looked up again
once before the error counts.

Errors: every answer is HTTP 200 carrying ``{"code", "message", "request_id", "data"}``.
Code 0 succeeds; 40100 (throttled) and 5xxxx (server side) are retried; 40001
(permission), 40002 (parameter) and every other code fail the delivery, as
``TikTok <code>: <message> (request_id <id>)``. A non-200 status is judged by the status:
408, 429 (``Retry-After`` honoured) and 5xx retry, other 4xx fail. Timeouts and connection
errors retry.

Options: ``access_token`` (required; give it as ``${ENV}``), ``advertiser_id`` (required,
digits, quoted), ``base_url``, ``chunk_size``, ``phone_format`` (``digits`` or ``e164``),
``timeout`` seconds (default 30).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from ..members import Superseded
from . import options as check
from .base import (
    Chunk,
    ChunkResult,
    Member,
    MemberLedger,
    PermanentError,
    RetryableError,
    Segment,
)
from .http import HttpAdapter, excerpt, status_error

DEFAULT_BASE_URL = "https://business-api.tiktok.com"
API_PREFIX = "/open_api/v1.3/"
ID_SCHEMA = ("EMAIL_SHA256", "PHONE_SHA256")
PHONE_FORMATS = ("digits", "e164")
MAX_ROWS = 1_000  # batch_data rows per segment/mapping request
THROTTLED = 40100
LIST_PAGE_SIZE = 100  # TikTok's largest page, as Segment asks for
_ADVERTISER_ID = re.compile(r"[0-9]{1,32}")

Cells = list[dict[str, Any]]


def email_hash(value: object) -> str | None:
    """SHA-256 of the email as TikTok matches it: ``+tag`` dropped, dots kept."""
    return normalize.hash_value(email_normalized(value))


def email_normalized(value: object) -> str | None:
    """The email as hashed: trimmed, lowercased, ``+tag`` dropped, dots kept."""
    return normalize.email(value, dots="keep", drop_plus=True)


def phone_normalized(
    value: object, country: object = None, phone_format: str = "digits"
) -> str | None:
    """The phone as hashed: E.164 digits, with the ``+`` only for ``phone_format="e164"``."""
    region = country if isinstance(country, str) else None
    if phone_format == "e164":
        return normalize.phone_e164(value, region)
    return normalize.phone_digits(value, region)


def phone_hash(value: object, country: object = None, phone_format: str = "digits") -> str | None:
    """SHA-256 of the phone as ``phone_normalized`` gives it; a digest passes through."""
    return normalize.hashed(value, lambda v: phone_normalized(v, country, phone_format))


def identifiers(
    user: Mapping[str, Any], phone_format: str = "digits"
) -> tuple[str | None, str | None]:
    """The user's (email, phone) digests in ``ID_SCHEMA`` order; None where unusable."""
    phone = phone_hash(user.get("phone"), user.get("country"), phone_format)
    return email_hash(user.get("email")), phone


def batch_data(
    users: Sequence[Mapping[str, Any]], audience_id: str, phone_format: str = "digits"
) -> tuple[list[Cells], int]:
    """The ``batch_data`` rows for ``users`` and how many users had no usable identifier."""
    rows: list[Cells] = []
    invalid = 0
    for user in users:
        ids = identifiers(user, phone_format)
        if all(value is None for value in ids):
            invalid += 1
            continue
        rows.append([_cell(value, audience_id) for value in ids])
    return rows, invalid


def _row(members: set[Member], audience_id: str) -> Cells | None:
    """One ``batch_data`` row holding ``members`` (one user's); None when empty."""
    if not members:
        return None
    digests = dict(members)
    return [
        _cell(digests[kind].hex() if kind in digests else None, audience_id)
        for kind in range(len(ID_SCHEMA))
    ]


def _cell(digest: str | None, audience_id: str) -> dict[str, Any]:
    return {} if digest is None else {"id": digest, "audience_ids": [audience_id]}


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
        phone_format: str = "digits",
    ) -> None:
        self.access_token = access_token
        self.advertiser_id = advertiser_id
        self.base_url = base_url.rstrip("/")
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.phone_format = phone_format
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
            phone_format=check.choice(options, "phone_format", "digits", PHONE_FORMATS),
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        if segment.type == "primary":
            return await self._replace(segment, chunk)
        state = segment.state
        if chunk.index == 1 or "audience_id" not in state:
            state["audience_id"], state["from_cache"] = await self._audience(
                segment.segment_name, remembered=True
            )
        rows, invalid = batch_data(chunk.users, state["audience_id"], self.phone_format)
        if not rows:
            return ChunkResult(invalid=invalid)
        try:
            await self._mapping("add", rows)
        except PermanentError:
            if not state["from_cache"]:
                raise
            # The remembered id may be stale: TikTok forgot it. Look the name up once.
            stale = state["audience_id"]
            self.audience_ids.pop(segment.segment_name, None)
            state["audience_id"], state["from_cache"] = await self._audience(
                segment.segment_name, remembered=False
            )
            if state["audience_id"] == stale:
                raise
            rows, invalid = batch_data(chunk.users, state["audience_id"], self.phone_format)
            await self._mapping("add", rows)
        state["from_cache"] = False
        return ChunkResult(invalid=invalid, status=200)

    # --- primary: the difference from the last successful delivery ------------------------

    async def _replace(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        ledger = segment.ledger
        if ledger is None:
            raise PermanentError("TikTok primary delivery needs the member ledger")
        state = segment.state
        try:
            if chunk.index == 1 or "audience_id" not in state:
                # Looked up by name every attempt (not from memory): the ledger must know
                # which audience it describes.
                state["audience_id"], _ = await self._audience(
                    segment.segment_name, remembered=False
                )
                await ledger.begin(state["audience_id"])
            audience_id: str = state["audience_id"]
            users: list[tuple[Member, ...]] = []
            invalid = 0
            for user in chunk.users:
                ids = identifiers(user, self.phone_format)
                members = tuple(
                    (kind, bytes.fromhex(digest))
                    for kind, digest in enumerate(ids)
                    if digest is not None
                )
                if members:
                    users.append(members)
                else:
                    invalid += 1
            new = set(await ledger.add([m for members in users for m in members]))
            rows = [
                row
                for row in (
                    _row({m for m in members if m in new}, audience_id) for members in users
                )
                if row is not None
            ]
            for start in range(0, len(rows), MAX_ROWS):
                await self._mapping("add", rows[start : start + MAX_ROWS])
            if chunk.last:
                await self._remove_leavers(ledger, audience_id)
        except Superseded as exc:
            raise RetryableError(f"TikTok: {exc}") from None
        return ChunkResult(invalid=invalid, status=200)

    async def _remove_leavers(self, ledger: MemberLedger, audience_id: str) -> None:
        """``delete`` every identifier a previous delivery may have put in the audience and
        this one did not stage, a page at a time."""
        after: Member | None = None
        while True:
            page = await ledger.leavers(after, MAX_ROWS)
            if not page:
                return
            rows = [_row({member}, audience_id) for member in page]
            await self._mapping("delete", [row for row in rows if row is not None])
            after = page[-1]

    # --- the audience -------------------------------------------------------------------

    async def _audience(self, name: str, *, remembered: bool) -> tuple[str, bool]:
        """The audience id for ``name`` (found by name, or created) and whether it came
        from memory unchecked; ``remembered=False`` always asks TikTok."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # two lanes must not both create the audience
            if remembered and name in self.audience_ids:
                return self.audience_ids[name], True
            found = await self._find(name)
            if found is not None:
                self.audience_ids[name] = found
                return found, False
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

    async def _find(self, name: str) -> str | None:
        """The id of the first audience named ``name``, oldest first as TikTok lists them."""
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
                    return str(audience_id)
            page_info = data.get("page_info") or {}
            total_pages = page_info.get("total_page") if isinstance(page_info, dict) else None
            if not audiences or not isinstance(total_pages, int) or page >= total_pages:
                return None
            page += 1

    async def _mapping(self, action: str, rows: list[Cells]) -> None:
        await self._call(
            "POST",
            "segment/mapping/",
            {
                "advertiser_ids": [self.advertiser_id],
                "action": action,
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

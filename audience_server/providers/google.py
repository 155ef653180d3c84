"""``google``: Google Customer Match through the Data Manager API.

Endpoints (base ``https://datamanager.googleapis.com``, option ``base_url``):

    GET  /v1/accountTypes/{type}/accounts/{id}/userLists?filter=display_name = "<name>"
    POST /v1/accountTypes/{type}/accounts/{id}/userLists      create the list when missing
    POST /v1/audienceMembers:removeAll                         first step of a ``primary``
    POST /v1/audienceMembers:ingest                            one call per chunk

Auth: ``Authorization: Bearer <access_token>`` (OAuth 2 scope
``https://www.googleapis.com/auth/datamanager``; no developer token). The server does not
refresh tokens: the operator supplies a valid one through ``${ENV}`` in the destinations
file (e.g. minted by ``gcloud auth print-access-token`` or for a service account), and
restarts the server when it rotates. An expired token fails the delivery with Google's
UNAUTHENTICATED message; after a restart with a fresh one,
``POST /audience/sessions/{id}/retry`` sends the segment again.

Options: ``access_token`` and ``account_id`` (the operating account; ``123-456-7890`` is
read as digits) are required; ``account_type`` (default ``GOOGLE_ADS``; also
``DISPLAY_VIDEO_PARTNER``, ``DISPLAY_VIDEO_ADVERTISER``, ``DATA_PARTNER``);
``login_account_id`` / ``login_account_type`` (a manager account) and ``linked_account_id``
/ ``linked_account_type``; ``user_list_id``, ``user_lists``, ``membership_days`` (1-540);
``consent``; ``chunk_size``; ``timeout`` seconds (default 30); ``base_url``.

Which list: ``user_lists`` maps a segment name at the destination (prefix applied, e.g.
``{ "blotout_VIP" = "5551234" }``) to a list id, and ``user_list_id`` is the list for every
other name (then a ``primary`` of any segment empties that one shared list). Without either,
the list is the one whose display name is the segment name in the operating account,
created (``CONTACT_ID`` upload keys, ``membership_days`` when set) when there is none; the
userLists calls carry the login/linked account as ``login-account`` / ``linked-account``
headers. Found ids are remembered per segment name; a remembered list that Google no
longer knows is forgotten and the attempt retried, so the next attempt looks it up again.

Batching: at most 10,000 audience members per request (option ``chunk_size``, default and
maximum 10,000), at most 10 identifiers per member (this adapter sends at most 3).
``custom`` ingests (adds). ``primary`` first calls ``removeAll`` on the list (members last
added before that request are removed; Google stamps the time), then ingests the segment,
so the list ends as exactly this segment. A failed attempt starts over with ``removeAll``.

What is sent per user (SHA-256, lowercase hex, ``encoding: HEX``; a value that already is
a SHA-256 hex digest passes through):

- ``emailAddress``: trimmed, whitespace removed, lowercase; on gmail.com / googlemail.com
  the local part also loses its dots and any ``+tag`` (Google's "Format user data" page);
- ``phoneNumber``: E.164 with ``+``, national numbers read in the user's ``country``;
- ``address``: ``givenName`` and ``familyName`` (lowercase, no punctuation, no honorific
  or generational suffix) hashed; ``regionCode`` (ISO alpha-2, uppercase) and
  ``postalCode`` NOT hashed; all four or no address.

A user with none of the three is invalid (counted, not sent). ``externalId`` is not sent:
it matches only USER_ID lists, not contact-info ones.

Request-level ``consent`` (``adUserData``, ``adPersonalization``: ``CONSENT_GRANTED`` /
``CONSENT_DENIED`` / ``CONSENT_STATUS_UNSPECIFIED``) is sent only when configured: the
server does not claim consent it was not told about. Every ingest states
``termsOfService.customerMatchTermsOfServiceStatus = ACCEPTED``, which Google requires for
Customer Match: configuring this destination is accepting those terms.

Errors come as google.rpc status JSON ``{"error": {"code", "message", "status",
"details"}}``; its ``status`` decides. RESOURCE_EXHAUSTED (429), UNAVAILABLE, INTERNAL,
ABORTED, DEADLINE_EXCEEDED and UNKNOWN are retried, as are 408/429/5xx answers without
that JSON, timeouts and connection errors (``Retry-After``, else ``RetryInfo.retryDelay``,
honoured). Every other status (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED,
NOT_FOUND, ...) fails the delivery at once. The reason kept is Google's message with its
ErrorInfo reasons and first field violation, e.g. ``Google Data Manager 403
PERMISSION_DENIED: The caller does not have permission [PERMISSION_DENIED]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, DeliveryError, PermanentError, RetryableError, Segment
from .http import HttpAdapter, excerpt, parse_retry_after, retryable_status, status_error

log = logging.getLogger("audience_server.providers.google")

DEFAULT_BASE_URL = "https://datamanager.googleapis.com"
MAX_MEMBERS = 10_000  # AudienceMembers per ingest request
ACCOUNT_TYPES = ("DATA_PARTNER", "DISPLAY_VIDEO_ADVERTISER", "DISPLAY_VIDEO_PARTNER", "GOOGLE_ADS")
CONSENT_VALUES = frozenset({"CONSENT_GRANTED", "CONSENT_DENIED", "CONSENT_STATUS_UNSPECIFIED"})
CONSENT_KEYS = ("adUserData", "adPersonalization")
MAX_MEMBERSHIP_DAYS = 540  # Customer Match's longest membership
# google.rpc codes worth another attempt; the others are the caller's problem.
RETRYABLE_STATUSES = frozenset(
    {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "ABORTED", "DEADLINE_EXCEEDED", "UNKNOWN"}
)
LIST_GONE_REASONS = frozenset({"INVALID_USER_LIST_ID", "NOT_FOUND"})

_ACCOUNT_ID = re.compile(r"[0-9]{1,20}")
_LIST_ID = re.compile(r"[0-9]{1,20}")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)s")
_HONORIFICS = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr"})
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv"})


# --- normalization: the Data Manager rules on top of audience_server.normalize -----------


def email(value: object) -> str | None:
    """Google's email form: gmail.com / googlemail.com lose local-part dots and ``+tag``;
    other domains keep both (``normalize.email(drop_plus=True)`` would strip every domain)."""
    text = normalize.email(value, dots="gmail")
    if text is None or normalize.is_sha256(text):
        return text
    local, _, domain = text.rpartition("@")
    if domain in normalize.GMAIL_DOMAINS:
        local = local.split("+", 1)[0]
        if not local:
            return None
    return f"{local}@{domain}"


def name(value: object) -> str | None:
    """``normalize.name`` after dropping a leading honorific (Mrs.) and trailing
    generational suffixes (Jr.), as Google asks; a lone word is kept whatever it is."""
    if not isinstance(value, str):
        return None
    words = value.split()
    while len(words) > 1 and normalize.name(words[0]) in _HONORIFICS:
        words.pop(0)
    while len(words) > 1 and normalize.name(words[-1]) in _SUFFIXES:
        words.pop()
    return normalize.name(" ".join(words))


def audience_member(user: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``AudienceMember`` for one user as received, or None when nothing is usable."""
    identifiers: list[dict[str, Any]] = []
    hashed_email = normalize.hashed(user.get("email"), email)
    if hashed_email is not None:
        identifiers.append({"emailAddress": hashed_email})
    raw_country = user.get("country")
    country = raw_country if isinstance(raw_country, str) else None
    phone = normalize.hashed(user.get("phone"), lambda value: normalize.phone_e164(value, country))
    if phone is not None:
        identifiers.append({"phoneNumber": phone})
    address = _address(user)
    if address is not None:
        identifiers.append({"address": address})
    if not identifiers:
        return None
    return {"userData": {"userIdentifiers": identifiers}}


def _address(user: Mapping[str, Any]) -> dict[str, str] | None:
    region = normalize.country(user.get("country"))
    if region is None:
        return None
    given = normalize.hashed(user.get("firstName"), name)
    family = normalize.hashed(user.get("lastName"), name)
    postal = normalize.postal_code(user.get("postalCode"), region)
    if given is None or family is None or postal is None:
        return None
    return {
        "givenName": given,
        "familyName": family,
        "regionCode": region.upper(),
        "postalCode": postal,
    }


def audience_members(users: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The members to send and how many users had nothing usable."""
    members: list[dict[str, Any]] = []
    invalid = 0
    for user in users:
        member = audience_member(user)
        if member is None:
            invalid += 1
        else:
            members.append(member)
    return members, invalid


# --- the provider --------------------------------------------------------------------------


class _ListGone(PermanentError):
    """Google does not know the user list id the request named."""


class GoogleProvider(HttpAdapter):
    """Delivers segments to Customer Match lists of one Google account."""

    platform = "Google Data Manager"

    def __init__(
        self,
        *,
        access_token: str,
        account_type: str,
        account_id: str,
        login_account: tuple[str, str] | None = None,
        linked_account: tuple[str, str] | None = None,
        user_list_id: str | None = None,
        user_lists: Mapping[str, str] | None = None,
        consent: Mapping[str, str] | None = None,
        membership_days: int | None = None,
        chunk_size: int = MAX_MEMBERS,
        timeout: float = 30.0,
        base_url: str = DEFAULT_BASE_URL,
    ) -> None:
        self.access_token = access_token
        self.account_type = account_type
        self.account_id = account_id
        self.login_account = login_account
        self.linked_account = linked_account
        self.user_list_id = user_list_id
        self.user_lists = dict(user_lists or {})
        self.consent = dict(consent) if consent else None
        self.membership_days = membership_days
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.base_url = base_url.rstrip("/")
        self._lists: dict[str, str] = {}  # segment name -> list id found or created

    @classmethod
    def from_config(cls, config: DestinationConfig) -> GoogleProvider:
        options = config.options
        token = check.token(options, "access_token", "an OAuth 2 access token")
        account_type = check.choice(options, "account_type", "GOOGLE_ADS", ACCOUNT_TYPES)
        account_id = _account_id(options, "account_id", required=True)
        assert account_id is not None
        login = _optional_account(options, "login_account", account_type)
        linked = _optional_account(options, "linked_account", account_type)
        user_list_id = _list_id(options.get("user_list_id"), "user_list_id")
        user_lists = options.get("user_lists", {})
        if not isinstance(user_lists, dict):
            raise OptionError("user_lists", "must be a table of segment names to list ids")
        lists: dict[str, str] = {}
        for key, value in user_lists.items():
            list_id = _list_id(value, f"user_lists.{key}")
            if list_id is None:  # TOML has no null, but a caller's dict may
                raise OptionError(f"user_lists.{key}", "must be a numeric user list id")
            lists[str(key)] = list_id
        membership_days = None
        if options.get("membership_days") is not None:
            membership_days = check.positive_int(
                options, "membership_days", MAX_MEMBERSHIP_DAYS, MAX_MEMBERSHIP_DAYS
            )
        timeout = check.seconds(options, "timeout", 30)
        base_url = check.http_url(options, "base_url", DEFAULT_BASE_URL)
        return cls(
            access_token=token,
            account_type=account_type,
            account_id=account_id,
            login_account=login,
            linked_account=linked,
            user_list_id=user_list_id,
            user_lists=lists,
            consent=_consent(options.get("consent")),
            membership_days=membership_days,
            chunk_size=check.positive_int(options, "chunk_size", MAX_MEMBERS, MAX_MEMBERS),
            timeout=timeout,
            base_url=base_url,
        )

    # --- sending ---------------------------------------------------------------------------

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        members, invalid = audience_members(chunk.users)
        status: int | None = None
        if chunk.index == 1 and segment.type == "primary":
            status = await self._on_list(segment, self._remove_all)
        if members:

            async def ingest(list_id: str) -> int:
                return await self._ingest(list_id, members)

            status = await self._on_list(segment, ingest)
        return ChunkResult(invalid=invalid, status=status)

    async def _on_list(self, segment: Segment, call: Callable[[str], Awaitable[int]]) -> int:
        list_id, source = await self._resolve(segment)
        try:
            return await call(list_id)
        except _ListGone as exc:
            if source != "cache":
                raise
            # Deleted since we found it: forget it; the next attempt looks the name up again.
            self._lists.pop(segment.segment_name, None)
            raise RetryableError(f"{exc}; looking the list up again", status=exc.status) from None

    async def _resolve(self, segment: Segment) -> tuple[str, str]:
        """The list of this attempt, and where its id came from (config, cache or api)."""
        state = segment.state
        if "user_list_id" not in state:
            title = segment.segment_name
            configured = self.user_lists.get(title, self.user_list_id)
            if configured is not None:
                state.update(user_list_id=configured, list_source="config")
            elif title in self._lists:
                state.update(user_list_id=self._lists[title], list_source="cache")
            else:
                list_id = await self._find_or_create(title)
                state.update(user_list_id=list_id, list_source="api")
        return str(state["user_list_id"]), str(state["list_source"])

    async def _find_or_create(self, title: str) -> str:
        list_id = await self._find_list(title)
        if list_id is None:
            try:
                list_id = await self._create_list(title)
            except PermanentError:
                # Another delivery may have created it between our look-up and our create.
                list_id = await self._find_list(title)
                if list_id is None:
                    raise
        self._lists[title] = list_id
        return list_id

    async def _find_list(self, title: str) -> str | None:
        literal = title.replace("\\", "\\\\").replace('"', '\\"')
        params = {"filter": f'display_name = "{literal}"', "pageSize": "1000"}
        while True:
            _, body = await self._call("GET", self._lists_path(), params=params, headers=True)
            for item in body.get("userLists") or []:
                if isinstance(item, dict) and item.get("displayName") == title:
                    return _id_of(item)
            token = body.get("nextPageToken")
            if not isinstance(token, str) or not token:
                return None
            params["pageToken"] = token

    async def _create_list(self, title: str) -> str:
        body: dict[str, Any] = {
            "displayName": title,
            "description": "Customer list delivered by Audience Server",
            "ingestedUserListInfo": {"uploadKeyTypes": ["CONTACT_ID"]},
        }
        if self.membership_days is not None:
            body["membershipDuration"] = f"{self.membership_days * 86_400}s"
        _, created = await self._call("POST", self._lists_path(), json=body, headers=True)
        list_id = _id_of(created)
        log.info(
            "google user list created",
            extra={"segmentName": title, "userListId": list_id, "accountId": self.account_id},
        )
        return list_id

    async def _remove_all(self, list_id: str) -> int:
        body = {"destinations": [self._destination(list_id)]}
        status, _ = await self._call("POST", "/v1/audienceMembers:removeAll", json=body)
        return status

    async def _ingest(self, list_id: str, members: Sequence[dict[str, Any]]) -> int:
        body: dict[str, Any] = {
            "destinations": [self._destination(list_id)],
            "audienceMembers": members,
            "encoding": "HEX",
            "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
        }
        if self.consent is not None:
            body["consent"] = self.consent
        status, answer = await self._call("POST", "/v1/audienceMembers:ingest", json=body)
        log.debug(
            "google ingest accepted",
            extra={
                "userListId": list_id,
                "members": len(members),
                "requestId": answer.get("requestId"),
            },
        )
        return status

    def _destination(self, list_id: str) -> dict[str, Any]:
        destination: dict[str, Any] = {
            "operatingAccount": {"accountType": self.account_type, "accountId": self.account_id}
        }
        if self.login_account is not None:
            kind, ident = self.login_account
            destination["loginAccount"] = {"accountType": kind, "accountId": ident}
        if self.linked_account is not None:
            kind, ident = self.linked_account
            destination["linkedAccount"] = {"accountType": kind, "accountId": ident}
        destination["productDestinationId"] = list_id
        return destination

    def _lists_path(self) -> str:
        return f"/v1/accountTypes/{self.account_type}/accounts/{self.account_id}/userLists"

    # --- HTTP at the edge ------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """One request; the status and JSON object of a 2xx answer, else a DeliveryError.
        ``headers``: send the login/linked account as headers (the userLists methods)."""
        sent = {"Authorization": f"Bearer {self.access_token}", "Accept": "application/json"}
        if headers and self.login_account is not None:
            sent["login-account"] = "accountTypes/{}/accounts/{}".format(*self.login_account)
        if headers and self.linked_account is not None:
            sent["linked-account"] = "accountTypes/{}/accounts/{}".format(*self.linked_account)
        response = await self.request(
            method, self.base_url + path, json=json, params=params, headers=sent
        )
        if 200 <= response.status_code < 300:
            try:
                body = orjson.loads(response.content) if response.content else {}
            except orjson.JSONDecodeError:
                body = {}
            return response.status_code, body if isinstance(body, dict) else {}
        raise platform_error(response.status_code, response.content, response.headers)


def platform_error(
    status: int, content: bytes, headers: Mapping[str, str] | None = None
) -> DeliveryError:
    """The google.rpc error answer as RetryableError or PermanentError, Google's message
    kept (short; Google's messages name fields, not the values sent)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = excerpt(content.decode("utf-8", "replace")) or "no body"
        return status_error(f"Google Data Manager HTTP {status}: {text}", status, headers or {})
    code_name = error.get("status") if isinstance(error.get("status"), str) else None
    message = excerpt(error.get("message") or "no message")
    reasons, violation, delay = _details(error.get("details"))
    text = f"Google Data Manager {status} {code_name or ''}".rstrip() + f": {message}"
    if reasons:
        text += f" [{', '.join(reasons)}]"
    if violation:
        text += f" ({violation})"
    retry = code_name in RETRYABLE_STATUSES if code_name else retryable_status(status)
    if retry:
        retry_after = parse_retry_after((headers or {}).get("retry-after"))
        return RetryableError(text, status=status, retry_after=retry_after or delay)
    if LIST_GONE_REASONS & {*reasons, code_name or ""}:
        return _ListGone(text, status=status)
    return PermanentError(text, status=status)


def _details(details: object) -> tuple[list[str], str | None, float | None]:
    """ErrorInfo reasons, the first BadRequest field violation, RetryInfo's delay."""
    reasons: list[str] = []
    violation: str | None = None
    delay: float | None = None
    for item in details if isinstance(details, list) else []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo") and isinstance(item.get("reason"), str):
            if item["reason"] not in reasons:
                reasons.append(item["reason"])
        elif kind.endswith("google.rpc.BadRequest") and violation is None:
            for field in item.get("fieldViolations") or []:
                if isinstance(field, dict):
                    where, what = field.get("field"), field.get("description")
                    violation = excerpt(f"{where}: {what}" if where else what, 160)
                    if isinstance(field.get("reason"), str) and field["reason"] not in reasons:
                        reasons.append(field["reason"])
                    break
        elif kind.endswith("google.rpc.RetryInfo"):
            match = _DURATION.fullmatch(str(item.get("retryDelay", "")))
            if match:
                delay = float(match.group(1))
    return reasons, violation, delay


def _id_of(user_list: object) -> str:
    """The numeric id of a UserList answer (``id``, else the tail of ``name``)."""
    if isinstance(user_list, dict):
        ident = user_list.get("id")
        if isinstance(ident, str | int) and _LIST_ID.fullmatch(str(ident)):
            return str(ident)
        resource = user_list.get("name")
        if isinstance(resource, str):
            tail = resource.rsplit("/", 1)[-1]
            if _LIST_ID.fullmatch(tail):
                return tail
    raise PermanentError("Google Data Manager: a user list answer carries no list id")


# --- options -------------------------------------------------------------------------------


def _account_id(options: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    value = options.get(field)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    # Google Ads shows customer ids as 123-456-7890; the API wants the digits.
    digits = value.replace("-", "") if isinstance(value, str) else None
    if digits is None or not _ACCOUNT_ID.fullmatch(digits):
        raise OptionError(field, "must be the account's numeric id (e.g. 1234567890)")
    return digits


def _optional_account(
    options: Mapping[str, Any], prefix: str, default_type: str
) -> tuple[str, str] | None:
    ident = _account_id(options, f"{prefix}_id", required=False)
    if ident is None:
        if f"{prefix}_type" in options:
            raise OptionError(f"{prefix}_id", f"is required when {prefix}_type is set")
        return None
    return check.choice(options, f"{prefix}_type", default_type, ACCOUNT_TYPES), ident


def _list_id(value: object, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    if not isinstance(value, str) or not _LIST_ID.fullmatch(value.strip()):
        raise OptionError(field, "must be a numeric user list id")
    return value.strip()


def _consent(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise OptionError("consent", "must be a table with adUserData and/or adPersonalization")
    consent: dict[str, str] = {}
    for key, item in value.items():
        if key not in CONSENT_KEYS:
            raise OptionError(f"consent.{key}", "unknown; use adUserData or adPersonalization")
        if item not in CONSENT_VALUES:
            raise OptionError(
                f"consent.{key}", f"must be one of {', '.join(sorted(CONSENT_VALUES))}"
            )
        consent[key] = item
    return consent

"""The ``google`` provider: Customer Match lists through the Data Manager API.

Endpoints (base ``https://datamanager.googleapis.com``, option ``base_url``):

    GET  /v1/accountTypes/{type}/accounts/{id}/userLists?filter=display_name = "<name>"
    POST /v1/accountTypes/{type}/accounts/{id}/userLists      create the list when missing
    POST /v1/audienceMembers:ingest                            one call per chunk
    GET  /v1/requestStatus:retrieve?requestId=...              each ingest's outcome
    POST /v1/audienceMembers:removeAll                         last step of a ``primary``

The package's docstring (``__init__``) says what a destination accepts; this module holds
the calls, their order and their errors.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from ...clock import Clock, utcnow
from ...destinations import DestinationConfig, OptionError
from .. import options as check
from ..base import Chunk, ChunkResult, DeliveryError, PermanentError, RetryableError, Segment
from ..http import HttpAdapter, excerpt, parse_retry_after, retryable_status, status_error
from . import credentials, outcomes
from .credentials import StaticToken, TokenSource
from .identifiers import audience_members

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
STATUS_WAIT = 60.0  # seconds an attempt waits for Google's outcomes at most
STATUS_POLL = 2.0  # the first pause between retrieve rounds; doubled up to STATUS_POLL_CAP
STATUS_POLL_CAP = 15.0

_ACCOUNT_ID = re.compile(r"[0-9]{1,20}")
_LIST_ID = re.compile(r"[0-9]{1,20}")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)s")


# --- the provider --------------------------------------------------------------------------


class _ListGone(PermanentError):
    """Google does not know the user list id the request named."""


class GoogleProvider(HttpAdapter):
    """Delivers segments to Customer Match lists of one Google account."""

    platform = "Google Data Manager"

    def __init__(
        self,
        *,
        access_token: str | None = None,
        tokens: TokenSource | None = None,
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
        status_wait: float = STATUS_WAIT,
        status_poll: float = STATUS_POLL,
        base_url: str = DEFAULT_BASE_URL,
        clock: Clock = utcnow,
    ) -> None:
        if (access_token is None) == (tokens is None):
            raise TypeError("a GoogleProvider takes an access_token or tokens, not both")
        self.access_token = access_token
        self.tokens: TokenSource = tokens if tokens is not None else StaticToken(access_token or "")
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
        self.status_wait = status_wait
        self.status_poll = status_poll
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._lists: dict[str, str] = {}  # segment name -> list id found or created

    @classmethod
    def from_config(cls, config: DestinationConfig, clock: Clock = utcnow) -> GoogleProvider:
        options = config.options
        timeout = check.seconds(options, "timeout", 30)
        tokens: TokenSource | None = None
        token: str | None = None
        if options.get("credentials_file") is not None:
            if options.get("access_token") is not None:
                raise OptionError(
                    "credentials_file", "give access_token or credentials_file, not both"
                )
            tokens = credentials.load(
                options["credentials_file"], destination=config.id, timeout=timeout, clock=clock
            )
        else:
            token = check.token(
                options, "access_token", "an OAuth 2 access token, or set credentials_file"
            )
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
        return cls(
            access_token=token,
            tokens=tokens,
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
            status_wait=_non_negative(options, "status_wait", STATUS_WAIT),
            status_poll=check.seconds(options, "status_poll", STATUS_POLL),
            base_url=check.http_url(options, "base_url", DEFAULT_BASE_URL),
            clock=clock,
        )

    # --- sending ---------------------------------------------------------------------------

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        """Ingest the chunk; after the last one, read the outcomes of this attempt's ingests
        and, for a ``primary``, remove the members last added before the attempt began."""
        state = segment.state
        state.setdefault("started_at", self.clock())
        requests: list[str] = state.setdefault("request_ids", [])
        members, invalid = audience_members(chunk.users)
        status: int | None = None
        if members:

            async def ingest(list_id: str) -> int:
                return await self._ingest(list_id, members, requests)

            status = await self._on_list(segment, ingest)
        if chunk.last:
            invalid += await self._outcomes(requests)
            if segment.type == "primary":
                started: dt.datetime = state["started_at"]

                async def remove_all(list_id: str) -> int:
                    return await self._remove_all(list_id, started)

                status = await self._on_list(segment, remove_all)
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

    async def _remove_all(self, list_id: str, before: dt.datetime) -> int:
        """Remove the members last added before ``before`` (the attempt's start): the old
        members go, this attempt's stay, and the list was never empty on the way."""
        stamp = before.astimezone(dt.UTC).isoformat(timespec="microseconds")
        body = {
            "destinations": [self._destination(list_id)],
            "removeAsOfTime": stamp.replace("+00:00", "Z"),
        }
        status, _ = await self._call("POST", "/v1/audienceMembers:removeAll", json=body)
        return status

    async def _ingest(
        self, list_id: str, members: Sequence[dict[str, Any]], requests: list[str]
    ) -> int:
        body: dict[str, Any] = {
            "destinations": [self._destination(list_id)],
            "audienceMembers": members,
            "encoding": "HEX",
            "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
        }
        if self.consent is not None:
            body["consent"] = self.consent
        status, answer = await self._call("POST", "/v1/audienceMembers:ingest", json=body)
        request_id = answer.get("requestId")
        if isinstance(request_id, str) and request_id:
            requests.append(request_id)
        log.debug(
            "google ingest accepted",
            extra={"userListId": list_id, "members": len(members), "requestId": request_id},
        )
        return status

    async def _outcomes(self, requests: Sequence[str]) -> int:
        """Poll the ingests' outcomes (backing off, ``status_wait`` seconds at most): the
        records Google refused, or PermanentError when a request FAILED. Requests still
        processing at the bound, or whose status cannot be read, are logged and left."""
        pending = list(dict.fromkeys(requests))
        rejected = 0
        if not pending or self.status_wait <= 0:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.status_wait
        pause = self.status_poll
        while True:
            still: list[str] = []
            for request_id in pending:
                try:
                    outcome = await self._retrieve(request_id)
                except DeliveryError as exc:
                    # The ingests were accepted: a status read that fails (over quota, say)
                    # must not send the whole segment again. Logged, not waited for.
                    log.warning(
                        "google request status unreadable; not waited for",
                        extra={"requestIds": pending, "error": str(exc)},
                    )
                    return rejected
                if outcome.failure is not None:
                    raise PermanentError(
                        f"Google Data Manager request {request_id} FAILED: {outcome.failure}"
                    )
                if outcome.done:
                    rejected += outcome.rejected
                else:
                    still.append(request_id)
            pending = still
            if not pending:
                return rejected
            left = deadline - loop.time()
            if left <= 0:
                log.warning(
                    "google requests still processing; their outcome is not waited for",
                    extra={"requestIds": pending, "waited": self.status_wait},
                )
                return rejected
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, STATUS_POLL_CAP)

    async def _retrieve(self, request_id: str) -> outcomes.RequestOutcome:
        try:
            _, answer = await self._call(
                "GET", "/v1/requestStatus:retrieve", params={"requestId": request_id}
            )
        except PermanentError as exc:
            if exc.status == 404:  # not visible yet: treated as still processing
                return outcomes.RequestOutcome(done=False)
            raise
        return outcomes.read(answer)

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
        ``headers``: send the login/linked account as headers (the userLists methods).
        An UNAUTHENTICATED answer to a refreshable token refreshes it and tries once more."""
        token = await self.tokens.token()
        response = await self._exchange(method, path, token, json, params, headers)
        unauthenticated = _rpc_status(response.content) == "UNAUTHENTICATED"
        if response.status_code == 401 and unauthenticated and self.tokens.refreshable:
            token = await self.tokens.refresh(token)
            response = await self._exchange(method, path, token, json, params, headers)
        if 200 <= response.status_code < 300:
            try:
                body = orjson.loads(response.content) if response.content else {}
            except orjson.JSONDecodeError:
                body = {}
            return response.status_code, body if isinstance(body, dict) else {}
        raise platform_error(response.status_code, response.content, response.headers)

    async def _exchange(
        self,
        method: str,
        path: str,
        token: str,
        json: Any,
        params: Mapping[str, str] | None,
        headers: bool,
    ) -> Any:
        sent = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if headers and self.login_account is not None:
            sent["login-account"] = "accountTypes/{}/accounts/{}".format(*self.login_account)
        if headers and self.linked_account is not None:
            sent["linked-account"] = "accountTypes/{}/accounts/{}".format(*self.linked_account)
        return await self.request(
            method, self.base_url + path, json=json, params=params, headers=sent
        )

    async def aclose(self) -> None:
        """Close the HTTP clients, the token endpoint's too."""
        self.tokens.close()
        await super().aclose()


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


def _rpc_status(content: bytes) -> str | None:
    """The google.rpc ``status`` name of an error answer, if it is one."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    status = error.get("status") if isinstance(error, dict) else None
    return status if isinstance(status, str) else None


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


def _non_negative(options: Mapping[str, Any], name: str, default: float) -> float:
    """Seconds, zero allowed (``status_wait = 0``: do not wait for outcomes)."""
    value = options.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise OptionError(name, "must be a number of seconds, zero or more")
    return float(value)


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

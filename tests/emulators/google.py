"""A Google Data Manager API stand-in on 127.0.0.1, for the Customer Match adapter tests.

It serves what the adapter uses, validating as Google does and answering google.rpc status
JSON (``{"error": {"code", "message", "status", "details"}}``) when it refuses:

    GET|POST /v1/accountTypes/{type}/accounts/{id}/userLists    list (filter) / create
    POST     /v1/audienceMembers:ingest | :remove | :removeAll

- auth: ``Authorization: Bearer <token>`` of a token ``grant``-ed on the operating account,
  or on a ``loginAccount`` ``link``-ed as its manager (401 UNAUTHENTICATED, 403
  PERMISSION_DENIED otherwise);
- shape: unknown JSON fields refused; 1-10 destinations, each with ``operatingAccount``
  and the ``productDestinationId`` of a list of that account; 1-10,000 audience members
  of ``userData`` with 1-10 ``userIdentifiers``, each exactly one of ``emailAddress``,
  ``phoneNumber``, ``address``; ``encoding`` HEX or BASE64; hashed fields SHA-256 in that
  encoding; an address with all four fields, ``regionCode`` two uppercase letters and
  ``postalCode`` in clear; ingest states the Customer Match terms ``ACCEPTED``; consent
  values from Google's enum;
- membership is kept per (account, list) as Google would hold it: each member a frozenset
  of ``("emailAddress", hex)``, ``("phoneNumber", hex)``,
  ``("address", givenName hex, familyName hex, regionCode, postalCode)``, with the time it
  was last added (``removeAll`` removes members last added before its ``removeAsOfTime``);
- ``fail(status)`` answers with Google's error of that status (429 RESOURCE_EXHAUSTED,
  503 UNAVAILABLE, 403 PERMISSION_DENIED, ...: see FAILURES); each request's route is
  ingest, remove, removeAll, listUserLists, createUserList or unknown.

    with GoogleEmulator() as google:
        google.grant("token-1", "1234567890")
        google.fail(429, on="ingest", retry_after="1")
        ...  # a google destination with base_url=google.base_url, access_token="token-1"
        assert google.members("1234567890", google.lists("1234567890")["blotout_x"]) == {...}
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import itertools
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from tests.emulators.base import Emulator, JsonBody, PlatformError
from tests.emulators.loopback import HttpError, Incoming, Reply

Account = tuple[str, str]  # (accountType, accountId)
Member = frozenset[tuple[str, ...]]

MAX_BODY = 64 * 1024 * 1024
MAX_DESTINATIONS = 10
MAX_MEMBERS = 10_000
MAX_IDENTIFIERS = 10
ACCOUNT_TYPES = frozenset(
    {"GOOGLE_ADS", "DISPLAY_VIDEO_PARTNER", "DISPLAY_VIDEO_ADVERTISER", "DATA_PARTNER"}
)
CONSENT_VALUES = frozenset({"CONSENT_GRANTED", "CONSENT_DENIED", "CONSENT_STATUS_UNSPECIFIED"})
UPLOAD_KEY_TYPES = frozenset({"CONTACT_ID", "MOBILE_ID", "USER_ID", "PAIR_ID", "PSEUDONYMOUS_ID"})
AUTH_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
DOMAIN = "datamanager.googleapis.com"
_MEDIA = "application/json; charset=UTF-8"

_ROUTES = {
    "/v1/audienceMembers:ingest": "ingest",
    "/v1/audienceMembers:remove": "remove",
    "/v1/audienceMembers:removeAll": "removeAll",
}
_RESOURCE = re.compile(r"accountTypes/([A-Z_]+)/accounts/([0-9]+)")
_LISTS_PATH = re.compile(f"/v1/{_RESOURCE.pattern}/userLists")
_HEX = re.compile(r"[0-9a-fA-F]+")
_REGION = re.compile(r"[A-Z]{2}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FILTER = re.compile(r'\s*(?:display_name|displayName)\s*=\s*"((?:[^"\\]|\\.)*)"\s*')
_DURATION = re.compile(r"([0-9]+)s")
_DATA_KINDS = ("userData", "pairData", "mobileData", "userIdData", "ppidData")

# What fail(status) answers: HTTP status -> (google.rpc status, message, ErrorInfo reason)
FAILURES: dict[int, tuple[str, str, str]] = {
    429: (
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Ingestion requests' and limit 'Ingestion requests "
        f"per minute per project' of service '{DOMAIN}'.",
        "RATE_LIMIT_EXCEEDED",
    ),
    503: ("UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
    500: ("INTERNAL", "An internal error has occurred.", "INTERNAL_ERROR"),
    504: ("DEADLINE_EXCEEDED", "The request took too long.", "DEADLINE_EXCEEDED"),
    403: ("PERMISSION_DENIED", "The caller does not have permission", "PERMISSION_DENIED"),
    401: ("UNAUTHENTICATED", AUTH_MESSAGE, "ACCESS_TOKEN_EXPIRED"),
    400: ("INVALID_ARGUMENT", "There was a problem with the request.", "INVALID_ARGUMENT"),
    404: ("NOT_FOUND", "Resource not found.", "NOT_FOUND"),
}


class GoogleError(PlatformError):
    """A google.rpc error answer at HTTP ``code``; its ErrorInfo names a request id of its own."""

    def __init__(
        self,
        code: int,
        status: str,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
    ) -> None:
        body = _rpc_error(code, status, message, reason, field, uuid.uuid4().hex)
        super().__init__(code, message, body, content_type=_MEDIA)


def _rpc_error(
    code: int, status: str, message: str, reason: str | None, field: str | None, request_id: str
) -> dict[str, Any]:
    """``{"error": {"code", "message", "status", "details"}}``, as Google refuses."""
    details: list[dict[str, Any]] = []
    if reason:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": DOMAIN,
                "metadata": {"requestId": request_id},
            }
        )
    if field:
        violation = {"field": field, "description": message}
        if reason:
            violation["reason"] = reason
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [violation],
            }
        )
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def invalid(
    message: str, *, reason: str = "INVALID_ARGUMENT", field: str | None = None
) -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", message, reason=reason, field=field)


def _missing(field: str) -> GoogleError:
    return invalid(
        f"Required field is missing: {field}.", reason="REQUIRED_FIELD_MISSING", field=field
    )


def _items(value: Any, field: str, most: int, too_many: str, reason: str) -> list[Any]:
    """A repeated field of 1 to ``most`` items; ``too_many`` and ``reason``: Google's refusal
    of more."""
    if not isinstance(value, list) or not value:
        raise _missing(field)
    if len(value) > most:
        raise invalid(too_many, reason=reason, field=field)
    return value


_JSON_BODY = JsonBody(
    wrong_media=lambda media: invalid(
        f"Invalid JSON payload received: Content-Type {media or 'missing'}."
    ),
    not_json=lambda exc: invalid(f"Invalid JSON payload received. {exc}"),
    not_object=lambda: invalid("Invalid JSON payload received. Expected an object."),
)


@dataclass
class UserList:
    account: Account
    id: str
    display_name: str
    description: str
    membership_duration: str | None
    upload_key_types: list[str]

    def resource(self) -> dict[str, Any]:
        kind, ident = self.account
        body: dict[str, Any] = {
            "name": f"accountTypes/{kind}/accounts/{ident}/userLists/{self.id}",
            "id": self.id,
            "readOnly": False,
            "displayName": self.display_name,
            "membershipStatus": "OPEN",
            "ingestedUserListInfo": {"uploadKeyTypes": list(self.upload_key_types)},
        }
        if self.description:
            body["description"] = self.description
        if self.membership_duration:
            body["membershipDuration"] = self.membership_duration
        return body


class GoogleEmulator(Emulator):
    """The Data Manager API on a loopback port; state is read with the accessors below."""

    def __init__(self) -> None:
        super().__init__(name="google-emulator")
        self._grants: dict[str, set[Account]] = {}
        self._managed: dict[Account, set[Account]] = {}
        self._lists: dict[Account, dict[str, UserList]] = {}
        self._members: dict[tuple[Account, str], dict[Member, float]] = {}
        self._ids = itertools.count(9_000_000_001)

    # -- set-up --------------------------------------------------------------------------------

    def grant(self, token: str, account_id: str, account_type: str = "GOOGLE_ADS") -> None:
        """Let ``token`` (an OAuth user) write to the account."""
        with self._cond:
            self._grants.setdefault(token, set()).add((account_type, account_id))

    def link(self, manager_id: str, client_id: str, account_type: str = "GOOGLE_ADS") -> None:
        """Make ``manager_id`` a manager of ``client_id``: it may act as its loginAccount."""
        with self._cond:
            self._managed.setdefault((account_type, manager_id), set()).add(
                (account_type, client_id)
            )

    def create_list(self, account_id: str, name: str, account_type: str = "GOOGLE_ADS") -> str:
        """A Customer Match list made in the Google Ads UI; returns its id."""
        with self._cond:
            return self._new_list((account_type, account_id), name, "", None, ["CONTACT_ID"]).id

    def delete_list(self, account_id: str, list_id: str, account_type: str = "GOOGLE_ADS") -> None:
        with self._cond:
            del self._lists[(account_type, account_id)][list_id]
            self._members.pop(((account_type, account_id), list_id), None)

    # -- what it holds ------------------------------------------------------------------------

    def lists(self, account_id: str, account_type: str = "GOOGLE_ADS") -> dict[str, str]:
        """Display name -> list id, for the account's lists."""
        with self._cond:
            found = self._lists.get((account_type, account_id), {})
            return {item.display_name: item.id for item in found.values()}

    def members(
        self, account_id: str, list_id: str, account_type: str = "GOOGLE_ADS"
    ) -> set[Member]:
        with self._cond:
            return set(self._members.get(((account_type, account_id), list_id), {}))

    # -- serving -------------------------------------------------------------------------------

    def _handle(self, incoming: Incoming) -> Reply:
        request_id = uuid.uuid4().hex  # a GoogleError is answered by the base
        route, account = self._route(incoming)
        incoming.route = route
        incoming.principal = token = self._token(incoming)
        turn = self._take(incoming)
        turn.wait()
        if turn.reply is not None:
            return turn.reply
        body = self._json(incoming) if incoming.method == "POST" else None
        with self._cond:
            answer = self._serve(route, account, token, incoming, body, request_id)
        return _rpc(200, answer)

    def _http_error(self, exc: HttpError) -> Reply:  # from reading the body
        return GoogleError(exc.status, "INVALID_ARGUMENT", exc.message).reply()

    def _failure(self, status: int, retry_after: str | None) -> Reply:
        if status not in FAILURES:
            known = ", ".join(str(code) for code in FAILURES)
            raise ValueError(f"no Google error for HTTP {status} to script; known: {known}")
        name, message, reason = FAILURES[status]
        return GoogleError(status, name, message, reason=reason).reply()

    def _route(self, incoming: Incoming) -> tuple[str, Account | None]:
        route = _ROUTES.get(incoming.path)
        if route is not None and incoming.method == "POST":
            return route, None
        match = _LISTS_PATH.fullmatch(incoming.path)
        if match and incoming.method in ("GET", "POST"):
            name = "listUserLists" if incoming.method == "GET" else "createUserList"
            return name, (match.group(1), match.group(2))
        raise GoogleError(404, "NOT_FOUND", f"Method not found: {incoming.method} {incoming.path}")

    def _token(self, incoming: Incoming) -> str:
        scheme, _, token = incoming.headers.get("authorization", "").partition(" ")
        with self._cond:
            known = token in self._grants
        if scheme != "Bearer" or not known:
            raise GoogleError(
                401, "UNAUTHENTICATED", AUTH_MESSAGE, reason="ACCESS_TOKEN_TYPE_UNSUPPORTED"
            )
        return token

    def _json(self, incoming: Incoming) -> dict[str, Any]:
        body: dict[str, Any] = _JSON_BODY.parse(incoming, incoming.read_body(MAX_BODY))
        return body

    def _serve(
        self,
        route: str,
        account: Account | None,
        token: str,
        incoming: Incoming,
        body: dict[str, Any] | None,
        request_id: str,
    ) -> dict[str, Any]:
        if route == "listUserLists":
            assert account is not None
            return self._list_lists(account, token, incoming)
        assert body is not None
        if route == "createUserList":
            assert account is not None
            return self._create_list(account, token, incoming, body)
        if route == "removeAll":
            return self._remove_all(token, body, request_id)
        return self._members_call(route, token, body, request_id)

    # -- userLists -----------------------------------------------------------------------------

    def _header_account(self, incoming: Incoming, name: str) -> Account | None:
        value = incoming.headers.get(name)
        if value is None:
            return None
        match = _RESOURCE.fullmatch(value.strip())
        if not match or match.group(1) not in ACCOUNT_TYPES:
            raise invalid(f"Invalid {name} header.", reason="INVALID_FORMAT", field=name)
        return match.group(1), match.group(2)

    def _list_lists(self, account: Account, token: str, incoming: Incoming) -> dict[str, Any]:
        self._access(token, account, self._header_account(incoming, "login-account"))
        query = parse_qs(incoming.query, keep_blank_values=True)
        unknown = set(query) - {"filter", "pageSize", "pageToken"}
        if unknown:
            raise invalid(f"Unknown query parameter {sorted(unknown)[0]!r}.")
        wanted: str | None = None
        text = query.get("filter", [""])[0]
        if text.strip():
            match = _FILTER.fullmatch(text)
            if not match:
                raise invalid(
                    'Invalid filter: this emulator knows display_name = "...".', field="filter"
                )
            wanted = re.sub(r"\\(.)", r"\1", match.group(1))
        size_text = query.get("pageSize", ["50"])[0]
        if not size_text.isdigit() or int(size_text) < 1:
            raise invalid("pageSize must be a positive integer.", field="pageSize")
        size = min(int(size_text), 1000)
        start = 0
        page_token = query.get("pageToken", [""])[0]
        if page_token:
            if not page_token.startswith("o:") or not page_token[2:].isdigit():
                raise invalid("Invalid page token.", field="pageToken")
            start = int(page_token[2:])
        found = [
            item
            for item in self._lists.get(account, {}).values()
            if wanted is None or item.display_name == wanted
        ]
        page = found[start : start + size]
        answer: dict[str, Any] = {}
        if page:
            answer["userLists"] = [item.resource() for item in page]
        if start + size < len(found):
            answer["nextPageToken"] = f"o:{start + size}"
        return answer

    def _create_list(
        self, account: Account, token: str, incoming: Incoming, body: dict[str, Any]
    ) -> dict[str, Any]:
        self._access(token, account, self._header_account(incoming, "login-account"))
        _fields(
            body,
            "user_list",
            {
                "name",
                "displayName",
                "description",
                "membershipDuration",
                "membershipStatus",
                "integrationCode",
                "ingestedUserListInfo",
            },
        )
        title = body.get("displayName")
        if not isinstance(title, str) or not title.strip():
            raise _missing("user_list.display_name")
        if any(item.display_name == title for item in self._lists.get(account, {}).values()):
            raise invalid(
                "A user list with this display name already exists.",
                reason="INVALID_ARGUMENT",
                field="user_list.display_name",
            )
        duration = body.get("membershipDuration")
        if duration is not None:
            match = _DURATION.fullmatch(str(duration))
            if (
                not match
                or int(match.group(1)) % 86_400
                or not 0 < int(match.group(1)) <= 540 * 86_400
            ):
                raise invalid(
                    "membershipDuration must be a whole number of days, at most 540.",
                    field="user_list.membership_duration",
                )
        info = body.get("ingestedUserListInfo")
        if info is None:
            raise _missing("user_list.ingested_user_list_info")
        _fields(info, "user_list.ingested_user_list_info", {"uploadKeyTypes", "contactIdInfo"})
        keys = info.get("uploadKeyTypes")
        if not isinstance(keys, list) or not keys:
            raise _missing("user_list.ingested_user_list_info.upload_key_types")
        if any(key not in UPLOAD_KEY_TYPES for key in keys):
            raise invalid(
                "Enum value cannot be used.",
                reason="INVALID_ENUM_VALUE",
                field="user_list.ingested_user_list_info.upload_key_types",
            )
        description = body.get("description", "")
        created = self._new_list(account, title, str(description), duration, list(keys))
        return created.resource()

    def _new_list(
        self,
        account: Account,
        title: str,
        description: str,
        duration: str | None,
        keys: list[str],
    ) -> UserList:
        item = UserList(account, str(next(self._ids)), title, description, duration, keys)
        self._lists.setdefault(account, {})[item.id] = item
        return item

    # -- audience members ---------------------------------------------------------------------

    def _access(self, token: str, operating: Account, login: Account | None) -> None:
        granted = self._grants.get(token, set())
        if login is None:
            allowed = operating in granted
        else:
            allowed = login in granted and (
                login == operating or operating in self._managed.get(login, set())
            )
        if not allowed:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                "The caller does not have permission",
                reason="PERMISSION_DENIED",
            )

    def _destinations(self, token: str, body: dict[str, Any]) -> list[tuple[Account, str]]:
        items = _items(
            body.get("destinations"),
            "destinations",
            MAX_DESTINATIONS,
            "Maximum number of destinations allowed per request is 10.",
            "TOO_MANY_DESTINATIONS",
        )
        found: list[tuple[Account, str]] = []
        for index, item in enumerate(items):
            where = f"destinations[{index}]"
            _fields(
                item,
                where,
                {
                    "reference",
                    "loginAccount",
                    "linkedAccount",
                    "operatingAccount",
                    "productDestinationId",
                },
            )
            operating = _account(item.get("operatingAccount"), f"{where}.operating_account")
            if operating is None:
                raise _missing(f"{where}.operating_account")
            login = _account(item.get("loginAccount"), f"{where}.login_account")
            _account(item.get("linkedAccount"), f"{where}.linked_account")
            list_id = item.get("productDestinationId")
            if not isinstance(list_id, str) or not list_id:
                raise _missing(f"{where}.product_destination_id")
            self._access(token, operating, login)
            if list_id not in self._lists.get(operating, {}):
                raise invalid(
                    "The user list is not valid.",
                    reason="INVALID_USER_LIST_ID",
                    field=f"{where}.product_destination_id",
                )
            found.append((operating, list_id))
        return found

    def _members_call(
        self, route: str, token: str, body: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        allowed = {"destinations", "audienceMembers", "validateOnly", "encoding", "encryptionInfo"}
        if route == "ingest":
            allowed |= {"consent", "termsOfService"}
        _fields(body, "", allowed)
        destinations = self._destinations(token, body)
        if "encryptionInfo" in body:
            raise invalid(
                "encryptionInfo is not supported by this emulator.", field="encryption_info"
            )
        encoding = body.get("encoding")
        if encoding is None:
            raise _missing("encoding")
        if encoding not in ("HEX", "BASE64"):
            raise invalid(
                "Enum value cannot be used.", reason="INVALID_ENUM_VALUE", field="encoding"
            )
        if route == "ingest":
            _consent(body.get("consent"), "consent")
            terms = body.get("termsOfService")
            if terms is not None:
                _fields(terms, "terms_of_service", {"customerMatchTermsOfServiceStatus"})
            status = terms.get("customerMatchTermsOfServiceStatus") if terms else None
            if status != "ACCEPTED":
                raise invalid(
                    "The required terms and conditions are not accepted.",
                    reason="TERMS_AND_CONDITIONS_NOT_SIGNED",
                    field="terms_of_service.customer_match_terms_of_service_status",
                )
        validate_only = _validate_only(body)
        members = _members(body.get("audienceMembers"), encoding)
        if not validate_only:
            now = time.time()
            for destination in destinations:
                held = self._members.setdefault(destination, {})
                if route == "ingest":
                    for member in members:
                        held[member] = now
                else:  # a removal names identifiers; any member holding one of them goes
                    gone = set().union(*members)
                    for member in [m for m in held if m & gone]:
                        del held[member]
        return {"requestId": request_id}

    def _remove_all(self, token: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        _fields(body, "", {"destinations", "removeAsOfTime", "validateOnly"})
        destinations = self._destinations(token, body)
        now = time.time()
        cutoff = now
        if "removeAsOfTime" in body:
            cutoff = _timestamp(body["removeAsOfTime"], "remove_as_of_time")
            if cutoff > now:
                raise invalid(
                    "The remove as of time must not be in the future.", field="remove_as_of_time"
                )
        if not _validate_only(body):
            for destination in destinations:
                held = self._members.get(destination, {})
                for member in [m for m, added in held.items() if added < cutoff]:
                    del held[member]
        return {"requestId": request_id}


def _rpc(status: int, answer: Mapping[str, Any]) -> Reply:
    return Reply(status, json.dumps(answer).encode(), _MEDIA)


# -- field checks (pure) ----------------------------------------------------------------------


def _fields(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(
            f"Invalid value at '{where or 'request'}': expected an object.", field=where or None
        )
    for key in value:
        if key not in allowed:
            at = f" at '{where}'" if where else ""
            raise invalid(
                f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
            )
    return value


def _account(value: Any, where: str) -> Account | None:
    if value is None:
        return None
    _fields(value, where, {"accountType", "accountId", "product"})
    kind = value.get("accountType", value.get("product"))  # ``product`` is the deprecated name
    if kind not in ACCOUNT_TYPES:
        raise invalid(
            "Enum value cannot be used.", reason="INVALID_ENUM_VALUE", field=f"{where}.account_type"
        )
    ident = value.get("accountId")
    if not isinstance(ident, str) or not ident.isdigit():
        raise invalid("Format is invalid.", reason="INVALID_FORMAT", field=f"{where}.account_id")
    return kind, ident


def _consent(value: Any, where: str) -> None:
    if value is None:
        return
    _fields(value, where, {"adUserData", "adPersonalization"})
    for key, item in value.items():
        if item not in CONSENT_VALUES:
            raise invalid(
                "Enum value cannot be used.", reason="INVALID_ENUM_VALUE", field=f"{where}.{key}"
            )


def _validate_only(body: dict[str, Any]) -> bool:
    value = body.get("validateOnly", False)
    if not isinstance(value, bool):
        raise invalid("validateOnly must be a boolean.", field="validate_only")
    return value


def _members(value: Any, encoding: str) -> list[Member]:
    items = _items(
        value,
        "audience_members",
        MAX_MEMBERS,
        "Maximum number of audience members allowed per request is 10,000.",
        "TOO_MANY_AUDIENCE_MEMBERS",
    )
    members: list[Member] = []
    for index, item in enumerate(items):
        where = f"audience_members[{index}]"
        _fields(item, where, {"destinationReferences", "consent", *_DATA_KINDS})
        kinds = [kind for kind in _DATA_KINDS if kind in item]
        if len(kinds) != 1:
            raise invalid(
                "This audience member is not valid: set exactly one kind of data.",
                reason="INVALID_AUDIENCE_MEMBER",
                field=where,
            )
        if kinds[0] != "userData":
            raise invalid(f"{kinds[0]} is not supported by this emulator.", field=where)
        _consent(item.get("consent"), f"{where}.consent")
        user_data = _fields(item["userData"], f"{where}.user_data", {"userIdentifiers"})
        identifiers = _items(
            user_data.get("userIdentifiers"),
            f"{where}.user_data.user_identifiers",
            MAX_IDENTIFIERS,
            "Maximum number of user identifiers allowed per audience member is 10.",
            "TOO_MANY_USER_IDENTIFIERS",
        )
        parts = [
            _identifier(ident, f"{where}.user_data.user_identifiers[{position}]", encoding)
            for position, ident in enumerate(identifiers)
        ]
        members.append(frozenset(parts))
    return members


def _identifier(value: Any, where: str, encoding: str) -> tuple[str, ...]:
    _fields(value, where, {"emailAddress", "phoneNumber", "address"})
    if len(value) != 1:
        raise invalid(
            "A user identifier sets exactly one of emailAddress, phoneNumber, address.",
            reason="INVALID_FORMAT",
            field=where,
        )
    ((key, item),) = value.items()
    if key == "emailAddress":
        return key, _digest(item, f"{where}.email_address", encoding)
    if key == "phoneNumber":
        return key, _digest(item, f"{where}.phone_number", encoding)
    address = _fields(
        item, f"{where}.address", {"givenName", "familyName", "regionCode", "postalCode"}
    )
    for part, snake in (
        ("givenName", "given_name"),
        ("familyName", "family_name"),
        ("regionCode", "region_code"),
        ("postalCode", "postal_code"),
    ):
        if not isinstance(address.get(part), str) or not address[part]:
            raise _missing(f"{where}.address.{snake}")
    region, postal = address["regionCode"], address["postalCode"]
    if not _REGION.fullmatch(region):
        raise invalid(
            "Country code is not valid.",
            reason="INVALID_COUNTRY_CODE",
            field=f"{where}.address.region_code",
        )
    if _SHA256_HEX.fullmatch(postal) or len(postal) > 16:
        raise invalid(
            "Postal code is not valid.",
            reason="INVALID_POSTAL_CODE",
            field=f"{where}.address.postal_code",
        )
    return (
        "address",
        _digest(address["givenName"], f"{where}.address.given_name", encoding),
        _digest(address["familyName"], f"{where}.address.family_name", encoding),
        region,
        postal,
    )


def _digest(value: Any, where: str, encoding: str) -> str:
    """A SHA-256 digest in the request's encoding, as lowercase hex."""
    if not isinstance(value, str) or not value:
        raise _missing(where)
    if encoding == "HEX":
        if not _HEX.fullmatch(value):
            raise invalid(
                "The HEX encoded value is malformed.", reason="INVALID_HEX_ENCODING", field=where
            )
        if len(value) != 64:
            raise invalid(
                "The SHA256 encoded value is malformed.",
                reason="INVALID_SHA256_FORMAT",
                field=where,
            )
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(
            "The base64 encoded value is malformed.", reason="INVALID_BASE64_ENCODING", field=where
        ) from None
    if len(raw) != 32:
        raise invalid(
            "The SHA256 encoded value is malformed.", reason="INVALID_SHA256_FORMAT", field=where
        )
    return raw.hex()


def _timestamp(value: Any, where: str) -> float:
    if not isinstance(value, str):
        raise invalid("Invalid timestamp.", reason="INVALID_FORMAT", field=where)
    # RFC 3339 allows 9 fractional digits; Python reads 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise invalid("Invalid timestamp.", reason="INVALID_FORMAT", field=where) from None
    if when.tzinfo is None:
        raise invalid(
            "Invalid timestamp: an offset or Z is required.", reason="INVALID_FORMAT", field=where
        )
    return when.timestamp()

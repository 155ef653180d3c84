"""A Google Data Manager API stand-in on 127.0.0.1, for the Customer Match adapter tests.

It serves what the adapter uses, validating as Google does and answering google.rpc status
JSON (``{"error": {"code", "message", "status", "details"}}``) when it refuses:

    GET|POST /v1/accountTypes/{type}/accounts/{id}/userLists    list (filter) / create
    POST     /v1/audienceMembers:ingest | :remove | :removeAll
    GET      /v1/requestStatus:retrieve?requestId=...            an ingest's outcome
    POST     /token                                               Google's OAuth 2 token endpoint

- auth: ``Authorization: Bearer <token>`` of a token ``grant``-ed on the operating account,
  or on a ``loginAccount`` ``link``-ed as its manager (401 UNAUTHENTICATED, 403
  PERMISSION_DENIED otherwise); or of a token the token endpoint issued, for the accounts of
  its ``oauth_client`` / ``service_account``, which expires ``token_lifetime`` seconds after
  it was issued on the emulator's clock (``advance()`` moves it): then 401 UNAUTHENTICATED
  with ErrorInfo reason ACCESS_TOKEN_EXPIRED;
- token endpoint (form-encoded POST): ``grant_type=refresh_token`` with the client's id,
  secret and refresh token, or ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  with an RS256 ``assertion`` whose signature is verified with the service account's public
  key and whose claims are Google's (iss, scope, aud = this endpoint, iat, exp at most an hour
  later); refusals in OAuth's JSON (``{"error": "invalid_grant", "error_description"}``);
- outcomes: every ingest is recorded under its request id and answered by
  ``requestStatus:retrieve`` as a ``RetrieveRequestStatusResponse`` (``PROCESSING`` for the
  first ``processing_polls`` retrieves, then SUCCESS / PARTIAL_SUCCESS / FAILED with
  ``errorInfo.errorCounts``); a member whose ``adUserData`` consent is CONSENT_DENIED, or has
  none on an account that ``require_consent``-s, is refused there (not added), and
  ``fail_next_ingest(reason)`` makes the next ingest FAILED (nothing added);
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
  ``sizes()`` is the list's size after every call that changed it, in order;
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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.emulators.base import Emulator, JsonBody, PlatformError, media_type
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
SCOPE = "https://www.googleapis.com/auth/datamanager"
# The JWT-bearer grant's audience is Google's token endpoint whatever URL it was posted to
# (https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests:
# "aud ... always https://oauth2.googleapis.com/token").
GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 3600  # same page: "exp ... a maximum of 1 hour after the issued time"
CLOCK_SKEW = 300.0  # how far in the future an assertion's iat may be
# RequestStatusPerDestination.RequestStatus and ProcessingErrorReason values used here
# (googleapis/googleapis@7d4e6ae6c363b860a4856bc4e74acd8421ae27fc
# google/ads/datamanager/v1/request_status_per_destination.proto and
# @102d9f92ac6ed649a61efd9b208e4d1de278e9bb processing_errors.proto).
DENIED_CONSENT = "PROCESSING_ERROR_REASON_DENIED_CONSENT"
UNKNOWN_CONSENT = "PROCESSING_ERROR_REASON_UNKNOWN_CONSENT"

_ROUTES = {
    ("POST", "/v1/audienceMembers:ingest"): "ingest",
    ("POST", "/v1/audienceMembers:remove"): "remove",
    ("POST", "/v1/audienceMembers:removeAll"): "removeAll",
    # ingestion_service.proto: rpc RetrieveRequestStatus, get: "/v1/requestStatus:retrieve"
    ("GET", "/v1/requestStatus:retrieve"): "retrieveRequestStatus",
    ("POST", "/token"): "token",
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


class OAuthError(PlatformError):
    """A token endpoint refusal in OAuth 2's JSON (RFC 6749 section 5.2: ``error``,
    ``error_description``; 400, or 401 for ``invalid_client``)."""

    def __init__(self, error: str, description: str) -> None:
        status = 401 if error == "invalid_client" else 400
        document = {"error": error, "error_description": description}
        super().__init__(status, description, document, content_type=_MEDIA)


def _expired(method: str) -> GoogleError:
    """What Google answers a bearer token past its expiry: UNAUTHENTICATED with ErrorInfo
    reason ACCESS_TOKEN_EXPIRED in domain googleapis.com (https://cloud.google.com/apis/design/
    errors, the standard error payload)."""
    error = GoogleError(401, "UNAUTHENTICATED", AUTH_MESSAGE)
    document: dict[str, Any] = error.document
    document["error"]["details"] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ACCESS_TOKEN_EXPIRED",
            "domain": "googleapis.com",
            "metadata": {"service": DOMAIN, "method": method},
        }
    ]
    return error


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


@dataclass
class _Client:
    """An OAuth client and the refresh tokens a user granted it, with the user's accounts."""

    secret: str
    refresh_tokens: set[str]
    accounts: set[Account]


@dataclass
class _ServiceAccount:
    public_key: rsa.RSAPublicKey
    accounts: set[Account]


@dataclass
class _Request:
    """An ingest (or removeAll) as its requestStatus will tell it."""

    statuses: list[dict[str, Any]]  # RequestStatusPerDestination, once processed
    polls_left: int  # retrieves still answered PROCESSING


class GoogleEmulator(Emulator):
    """The Data Manager API and Google's token endpoint on a loopback port; state is read
    with the accessors below."""

    def __init__(self, token_lifetime: int = 3600) -> None:
        super().__init__(name="google-emulator")
        self._grants: dict[str, set[Account]] = {}
        self._managed: dict[Account, set[Account]] = {}
        self._lists: dict[Account, dict[str, UserList]] = {}
        self._members: dict[tuple[Account, str], dict[Member, float]] = {}
        self._sizes: dict[tuple[Account, str], list[tuple[str, int]]] = {}
        self._ids = itertools.count(9_000_000_001)
        self._clients: dict[str, _Client] = {}
        self._robots: dict[str, _ServiceAccount] = {}
        self._expiry: dict[str, float] = {}  # issued token -> when it expires (self.now())
        self._issued = itertools.count(1)
        self._offset = 0.0
        self._requests: dict[str, _Request] = {}
        self._consent_required: set[Account] = set()
        self._fail_next: list[tuple[str, int | None]] = []
        self.token_lifetime = token_lifetime
        self.processing_polls = 0  # retrieves of a new request answered PROCESSING first
        self.age_per_call = 0.0  # seconds the clock moves after each API call: time passing

    # -- time and tokens -----------------------------------------------------------------------

    def now(self) -> float:
        """The emulator's clock: real time plus what ``advance`` added (tokens age on it)."""
        with self._cond:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the tokens the endpoint issued."""
        with self._cond:
            self._offset += seconds

    def oauth_client(
        self, client_id: str, secret: str, refresh_token: str, *account_ids: str
    ) -> None:
        """A user's refresh token for an OAuth client, good for the user's accounts."""
        with self._cond:
            client = self._clients.setdefault(client_id, _Client(secret, set(), set()))
            client.refresh_tokens.add(refresh_token)
            client.accounts |= {("GOOGLE_ADS", ident) for ident in account_ids}

    def revoke(self, refresh_token: str) -> None:
        """The user revoked the grant (or it lapsed): the token endpoint refuses it."""
        with self._cond:
            for client in self._clients.values():
                client.refresh_tokens.discard(refresh_token)

    def service_account(self, email: str, public_key_pem: bytes, *account_ids: str) -> None:
        """A service account whose key's public half is ``public_key_pem``."""
        key = load_pem_public_key(public_key_pem)
        assert isinstance(key, rsa.RSAPublicKey)
        with self._cond:
            self._robots[email] = _ServiceAccount(key, {("GOOGLE_ADS", i) for i in account_ids})

    def tokens_issued(self) -> int:
        with self._cond:
            return len(self._expiry)

    # -- outcomes ------------------------------------------------------------------------------

    def require_consent(self, account_id: str, account_type: str = "GOOGLE_ADS") -> None:
        """The account cannot settle consent itself: members without adUserData consent (theirs
        or the request's) are refused with PROCESSING_ERROR_REASON_UNKNOWN_CONSENT."""
        with self._cond:
            self._consent_required.add((account_type, account_id))

    def fail_next_ingest(
        self, reason: str = "PROCESSING_ERROR_REASON_INTERNAL_ERROR", count: int | None = None
    ) -> None:
        """The next valid ingest is accepted, then processed with its first ``count`` members
        refused for ``reason`` (None: all of them: FAILED, adding nobody)."""
        with self._cond:
            self._fail_next.append((reason, count))

    def sizes(
        self, account_id: str, list_id: str, account_type: str = "GOOGLE_ADS"
    ) -> list[tuple[str, int]]:
        """(route, members after it) for every call that changed the list, in order."""
        with self._cond:
            return list(self._sizes.get(((account_type, account_id), list_id), []))

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
        if route == "token":
            return self._token_endpoint(incoming)
        incoming.principal = token = self._token(incoming, route)
        turn = self._take(incoming)
        turn.wait()
        if turn.reply is not None:
            return turn.reply
        body = self._json(incoming) if incoming.method == "POST" else None
        with self._cond:
            answer = self._serve(route, account, token, incoming, body, request_id)
            self._offset += self.age_per_call
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
        route = _ROUTES.get((incoming.method, incoming.path))
        if route is not None:
            return route, None
        match = _LISTS_PATH.fullmatch(incoming.path)
        if match and incoming.method in ("GET", "POST"):
            name = "listUserLists" if incoming.method == "GET" else "createUserList"
            return name, (match.group(1), match.group(2))
        raise GoogleError(404, "NOT_FOUND", f"Method not found: {incoming.method} {incoming.path}")

    def _token(self, incoming: Incoming, route: str) -> str:
        scheme, _, token = incoming.headers.get("authorization", "").partition(" ")
        with self._cond:
            known = token in self._grants
            expires = self._expiry.get(token)
            expired = expires is not None and self.now() >= expires
        if scheme != "Bearer" or not known:
            raise GoogleError(
                401, "UNAUTHENTICATED", AUTH_MESSAGE, reason="ACCESS_TOKEN_TYPE_UNSUPPORTED"
            )
        if expired:
            raise _expired(f"google.ads.datamanager.v1.IngestionService.{route}")
        return token

    # -- the token endpoint ----------------------------------------------------------------------

    def _token_endpoint(self, incoming: Incoming) -> Reply:
        """Google's OAuth 2 token endpoint: the refresh-token grant
        (https://developers.google.com/identity/protocols/oauth2/web-server#offline) and the
        JWT-bearer grant of service accounts (.../oauth2/service-account#authorizingrequests),
        refusals as RFC 6749 section 5.2."""
        raw = incoming.read_body(MAX_BODY)
        if media_type(incoming) != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "Invalid Content-Type: form-urlencoded required.")
        form = {key: values[-1] for key, values in parse_qs(raw.decode(errors="replace")).items()}
        grant = form.get("grant_type")
        with self._cond:
            if grant == "refresh_token":
                accounts = self._refresh_grant(form)
            elif grant == JWT_BEARER:
                accounts = self._jwt_grant(form)
            elif not grant:
                raise OAuthError("unsupported_grant_type", "Missing grant_type.")
            else:
                raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {grant}")
        turn = self._take(incoming)
        turn.wait()
        if turn.reply is not None:
            return turn.reply
        with self._cond:
            token = f"ya29.emulated-{next(self._issued)}"
            self._grants[token] = set(accounts)
            self._expiry[token] = self.now() + self.token_lifetime
            incoming.principal = token
        answer = {
            "access_token": token,
            "expires_in": self.token_lifetime,
            "scope": SCOPE,
            "token_type": "Bearer",
        }
        return _rpc(200, answer)

    def _refresh_grant(self, form: Mapping[str, str]) -> set[Account]:
        for field in ("client_id", "client_secret", "refresh_token"):
            if not form.get(field):
                raise OAuthError("invalid_request", f"Missing required parameter: {field}")
        client = self._clients.get(form["client_id"])
        if client is None:
            raise OAuthError("invalid_client", "The OAuth client was not found.")
        if client.secret != form["client_secret"]:
            raise OAuthError("invalid_client", "Unauthorized")
        if form["refresh_token"] not in client.refresh_tokens:
            raise OAuthError("invalid_grant", "Token has been expired or revoked.")
        return set(client.accounts)

    def _jwt_grant(self, form: Mapping[str, str]) -> set[Account]:
        assertion = form.get("assertion", "")
        parts = assertion.split(".")
        if len(parts) != 3:
            raise OAuthError("invalid_request", "Invalid JWT: malformed assertion.")
        try:
            header = json.loads(_b64url(parts[0]))
            claims = json.loads(_b64url(parts[1]))
            signature = _b64url(parts[2])
        except (ValueError, binascii.Error):
            raise OAuthError("invalid_request", "Invalid JWT: malformed assertion.") from None
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise OAuthError("invalid_grant", "Invalid JWT: the algorithm must be RS256.")
        issuer = claims.get("iss") if isinstance(claims, dict) else None
        robot = self._robots.get(issuer) if isinstance(issuer, str) else None
        if robot is None:
            raise OAuthError("invalid_grant", "Invalid grant: account not found")
        try:
            robot.public_key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            raise OAuthError("invalid_grant", "Invalid JWT Signature.") from None
        if claims.get("aud") != GOOGLE_TOKEN_ENDPOINT:
            raise OAuthError("invalid_grant", "Invalid JWT: audience is not the token endpoint.")
        if SCOPE not in str(claims.get("scope", "")).split():
            raise OAuthError("invalid_scope", "The datamanager scope was not requested.")
        issued, expires = claims.get("iat"), claims.get("exp")
        # The assertion's times are the signer's: checked on the real clock (advance() ages
        # the access tokens, not the service account's own clock).
        now = time.time()
        if (
            not isinstance(issued, int)
            or not isinstance(expires, int)
            or issued > now + CLOCK_SKEW
            or expires <= now
            or expires - issued > MAX_ASSERTION_LIFETIME
        ):
            raise OAuthError(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        return set(robot.accounts)

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
        if route == "retrieveRequestStatus":
            return self._retrieve(incoming)
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
        if validate_only:
            return {"requestId": request_id}
        now = time.time()
        statuses: list[dict[str, Any]] = []
        failing = self._fail_next.pop(0) if route == "ingest" and self._fail_next else None
        for raw, destination in zip(body["destinations"], destinations, strict=True):
            held = self._members.setdefault(destination, {})
            errors: dict[str, int] = {}
            refusing = 0
            if failing is not None:
                refusing = len(members) if failing[1] is None else min(failing[1], len(members))
                errors[failing[0]] = refusing
            if route == "ingest":
                request_consent = (body.get("consent") or {}).get("adUserData")
                for member, member_consent in members[refusing:]:
                    # ingestion_service.proto: "User-level consent overrides request-level".
                    consent = member_consent or request_consent
                    refused = _refusal(consent, destination[0] in self._consent_required)
                    if refused is None:
                        held[member] = now
                    else:
                        errors[refused] = errors.get(refused, 0) + 1
            else:  # a removal names identifiers; any member holding one of them goes
                gone = set().union(*(member for member, _ in members))
                for member in [m for m in held if m & gone]:
                    del held[member]
            self._sizes.setdefault(destination, []).append((route, len(held)))
            statuses.append(_status_of(route, raw, members, errors))
        self._requests[request_id] = _Request(statuses, self.processing_polls)
        return {"requestId": request_id}

    def _remove_all(self, token: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """removeAll as its REST reference says (developers.google.com/data-manager/api/
        reference/rest/v1/audienceMembers/removeAll): ``removeAsOfTime`` removes the members
        "last added before" it, default now."""
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
            statuses: list[dict[str, Any]] = []
            for raw, destination in zip(body["destinations"], destinations, strict=True):
                held = self._members.get(destination, {})
                for member in [m for m, added in held.items() if added < cutoff]:
                    del held[member]
                self._sizes.setdefault(destination, []).append(("removeAll", len(held)))
                statuses.append({"destination": raw, "requestStatus": "SUCCESS"})
            self._requests[request_id] = _Request(statuses, self.processing_polls)
        return {"requestId": request_id}

    def _retrieve(self, incoming: Incoming) -> dict[str, Any]:
        """A ``RetrieveRequestStatusResponse`` (ingestion_service.proto): one
        RequestStatusPerDestination per destination, in the request's order."""
        query = parse_qs(incoming.query)
        wanted = (query.get("requestId") or query.get("request_id") or [""])[-1]
        if not wanted:
            raise _missing("request_id")
        request = self._requests.get(wanted)
        if request is None:  # the emulator's reading: an id Google never issued
            raise GoogleError(404, "NOT_FOUND", "Request ID not found.", reason="NOT_FOUND")
        if request.polls_left > 0:
            request.polls_left -= 1
            return {
                "requestStatusPerDestination": [
                    {"destination": item["destination"], "requestStatus": "PROCESSING"}
                    for item in request.statuses
                ]
            }
        return {"requestStatusPerDestination": request.statuses}


def _refusal(consent: str | None, required: bool) -> str | None:
    """The ProcessingErrorReason that keeps a member out, if any (processing_errors.proto:
    DENIED_CONSENT "ad user data is denied"; UNKNOWN_CONSENT "could not be determined")."""
    if consent == "CONSENT_DENIED":
        return DENIED_CONSENT
    if required and consent != "CONSENT_GRANTED":
        return UNKNOWN_CONSENT
    return None


def _status_of(
    route: str,
    destination: dict[str, Any],
    members: list[tuple[Member, str | None]],
    errors: Mapping[str, int],
) -> dict[str, Any]:
    """A processed request's RequestStatusPerDestination in proto3 JSON (int64 as strings).
    Which status a wholly refused request gets is not in the protos: FAILED here."""
    refused = sum(errors.values())
    if not refused:
        state = "SUCCESS"
    elif refused < len(members):
        state = "PARTIAL_SUCCESS"
    else:
        state = "FAILED"
    status: dict[str, Any] = {"destination": destination, "requestStatus": state}
    if errors:
        status["errorInfo"] = {
            "errorCounts": [
                {"recordCount": str(count), "reason": reason} for reason, count in errors.items()
            ]
        }
    counts = {
        "recordCount": str(len(members)),
        "userIdentifierCount": str(sum(len(member) for member, _ in members)),
    }
    if route == "ingest":
        status["audienceMembersIngestionStatus"] = {"userDataIngestionStatus": counts}
    else:
        status["audienceMembersRemovalStatus"] = {"userDataRemovalStatus": counts}
    return status


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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


def _members(value: Any, encoding: str) -> list[tuple[Member, str | None]]:
    """Each member's identifiers, and its own adUserData consent if it has one."""
    items = _items(
        value,
        "audience_members",
        MAX_MEMBERS,
        "Maximum number of audience members allowed per request is 10,000.",
        "TOO_MANY_AUDIENCE_MEMBERS",
    )
    members: list[tuple[Member, str | None]] = []
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
        consent = (item.get("consent") or {}).get("adUserData")
        members.append((frozenset(parts), consent))
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

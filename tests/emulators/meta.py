"""A Meta Graph API (Custom Audiences) emulator on 127.0.0.1, for the facebook adapter's tests.

Serves, under ``/<version>/`` (``v25.0`` unless told otherwise):

    GET    act_<id>/customaudiences    list: fields, limit, after/before cursors, paging.next
    POST   act_<id>/customaudiences    create: name, subtype=CUSTOM, customer_file_source
    GET    <audience id>               one audience's fields
    POST   <audience id>/users         add rows          DELETE <audience id>/users: remove
    POST   <audience id>/usersreplace  replace the membership with one session's rows

Checks run in Graph's order: the version; the access token (``Authorization: Bearer|OAuth``
or the ``access_token`` parameter; missing or unknown: code 190); the node (an ad account is
``act_<digits>`` and must exist, an audience must exist: 100/33; the token must manage the
account: 200); the parameters (100): payload schema names, ``is_raw``, row lengths, lowercase
SHA-256 hex in hashed columns (EXTERN_ID and MADID are stored raw), at most 10,000 rows, the
session rules (``batch_seq`` 1, 2, ... per ``session_id``; nothing after ``last_batch_flag``;
``usersreplace`` needs a session). Scripted failures (``fail()``, with a body from
``graph_error_body()``) and delays apply only then, before any state changes. Bodies may be JSON or
form-encoded (``payload`` and ``session`` as JSON text), as Graph accepts both. Each request's
route is its kind: list, create, read, users, usersreplace, account or unknown.

Membership is kept as Meta holds it: a set of rows, each the frozenset of its non-empty
``(key, value)`` pairs, hashes as received. ``/users`` adds a batch when it arrives;
``usersreplace`` stages its session's rows and swaps them in when the flagged batch arrives.

    with MetaEmulator() as meta:
        meta.add_account("1234", token="tok")
        meta.fail(400, graph_error_body(17, "(#17) User request limit reached"), times=2)
        ...  # deliver with base_url=meta.base_url, ad_account_id="act_1234"
        assert meta.members("1234", "blotout_churn") == {member(EMAIL=sha256_hex)}

Not emulated, as Meta's own notes leave them unconfirmed: the ~90 minute life of a replace
session, and a lock on ``/users`` while a replace session is open.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from tests.emulators.base import Call, Emulator, JsonBody, PlatformError, media_type
from tests.emulators.loopback import Incoming, Reply

Member = frozenset[tuple[str, str]]

MAX_ROWS = 10_000
CUSTOMER_FILE_SOURCES = frozenset(
    {"USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY", "BOTH_USER_AND_PARTNER_PROVIDED"}
)
MULTI_KEYS = frozenset(
    {
        "EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI",
        "CT", "ST", "ZIP", "MADID", "COUNTRY", "LOOKALIKE_VALUE", "DATA_PROCESSING_OPTIONS",
    }
)  # fmt: skip
RAW_KEYS = frozenset({"EXTERN_ID", "MADID", "DATA_PROCESSING_OPTIONS"})  # never hashed
SINGLE_KEYS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE", "MOBILE_ADVERTISER_ID": "MADID"}
AUDIENCE_FIELDS = frozenset(
    {
        "id", "name", "subtype", "customer_file_source", "description", "account_id",
        "approximate_count_lower_bound", "approximate_count_upper_bound",
    }
)  # fmt: skip
_JSON = "application/json; charset=UTF-8"
_HEX = re.compile(r"[0-9a-f]{64}")
_ACCOUNT_NODE = re.compile(r"act_([0-9]+)")
_DIGITS = re.compile(r"[0-9]+")
UPLOAD_EDGES = frozenset({"users", "usersreplace"})  # the routes of uploads, for fail(on=...)


def member(**keys: str) -> Member:
    """A stored row: its non-empty keys, e.g. ``member(EMAIL=h, PHONE=h, EXTERN_ID="c-1")``."""
    return frozenset((key, value) for key, value in keys.items() if value)


def graph_error_body(
    code: int,
    message: str,
    *,
    subcode: int | None = None,
    type: str = "OAuthException",
    transient: bool | None = None,
) -> dict[str, Any]:
    """A Graph error body, ``{"error": {"message", "type", "code", ...}}``, for ``fail()``."""
    error: dict[str, Any] = {"message": message, "type": type, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    if transient is not None:
        error["is_transient"] = transient
    error["fbtrace_id"] = secrets.token_urlsafe(8)
    return {"error": error}


def usage_header(regain_minutes: int = 0) -> dict[str, str]:
    """The ``X-Business-Use-Case-Usage`` header Meta sends with a rate limit, for ``fail()``."""
    usage = {
        "type": "ads_management",
        "call_count": 100,
        "total_cputime": 25,
        "total_time": 40,
        "estimated_time_to_regain_access": regain_minutes,
    }
    return {"X-Business-Use-Case-Usage": json.dumps({"100000000000001": [usage]})}


def graph_code(call: Call) -> int | None:
    """The Graph error code ``call`` was answered with; None for any other answer."""
    answer = call.answer_json()
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) else None


class GraphError(PlatformError):
    """A Graph error answer: ``{"error": {"message", "type", "code", ...}}``."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: int = 400,
        subcode: int | None = None,
        type: str = "OAuthException",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = graph_error_body(code, message, subcode=subcode, type=type)
        super().__init__(status, message, body, content_type=_JSON, headers=headers)


def _missing_object(method: str, node: str) -> GraphError:
    return GraphError(
        100,
        f"Unsupported {method.lower()} request. Object with ID '{node}' does not exist, cannot "
        "be loaded due to missing permissions, or does not support this operation. Please "
        "read the Graph API documentation at https://developers.facebook.com/docs/graph-api",
        subcode=33,
        type="GraphMethodException",
    )


def _bad_param(message: str) -> GraphError:
    return GraphError(100, f"(#100) {message}")


_JSON_BODY = JsonBody(  # the media type is checked by the caller: Graph takes forms too
    not_json=lambda _: _bad_param("The request body is not valid JSON"),
    not_object=lambda: _bad_param("The request body must be a JSON object"),
)


@dataclass
class UploadSession:
    """One ``session_id`` of one audience."""

    session_id: int
    edge: str  # users | usersreplace
    last_seq: int = 0
    finished: bool = False
    estimated_num_total: int | None = None
    num_received: int = 0
    num_invalid_entries: int = 0
    staged: set[Member] = field(default_factory=set)  # usersreplace: swapped in at the end


@dataclass
class Audience:
    id: str
    account: str  # digits, without act_
    name: str
    subtype: str = "CUSTOM"
    customer_file_source: str | None = None
    description: str | None = None
    members: set[Member] = field(default_factory=set)
    sessions: dict[int, UploadSession] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """One accepted ``users``/``usersreplace`` request."""

    audience_id: str
    edge: str
    method: str
    schema: tuple[str, ...]
    rows: int
    invalid: int
    session_id: int | None
    batch_seq: int | None
    last: bool
    estimated_num_total: int | None


class MetaEmulator(Emulator):
    """Graph's custom-audience endpoints on 127.0.0.1, strict, scriptable, and inspectable."""

    def __init__(
        self,
        *,
        versions: Iterable[str] = ("v25.0",),
        max_page_size: int = 100,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.versions = frozenset(versions)
        self.max_page_size = max_page_size
        self.max_body_bytes = max_body_bytes
        super().__init__(name="meta-emulator")
        self._tokens: dict[str, set[str]] = {}  # token -> account digits it may manage
        self._accounts: dict[str, list[str]] = {}  # account digits -> audience ids, in order
        self._audiences: dict[str, Audience] = {}
        self._next_id = 23850000000000001
        self._invalid_values: set[str] = set()
        self._uploads: list[Upload] = []

    # -- set-up ------------------------------------------------------------------------------

    def add_account(self, account_id: str | int, token: str) -> str:
        """An ad account (``act_`` optional) that ``token`` may manage; its digits."""
        digits = str(account_id).removeprefix("act_")
        with self._cond:
            self._accounts.setdefault(digits, [])
            self._tokens.setdefault(token, set()).add(digits)
        return digits

    def add_audience(
        self, account_id: str | int, name: str, members: Iterable[Member] = (), **fields: Any
    ) -> str:
        """An audience made outside the adapter (in Ads Manager, say); its id."""
        with self._cond:
            audience = self._new_audience(str(account_id).removeprefix("act_"), name, **fields)
            audience.members.update(members)
            return audience.id

    def delete_audience(self, audience_id: str) -> None:
        """As if deleted in Ads Manager: later calls on its id get 100/33."""
        with self._cond:
            audience = self._audiences.pop(audience_id)
            self._accounts[audience.account].remove(audience_id)

    def invalid_values(self, *values: str) -> None:
        """Values Meta will not take (counted in ``num_invalid_entries``, the row not kept)."""
        with self._cond:
            self._invalid_values.update(values)

    # -- what it holds -----------------------------------------------------------------------

    def audiences(self, account_id: str | int) -> list[Audience]:
        """The account's audiences in creation order (copies)."""
        digits = str(account_id).removeprefix("act_")
        with self._cond:
            return [_copy(self._audiences[i]) for i in self._accounts.get(digits, [])]

    def audience(self, account_id: str | int, name: str) -> Audience:
        """The one audience of that name; LookupError when there is none or several."""
        found = [a for a in self.audiences(account_id) if a.name == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} audiences named {name!r} in act_{account_id}")
        return found[0]

    def members(self, account_id: str | int, name: str) -> set[Member]:
        return self.audience(account_id, name).members

    def uploads(self, audience_id: str | None = None) -> list[Upload]:
        """Accepted uploads, in arrival order."""
        with self._cond:
            return [u for u in self._uploads if audience_id in (None, u.audience_id)]

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, incoming: Incoming) -> Reply:
        incoming.route = _kind(incoming.method, incoming.path)
        run = self._route(incoming)  # a GraphError, here or from run(), is answered by the base
        turn = self._take(incoming)
        turn.wait()
        if turn.reply is not None:
            return turn.reply
        with self._cond:
            return _json(200, run())  # run() checks the session again: a batch came meanwhile

    def _route(self, incoming: Incoming) -> Callable[[], Any]:
        """Check the request up to the point where only scripted answers and the state are
        left; returns the action that applies it."""
        method = incoming.method
        if method == "GET" and "content-length" not in incoming.headers:
            incoming.body = b""  # nothing to read; keeps the connection usable
        params = dict(parse_qsl(incoming.query, keep_blank_values=True))
        if method in ("POST", "DELETE"):
            params.update(self._body_params(incoming))
        parts = incoming.path.strip("/").split("/")
        version, node, edges = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
        if version not in self.versions:
            latest = max(self.versions, key=_version_key)
            raise GraphError(
                2635,
                f"(#2635) You are calling a deprecated version of the Ads API. "
                f"Please update to the latest version: {latest}.",
            )
        token = incoming.principal = self._token(incoming, params)
        if not node or len(edges) > 1:
            raise GraphError(2500, f"Unknown path components: /{'/'.join(parts[1:])}")
        edge = edges[0] if edges else None
        with self._cond:
            if match := _ACCOUNT_NODE.fullmatch(node):
                where = (version, node, match.group(1))
                return self._account_route(method, where, edge, token, params)
            audience = self._audiences.get(node) if _DIGITS.fullmatch(node) else None
            if audience is None:
                raise _missing_object(method, node)
            if audience.account not in self._tokens[token]:
                raise GraphError(200, f"(#200) The current user can not update audience {node}")
            if edge is None and method == "GET":
                fields = _fields(params)
                return lambda: _render(audience, fields)
            if edge in UPLOAD_EDGES and (method == "POST" or (edge, method) == ("users", "DELETE")):
                return self._upload_action(audience, edge, method, params)
        if edge is None:
            raise _missing_object(method, node)
        raise GraphError(2500, f"Unknown path components: /{edge}")

    def _account_route(
        self,
        method: str,
        where: tuple[str, str, str],
        edge: str | None,
        token: str,
        params: dict[str, Any],
    ) -> Callable[[], Any]:
        _, node, digits = where
        if digits not in self._accounts:
            raise _missing_object(method, node)
        if digits not in self._tokens[token]:
            raise GraphError(
                200, "(#200) Ad account owner has NOT grant ads_management or ads_read permission"
            )
        if edge is None and method == "GET":
            return lambda: {"id": node, "account_id": digits}
        if edge != "customaudiences":
            raise GraphError(2500, f"Unknown path components: /{edge}")
        if method == "GET":
            fields = _fields(params)
            limit = _limit(params.get("limit"), self.max_page_size)
            after, before = params.get("after"), params.get("before")
            return lambda: self._page(where, fields, limit, after, before)
        if method == "POST":
            return self._create_action(digits, params)
        raise _missing_object(method, node)

    def _token(self, incoming: Incoming, params: Mapping[str, Any]) -> str:
        header = incoming.headers.get("authorization")
        token: Any = params.get("access_token")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() not in ("bearer", "oauth") or not value.strip():
                raise _bad_token()
            token = value.strip()
        if token is None or token == "":
            raise GraphError(
                190, "An access token is required to request this resource.", status=400
            )
        if not isinstance(token, str) or token not in self._tokens:
            raise _bad_token()
        return token

    def _body_params(self, incoming: Incoming) -> dict[str, Any]:
        lengths = incoming.header_values("Content-Length")
        if not lengths and "transfer-encoding" not in incoming.headers:
            incoming.body = b""
            return {}
        raw = incoming.read_body(self.max_body_bytes)
        if not raw:
            return {}
        content_type = media_type(incoming)
        if content_type == "application/json":
            body: dict[str, Any] = _JSON_BODY.parse(incoming, raw)
            return body
        if content_type == "application/x-www-form-urlencoded":
            return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        raise _bad_param(f"Unsupported content type {content_type or '(none)'}")

    # -- list and create (called with the lock held) -----------------------------------------

    def _page(
        self, where: tuple[str, str, str], fields: list[str], limit: int, after: Any, before: Any
    ) -> dict[str, Any]:
        version, node, digits = where
        url = f"{self.base_url}/{version}/{node}/customaudiences"
        ids = self._accounts.get(digits, [])
        start, stop = 0, len(ids)
        if after is not None:
            start = _cursor_position(ids, after) + 1
        elif before is not None:
            stop = _cursor_position(ids, before)
            start = max(0, stop - limit)
        page = ids[start : min(stop, start + limit)]
        answer: dict[str, Any] = {"data": [_render(self._audiences[i], fields) for i in page]}
        if page:
            cursors = {"before": _cursor(page[0]), "after": _cursor(page[-1])}
            answer["paging"] = {"cursors": cursors}
            if start + len(page) < len(ids):
                query = {"fields": ",".join(fields), "limit": limit, "after": cursors["after"]}
                answer["paging"]["next"] = f"{url}?{urlencode(query)}"
            if start > 0:
                query = {"fields": ",".join(fields), "limit": limit, "before": cursors["before"]}
                answer["paging"]["previous"] = f"{url}?{urlencode(query)}"
        return answer

    def _create_action(self, digits: str, params: Mapping[str, Any]) -> Callable[[], Any]:
        name = params.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad_param("The parameter name is required")
        subtype = params.get("subtype")
        if subtype != "CUSTOM":
            raise _bad_param("This emulator makes customer-list audiences only: subtype=CUSTOM")
        source = params.get("customer_file_source")
        if source not in CUSTOMER_FILE_SOURCES:
            raise _bad_param(
                "customer_file_source must be one of " + ", ".join(sorted(CUSTOMER_FILE_SOURCES))
            )
        description = params.get("description")

        def create() -> dict[str, Any]:
            audience = self._new_audience(
                digits, name, customer_file_source=source, description=description
            )
            return {"id": audience.id}

        return create

    def _new_audience(self, digits: str, name: str, **fields: Any) -> Audience:
        if digits not in self._accounts:
            raise KeyError(f"no account {digits}; add_account() it first")
        audience = Audience(id=str(self._next_id), account=digits, name=name, **fields)
        self._next_id += 1
        self._audiences[audience.id] = audience
        self._accounts[digits].append(audience.id)
        return audience

    # -- uploads -----------------------------------------------------------------------------

    def _upload_action(
        self, audience: Audience, edge: str, method: str, params: Mapping[str, Any]
    ) -> Callable[[], Any]:
        payload = _json_param(params, "payload")
        if payload is None:
            raise _bad_param("The parameter payload is required")
        schema, rows, received = self._rows(payload)
        session = _json_param(params, "session")
        if session is None and edge == "usersreplace":
            raise _bad_param("The parameter session is required for usersreplace")
        checked = None if session is None else _session(session)
        if checked is not None:
            _check_sequence(audience, edge, checked[0], checked[1])

        def apply() -> dict[str, Any]:
            if checked is not None:  # again: another batch may have come in meanwhile
                _check_sequence(audience, edge, checked[0], checked[1])
            valid = {row for row in rows if row is not None and self._usable(row)}
            invalid = sum(1 for row in rows if row is None or not self._usable(row))
            answer_session: str | None = None
            upload_session: UploadSession | None = None
            if checked is not None:
                session_id, batch_seq, last, estimated = checked
                upload_session = audience.sessions.setdefault(
                    session_id, UploadSession(session_id, edge, estimated_num_total=estimated)
                )
                upload_session.last_seq = batch_seq
                upload_session.num_received += received
                upload_session.num_invalid_entries += invalid
                upload_session.finished = last
                answer_session = str(session_id)
            if edge == "usersreplace":
                assert upload_session is not None
                upload_session.staged |= valid
                if upload_session.finished:
                    audience.members = set(upload_session.staged)
                    upload_session.staged = set()
            elif method == "DELETE":
                audience.members -= valid
            else:
                audience.members |= valid
            self._uploads.append(
                Upload(
                    audience.id,
                    edge,
                    method,
                    schema,
                    received,
                    invalid,
                    checked[0] if checked else None,
                    checked[1] if checked else None,
                    checked[2] if checked else False,
                    checked[3] if checked else None,
                )
            )
            return {
                "audience_id": audience.id,
                "session_id": answer_session,
                "num_received": received,
                "num_invalid_entries": invalid,
                "invalid_entry_samples": {},
            }

        return apply

    def _usable(self, row: Member) -> bool:
        return not any(value in self._invalid_values for _, value in row)

    def _rows(self, payload: Any) -> tuple[tuple[str, ...], list[Member | None], int]:
        """Schema, one stored row per data row (None: nothing usable), rows received."""
        if not isinstance(payload, dict):
            raise _bad_param("The parameter payload must be an object")
        schema = payload.get("schema")
        data = payload.get("data")
        if not isinstance(data, list) or not data:
            raise _bad_param("Data is missing or does not match schema")
        if len(data) > MAX_ROWS:
            raise _bad_param(f"Too many records: {len(data)} in one request, at most {MAX_ROWS}")
        if isinstance(schema, str):
            return self._single_key_rows(schema, data)
        if (
            not isinstance(schema, list)
            or not schema
            or not all(isinstance(key, str) and key in MULTI_KEYS for key in schema)
            or len(set(schema)) != len(schema)
        ):
            raise _bad_param(
                "Invalid schema: a list of distinct multi-key types "
                "(EXTERN_ID, EMAIL, PHONE, FN, LN, ZIP, COUNTRY, ...) or one single key"
            )
        if "LOOKALIKE_VALUE" in schema:
            raise _bad_param("LOOKALIKE_VALUE is for value-based audiences only")
        if payload.get("is_raw") not in (True, "true"):
            raise _bad_param("is_raw must be true for a multi-key schema of individual keys")
        stored: list[Member | None] = []
        for position, row in enumerate(data):
            if not isinstance(row, list) or len(row) != len(schema):
                raise _bad_param(
                    f"Data is missing or does not match schema: row {position} has "
                    f"{len(row) if isinstance(row, list) else 'no'} values for "
                    f"{len(schema)} keys"
                )
            pairs: list[tuple[str, str]] = []
            for key, value in zip(schema, row, strict=True):
                if key == "DATA_PROCESSING_OPTIONS":
                    continue  # limited data use flags; not membership
                pairs.extend(_checked_value(key, value, position))
            stored.append(frozenset(pairs) or None)
        return tuple(schema), stored, len(data)

    def _single_key_rows(
        self, schema: str, data: list[Any]
    ) -> tuple[tuple[str, ...], list[Member | None], int]:
        key = SINGLE_KEYS.get(schema)
        if key is None:
            raise _bad_param(f"Invalid schema {schema!r}: use one of {', '.join(SINGLE_KEYS)}")
        stored: list[Member | None] = []
        for position, item in enumerate(data):
            value = item[0] if isinstance(item, list) and len(item) == 1 else item
            stored.append(frozenset(_checked_value(key, value, position)) or None)
        return (schema,), stored, len(data)


def _kind(method: str, path: str) -> str:
    """What a request is, from its method and path alone (its route in the call log)."""
    parts = path.strip("/").split("/")[1:]
    node, edge = [*parts, "", ""][:2] if len(parts) <= 2 else ("", "?")
    if _ACCOUNT_NODE.fullmatch(node):
        if edge == "customaudiences":
            return {"GET": "list", "POST": "create"}.get(method, "unknown")
        return "account" if not edge else "unknown"
    if _DIGITS.fullmatch(node):
        if edge in UPLOAD_EDGES:
            return edge
        return "read" if not edge and method == "GET" else "unknown"
    return "unknown"


def _check_sequence(audience: Audience, edge: str, session_id: int, batch_seq: int) -> None:
    known = audience.sessions.get(session_id)
    if known is None:
        if batch_seq != 1:
            raise _bad_param(f"batch_seq must start at 1 in a new session, got {batch_seq}")
        return
    if known.edge != edge:
        raise _bad_param(f"Session {session_id} is a {known.edge} session")
    if known.finished:
        raise _bad_param(f"Session {session_id} already received its last batch")
    if batch_seq != known.last_seq + 1:
        expected = known.last_seq + 1
        raise _bad_param(f"batch_seq {batch_seq} is out of order: expected {expected}")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", version))


def _checked_value(key: str, value: Any, position: int) -> list[tuple[str, str]]:
    if not isinstance(value, str):
        raise _bad_param(f"Data is missing or does not match schema: {key} in row {position}")
    if value == "":
        return []
    if key == "MADID":
        return [(key, value.lower())]
    if key in RAW_KEYS:
        return [(key, value)]
    if not _HEX.fullmatch(value):
        raise _bad_param(
            f"Data is not hashed properly: {key} in row {position} must be a lowercase "
            "SHA-256 hex digest of the normalized value"
        )
    return [(key, value)]


def _session(session: Any) -> tuple[int, int, bool, int | None]:
    if not isinstance(session, dict):
        raise _bad_param("The parameter session must be an object")
    session_id = session.get("session_id")
    batch_seq = session.get("batch_seq")
    last = session.get("last_batch_flag", False)
    estimated = session.get("estimated_num_total")
    if not isinstance(session_id, int) or _is_bool(session_id) or not 0 < session_id < 2**64:
        raise _bad_param("session.session_id must be a positive 64-bit integer")
    if not isinstance(batch_seq, int) or _is_bool(batch_seq) or batch_seq < 1:
        raise _bad_param("session.batch_seq must be an integer from 1")
    if not isinstance(last, bool):
        raise _bad_param("session.last_batch_flag must be a boolean")
    if estimated is not None and (
        not isinstance(estimated, int) or _is_bool(estimated) or estimated < 0
    ):
        raise _bad_param("session.estimated_num_total must be a non-negative integer")
    return session_id, batch_seq, last, estimated


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _json_param(params: Mapping[str, Any], name: str) -> Any:
    value = params.get(name)
    if isinstance(value, str):  # form-encoded, or JSON text inside a JSON body
        try:
            return json.loads(value)
        except ValueError:
            raise _bad_param(f"The parameter {name} is not valid JSON") from None
    return value


def _fields(params: Mapping[str, Any]) -> list[str]:
    raw = params.get("fields") or "id"
    fields = [f.strip() for f in str(raw).split(",") if f.strip()]
    for name in fields:
        if name not in AUDIENCE_FIELDS:
            raise _bad_param(
                f"Tried accessing nonexisting field ({name}) on node type (CustomAudience)"
            )
    return fields


def _limit(raw: Any, most: int) -> int:
    if raw is None:
        return min(25, most)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise _bad_param("The parameter limit must be an integer") from None
    return max(1, min(value, most))  # Graph clamps rather than refusing


def _cursor(audience_id: str) -> str:
    return base64.urlsafe_b64encode(audience_id.encode()).decode().rstrip("=")


def _cursor_position(ids: list[str], cursor: Any) -> int:
    try:
        text = str(cursor)
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        return ids.index(decoded)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _bad_param("Invalid cursor") from None


def _render(audience: Audience, fields: list[str]) -> dict[str, Any]:
    values = {
        "id": audience.id,
        "name": audience.name,
        "subtype": audience.subtype,
        "customer_file_source": audience.customer_file_source,
        "description": audience.description,
        "account_id": audience.account,
        "approximate_count_lower_bound": len(audience.members),
        "approximate_count_upper_bound": len(audience.members),
    }
    return {name: values[name] for name in fields if values[name] is not None}


def _copy(audience: Audience) -> Audience:
    return Audience(
        id=audience.id,
        account=audience.account,
        name=audience.name,
        subtype=audience.subtype,
        customer_file_source=audience.customer_file_source,
        description=audience.description,
        members=set(audience.members),
        sessions={
            key: UploadSession(**{**vars(s), "staged": set(s.staged)})
            for key, s in audience.sessions.items()
        },
    )


def _bad_token() -> GraphError:
    return GraphError(
        190,
        "Invalid OAuth access token - Cannot parse access token",
        headers={"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token"'},
    )


def _json(status: int, body: Any) -> Reply:
    return Reply(status, json.dumps(body).encode(), _JSON)

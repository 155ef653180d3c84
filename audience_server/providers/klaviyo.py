"""``klaviyo``: users upserted as Klaviyo profiles and added to a list by name.

Endpoints (base ``https://a.klaviyo.com``, JSON:API documents):

    GET    /api/lists?filter=equals(name,"…")&sort=created  find the list (links.next paged)
    POST   /api/lists                                       create it when there is none
    POST   /api/profile-bulk-import-jobs                    upsert profiles, add them to the list
    GET    /api/profile-bulk-import-jobs/{id}               poll until ``complete``
  primary only:
    GET    /api/lists/{id}/relationships/profiles           members before chunk 1
    GET    /api/profile-bulk-import-jobs/{id}/relationships/profiles    who each job touched
    DELETE /api/lists/{id}/relationships/profiles           the others, 1,000 a call, at the end

Auth: ``Authorization: Klaviyo-API-Key <api_key>`` and a required ``revision: YYYY-MM-DD``
header. Nothing is hashed: Klaviyo stores PII in plaintext. ``email`` trimmed and lowercased
(a SHA-256 digest is useless here and dropped), ``phone_number`` in E.164 with ``+`` (national
numbers read with the user's country; a number that cannot be converted is dropped),
``external_id`` up to 255 characters, ``first_name``/``last_name`` trimmed with their case kept,
``location.country`` (ISO alpha-2, upper case) and ``location.zip`` as given. A user with none of
email, phone or external id left is invalid and not sent; so is one whose profile is over 100 KB.

Limits: an import job takes at most 10,000 profiles and 5 MB, so a chunk whose JSON would be
larger is split into several jobs. Each job is polled (``poll_interval``) until complete; its
``failed_count`` adds to the invalid users. A chunk waits on Klaviyo (its jobs, and a 429 on a
read, whose ``Retry-After`` is slept through when it fits) at most ``job_timeout`` seconds, then
the attempt is retried.

``custom`` only adds to the list. ``primary`` makes the list's membership exactly this upload:
the members before chunk 1 that no import job of this attempt touched are removed once the last
job is complete, so members that stay are never removed and re-added (list-triggered flows do not
fire again for them).

Errors: 429 (``Retry-After`` honoured), 408, 5xx, timeouts and connection errors are retried; a
404 on the remembered list forgets it and retries (the list is looked up again); any other 4xx
fails the delivery with Klaviyo's ``errors[0].detail`` (emails and phone numbers in it masked).

Options: ``api_key`` (secret), ``base_url``, ``revision`` (default 2026-07-15), ``chunk_size``
(default and most 10,000), ``timeout`` seconds per request (30), ``poll_interval`` seconds (1),
``job_timeout`` seconds per chunk (300; keep it under the worker's ``AUDIENCE_CHUNK_TIMEOUT``,
10 minutes by default — the worker keeps its lease alive meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import httpx2
import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, PermanentError, RetryableError, Segment
from .http import HttpAdapter, excerpt, parse_retry_after, status_error

DEFAULT_BASE_URL = "https://a.klaviyo.com"
DEFAULT_REVISION = "2026-07-15"
MEDIA_TYPE = "application/vnd.api+json"
MAX_PROFILES_PER_JOB = 10_000
MAX_JOB_BYTES = 5_000_000  # "5MB": read as decimal, the smaller of the two readings
MAX_PROFILE_BYTES = 100_000  # "100KB", likewise
MAX_EXTERNAL_ID = 255
REMOVE_BATCH = 1_000  # most profiles per list-relationship call
PAGE_SIZE = 100  # most a relationships page returns
LIST_PAGE_SIZE = 10  # most GET /api/lists returns
# A bulk import job's statuses (Klaviyo's words, not this server's states).
JOB_DONE = "complete"
JOB_UNDER_WAY = ("queued", "processing")

_REVISION = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.[A-Za-z0-9_-]+)?")
_WHITESPACE = re.compile(r"\s+")

_JOB_PREFIX = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
_JOB_MIDDLE = b']}},"relationships":{"lists":{"data":[{"type":"list","id":'
_JOB_SUFFIX = b"}]}}}}"


# --- users -> profiles (pure) ---------------------------------------------------------------


def _plain(value: object) -> str | None:
    """A display value as given: trimmed, inner whitespace runs made one space."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = _WHITESPACE.sub(" ", value).strip()
    return text or None


def _email(value: object) -> str | None:
    if normalize.is_sha256(value):
        return None  # a digest is not an address Klaviyo can use
    return normalize.email(value)


def _phone(value: object, country: str | None) -> str | None:
    if normalize.is_sha256(value):
        return None
    return normalize.phone_e164(value, country)


def _external_id(value: object) -> str | None:
    text = normalize.external_id(value)
    return text if text is not None and len(text) <= MAX_EXTERNAL_ID else None


def profile_attributes(user: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Klaviyo profile ``attributes`` for a user, or None when no identifier is usable."""
    country = normalize.country(user.get("country"))
    attributes: dict[str, Any] = {}
    identifiers = {
        "email": _email(user.get("email")),
        "phone_number": _phone(user.get("phone"), country),
        "external_id": _external_id(user.get("externalId")),
    }
    attributes.update((key, value) for key, value in identifiers.items() if value is not None)
    if not attributes:
        return None
    for key, field in (("first_name", "firstName"), ("last_name", "lastName")):
        if (text := _plain(user.get(field))) is not None:
            attributes[key] = text
    location = {}
    if country is not None:
        location["country"] = country.upper()
    if (zip_code := _plain(user.get("postalCode"))) is not None:
        location["zip"] = zip_code
    if location:
        attributes["location"] = location
    return attributes


def encode_profiles(users: Iterable[Mapping[str, Any]]) -> tuple[list[bytes], int]:
    """Each usable user as a JSON profile resource, and how many users were unusable."""
    encoded: list[bytes] = []
    invalid = 0
    for user in users:
        attributes = profile_attributes(user)
        if attributes is None:
            invalid += 1
            continue
        resource = orjson.dumps({"type": "profile", "attributes": attributes})
        if len(resource) > MAX_PROFILE_BYTES:
            invalid += 1
            continue
        encoded.append(resource)
    return encoded, invalid


def job_bodies(
    profiles: Sequence[bytes],
    list_id: str,
    *,
    max_profiles: int = MAX_PROFILES_PER_JOB,
    max_bytes: int = MAX_JOB_BYTES,
) -> list[bytes]:
    """Bulk import request bodies adding ``profiles`` to the list, each within both limits."""
    tail = _JOB_MIDDLE + orjson.dumps(list_id) + _JOB_SUFFIX
    overhead = len(_JOB_PREFIX) + len(tail)
    bodies: list[bytes] = []
    batch: list[bytes] = []
    size = overhead
    for profile in profiles:
        added = len(profile) + (1 if batch else 0)  # the comma before it
        if batch and (len(batch) == max_profiles or size + added > max_bytes):
            bodies.append(_JOB_PREFIX + b",".join(batch) + tail)
            batch, size, added = [], overhead, len(profile)
        batch.append(profile)
        size += added
    if batch:
        bodies.append(_JOB_PREFIX + b",".join(batch) + tail)
    return bodies


def _list_filter(name: str) -> str | None:
    """``equals(name,"…")`` with a quote the name does not contain; None if it has both."""
    for quote in ('"', "'"):
        if quote not in name:
            return f"equals(name,{quote}{name}{quote})"
    return None


def _error_detail(response: httpx2.Response) -> str:
    """Klaviyo's own ``errors[0].detail`` (or title), else a short excerpt of the body."""
    try:
        body = orjson.loads(response.content)
        first = body["errors"][0]
        detail = first.get("detail") or first.get("title") or first.get("code")
        if isinstance(detail, str) and detail:
            return excerpt(detail)  # Klaviyo's messages may quote the value they reject
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        pass
    return excerpt(response.text) or response.reason_phrase


class _ListGone(Exception):
    """The remembered list id is unknown to Klaviyo (deleted meanwhile)."""


# --- the provider ---------------------------------------------------------------------------


class KlaviyoProvider(HttpAdapter):
    """One Klaviyo account (a private key); each segment name is a list in it."""

    platform = "Klaviyo"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        revision: str = DEFAULT_REVISION,
        chunk_size: int = MAX_PROFILES_PER_JOB,
        timeout: float = 30.0,
        poll_interval: float = 1.0,
        job_timeout: float = 300.0,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.revision = revision
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self._lists: dict[str, str] = {}  # list name -> id, learned once per name
        self._list_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, config: DestinationConfig) -> KlaviyoProvider:
        options = config.options
        api_key = options.get("api_key")
        if not isinstance(api_key, str) or not api_key.strip() or _WHITESPACE.search(api_key):
            raise OptionError("api_key", "is required: a Klaviyo private API key, no spaces")
        base_url = check.http_url(options, "base_url", DEFAULT_BASE_URL)
        revision = options.get("revision", DEFAULT_REVISION)
        if not isinstance(revision, str) or not _valid_revision(revision):
            raise OptionError("revision", "must be a date YYYY-MM-DD (optionally .suffix)")
        return cls(
            api_key,
            base_url=base_url,
            revision=revision,
            chunk_size=check.positive_int(
                options, "chunk_size", MAX_PROFILES_PER_JOB, MAX_PROFILES_PER_JOB
            ),
            timeout=check.seconds(options, "timeout", 30.0),
            poll_interval=check.seconds(options, "poll_interval", 1.0),
            job_timeout=check.seconds(options, "job_timeout", 300.0),
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        state = segment.state
        try:
            if chunk.index == 1 or "list_id" not in state:  # an attempt starts over
                await self._begin(segment)
            invalid, status = await self._import(segment, chunk)
            if segment.type == "primary" and chunk.last:
                await self._remove(state["list_id"], sorted(state["before"] - state["kept"]))
        except _ListGone as exc:
            self._lists.pop(segment.segment_name, None)
            raise RetryableError(f"{exc}; the list will be looked up again", status=404) from None
        return ChunkResult(invalid=invalid, status=status)

    async def _begin(self, segment: Segment) -> None:
        """Find or create the list; for ``primary``, note who is in it now."""
        list_id = await self._list_id(segment.segment_name)
        segment.state["list_id"] = list_id
        if segment.type == "primary":
            members = f"/api/lists/{list_id}/relationships/profiles"
            segment.state["before"] = await self._ids(
                members, "read list", self._deadline(), list_call=True
            )
            segment.state["kept"] = set()

    async def _import(self, segment: Segment, chunk: Chunk) -> tuple[int, int | None]:
        """Import the chunk's profiles into the list, job by job; invalid users and status."""
        state = segment.state
        # Phone parsing takes a while for 10,000 users: off the event loop the other lanes share.
        profiles, invalid = await anyio.to_thread.run_sync(encode_profiles, chunk.users)
        status: int | None = None
        before: set[str] = state.get("before", set())
        deadline = self._deadline()
        for body in job_bodies(profiles, state["list_id"]):
            job_id, status = await self._start_import(body)
            invalid += await self._wait(job_id, deadline)
            if before:  # primary, over a list that had members: which of them stay
                touched = await self._ids(
                    f"/api/profile-bulk-import-jobs/{job_id}/relationships/profiles",
                    "read import job profiles",
                    deadline,
                )
                state["kept"] |= touched & before
        return invalid, status

    # --- lists ------------------------------------------------------------------------------

    async def _list_id(self, name: str) -> str:
        if (known := self._lists.get(name)) is not None:
            return known
        # Two deliveries of one name must not both create it: Klaviyo allows duplicate names.
        lock = self._list_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if (known := self._lists.get(name)) is None:
                known = await self._find_list(name) or await self._create_list(name)
                self._lists[name] = known
        return known

    async def _find_list(self, name: str) -> str | None:
        params = {"sort": "created", "fields[list]": "name", "page[size]": str(LIST_PAGE_SIZE)}
        if (expression := _list_filter(name)) is not None:
            params["filter"] = expression
        async with contextlib.aclosing(self._pages("/api/lists", params, "find list")) as pages:
            async for item in pages:
                attributes = item.get("attributes")
                named = isinstance(attributes, dict) and attributes.get("name") == name
                if named and isinstance(item.get("id"), str):
                    return str(item["id"])
        return None

    async def _create_list(self, name: str) -> str:
        body = {"data": {"type": "list", "attributes": {"name": name}}}
        document, _ = await self._call("POST", "/api/lists", "create list", body=body)
        return _resource_id(document, "create list")

    async def _remove(self, list_id: str, profile_ids: Sequence[str]) -> None:
        path = f"/api/lists/{list_id}/relationships/profiles"
        for start in range(0, len(profile_ids), REMOVE_BATCH):
            batch = profile_ids[start : start + REMOVE_BATCH]
            body = {"data": [{"type": "profile", "id": pid} for pid in batch]}
            await self._call("DELETE", path, "remove from list", body=body, list_call=True)

    # --- import jobs ------------------------------------------------------------------------

    async def _start_import(self, body: bytes) -> tuple[str, int]:
        document, status = await self._call(
            "POST", "/api/profile-bulk-import-jobs", "import profiles", raw=body, list_call=True
        )
        return _resource_id(document, "import profiles"), status

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.job_timeout

    async def _wait(self, job_id: str, deadline: float) -> int:
        """Poll the job until complete; its failed_count."""
        loop = asyncio.get_running_loop()
        path = f"/api/profile-bulk-import-jobs/{job_id}"
        while True:
            await asyncio.sleep(self.poll_interval)
            document, _ = await self._call("GET", path, "poll import job", deadline=deadline)
            data = document.get("data")
            attributes = data.get("attributes") if isinstance(data, dict) else None
            if not isinstance(attributes, dict):
                raise PermanentError("unexpected answer from Klaviyo (poll import job)")
            job_status = attributes.get("status")
            if job_status == JOB_DONE:
                failed = attributes.get("failed_count") or 0
                return failed if isinstance(failed, int) and failed > 0 else 0
            if job_status not in JOB_UNDER_WAY:
                raise RetryableError(f"Klaviyo import job {job_id} ended {job_status!r}")
            if loop.time() >= deadline:
                raise RetryableError(
                    f"Klaviyo import job {job_id} still {job_status} after {self.job_timeout:g} s"
                )

    # --- HTTP -------------------------------------------------------------------------------

    async def _ids(
        self, path: str, what: str, deadline: float, *, list_call: bool = False
    ) -> set[str]:
        """The ids of a relationships collection, every page."""
        params = {"page[size]": str(PAGE_SIZE)}
        found: set[str] = set()
        pages = self._pages(path, params, what, list_call=list_call, deadline=deadline)
        async for item in pages:
            if isinstance(item.get("id"), str):
                found.add(item["id"])
        return found

    async def _pages(
        self,
        path: str,
        params: dict[str, str] | None,
        what: str,
        *,
        list_call: bool = False,
        deadline: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Every resource of a collection, following ``links.next``.

        Only the path and query of a next link are used, always against ``base_url``: the key
        goes nowhere else, and a proxy in ``base_url`` keeps working.
        """
        target: str | None = path
        while target is not None:
            document, _ = await self._call(
                "GET", target, what, params=params, list_call=list_call, deadline=deadline
            )
            data = document.get("data")
            if not isinstance(data, list):
                raise PermanentError(f"unexpected answer from Klaviyo ({what}): no data list")
            for item in data:
                if isinstance(item, dict):
                    yield item
            links = document.get("links") or {}
            following = links.get("next") if isinstance(links, dict) else None
            if not isinstance(following, str) or not following:
                return
            parts = urlsplit(following)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            params = None  # the cursor link carries them

    async def _call(
        self,
        method: str,
        target: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        raw: bytes | None = None,
        list_call: bool = False,
        deadline: float | None = None,
    ) -> tuple[dict[str, Any], int]:
        """One request; the JSON document and status, or the mapped DeliveryError.

        With a ``deadline`` (reads only: they are safe to repeat) a 429 whose ``Retry-After``
        ends before it is slept through here instead of retrying the whole attempt.
        """
        headers = {
            "Authorization": f"Klaviyo-API-Key {self.api_key}",
            "revision": self.revision,
            "Accept": MEDIA_TYPE,
        }
        content = raw if raw is not None else (None if body is None else orjson.dumps(body))
        if content is not None:
            headers["Content-Type"] = MEDIA_TYPE
        while True:
            response = await self.request(
                method,
                self.base_url + target,
                what=what,
                params=params,
                content=content,
                headers=headers,
            )
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if response.status_code != 429 or deadline is None or retry_after is None:
                break
            if asyncio.get_running_loop().time() + retry_after > deadline:
                break
            await asyncio.sleep(retry_after)
        status = response.status_code
        if 200 <= status < 300:
            if status == 204 or not response.content:
                return {}, status
            try:
                document = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise PermanentError(
                    f"unexpected answer from Klaviyo ({what}): not JSON", status=status
                ) from None
            if not isinstance(document, dict):
                raise PermanentError(f"unexpected answer from Klaviyo ({what})", status=status)
            return document, status
        reason = f"Klaviyo HTTP {status} ({what}): {_error_detail(response)}"
        if status == 404 and list_call:
            raise _ListGone(reason)
        raise status_error(reason, status, response.headers)


def _resource_id(document: Mapping[str, Any], what: str) -> str:
    data = document.get("data")
    if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
        return str(data["id"])
    raise PermanentError(f"unexpected answer from Klaviyo ({what}): no data.id")


def _valid_revision(value: str) -> bool:
    match = _REVISION.fullmatch(value)
    if match is None:
        return False
    try:
        dt.date.fromisoformat(match.group(1))
    except ValueError:
        return False
    return True


__all__ = [
    "KlaviyoProvider",
    "encode_profiles",
    "job_bodies",
    "profile_attributes",
]

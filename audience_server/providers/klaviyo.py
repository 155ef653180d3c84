"""``klaviyo``: users upserted as Klaviyo profiles and added to a list by name.

Endpoints (base ``https://a.klaviyo.com``, JSON:API documents):

    GET    /api/lists?filter=equals(name,"…")&sort=created  find the list (links.next paged)
    POST   /api/lists                                       create it when there is none
    POST   /api/profile-bulk-import-jobs                    upsert profiles, add them to the list
    GET    /api/profile-bulk-import-jobs/{id}               poll until ``complete``
  primary only:
    GET    /api/lists/{id}/relationships/profiles           members, read from chunk 1 on
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
the members found in the list that no import job of this attempt touched are removed once the
last job is complete, so members that stay are never removed and re-added (list-triggered flows
do not fire again for them).

Reading a big list takes minutes (100 members a page, 75 pages a second and 700 a minute at
most: a million members is a quarter of an hour), so the read is not part of any chunk: it starts
with chunk 1 as a task of its own, runs while the chunks are imported, and is waited for only by
the last chunk. It has its own deadline, ``list_read_timeout``; it spaces its requests to the
endpoint's limits (``list_read_burst`` a second, ``list_read_steady`` a minute: lower them when
other apps share the account's quota); a 429 is waited out for its ``Retry-After`` and a 408,
5xx, timeout or connection error with exponential backoff, and the same page (the same cursor
from ``links.next``) is asked for again, as long as the deadline allows. The ids are streamed
into a private temporary SQLite database (on disk past SQLite's ~2 MB page cache, deleted when
the replace ends), so memory stays bounded. When the worker's chunk timeout
(``AUDIENCE_CHUNK_TIMEOUT``) ends an attempt while the read goes on, the read is not stopped: the
session's next attempt carries on with it instead of starting over (set the chunk timeout above
the read time to spare those attempts their repeated imports). The removals are repeated in
place like the reads (removing a non-member changes nothing), within a deadline of the same
length.

Errors: 429 (``Retry-After`` honoured), 408, 5xx, timeouts and connection errors are retried; a
404 on the remembered list forgets it and retries (the list is looked up again); any other 4xx
fails the delivery with Klaviyo's ``errors[0].detail`` (emails and phone numbers in it masked).

Options: ``api_key`` (secret), ``base_url``, ``revision`` (default 2026-07-15), ``chunk_size``
(default and most 10,000), ``timeout`` seconds per request (30), ``poll_interval`` seconds (1),
``job_timeout`` seconds per chunk (300; keep it under the worker's ``AUDIENCE_CHUNK_TIMEOUT``,
10 minutes by default — the worker keeps its lease alive meanwhile); for ``primary``,
``list_read_timeout`` seconds for reading the list's members (3600), ``list_read_burst``
requests a second (75) and ``list_read_steady`` a minute (700) for that read.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import sqlite3
from collections import deque
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import httpx2
import orjson

from .. import normalize
from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, DeliveryError, PermanentError, RetryableError, Segment
from .http import HttpAdapter, excerpt, parse_retry_after, retryable_status, status_error

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
# The list-members read, GET /api/lists/{id}/relationships/profiles: its x-klaviyo-ratelimit is
# burst 75/s, steady 750/m (klaviyo/openapi@1440f548 get_profile_ids_for_list.json); Klaviyo's
# rate-limit guide puts the "L" tier at 75/s and 700/m. The lower of the two is the default.
READ_BURST = 75  # per second
READ_STEADY = 700  # per minute
# Kept from this side with a margin over Klaviyo's 1 s and 60 s windows: requests reach it a
# little later than they leave, by a delay that varies.
BURST_SPAN = 1.05
STEADY_SPAN = 61.0
LIST_READ_TIMEOUT = 3600.0  # 10^6 members are 10^4 pages: 15 minutes at 700 a minute
BACKOFF_BASE = 0.25  # seconds before retrying a safe call in place, doubling ...
BACKOFF_CAP = 30.0  # ... up to this
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


class _Pace:
    """At most ``burst`` requests in any 1 s span and ``steady`` in any 60 s span (with the
    margins above), so neither of Klaviyo's fixed windows fills, however they are aligned."""

    def __init__(self, burst: int, steady: int) -> None:
        self.burst = burst
        self.steady = steady
        self._sent: deque[float] = deque()  # when the requests of the last minute left

    async def wait(self, deadline: float | None = None) -> bool:
        """Wait for the next request's turn; False (without waiting) if it comes after the
        deadline."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._sent and self._sent[0] <= now - STEADY_SPAN:
                self._sent.popleft()
            wait = 0.0
            if len(self._sent) >= self.steady:
                wait = self._sent[-self.steady] + STEADY_SPAN - now
            if len(self._sent) >= self.burst:
                wait = max(wait, self._sent[-self.burst] + BURST_SPAN - now)
            if wait <= 0:
                self._sent.append(now)  # no await since the check: no other caller slipped in
                return True
            if deadline is not None and now + wait > deadline:
                return False
            await asyncio.sleep(wait)


class _MemberRead:
    """The members a ``primary`` replace found in the list, and those its imports touched.

    Both sets are kept in a private temporary SQLite database (``sqlite3.connect("")``:
    SQLite keeps it in its page cache, about 2 MB, and spills the rest to a file in the
    temporary directory, deleted when it is closed), so memory stays bounded whatever the
    list's size. The read runs as its own task, page by page from ``links.next``; ``target``
    is the page to read next, so a page that fails is asked for again with the same cursor.
    It is not part of any chunk's call: a worker's chunk timeout that cuts an attempt short
    does not stop it, and the session's next attempt carries on with it.
    """

    def __init__(self, tenant: str, session_id: str, list_id: str, deadline: float) -> None:
        self.key = (tenant, session_id, list_id)
        self.list_id = list_id
        self.deadline = deadline
        self.target: str | None = (
            f"/api/lists/{list_id}/relationships/profiles?page%5Bsize%5D={PAGE_SIZE}"
        )
        self.pages = 0
        self.members = 0
        self.task: asyncio.Task[None] | None = None
        self.in_use = False  # its removals are under way: not to be closed under them
        self._db = sqlite3.connect("", isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE before (id TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE kept (id TEXT PRIMARY KEY) WITHOUT ROWID;"
        )

    def add_members(self, ids: Sequence[str]) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO before VALUES (?)", [(i,) for i in ids])
        self.members += len(ids)

    def keep(self, ids: Iterable[str]) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO kept VALUES (?)", [(i,) for i in ids])

    def new_attempt(self) -> None:
        """What an earlier attempt's imports touched does not count for this one."""
        self._db.execute("DELETE FROM kept")

    @property
    def found_empty(self) -> bool:
        """The read is over and the list had nobody: imports need not say whom they touched."""
        return self.target is None and self.members == 0

    @property
    def stale(self) -> bool:
        """Failed, or over and older than its deadline: not to be carried on, and closed."""
        task = self.task
        if self.in_use or task is None or not task.done():
            return False  # a read under way ends by itself at its deadline
        return self.failed or asyncio.get_running_loop().time() > self.deadline

    @property
    def failed(self) -> bool:
        task = self.task
        return task is not None and task.done() and (task.cancelled() or bool(task.exception()))

    async def finished(self) -> None:
        """Wait for the read (raising its error); waiting may be cancelled, the read is not."""
        assert self.task is not None
        await asyncio.shield(self.task)

    def removals(self, size: int) -> Generator[list[str], None, None]:
        """The members found and not kept, ``size`` at a time, streamed from the database."""
        cursor = self._db.execute(
            "SELECT id FROM before WHERE id NOT IN (SELECT id FROM kept) ORDER BY id"
        )
        try:
            while batch := cursor.fetchmany(size):
                yield [row[0] for row in batch]
        finally:
            cursor.close()

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)  # its error is retrieved
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


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
        list_read_timeout: float = LIST_READ_TIMEOUT,
        list_read_burst: int = READ_BURST,
        list_read_steady: int = READ_STEADY,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.revision = revision
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.list_read_timeout = list_read_timeout
        self._lists: dict[str, str] = {}  # list name -> id, learned once per name
        self._list_locks: dict[str, asyncio.Lock] = {}
        self._read_pace = _Pace(list_read_burst, list_read_steady)  # one quota per account
        self._reads: dict[tuple[str, str, str], _MemberRead] = {}  # (tenant, session, list)

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
            list_read_timeout=check.seconds(options, "list_read_timeout", LIST_READ_TIMEOUT),
            list_read_burst=check.positive_int(options, "list_read_burst", READ_BURST, 100_000),
            list_read_steady=check.positive_int(
                options, "list_read_steady", READ_STEADY, 1_000_000
            ),
        )

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        state = segment.state
        try:
            if chunk.index == 1 or "list_id" not in state:  # an attempt starts over
                await self._begin(segment)
            invalid, status = await self._import(segment, chunk)
            if segment.type == "primary" and chunk.last:
                await self._replace(state["read"])
        except _ListGone as exc:
            self._lists.pop(segment.segment_name, None)
            if (read := state.get("read")) is not None:
                await self._drop(read)
            raise RetryableError(f"{exc}; the list will be looked up again", status=404) from None
        except DeliveryError as exc:
            read = state.get("read")
            if read is not None and (read.failed or isinstance(exc, PermanentError)):
                await self._drop(read)  # a next attempt, if any, reads the list again
            raise
        return ChunkResult(invalid=invalid, status=status)

    async def _begin(self, segment: Segment) -> None:
        """Find or create the list; for ``primary``, start reading who is in it now (or carry
        on with the read an earlier attempt of this session started)."""
        list_id = await self._list_id(segment.segment_name)
        segment.state["list_id"] = list_id
        if segment.type == "primary":
            read = await self._member_read(segment.tenant, segment.session_id, list_id)
            read.new_attempt()
            segment.state["read"] = read

    async def _member_read(self, tenant: str, session_id: str, list_id: str) -> _MemberRead:
        for other in list(self._reads.values()):
            if other.stale:
                await self._drop(other)
        now = asyncio.get_running_loop().time()
        if (read := self._reads.get((tenant, session_id, list_id))) is not None:
            return read
        read = _MemberRead(tenant, session_id, list_id, now + self.list_read_timeout)
        read.task = asyncio.create_task(self._read_members(read))
        self._reads[read.key] = read
        return read

    async def _drop(self, read: _MemberRead) -> None:
        if self._reads.get(read.key) is read:
            del self._reads[read.key]
        await read.close()

    async def _read_members(self, read: _MemberRead) -> None:
        """Every page of the list's members into ``read``, within its own deadline, paced to
        the endpoint's rate limits; a throttled or failed page is asked for again, same cursor."""
        loop = asyncio.get_running_loop()
        while read.target is not None:
            if loop.time() > read.deadline:
                raise RetryableError(
                    "Klaviyo list read not done within list_read_timeout "
                    f"{self.list_read_timeout:g} s ({read.pages} pages read)"
                )
            document, _ = await self._call(
                "GET",
                read.target,
                "read list",
                list_call=True,
                deadline=read.deadline,
                patient=True,
                pace=self._read_pace,
            )
            data = document.get("data")
            if not isinstance(data, list):
                raise PermanentError("unexpected answer from Klaviyo (read list): no data list")
            ids = [item["id"] for item in data if isinstance(item, dict) and _is_id(item)]
            read.add_members(ids)
            read.pages += 1
            read.target = _next_target(document)

    async def _replace(self, read: _MemberRead) -> None:
        """Once the read is over, remove the members no import of this attempt touched."""
        await read.finished()
        path = f"/api/lists/{read.list_id}/relationships/profiles"
        deadline = asyncio.get_running_loop().time() + self.list_read_timeout
        read.in_use = True
        try:
            with contextlib.closing(read.removals(REMOVE_BATCH)) as batches:
                for batch in batches:
                    body = {"data": [{"type": "profile", "id": pid} for pid in batch]}
                    # Removing a non-member changes nothing: safe to repeat.
                    await self._call(
                        "DELETE",
                        path,
                        "remove from list",
                        body=body,
                        list_call=True,
                        deadline=deadline,
                        patient=True,
                    )
        finally:
            read.in_use = False
        await self._drop(read)

    async def aclose(self) -> None:
        for read in list(self._reads.values()):
            await self._drop(read)
        await super().aclose()

    async def _import(self, segment: Segment, chunk: Chunk) -> tuple[int, int | None]:
        """Import the chunk's profiles into the list, job by job; invalid users and status."""
        state = segment.state
        # Phone parsing takes a while for 10,000 users: off the event loop the other lanes share.
        profiles, invalid = await anyio.to_thread.run_sync(encode_profiles, chunk.users)
        status: int | None = None
        read: _MemberRead | None = state.get("read")
        deadline = self._deadline()
        for body in job_bodies(profiles, state["list_id"]):
            job_id, status = await self._start_import(body)
            invalid += await self._wait(job_id, deadline)
            if read is not None and not read.found_empty:  # primary: who stays in the list
                touched = await self._ids(
                    f"/api/profile-bulk-import-jobs/{job_id}/relationships/profiles",
                    "read import job profiles",
                    deadline,
                )
                read.keep(touched)
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
        """Every resource of a collection, following ``links.next``."""
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
            target = _next_target(document)
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
        patient: bool = False,
        pace: _Pace | None = None,
    ) -> tuple[dict[str, Any], int]:
        """One request; the JSON document and status, or the mapped DeliveryError.

        With a ``deadline`` (calls safe to repeat only) a 429 whose ``Retry-After`` ends before
        it is slept through here instead of retrying the whole attempt. ``patient`` calls also
        wait out (``Retry-After``, else exponential backoff) a 429 without one, a 408, a 5xx, a
        timeout or a failed connection, and ask again, while the deadline allows. ``pace``
        spaces the requests to an endpoint's rate limits.
        """
        headers = {
            "Authorization": f"Klaviyo-API-Key {self.api_key}",
            "revision": self.revision,
            "Accept": MEDIA_TYPE,
        }
        content = raw if raw is not None else (None if body is None else orjson.dumps(body))
        if content is not None:
            headers["Content-Type"] = MEDIA_TYPE
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            if pace is not None and not await pace.wait(deadline):
                raise RetryableError(
                    f"Klaviyo {what}: its rate limits leave no turn before its deadline"
                )
            try:
                response = await self.request(
                    method,
                    self.base_url + target,
                    what=what,
                    params=params,
                    content=content,
                    headers=headers,
                )
            except RetryableError:  # a timeout or a connection error
                wait: float | None = _backoff(tries) if patient else None
                if wait is None or deadline is None or loop.time() + wait > deadline:
                    raise
            else:
                code = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                wait = None
                if code == 429 and deadline is not None and retry_after is not None:
                    wait = retry_after
                elif patient and retryable_status(code):
                    wait = retry_after if retry_after is not None else _backoff(tries)
                if wait is None or deadline is None or loop.time() + wait > deadline:
                    break
            await asyncio.sleep(wait)
            tries += 1
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


def _next_target(document: Mapping[str, Any]) -> str | None:
    """The path and query of ``links.next`` (None on the last page). Only those are used,
    always against ``base_url``: the key goes nowhere else, and a proxy in ``base_url`` keeps
    working."""
    links = document.get("links") or {}
    following = links.get("next") if isinstance(links, dict) else None
    if not isinstance(following, str) or not following:
        return None
    parts = urlsplit(following)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _is_id(item: Mapping[str, Any]) -> bool:
    return isinstance(item.get("id"), str) and bool(item["id"])


def _backoff(tries: int) -> float:
    """Klaviyo's advice on 429 and 5xx: retry with exponential backoff."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0**tries)


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

"""A Python client for the upload and operator APIs: batches sent with retries, resumable.

Errors (every one an ``UploadError``)::

    UploadError
    ├── Rejected        the server refused a request with a 4xx (its message, the batch)
    ├── Unreachable     transient failures outlasted the retry policy; re-run to resume
    └── SessionFailed   the session ended inconsistent, expired, aborted, or undelivered

Transient failures (connection errors, timeouts, 429, 5xx) are retried with capped
exponential backoff; re-sending a batch the server already has is harmless.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO, Any

import httpx2
import orjson

from .retry import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_BATCH_SIZE = 10_000
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
ENDED_STATES = frozenset({"delivered", "partially_delivered", "failed", "aborted"})
REFUSED_STATES = frozenset({"inconsistent", "expired", "aborted"})

Users = list[dict[str, Any]]
OnBatch = Callable[[int, int], None]  # (sequence, users) once the server acknowledged it


class UploadError(Exception):
    """Something stopped the upload; ``str()`` is the message for the operator."""


class Rejected(UploadError):
    """The server answered a 4xx other than 429: retrying the same request cannot help."""

    def __init__(self, status: int, messages: list[str], sequence: int | None = None) -> None:
        self.status = status
        self.messages = messages
        self.sequence = sequence
        where = f"batch {sequence}" if sequence is not None else "the request"
        super().__init__(f"server refused {where} with {status}: {' '.join(messages)}")


class Unreachable(UploadError):
    """Transient failures outlasted the retry policy; the upload can be resumed."""


class SessionFailed(UploadError):
    """Every batch was acknowledged but the session did not end as it should."""


def new_session_id() -> str:
    """A fresh id: the time (as EdgeTag clients use) and randomness against collisions."""
    return f"{int(time.time())}-{secrets.token_hex(4)}"


def batch_count(total_users: int, batch_size: int) -> int:
    return max(1, -(-total_users // batch_size))


def _messages(response: httpx2.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return [response.text.strip() or response.reason_phrase]
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [str(message) for message in body["errors"]]
    return [response.text.strip()]


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Batch:
    """One request's worth of a session: ``users`` already encoded as a JSON array."""

    sequence: int
    users: int
    users_json: bytes


@dataclass
class UploadResult:
    """What an upload achieved: the session's status as the server last reported it."""

    session_id: str
    total_users: int
    total_batches: int
    sent_batches: int = 0
    skipped_batches: int = 0
    status: dict[str, Any] = field(default_factory=dict)


class AudienceClient:
    """The HTTP API of one server. Thread-safe: batches may be sent from several threads."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 300.0,
        transport: httpx2.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry or RetryPolicy(base=0.5, cap=30.0, max_attempts=10)
        self.sleep = sleep
        self.http = httpx2.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> AudienceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(
        self, method: str, path: str, *, sequence: int | None = None, **kwargs: Any
    ) -> httpx2.Response:
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx2.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    return response
                problem = f"{response.status_code} {' '.join(_messages(response))}"
                retry_after = _retry_after(response)
            if not self.retry.allows_another(attempt):
                where = f"batch {sequence}" if sequence is not None else f"{method} {path}"
                raise Unreachable(f"{where} failed {attempt} times; last: {problem}")
            self.sleep(self.retry.delay(attempt, retry_after))

    def send_batch(
        self,
        *,
        name: str,
        type: str,
        session_id: str,
        total_batches: int,
        total_users: int,
        batch: Batch,
        sync: bool = False,
        disable_prefix: bool = False,
    ) -> None:
        """POST /audience with EdgeTag's form fields; returns once the batch is committed."""
        meta = {
            "sessionId": session_id,
            "sequence": batch.sequence,
            "totalBatches": total_batches,
            "totalUsers": total_users,
        }
        files: dict[str, tuple[None, str | bytes]] = {
            "name": (None, name),
            "type": (None, type),
            "batch": (None, orjson.dumps(meta)),
            "users": (None, batch.users_json),
        }
        params = {"sync": str(sync).lower(), "disablePrefix": str(disable_prefix).lower()}
        response = self._request(
            "POST", "/audience", sequence=batch.sequence, files=files, params=params
        )
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response), batch.sequence)

    def status(self, session_id: str) -> dict[str, Any] | None:
        """GET /audience/sessions/{id}; None when the server has no such session."""
        response = self._request("GET", f"/audience/sessions/{session_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

    def sessions(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of GET /audience/sessions: ``{"sessions": [...], "nextCursor": ...}``."""
        params = {"limit": str(limit)}
        params.update(
            {k: v for k, v in (("state", state), ("name", name), ("cursor", cursor)) if v}
        )
        response = self._request("GET", "/audience/sessions", params=params)
        if response.status_code != 200:
            raise Rejected(response.status_code, _messages(response))
        body: dict[str, Any] = response.json()
        return body

    def wait(self, session_id: str, timeout: float, poll: float = 0.5) -> dict[str, Any]:
        """Poll the session until its deliveries have ended, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(session_id)
            if status is None:
                raise SessionFailed(f"session {session_id} does not exist on the server.")
            if status["state"] in ENDED_STATES | REFUSED_STATES or time.monotonic() > deadline:
                return status
            self.sleep(poll)

    def send_batches(
        self,
        batches: Iterable[Batch],
        *,
        name: str,
        type: str,
        session_id: str,
        total_batches: int,
        total_users: int,
        concurrency: int = 1,
        sync: bool = False,
        disable_prefix: bool = False,
        on_batch: OnBatch | None = None,
    ) -> int:
        """Send every batch, at most ``concurrency`` at once; returns how many were sent.
        Only a bounded window of batches is in memory, whatever the segment's size."""

        def send(batch: Batch) -> Batch:
            self.send_batch(
                name=name,
                type=type,
                session_id=session_id,
                total_batches=total_batches,
                total_users=total_users,
                batch=batch,
                sync=sync,
                disable_prefix=disable_prefix,
            )
            return batch

        sent = 0
        pending: set[Future[Batch]] = set()

        def collect(done: Iterable[Future[Batch]]) -> None:
            nonlocal sent
            for future in done:
                batch = future.result()  # raises the batch's error
                sent += 1
                if on_batch is not None:
                    on_batch(batch.sequence, batch.users)

        pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="upload")
        try:
            for batch in batches:
                while len(pending) >= max(1, concurrency):
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(done)
                pending.add(pool.submit(send, batch))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sent


def make_batches(
    users: Iterable[dict[str, Any]], batch_size: int, wanted: Collection[int] | None = None
) -> Iterator[Batch]:
    """Split users into batches numbered from 1; only the ``wanted`` sequences are encoded."""
    sequence = 0
    chunk: Users = []
    for user in users:
        chunk.append(user)
        if len(chunk) == batch_size:
            sequence += 1
            if wanted is None or sequence in wanted:
                yield Batch(sequence, len(chunk), orjson.dumps(chunk))
            chunk = []
    if chunk:
        sequence += 1
        if wanted is None or sequence in wanted:
            yield Batch(sequence, len(chunk), orjson.dumps(chunk))


def missing_of(status: dict[str, Any] | None, total_batches: int) -> set[int]:
    """The sequences the server still needs (all of them for a session it does not know)."""
    if status is None:
        return set(range(1, total_batches + 1))
    if status["state"] in REFUSED_STATES:
        reason = f": {status['reason']}" if status.get("reason") else ""
        raise SessionFailed(f"session {status['sessionId']} is {status['state']}{reason}")
    if status["state"] != "receiving":
        return set()
    if status["totalBatches"] != total_batches or status.get("sequenceBase") == 0:
        raise SessionFailed(
            f"session {status['sessionId']} on the server has {status['totalBatches']} batches "
            f"(base {status.get('sequenceBase')}), this upload {total_batches} from 1."
        )
    return {int(sequence) for sequence in status["missingSequences"]}


def upload_session(
    client: AudienceClient,
    open_users: Callable[[], Iterable[dict[str, Any]]],
    *,
    name: str,
    total_users: int,
    session_id: str,
    type: str = "custom",
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = 1,
    sync: bool = False,
    disable_prefix: bool = False,
    on_batch: OnBatch | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> UploadResult:
    """Send what the server is missing of a session, then confirm it is complete.
    ``open_users`` is called once per pass over the users (a resume may need two)."""
    if total_users < 1:
        raise UploadError("there are no users to upload.")
    total_batches = batch_count(total_users, batch_size)
    result = UploadResult(session_id, total_users, total_batches)
    for _ in range(3):  # a second round only if the server still misses something
        missing = missing_of(client.status(session_id), total_batches)
        if on_plan is not None:
            on_plan(total_batches - len(missing), len(missing))
        if not missing:
            break
        if len(missing) < total_batches:
            result.skipped_batches = total_batches - len(missing)
        result.sent_batches += client.send_batches(
            make_batches(open_users(), batch_size, missing),
            name=name,
            type=type,
            session_id=session_id,
            total_batches=total_batches,
            total_users=total_users,
            concurrency=concurrency,
            sync=sync,
            disable_prefix=disable_prefix,
            on_batch=on_batch,
        )
    status = client.status(session_id)
    if status is None or status["state"] == "receiving":
        raise SessionFailed(f"session {session_id} is still missing batches after the upload.")
    if status["state"] in REFUSED_STATES:
        missing_of(status, total_batches)  # raises with the reason
    result.status = status
    return result


def _spool(users: Iterable[dict[str, Any]], file: IO[bytes]) -> int:
    count = 0
    for user in users:
        file.write(orjson.dumps(user) + b"\n")
        count += 1
    file.flush()
    return count


def upload(
    users: Iterable[dict[str, Any]],
    *,
    name: str,
    type: str = "custom",
    url: str = DEFAULT_URL,
    api_key: str | None = None,
    session_id: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = 1,
    sync: bool = False,
    disable_prefix: bool = False,
    retry: RetryPolicy | None = None,
    on_batch: OnBatch | None = None,
) -> UploadResult:
    """Upload users as one session. A list is sent as is; any other iterable is spooled to a
    temporary file first (its count must be known before the first batch), so a generator
    of any length uses little memory. Pass the same ``session_id`` again to resume."""
    session_id = session_id or new_session_id()
    with AudienceClient(url, api_key=api_key, retry=retry) as client:
        options: dict[str, Any] = {
            "name": name,
            "type": type,
            "session_id": session_id,
            "batch_size": batch_size,
            "concurrency": concurrency,
            "sync": sync,
            "disable_prefix": disable_prefix,
            "on_batch": on_batch,
        }
        if isinstance(users, list | tuple):
            listed = users
            return upload_session(client, lambda: listed, total_users=len(listed), **options)
        with tempfile.TemporaryFile() as spool:
            total = _spool(users, spool)

            def reread() -> Iterator[dict[str, Any]]:
                spool.seek(0)
                for line in spool:
                    yield orjson.loads(line)

            return upload_session(client, reread, total_users=total, **options)


def status(
    session_id: str, *, url: str = DEFAULT_URL, api_key: str | None = None
) -> dict[str, Any] | None:
    """The session as GET /audience/sessions/{id} shows it; None when it does not exist."""
    with AudienceClient(url, api_key=api_key) as client:
        return client.status(session_id)

"""Uploading users as one session: batching, asking the server what it still misses, sending
that with some concurrency, keeping the resume state and progress current, and waiting.

    upload(users, ...)            the Python entry: a list as it is, any other iterable spooled
    upload_source(client, ...)    a file or a spooled stream: count, resume state, then
      upload_session(...)         what the server misses, sent, until the session is complete
    wait(client, ...)             poll until nothing more will happen to the session, or
                                  until the server has made no progress for a while
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as first_done
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from .. import states
from ..retry import RetryPolicy
from ..states import SessionState
from .errors import InputError, SessionFailed
from .http import DEFAULT_URL, AudienceClient, Batch
from .progress import Progress, progress_key
from .readers import Source, detect_format, fingerprint, read_users
from .spool import ndjson_of, spool
from .state import State, resumed, save_state

DEFAULT_BATCH_SIZE = 10_000
NO_USERS = "the input holds no users."

OnBatch = Callable[[int, int], None]  # (sequence, users) once the server acknowledged it
OnPlan = Callable[[int, int], None]  # (batches the server has, batches it misses)
OnProgress = Callable[[dict[str, Any]], None]  # a session status that differs from the last


@dataclass(frozen=True)
class Plan:
    """What one upload was asked to do."""

    name: str
    type: str = "custom"
    batch_size: int = DEFAULT_BATCH_SIZE
    session_id: str | None = None
    concurrency: int = 1
    sync: bool = False
    disable_prefix: bool = False


@dataclass
class UploadResult:
    """What an upload achieved: the session's status as the server last reported it."""

    session_id: str
    total_users: int
    total_batches: int
    sent_batches: int = 0
    skipped_batches: int = 0
    status: dict[str, Any] = field(default_factory=dict)


def new_session_id() -> str:
    """A fresh id: the time (as EdgeTag clients use) and randomness against collisions."""
    return f"{int(time.time())}-{secrets.token_hex(4)}"


def batch_count(total_users: int, batch_size: int) -> int:
    """How many batches of ``batch_size`` hold ``total_users`` (one at least)."""
    return max(1, -(-total_users // batch_size))


def make_batches(
    users: Iterable[dict[str, Any]], batch_size: int, wanted: Collection[int] | None = None
) -> Iterator[Batch]:
    """Split users into batches numbered from 1; only the ``wanted`` sequences are encoded."""
    sequence = 0
    chunk: list[dict[str, Any]] = []
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
    if status["state"] in states.REFUSING:
        reason = f": {status['reason']}" if status.get("reason") else ""
        raise SessionFailed(f"session {status['sessionId']} is {status['state']}{reason}")
    if status["state"] != SessionState.RECEIVING:
        return set()
    if status["totalBatches"] != total_batches or status.get("sequenceBase") == 0:
        raise SessionFailed(
            f"session {status['sessionId']} on the server has {status['totalBatches']} batches "
            f"(base {status.get('sequenceBase')}), this upload {total_batches} from 1."
        )
    return {int(sequence) for sequence in status["missingSequences"]}


def send_batches(
    client: AudienceClient,
    batches: Iterable[Batch],
    plan: Plan,
    *,
    session_id: str,
    total_batches: int,
    total_users: int,
    on_batch: OnBatch | None = None,
) -> int:
    """Send every batch, at most ``plan.concurrency`` at once; returns how many were sent.
    Only a bounded window of batches is in memory, whatever the segment's size."""
    concurrency = max(1, plan.concurrency)

    def send(batch: Batch) -> Batch:
        client.send_batch(
            name=plan.name,
            type=plan.type,
            session_id=session_id,
            total_batches=total_batches,
            total_users=total_users,
            batch=batch,
            sync=plan.sync,
            disable_prefix=plan.disable_prefix,
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

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="upload")
    try:
        for batch in batches:
            while len(pending) >= concurrency:
                done, pending = first_done(pending, return_when=FIRST_COMPLETED)
                collect(done)
            pending.add(pool.submit(send, batch))
        while pending:
            done, pending = first_done(pending, return_when=FIRST_COMPLETED)
            collect(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sent


def upload_session(
    client: AudienceClient,
    open_users: Callable[[], Iterable[dict[str, Any]]],
    plan: Plan,
    *,
    session_id: str,
    total_users: int,
    on_batch: OnBatch | None = None,
    on_plan: OnPlan | None = None,
) -> UploadResult:
    """Send what the server is missing of a session, then confirm it is complete.
    ``open_users`` is called once per pass over the users (a resume may need two)."""
    if total_users < 1:
        raise InputError(NO_USERS)
    total_batches = batch_count(total_users, plan.batch_size)
    result = UploadResult(session_id, total_users, total_batches)
    for _ in range(3):  # a second round only if the server still misses something
        missing = missing_of(client.status(session_id), total_batches)
        if on_plan is not None:
            on_plan(total_batches - len(missing), len(missing))
        if not missing:
            break
        if len(missing) < total_batches:
            result.skipped_batches = total_batches - len(missing)
        result.sent_batches += send_batches(
            client,
            make_batches(open_users(), plan.batch_size, missing),
            plan,
            session_id=session_id,
            total_batches=total_batches,
            total_users=total_users,
            on_batch=on_batch,
        )
    status = client.status(session_id)
    if status is None or status["state"] == SessionState.RECEIVING:
        raise SessionFailed(f"session {session_id} is still missing batches after the upload.")
    if status["state"] in states.REFUSING:
        missing_of(status, total_batches)  # raises with the reason
    result.status = status
    return result


def upload_source(
    client: AudienceClient,
    source: Source,
    plan: Plan,
    *,
    fmt: str | None = None,
    state_path: Path | None = None,
    progress_stream: TextIO | None = None,
    progress_interval: float = 5.0,
    on_batch: OnBatch | None = None,
) -> UploadResult:
    """Count, then send what the server misses of the session, keeping ``state_path`` current
    and showing progress on ``progress_stream`` (none without one)."""
    fmt = fmt or detect_format(source)
    found = fingerprint(source, fmt)
    if found.users == 0:
        raise InputError(NO_USERS)
    state = None
    if state_path is not None:
        asked = (plan.name, plan.type, plan.batch_size)
        state = resumed(state_path, found, asked, plan.session_id)
    if state is None:
        state = State(
            session_id=plan.session_id or new_session_id(),
            name=plan.name,
            type=plan.type,
            batch_size=plan.batch_size,
            total_users=found.users,
            total_batches=batch_count(found.users, plan.batch_size),
            input_size=found.size,
            input_sha256=found.sha256,
        )

    def keep() -> None:
        if state_path is not None:
            save_state(state_path, state)

    keep()
    progress = None
    if progress_stream is not None:
        progress = Progress(
            state.total_users, state.total_batches, progress_stream, interval=progress_interval
        )
    done = 0  # batches the server has, from before this run or acknowledged in it
    last_saved = time.monotonic()

    def planned(have: int, missing: int) -> None:
        nonlocal done
        if have and not done:
            done = have
            if progress is not None:
                # Roughly: every missing batch is full but perhaps the last.
                users_missing = min(state.total_users, missing * state.batch_size)
                progress.skip(have, state.total_users - users_missing)
                print(
                    f"resuming session {state.session_id}: the server has {have} of "
                    f"{state.total_batches} batches",
                    file=progress.stream,
                )

    def acknowledged(sequence: int, users: int) -> None:
        nonlocal done, last_saved
        done += 1
        state.acknowledged = done
        if progress is not None:
            progress.advance(users)
        if on_batch is not None:
            on_batch(sequence, users)
        if time.monotonic() - last_saved > 1.0:
            keep()
            last_saved = time.monotonic()

    try:
        result = upload_session(
            client,
            lambda: read_users(source, fmt),
            plan,
            session_id=state.session_id,
            total_users=state.total_users,
            on_batch=acknowledged,
            on_plan=planned,
        )
    finally:
        if progress is not None:
            progress.close()
        keep()
    state.finished = True
    state.acknowledged = state.total_batches
    keep()
    return result


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
    plan = Plan(name, type, batch_size, session_id, concurrency, sync, disable_prefix)
    with AudienceClient(url, api_key=api_key, retry=retry) as client:
        if isinstance(users, list | tuple):
            listed = users
            return upload_session(
                client,
                lambda: listed,
                plan,
                session_id=session_id or new_session_id(),
                total_users=len(listed),
                on_batch=on_batch,
            )
        with spool(ndjson_of(users)) as spooled:
            return upload_source(client, spooled, plan, fmt="ndjson", on_batch=on_batch)


def status(
    session_id: str, *, url: str = DEFAULT_URL, api_key: str | None = None
) -> dict[str, Any] | None:
    """The session as GET /audience/sessions/{id} shows it; None when it does not exist."""
    with AudienceClient(url, api_key=api_key) as client:
        return client.status(session_id)


def wait(
    client: AudienceClient,
    session_id: str,
    timeout: float,
    poll: float = 0.5,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Poll the session until nothing more will happen to it by itself, or until the server
    has made no progress (``progress.progress_key``) for ``timeout`` seconds: a segment
    that takes an hour to assemble is still waited for. Returns the last status read
    (still going on when it gave up); ``on_progress`` is given each status that changed."""
    seen: Hashable = None
    changed_at = clock()
    while True:
        found = client.status(session_id)
        if found is None:
            raise SessionFailed(f"session {session_id} does not exist on the server.")
        key = progress_key(found)
        if key != seen:
            seen, changed_at = key, clock()
            if on_progress is not None:
                on_progress(found)
        if found["state"] in states.ENDED | states.REFUSING or clock() - changed_at >= timeout:
            return found
        client.sleep(poll)

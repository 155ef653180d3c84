"""Uploading a file: reading CSV / NDJSON / JSON users as a stream, the resume state kept
beside the input, and the progress shown while batches go out.

A file is read twice (count and digest, then send), never held in memory; stdin is spooled
to a temporary file first. The state file ties a session id to the input's digest, so a
re-run resumes the same session and refuses one onto a changed file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TextIO

import orjson

from .client import AudienceClient, UploadResult, batch_count, new_session_id, upload_session

FORMATS = ("csv", "ndjson", "json")
STATE_VERSION = 1
_CHUNK = 1 << 20


class InputError(Exception):
    """The input cannot be read as users, or does not match its resume state."""


# --- reading users ------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A binary file that digests every byte read through it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Digest the rest of the file, past what the parser needed."""
        while data := self.file.read(_CHUNK):
            self.digest.update(data)
            self.size += len(data)

    def readinto(self, buffer: Any) -> int:
        data = self.file.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        return len(data)


Source = Path | IO[bytes]  # a file by name, or a seekable file of no name (spooled stdin)


def detect_format(source: Source) -> str:
    """By extension, else by the first non-blank byte: ``[`` JSON, ``{`` NDJSON, else CSV."""
    suffix = source.suffix.lower() if isinstance(source, Path) else ""
    if suffix == ".csv":
        return "csv"
    if suffix in (".ndjson", ".jsonl"):
        return "ndjson"
    if suffix == ".json":
        return "json"
    with _opened(source) as raw:
        head = raw.file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "ndjson"
    return "csv"


def _csv_users(text: TextIO) -> Iterator[dict[str, Any]]:
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    columns = [column.strip() for column in header]
    if not all(columns) or len(set(columns)) != len(columns):
        raise InputError("the CSV header must name every column once.")
    for row in reader:
        if len(row) > len(columns):
            raise InputError(f"CSV line {reader.line_num} has more cells than the header.")
        user = {column: value for column, value in zip(columns, row, strict=False) if value != ""}
        if user:  # a row of empty cells is not a user
            yield user


def _ndjson_users(binary: IO[bytes]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(binary, 1):
        if not line.strip():
            continue
        try:
            user = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InputError(f"NDJSON line {number} is not JSON.") from None
        if not isinstance(user, dict):
            raise InputError(f"NDJSON line {number} is not a JSON object.")
        yield user


def _json_array_users(text: TextIO) -> Iterator[dict[str, Any]]:
    """The elements of a top-level JSON array, decoded one at a time from a sliding buffer."""
    decoder = json.JSONDecoder()
    buffer, eof, position, index = "", False, 0, 0

    def fill() -> bool:
        nonlocal buffer, position, eof
        chunk = text.read(_CHUNK)
        buffer, position = buffer[position:] + chunk, 0
        eof = not chunk
        return bool(chunk)

    def skip_blank() -> str:
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n":
                position += 1
            if position < len(buffer) or not fill():
                return buffer[position : position + 1]

    if skip_blank() != "[":
        raise InputError("a JSON input must be an array of user objects.")
    position += 1
    expect_value = True
    if skip_blank() == "]":
        return
    while True:
        if not expect_value:
            char = skip_blank()
            if char == "]":
                return
            if char != ",":
                raise InputError(f"JSON array is broken after element {index}.")
            position += 1
            skip_blank()
        while True:
            try:
                value, end = decoder.raw_decode(buffer, position)
                break
            except json.JSONDecodeError:
                if eof or not fill():
                    raise InputError(f"JSON array element {index} is not valid JSON.") from None
        if not isinstance(value, dict):
            raise InputError(f"JSON array element {index} is not an object.")
        position, index, expect_value = end, index + 1, False
        yield value


@contextmanager
def _opened(source: Source) -> Iterator[_HashingReader]:
    """The source from its first byte; a file passed open stays open for the next pass."""
    if isinstance(source, Path):
        with source.open("rb") as file:
            yield _HashingReader(file)
    else:
        source.seek(0)
        yield _HashingReader(source)


def _users_of(raw: _HashingReader, fmt: str) -> Iterator[dict[str, Any]]:
    binary = io.BufferedReader(raw, _CHUNK)
    if fmt == "ndjson":
        yield from _ndjson_users(binary)
        return
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    try:
        yield from _csv_users(text) if fmt == "csv" else _json_array_users(text)
    except UnicodeDecodeError:
        raise InputError("the input is not UTF-8 text.") from None


def read_users(source: Source, fmt: str) -> Iterator[dict[str, Any]]:
    """Every user of the file, in order, streamed."""
    with _opened(source) as raw:
        yield from _users_of(raw, fmt)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies an input: its size, its digest, and how many users it holds."""

    size: int
    sha256: str
    users: int


def fingerprint(source: Source, fmt: str) -> Fingerprint:
    """The counting pass: parse every user (so errors show before anything is sent)."""
    with _opened(source) as raw:
        users = sum(1 for _ in _users_of(raw, fmt))
        raw.drain()
        return Fingerprint(raw.size, raw.digest.hexdigest(), users)


def spool_stdin(stream: IO[bytes], directory: str | None = None) -> IO[bytes]:
    """Copy stdin to a temporary file so it can be read twice. The file has no name (it is
    gone once closed, or once the process dies, however it dies); the caller closes it."""
    file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (handed to the caller)
    try:
        shutil.copyfileobj(stream, file, _CHUNK)
    except BaseException:
        file.close()
        raise
    return file


# --- resume state ---------------------------------------------------------------------------


@dataclass
class State:
    """The resume state: which session this input goes to, and how far it got."""

    session_id: str
    name: str
    type: str
    batch_size: int
    total_users: int
    total_batches: int
    input_size: int
    input_sha256: str
    acknowledged: int = 0
    finished: bool = False
    version: int = STATE_VERSION


def default_state_path(path: Path) -> Path:
    return path.with_name(path.name + ".upload-state.json")


def load_state(path: Path) -> State | None:
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != STATE_VERSION:
            raise InputError(f"state file {path} is of another version; remove it to start anew.")
        return State(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, AttributeError):
        raise InputError(f"state file {path} is unreadable; remove it to start anew.") from None


def save_state(path: Path, state: State) -> None:
    """Atomically: a crash mid-write leaves the previous state."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(partial, path)


# --- progress -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A bar redrawn in place on a terminal; plain lines every ``interval`` s otherwise."""

    def __init__(
        self,
        total_users: int,
        total_batches: int,
        stream: TextIO = sys.stderr,
        *,
        tty: bool | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_users = total_users
        self.total_batches = total_batches
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = 0.1 if self.tty else interval
        self.users = 0
        self.batches = 0
        self.sent_users = 0  # only what this run sent: the rate ignores skipped batches
        self.clock = clock
        self.started = clock()
        # Never shown yet: the first line is due at once, whatever the clock reads (monotonic
        # time starts near zero on a machine booted a minute ago).
        self.shown = -math.inf

    def skip(self, batches: int, users: int) -> None:
        """Batches the server already had, counted as done."""
        self.batches += batches
        self.users += users

    def advance(self, users: int) -> None:
        self.batches += 1
        self.users += users
        self.sent_users += users
        now = self.clock()
        if now - self.shown >= self.interval or self.batches == self.total_batches:
            self.shown = now
            self.show()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = self.sent_users / elapsed
        left = self.total_users - self.users
        eta = _duration(left / rate) if rate > 0 else "?"
        share = self.users / self.total_users if self.total_users else 1.0
        return (
            f"{share:6.1%} users {self.users:,}/{self.total_users:,} "
            f"batches {self.batches:,}/{self.total_batches:,} "
            f"{rate:,.0f} users/s elapsed {_duration(elapsed)} eta {eta}"
        )

    def show(self) -> None:
        if self.tty:
            width = 24
            filled = int(width * self.users / self.total_users) if self.total_users else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {self.line()}\x1b[K")
        else:
            self.stream.write(f"progress {self.line()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.batches:
            self.stream.write("\n")
            self.stream.flush()


# --- the upload command ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one ``upload`` run was asked to do."""

    name: str
    type: str = "custom"
    batch_size: int = 10_000
    session_id: str | None = None
    concurrency: int = 1
    sync: bool = False
    disable_prefix: bool = False


def resolve_session(plan: Plan, state_path: Path | None, found: Fingerprint) -> State:
    """The state of this run: resumed from ``state_path`` when it matches the input, else new;
    refused when the state file belongs to other input or options."""
    previous = load_state(state_path) if state_path is not None else None
    total_batches = batch_count(found.users, plan.batch_size)
    if previous is not None:
        if (previous.input_size, previous.input_sha256) != (found.size, found.sha256):
            raise InputError(
                f"the input changed since session {previous.session_id} started "
                f"(state file {state_path}); remove the state file to upload it as a new session."
            )
        ours = (plan.name.strip(), plan.type, plan.batch_size)
        theirs = (previous.name.strip(), previous.type, previous.batch_size)
        if ours != theirs:
            raise InputError(
                f"state file {state_path} is for session {previous.session_id} with name, type "
                f"and batch size {theirs}; this run asks for {ours}. Remove it to start anew."
            )
        if plan.session_id is not None and plan.session_id != previous.session_id:
            raise InputError(
                f"state file {state_path} is for session {previous.session_id}, "
                f"not {plan.session_id}; remove it to start anew."
            )
        return previous
    state = State(
        session_id=plan.session_id or new_session_id(),
        name=plan.name,
        type=plan.type,
        batch_size=plan.batch_size,
        total_users=found.users,
        total_batches=total_batches,
        input_size=found.size,
        input_sha256=found.sha256,
    )
    return state


def upload_file(
    client: AudienceClient,
    path: Source,
    plan: Plan,
    *,
    fmt: str | None = None,
    state_path: Path | None = None,
    progress_stream: TextIO = sys.stderr,
    progress_interval: float = 5.0,
) -> UploadResult:
    """Count, then send what the server misses of the session, keeping ``state_path`` current."""
    fmt = fmt or detect_format(path)
    found = fingerprint(path, fmt)
    if found.users == 0:
        raise InputError("the input holds no users.")
    state = resolve_session(plan, state_path, found)
    if state_path is not None:
        save_state(state_path, state)
    progress = Progress(
        state.total_users, state.total_batches, progress_stream, interval=progress_interval
    )
    last_saved = time.monotonic()

    def planned(have: int, missing: int) -> None:
        if have and not progress.batches:
            users_had = state.total_users - _users_in(missing, state)
            progress.skip(have, users_had)
            print(
                f"resuming session {state.session_id}: the server has {have} of "
                f"{state.total_batches} batches",
                file=progress_stream,
            )

    def acknowledged(sequence: int, users: int) -> None:
        nonlocal last_saved
        progress.advance(users)
        state.acknowledged = progress.batches
        if state_path is not None and time.monotonic() - last_saved > 1.0:
            save_state(state_path, state)
            last_saved = time.monotonic()

    try:
        result = upload_session(
            client,
            lambda: read_users(path, fmt),
            name=plan.name,
            type=plan.type,
            total_users=state.total_users,
            session_id=state.session_id,
            batch_size=state.batch_size,
            concurrency=plan.concurrency,
            sync=plan.sync,
            disable_prefix=plan.disable_prefix,
            on_batch=acknowledged,
            on_plan=planned,
        )
    finally:
        progress.close()
        if state_path is not None:
            save_state(state_path, state)
    state.finished = True
    state.acknowledged = state.total_batches
    if state_path is not None:
        save_state(state_path, state)
    return result


def _users_in(missing_batches: int, state: State) -> int:
    """Roughly how many users the missing batches hold (all full but perhaps the last)."""
    return min(state.total_users, missing_batches * state.batch_size)

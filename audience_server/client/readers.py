"""Reading users from CSV, NDJSON or a JSON array as a stream, and the counting pass.

A source is read twice (count and digest, then send), never held in memory: a file by
name, or a seekable file of no name (see ``spool.py``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

import ijson  # type: ignore[import-untyped]
import orjson

from .errors import InputError

FORMATS = ("csv", "ndjson", "json")
_CHUNK = 1 << 20
_BLANK = (b" ", b"\t", b"\r", b"\n")

Source = Path | IO[bytes]  # a file by name, or a seekable file of no name (spooled stdin)


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
        head = raw.file.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
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


def _json_array_users(binary: io.BufferedReader[Any]) -> Iterator[dict[str, Any]]:
    """The elements of a top-level JSON array, parsed one at a time by ijson."""
    if binary.peek(len(codecs.BOM_UTF8)).startswith(codecs.BOM_UTF8):
        binary.read(len(codecs.BOM_UTF8))  # the parser takes JSON's UTF-8, not a BOM before it
    while (head := binary.peek(1)[:1]) in _BLANK:
        binary.read(1)
    if head != b"[":  # ijson would find no "item" in an object or a scalar, and say nothing
        raise InputError("a JSON input must be an array of user objects.")
    index = 0
    try:
        # Floats, not Decimals: the batches are encoded by orjson, as from any other format.
        for value in ijson.items(binary, "item", use_float=True, buf_size=_CHUNK):
            if not isinstance(value, dict):
                raise InputError(f"JSON array element {index} is not an object.")
            yield value
            index += 1
    except ijson.JSONError:
        # The parser's message quotes the input around the error: it may hold a user's data.
        raise InputError(f"JSON array element {index} is not valid JSON.") from None


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
    if fmt == "json":
        yield from _json_array_users(binary)
        return
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    try:
        yield from _csv_users(text)
    except UnicodeDecodeError:
        raise InputError("the input is not UTF-8 text.") from None


def read_users(source: Source, fmt: str) -> Iterator[dict[str, Any]]:
    """Every user of the source, in order, streamed."""
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

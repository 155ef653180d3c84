"""Input that can be read only once (stdin, a generator of users) copied to a temporary file,
so the readers can read it twice: once to count and digest, once to send.

The file has no name: it is gone once closed, or once the process dies, however it dies.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from functools import partial
from typing import IO, Any

import orjson

_CHUNK = 1 << 20


def spool(chunks: Iterable[bytes], directory: str | None = None) -> IO[bytes]:
    """Write every chunk to a nameless temporary file and hand it over; the caller closes it."""
    file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (handed to the caller)
    try:
        for chunk in chunks:
            file.write(chunk)
        file.flush()
    except BaseException:
        file.close()
        raise
    return file


def chunks_of(stream: IO[bytes]) -> Iterator[bytes]:
    """A binary stream in pieces of bounded size (never by lines: one may be the whole file)."""
    return iter(partial(stream.read, _CHUNK), b"")


def ndjson_of(users: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """Users as NDJSON lines, which ``readers`` reads back as the ``ndjson`` format."""
    return (orjson.dumps(user, option=orjson.OPT_APPEND_NEWLINE) for user in users)

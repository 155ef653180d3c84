"""``file``: one NDJSON file per (session, destination), one user object per line exactly as
received (duplicates removed), written to a temporary name and renamed when whole — a crash
never leaves a partial file under the final name.

Options: ``dir`` (default ``./deliveries/<destination id>``), ``chunk_size`` (default
10,000). The file is ``<dir>/<sessionId>.ndjson`` (``<dir>/<tenant>/…`` for a tenant other
than ``default``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import anyio.to_thread

from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, PermanentError, Segment


class FileProvider:
    def __init__(self, directory: Path, chunk_size: int) -> None:
        self.directory = directory
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: DestinationConfig) -> FileProvider:
        raw = config.options.get("dir", f"./deliveries/{config.id}")
        if not isinstance(raw, str) or not raw:
            raise OptionError("dir", "must be a directory path")
        return cls(Path(raw), check.positive_int(config.options, "chunk_size", 10_000, 1_000_000))

    def final_path(self, segment: Segment) -> Path:
        folder = self.directory if segment.tenant == "default" else self.directory / segment.tenant
        return folder / f"{segment.session_id}.ndjson"

    async def send(self, segment: Segment, chunk: Chunk) -> ChunkResult:
        await anyio.to_thread.run_sync(self._write, segment, chunk)
        return ChunkResult()

    def _write(self, segment: Segment, chunk: Chunk) -> None:
        final = self.final_path(segment)
        temp = final.with_name(f".{final.name}.partial")
        try:
            if chunk.index == 1:  # a new attempt starts the file over
                final.parent.mkdir(parents=True, exist_ok=True)
                segment.state["file"] = temp.open("wb")
            handle: IO[bytes] = segment.state["file"]
            if len(chunk):
                handle.write(b"\n".join(chunk.encoded) + b"\n")
            if chunk.last:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(temp, final)
                _fsync_dir(final.parent)
        except OSError as exc:
            _close(segment.state.get("file"))
            raise PermanentError(f"cannot write {final}: {exc.strerror or exc}") from None

    async def aclose(self) -> None:
        return None


def _close(handle: Any) -> None:
    if handle is not None and not handle.closed:
        handle.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

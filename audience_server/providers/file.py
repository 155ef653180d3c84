"""``file``: one NDJSON file per (session, destination), one user object per line exactly as
received (duplicates removed), written to a temporary name and renamed when whole — a crash
never leaves a partial file under the final name.

Options: ``dir`` (default ``./deliveries/<destination id>``), ``chunk_size`` (default
10,000). The file is ``<dir>/<sessionId>.ndjson`` (``<dir>/<tenant>/…`` for a tenant other
than ``default``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import IO, Any

import anyio.to_thread

from ..destinations import DestinationConfig, OptionError
from . import options as check
from .base import Chunk, ChunkResult, PermanentError, Segment


class FileProvider:
    def __init__(self, directory: Path, chunk_size: int, sync_every: int = 64 << 20) -> None:
        self.directory = directory
        self.chunk_size = chunk_size
        self.sync_every = sync_every  # bytes written between background syncs

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
                segment.state["sync"] = _Writeback(self.sync_every)
            handle: IO[bytes] = segment.state["file"]
            writeback: _Writeback = segment.state["sync"]
            if len(chunk):
                handle.write(b"\n".join(chunk.encoded) + b"\n")
                writeback.wrote(handle)
            if chunk.last:
                handle.flush()
                writeback.wait()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(temp, final)
                _fsync_dir(final.parent)
        except OSError as exc:
            if isinstance(started := segment.state.get("sync"), _Writeback):
                started.wait(check=False)
            _close(segment.state.get("file"))
            raise PermanentError(f"cannot write {final}: {exc.strerror or exc}") from None

    async def aclose(self) -> None:
        return None


class _Writeback:
    """Syncs a large file as it is written, in a thread, every ``every`` bytes, so the
    fsync that ends it waits only for the last stretch (a 10^7-user file is a gigabyte;
    synced only at the end, its whole write-back would come after the last line)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.synced_to = 0  # bytes of the file a sync was started for
        self.thread: threading.Thread | None = None
        self.error: OSError | None = None

    def wrote(self, handle: IO[bytes]) -> None:
        """After a write: start syncing what was written if enough is, and none is under way."""
        busy = self.thread is not None and self.thread.is_alive()
        if busy or handle.tell() - self.synced_to < self.every:
            return
        self.wait()
        handle.flush()
        self.synced_to = handle.tell()
        self.thread = threading.Thread(target=self._sync, args=(handle.fileno(),), daemon=True)
        self.thread.start()

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self.error = exc

    def wait(self, check: bool = True) -> None:
        """Until the sync under way is done; raises what it met (``check``)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if check and self.error is not None:
            error, self.error = self.error, None
            raise error


def _close(handle: Any) -> None:
    if handle is not None and not handle.closed:
        handle.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The keys of one session's users, and which of them repeat an earlier one: hash
partitions spilled to throwaway files in the worker's scratch folder.

Each key is appended with its position (its user's place among the session's users) as a
fixed-size record to one of 256 partition files chosen by the key's first byte. Then each
partition is read back in order into a set of the keys met so far in it: a key already in
the set repeats an earlier position (equal keys share a partition, and a partition keeps
the order they were met in). A partition with more distinct keys than ``keys_in_memory``
is split again by the key's next byte, carrying the keys already met ahead of the records
left. Every key is written and read a constant number of times, so the cost per user does
not grow with the segment, and memory is bounded by the set and the buffers whatever its
size. ``close()`` removes the folder with everything in it.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

_RECORD = struct.Struct("<16sQ")  # a key, and the position it was met at
_CARRIED = 2**64 - 1  # the position of a key carried into a split: met before the rest
_READ_RECORDS = 8192  # records read at a time
_SPAN_BITS = 20  # positions per bucket of repeats, whose flags then take 1 MiB
_OFFSET = struct.Struct("<I")  # a repeat's position within its bucket


class _Files:
    """Numbered files in a folder, appended to through memory buffers that are written
    out together once they hold ``budget`` bytes, so no file stays open however many."""

    def __init__(self, folder: Path, budget: int) -> None:
        folder.mkdir()
        self.folder = folder
        self.budget = budget
        self.buffers: dict[int, bytearray] = {}
        self.buffered = 0
        self.written: set[int] = set()

    def path(self, number: int) -> Path:
        return self.folder / str(number)

    def append(self, number: int, data: bytes) -> None:
        buffer = self.buffers.get(number)
        if buffer is None:
            buffer = self.buffers[number] = bytearray()
        buffer += data
        self.buffered += len(data)
        if self.buffered >= self.budget:
            self.flush()

    def flush(self) -> None:
        for number, buffer in self.buffers.items():
            if buffer:
                with self.path(number).open("ab") as file:
                    file.write(buffer)
                self.written.add(number)
        self.buffers.clear()
        self.buffered = 0

    def numbers(self) -> list[int]:
        """The files written so far (all that was appended, once flushed), in order."""
        return sorted(self.written)


class SeenUsers:
    """The keys of one session's users in the order met, spilled to temporary files; then
    the positions of those that repeat an earlier one."""

    def __init__(
        self,
        directory: Path | None = None,
        keys_in_memory: int = 1 << 16,
        buffer_bytes: int = 4 << 20,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="seen-", dir=directory))
        self.keys_in_memory = max(1, keys_in_memory)
        self.buffer_bytes = buffer_bytes
        self.count = 0  # keys added so far: the position of the next one
        self._partitions = _Files(self.folder / "keys", buffer_bytes)
        self._splits = 0

    def add(self, keys: Sequence[bytes]) -> None:
        """Append 16-byte keys at the next positions."""
        partitions = self._partitions
        buffers = partitions.buffers
        pack = _RECORD.pack
        position = self.count
        for key in keys:
            buffer = buffers.get(key[0])
            if buffer is None:
                buffer = buffers[key[0]] = bytearray()
            buffer += pack(key, position)
            position += 1
        partitions.buffered += _RECORD.size * (position - self.count)
        self.count = position
        if partitions.buffered >= partitions.budget:
            partitions.flush()

    def repeats(self) -> Iterator[int]:
        """The positions, ascending, whose key was met at an earlier position (call once,
        after the last ``add``)."""
        self._partitions.flush()
        found = _Files(self.folder / "repeats", self.buffer_bytes)
        for number in self._partitions.numbers():
            self._find(self._partitions.path(number), 1, found)
        found.flush()
        # Positions are found partition by partition; bucketed by their high bits, each
        # bucket is put in order through flags, one per position of its span.
        span = 1 << _SPAN_BITS
        for bucket in found.numbers():
            path = found.path(bucket)
            flags = bytearray(span)
            for (offset,) in _OFFSET.iter_unpack(path.read_bytes()):
                flags[offset] = 1
            path.unlink()
            base = bucket << _SPAN_BITS
            offset = flags.find(1)
            while offset != -1:
                yield base + offset
                offset = flags.find(1, offset + 1)

    def _find(self, path: Path, depth: int, found: _Files) -> None:
        """Record the repeats among one partition file's records (keys sharing their first
        ``depth`` bytes), splitting what is left of it if its set grows too large."""
        met: set[bytes] = set()
        mask = (1 << _SPAN_BITS) - 1
        with path.open("rb") as file:
            # A first-level file too large to fit is split whole, before any set is built:
            # the many distinct keys it surely holds are not carried. Later splits happen
            # when the set fills, so a file of many equal keys is not split again and again.
            if depth == 1 and path.stat().st_size > _RECORD.size * self.keys_in_memory:
                self._split(file, met, depth, found)
            while chunk := file.read(_RECORD.size * _READ_RECORDS):
                for key, position in _RECORD.iter_unpack(chunk):
                    if key in met:  # never a carried key: those come first, each once
                        found.append(position >> _SPAN_BITS, _OFFSET.pack(position & mask))
                    else:
                        met.add(key)
                # Keys of a file at depth 16 are all equal, so a split happens before that.
                if len(met) >= self.keys_in_memory:
                    self._split(file, met, depth, found)
                    break
        path.unlink()

    def _split(self, rest: BinaryIO, met: set[bytes], depth: int, found: _Files) -> None:
        """Partition the keys met and the records left by the key's byte at ``depth``,
        the keys met first, and find the repeats in each part."""
        self._splits += 1
        parts = _Files(self.folder / f"split-{self._splits}", self.buffer_bytes)
        for key in met:
            parts.append(key[depth], _RECORD.pack(key, _CARRIED))
        met.clear()
        buffers = parts.buffers  # appended to inline, as in add(): once per record left
        size = _RECORD.size
        while chunk := rest.read(size * _READ_RECORDS):
            for start in range(0, len(chunk), size):
                buffer = buffers.get(chunk[start + depth])
                if buffer is None:
                    buffer = buffers[chunk[start + depth]] = bytearray()
                buffer += chunk[start : start + size]
            parts.buffered += len(chunk)
            if parts.buffered >= parts.budget:
                parts.flush()
        parts.flush()
        for number in parts.numbers():
            self._find(parts.path(number), depth + 1, found)
        parts.folder.rmdir()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

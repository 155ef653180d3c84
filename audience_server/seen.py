"""The keys of one session's users, and which of them repeat an earlier one: hash
partitions spilled to throwaway files in the worker's scratch folder, worked on with numpy.

Each 16-byte key is appended with its position (its user's place among the session's
users) as a 24-byte record to one of 256 partition files chosen by the key's first byte;
records wait in a memory buffer and are partitioned a buffer at a time. Then each
partition is read back whole and sorted by (key, position): a record whose key equals the
one before it repeats an earlier position (equal keys share a partition). A partition
holding more than ``keys_in_memory`` records is first split again by the key's next byte
(equal keys still share a part), so memory is bounded by that budget and the buffers
whatever the segment's size; every key is written and read a constant number of times, so
the cost per user does not grow with it. The repeats come back in ascending order through
bucket files of 2^20 positions. ``close()`` removes the folder with everything in it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# A key as two integers (its bytes read big-endian, so byte d of the key is byte d of the
# pair, counted from the top), and its position. Native byte order throughout: numpy's
# concatenate makes fields native, so a record written must be native to be read back.
_RECORD = np.dtype([("hi", "=u8"), ("lo", "=u8"), ("position", "=u8")])
_KEY_BYTES = 16
_SPAN_BITS = 20  # positions per bucket of repeats
_Records = npt.NDArray[Any]  # of _RECORD, or of positions
_Numbers = npt.NDArray[np.unsignedinteger[Any]]  # the file each record goes to


class _Spill:
    """Records filed under numbers, in ONE file: appended through a memory buffer that is
    written out, sorted by number, once it holds ``budget`` bytes, each number's stretch
    of it indexed. Opening a file per number costs more than the rest (measured: half a
    millisecond an open, hundreds per buffer), and one file holds any number of them."""

    def __init__(self, path: Path, budget: int, dtype: np.dtype[Any]) -> None:
        self.path = path
        self.file = path.open("w+b")
        self.budget = max(budget, dtype.itemsize)
        self.dtype = dtype
        self._pending: list[tuple[_Numbers, _Records]] = []
        self._buffered = 0
        self._stretches: dict[int, list[tuple[int, int]]] = {}  # number: (offset, records)
        self._end = 0

    def append(self, numbers: _Numbers, records: _Records) -> None:
        """File each record under its number (the records of a number keep their order)."""
        self._pending.append((numbers, records))
        self._buffered += records.nbytes
        if self._buffered >= self.budget:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        numbers = np.concatenate([n for n, _ in self._pending])
        records = np.concatenate([r for _, r in self._pending])
        self._pending.clear()
        self._buffered = 0
        order = np.argsort(numbers, kind="stable")  # stable: each number keeps its order
        numbers, records = numbers[order], records[order]
        present, starts, counts = np.unique(numbers, return_index=True, return_counts=True)
        self.file.seek(self._end)
        records.tofile(self.file)
        size = self.dtype.itemsize
        for number, start, count in zip(
            present.tolist(), starts.tolist(), counts.tolist(), strict=True
        ):
            self._stretches.setdefault(number, []).append((self._end + start * size, count))
        self._end += records.nbytes

    def numbers(self) -> list[int]:
        """The numbers filed so far (all that was appended, once flushed), in order."""
        self.flush()
        return sorted(self._stretches)

    def count(self, number: int) -> int:
        return sum(count for _, count in self._stretches.get(number, []))

    def read(self, number: int, at_most: int | None = None) -> Iterator[_Records]:
        """The records of ``number`` in order, ``at_most`` at a time (by default, all)."""
        for offset, count in self._stretches.get(number, []):
            done = 0
            while done < count:
                take = count - done if at_most is None else min(at_most, count - done)
                self.file.seek(offset + done * self.dtype.itemsize)
                yield np.fromfile(self.file, dtype=self.dtype, count=take)
                done += take

    def read_all(self, number: int) -> _Records:
        parts = list(self.read(number))
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [self._empty()])

    def _empty(self) -> _Records:
        return np.empty(0, dtype=self.dtype)

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class SeenUsers:
    """The keys of one session's users in the order met, spilled to temporary files; then
    the positions of those that repeat an earlier one."""

    def __init__(
        self,
        directory: Path | None = None,
        keys_in_memory: int = 1 << 20,
        buffer_bytes: int = 4 << 20,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="seen-", dir=directory))
        self.keys_in_memory = max(1, keys_in_memory)
        self.buffer_bytes = buffer_bytes
        self.count = 0  # keys added so far: the position of the next one
        self._partitions = _Spill(self.folder / "keys", buffer_bytes, _RECORD)
        self._splits = 0

    def add(self, keys: bytes) -> None:
        """Append keys (16 bytes each, end to end) at the next positions."""
        count, rest = divmod(len(keys), _KEY_BYTES)
        if rest:
            raise ValueError("keys are 16 bytes each")
        if not count:
            return
        records = np.empty(count, dtype=_RECORD)
        raw = np.frombuffer(keys, dtype=np.uint8).reshape(count, _KEY_BYTES)
        as_words = raw.view(">u8")
        records["hi"] = as_words[:, 0]
        records["lo"] = as_words[:, 1]
        records["position"] = np.arange(self.count, self.count + count, dtype=np.uint64)
        self.count += count
        self._partitions.append(raw[:, 0].copy(), records)

    def repeats(self) -> Iterator[int]:
        """The positions, ascending, whose key was met at an earlier position (call once,
        after the last ``add``)."""
        found = _Spill(self.folder / "repeats", self.buffer_bytes, np.dtype("=u8"))
        try:
            for number in self._partitions.numbers():
                self._find(self._partitions, number, 1, found)
            self._partitions.close()
            for bucket in found.numbers():
                yield from np.sort(found.read_all(bucket)).tolist()
        finally:
            found.close()

    def _find(self, spill: _Spill, number: int, depth: int, found: _Spill) -> None:
        """Record the repeats among one number's records (keys sharing their first
        ``depth`` bytes), splitting them by the next byte first if over the budget."""
        if spill.count(number) > self.keys_in_memory:
            if depth < _KEY_BYTES:
                self._split(spill, number, depth, found)
            else:
                self._all_equal(spill, number, found)
            return
        records = spill.read_all(number)
        # Sorted by key, then position: the first of each run of equal keys is the one met
        # first, every other one repeats it.
        order = np.lexsort((records["position"], records["lo"], records["hi"]))
        records = records[order]
        repeated = (records["hi"][1:] == records["hi"][:-1]) & (
            records["lo"][1:] == records["lo"][:-1]
        )
        _found(found, records["position"][1:][repeated])

    def _all_equal(self, spill: _Spill, number: int, found: _Spill) -> None:
        """Records that all have one key (a user sent over and over), in order: every one
        but the first repeats it. Read a budget at a time."""
        first = True
        for chunk in spill.read(number, self.keys_in_memory):
            _found(found, chunk["position"][1:] if first else chunk["position"])
            first = False

    def _split(self, spill: _Spill, number: int, depth: int, found: _Spill) -> None:
        """Partition one number's records by the key's byte at ``depth``, a budget at a
        time, and find the repeats in each part."""
        self._splits += 1
        parts = _Spill(self.folder / f"split-{self._splits}", self.buffer_bytes, _RECORD)
        try:
            word, shift = ("hi", 8 * (7 - depth)) if depth < 8 else ("lo", 8 * (15 - depth))
            for chunk in spill.read(number, self.keys_in_memory):
                byte = ((chunk[word] >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.uint8)
                parts.append(byte, chunk)
            for part in parts.numbers():
                self._find(parts, part, depth + 1, found)
        finally:
            parts.close()

    def close(self) -> None:
        self._partitions.file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _found(found: _Spill, positions: npt.NDArray[np.uint64]) -> None:
    """File repeated positions under their bucket of 2^_SPAN_BITS."""
    found.append((positions >> _SPAN_BITS).astype(np.uint64), positions)

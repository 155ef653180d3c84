"""client/spool.py: one-pass input (stdin, a generator) made re-readable, leaving no file."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from audience_server.client import readers
from audience_server.client.spool import chunks_of, ndjson_of, spool


def test_spooled_stdin_has_no_name_to_leave_behind(tmp_path: Path) -> None:
    """stdin is spooled to be read twice; a client killed meanwhile must leave no file."""
    data = b'{"email": "a@x.com"}\n{"email": "b@x.com"}\n'
    with spool(chunks_of(io.BytesIO(data)), directory=str(tmp_path)) as spooled:
        assert list(tmp_path.iterdir()) == []
        assert readers.detect_format(spooled) == "ndjson"
        assert readers.fingerprint(spooled, "ndjson").users == 2
        assert [u["email"] for u in readers.read_users(spooled, "ndjson")] == ["a@x.com", "b@x.com"]


def test_a_generator_of_users_is_spooled_as_ndjson_the_readers_read_back(tmp_path: Path) -> None:
    users = [{"email": f"u{i}@x.com", "n": i, "tags": ["a", {"b": None}]} for i in range(3)]
    with spool(ndjson_of(iter(users)), directory=str(tmp_path)) as spooled:
        assert list(tmp_path.iterdir()) == []
        assert readers.fingerprint(spooled, "ndjson").users == 3
        assert list(readers.read_users(spooled, "ndjson")) == users
        assert list(readers.read_users(spooled, "ndjson")) == users  # and again


def test_a_failing_source_leaves_nothing_open(tmp_path: Path) -> None:
    def broken() -> Iterator[bytes]:
        yield b"{}\n"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        spool(broken(), directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []

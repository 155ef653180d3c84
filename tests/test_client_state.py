"""client/state.py: the resume file, resumed only for the same input and options."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_server.client.errors import InputError
from audience_server.client.readers import Fingerprint
from audience_server.client.state import (
    State,
    default_state_path,
    load_state,
    resumed,
    save_state,
)

FOUND = Fingerprint(size=120, sha256="ab" * 32, users=25)


def saved(path: Path) -> State:
    state = State("s-1", "Gold", "custom", 10, 25, 3, FOUND.size, FOUND.sha256, acknowledged=2)
    save_state(path, state)
    return state


def test_the_state_sits_beside_the_input_and_is_written_whole(tmp_path: Path) -> None:
    path = default_state_path(tmp_path / "users.csv")
    assert path == tmp_path / "users.csv.upload-state.json"
    assert load_state(path) is None
    state = saved(path)
    assert load_state(path) == state
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the partial file renamed
    path.write_text("{not json")
    with pytest.raises(InputError, match="is unreadable; remove it"):
        load_state(path)
    path.write_text('{"version": 99}')
    with pytest.raises(InputError, match="of another version"):
        load_state(path)


def test_a_run_resumes_only_the_same_input_and_options(tmp_path: Path) -> None:
    path = tmp_path / "s.json"

    def resume(
        found: Fingerprint = FOUND, session_id: str | None = None, batch_size: int = 10
    ) -> State | None:
        return resumed(path, found, ("Gold ", "custom", batch_size), session_id)

    assert resume() is None
    state = saved(path)
    assert resume() == state
    assert resume(session_id="s-1") == state
    with pytest.raises(InputError, match="is for session s-1, not s-2"):
        resume(session_id="s-2")
    with pytest.raises(InputError, match="the input changed since session s-1 started"):
        resume(Fingerprint(FOUND.size, "cd" * 32, FOUND.users))
    with pytest.raises(InputError, match="with name, type and batch size"):
        resume(batch_size=20)

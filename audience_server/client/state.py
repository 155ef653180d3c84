"""The resume state kept beside an input: which session it goes to, and how far it got.

It ties the session id to the input's digest and the options, so a re-run resumes the same
session and refuses one onto a changed file or other options.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError
from .readers import Fingerprint

STATE_VERSION = 1


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
    """``users.csv`` keeps its state in ``users.csv.upload-state.json``."""
    return path.with_name(path.name + ".upload-state.json")


def load_state(path: Path) -> State | None:
    """The state saved at ``path``; None when there is none."""
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


def resumed(
    path: Path, found: Fingerprint, asked: tuple[str, str, int], session_id: str | None
) -> State | None:
    """The state at ``path`` when this run resumes it, None when there is none; refused when
    it belongs to other input or options (``asked``: name, type and batch size) or to another
    ``session_id`` than one asked for."""
    previous = load_state(path)
    if previous is None:
        return None
    if (previous.input_size, previous.input_sha256) != (found.size, found.sha256):
        raise InputError(
            f"the input changed since session {previous.session_id} started "
            f"(state file {path}); remove the state file to upload it as a new session."
        )
    name, type, batch_size = asked
    ours = (name.strip(), type, batch_size)
    theirs = (previous.name.strip(), previous.type, previous.batch_size)
    if ours != theirs:
        raise InputError(
            f"state file {path} is for session {previous.session_id} with name, type "
            f"and batch size {theirs}; this run asks for {ours}. Remove it to start anew."
        )
    if session_id is not None and session_id != previous.session_id:
        raise InputError(
            f"state file {path} is for session {previous.session_id}, "
            f"not {session_id}; remove it to start anew."
        )
    return previous

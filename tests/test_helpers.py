"""The test plumbing itself: a helper that cannot fail would hide failures everywhere."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.helpers import eventually
from tests.servers import clean_env


def test_eventually_returns_the_first_value_that_is_done() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter), lambda n: n >= 3) == 3


def test_eventually_fails_when_never_done() -> None:
    with pytest.raises(AssertionError, match=r"not done within 0\.1 s; last read: 'stale'"):
        eventually(lambda: "stale", lambda value: value == "fresh", timeout=0.1)


def test_the_shells_audience_settings_do_not_reach_the_tests() -> None:
    """conftest clears them: a developer's exported AUDIENCE_DATABASE_URL must not change
    what the suite tests. The suite's own AUDIENCE_TEST_* variables stay."""
    assert [k for k in os.environ if k.startswith("AUDIENCE_") and "_TEST_" not in k] == []


def test_subprocesses_get_only_the_settings_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_DATABASE_URL", "sqlite:////elsewhere.db")
    monkeypatch.setenv("AUDIENCE_TEST_POSTGRES_URL", "postgresql://x@127.0.0.1/y")
    env = clean_env(AUDIENCE_PORT="1234")
    assert {k: v for k, v in env.items() if k.startswith("AUDIENCE_")} == {"AUDIENCE_PORT": "1234"}
    assert env["PATH"] == os.environ["PATH"]

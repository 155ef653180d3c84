"""Building EdgeTag-style requests for the tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from httpx2 import Response
from starlette.testclient import TestClient


def form(
    session_id: int | str,
    sequence: int,
    total_batches: int,
    total_users: int,
    users: Any,
    *,
    name: str = "High Value Customers Q1",
    type: str | None = "custom",
    **batch_extra: Any,
) -> dict[str, str]:
    batch = {
        "sessionId": session_id,
        "sequence": sequence,
        "totalBatches": total_batches,
        "totalUsers": total_users,
        **batch_extra,
    }
    fields = {"name": name, "batch": json.dumps(batch), "users": json.dumps(users)}
    if type is not None:
        fields["type"] = type
    return fields


def send(client: TestClient, fields: dict[str, str], query: str = "", **kwargs: Any) -> Response:
    """POST the fields as multipart/form-data, as EdgeTag clients do."""
    files = {key: (None, value) for key, value in fields.items()}
    return client.post(f"/audience{query}", files=files, **kwargs)


def errors(response: Response) -> list[str]:
    body = response.json()
    assert body["success"] is False
    return list(body["errors"])


T = TypeVar("T")


def eventually(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0) -> T:
    """Re-read until ``done`` holds: for state another thread or process moves on. Fails
    the test if it does not hold within ``timeout`` s (a limit, never a wait for a result)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {timeout:g} s; last read: {value!r:.2000}")
        time.sleep(0.02)  # polling interval, not a guess at how long the work takes

"""Building EdgeTag-style requests for the tests, and running the app with destinations."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from httpx2 import Response
from sqlalchemy import Engine
from starlette.testclient import TestClient

from audience_server.app import Destinations, create_app
from audience_server.destinations import DestinationConfig
from audience_server.providers import provider_class
from audience_server.settings import Settings

NAME = "High Value Customers Q1"  # the audience name the helpers upload under


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


HOOK_SECRET = "whsec-test"  # the `hook` fixture's receiver verifies signatures with it

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


def destinations(*configs: tuple[str, str, dict[str, Any]]) -> Destinations:
    """Providers built from ``(id, kind, options)`` triples, as the destinations file would."""
    built = {}
    for index, (destination_id, kind, options) in enumerate(configs):
        config = DestinationConfig(destination_id, kind, options, line=index + 1)
        built[destination_id] = (config, provider_class(kind).from_config(config))
    return built


def serve(settings: Settings, engine: Engine, where: Destinations) -> TestClient:
    """The app with its in-process worker delivering to ``where`` (enter it to start)."""
    app = create_app(settings, engine=engine, sweeper=False, destinations=where, worker=True)
    return TestClient(app, raise_server_exceptions=False)


def upload(
    client: TestClient,
    key: str,
    users: list[dict[str, Any]],
    batches_of: int,
    query: str = "",
    *,
    type: str = "custom",
) -> Any:
    """Send ``users`` in batches, the last one alone with ``query``; its response."""
    parts = [users[i : i + batches_of] for i in range(0, len(users), batches_of)]
    order = [*range(2, len(parts) + 1), 1]  # out of order; sequence 1 completes
    response = None
    for sequence in order:
        fields = form(
            key, sequence, len(parts), len(users), parts[sequence - 1], name=NAME, type=type
        )
        response = send(client, fields, query if sequence == 1 else "")
        if sequence != 1:
            assert response.status_code == 200, response.text
    return response


def status(client: TestClient, key: str) -> dict[str, Any]:
    """The session's status document."""
    body: dict[str, Any] = client.get(f"/audience/sessions/{key}").json()
    return body

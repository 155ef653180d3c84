"""Building EdgeTag-style requests for the tests."""

from __future__ import annotations

import json
from typing import Any

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

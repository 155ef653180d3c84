"""The OpenAPI document (placeholder: being built)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response


async def openapi_json(request: Request[Any]) -> Response:
    return Response(b"{}", media_type="application/json")

"""Callers and their tenants: ``Authorization: Bearer <key>`` when API keys are configured."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from starlette.requests import HTTPConnection

from .errors import Unauthorized

DEFAULT_TENANT = "default"


def tenant_of(conn: HTTPConnection[Any], api_keys: Mapping[str, str]) -> str:
    """The tenant the caller acts for; every session lookup is scoped to it."""
    if not api_keys:
        return DEFAULT_TENANT
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        found = None
        for key, tenant in api_keys.items():  # compare every key: no timing hint
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if found is not None:
            return found
    raise Unauthorized("A valid API key is required: send Authorization: Bearer <key>.")

"""The operator console (placeholder: being built)."""

from __future__ import annotations

from starlette.routing import BaseRoute

CONSOLE_ROUTES: list[BaseRoute] = []

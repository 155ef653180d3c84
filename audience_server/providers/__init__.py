"""Destination platforms: one module per kind, registered by name, imported on use."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..destinations import DestinationConfig, load_destinations
from .base import Provider

# kind -> "module:Class"; a module is imported only when a destination of its kind exists.
REGISTRY: dict[str, str] = {
    "facebook": "audience_server.providers.meta:MetaProvider",
    "file": "audience_server.providers.file:FileProvider",
    "google": "audience_server.providers.google:GoogleProvider",
    "klaviyo": "audience_server.providers.klaviyo:KlaviyoProvider",
    "tiktok": "audience_server.providers.tiktok:TikTokProvider",
    "webhook": "audience_server.providers.webhook:WebhookProvider",
}


def provider_class(kind: str) -> Any:
    """The provider class registered for ``kind``."""
    try:
        target = REGISTRY[kind]
    except KeyError:
        close = difflib.get_close_matches(kind, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown destination kind {kind!r}{hint}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def configured_destinations(
    path: Path, *, explicit: bool, environ: Mapping[str, str]
) -> dict[str, tuple[DestinationConfig, Provider]]:
    """Every destination of the destinations file, ready to send (by id, in file order)."""
    validators = {kind: _validator(kind) for kind in REGISTRY}
    configs = load_destinations(path, explicit=explicit, environ=environ, validators=validators)
    return {c.id: (c, provider_class(c.kind).from_config(c)) for c in configs}


def _validator(kind: str) -> Callable[[DestinationConfig], object]:
    return lambda config: provider_class(kind).from_config(config)


__all__ = ["REGISTRY", "Provider", "configured_destinations", "provider_class"]

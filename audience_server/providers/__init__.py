"""Destination platforms: one module per kind, registered by name, imported on use.

base.py        what a provider is: Segment, Chunk, ChunkResult, the errors, Provider
http.py        the HTTP edge the platform adapters share (client, errors, excerpts)
options.py     the option checks the kinds share
recording.py   an in-memory provider for tests of the worker (not a kind)
file.py, webhook.py, meta.py (kind ``facebook``), tiktok.py, klaviyo.py, google.py
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

from ..destinations import DestinationConfig, load_destinations, unknown_kind
from .base import Provider

# kind -> "module:Class"; a module is imported only when a destination of its kind exists.
REGISTRY: dict[str, str] = {
    "facebook": "audience_server.providers.meta:MetaProvider",
    "file": "audience_server.providers.file:FileProvider",
    "google": "audience_server.providers.google.provider:GoogleProvider",
    "klaviyo": "audience_server.providers.klaviyo:KlaviyoProvider",
    "tiktok": "audience_server.providers.tiktok:TikTokProvider",
    "webhook": "audience_server.providers.webhook:WebhookProvider",
}


class UnknownKind(LookupError):
    """No provider is registered for the kind; the message names the known ones."""


def provider_class(kind: str) -> type[Provider]:
    """The provider class registered for ``kind``, its module imported now."""
    try:
        target = REGISTRY[kind]
    except KeyError:
        raise UnknownKind(unknown_kind(kind, REGISTRY)) from None
    module, _, name = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module), name)
    return cls


def build(config: DestinationConfig) -> Provider:
    """The provider of one destination, built from its options (OptionError if bad)."""
    return provider_class(config.kind).from_config(config)


def configured_destinations(
    path: Path, *, explicit: bool, environ: Mapping[str, str]
) -> dict[str, tuple[DestinationConfig, Provider]]:
    """Every destination of the destinations file, ready to send (by id, in file order);
    each provider is built once, by the validation of its table."""
    built: dict[str, Provider] = {}

    def validate(config: DestinationConfig) -> None:
        built[config.id] = build(config)

    validators = dict.fromkeys(REGISTRY, validate)
    configs = load_destinations(path, explicit=explicit, environ=environ, validators=validators)
    for config in configs:
        if config.id not in built:  # the built-in default, which no file validated
            built[config.id] = build(config)
    return {config.id: (config, built[config.id]) for config in configs}


__all__ = [
    "REGISTRY",
    "Provider",
    "UnknownKind",
    "build",
    "configured_destinations",
    "provider_class",
]

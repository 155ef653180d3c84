"""The option checks the provider kinds share; each raises OptionError naming the option.

No message quotes the value: options hold tokens and keys, substituted from the environment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..destinations import OptionError


def positive_int(options: Mapping[str, Any], name: str, default: int, high: int) -> int:
    """An integer option in 1..high (``chunk_size``, day counts)."""
    value = options.get(name, default)
    if type(value) is not int or not 1 <= value <= high:
        raise OptionError(name, f"must be an integer from 1 to {high}")
    return value


def seconds(options: Mapping[str, Any], name: str, default: float) -> float:
    """A duration option in seconds, greater than zero (``timeout``, intervals)."""
    value = options.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise OptionError(name, "must be a number of seconds greater than zero")
    return float(value)


def http_url(options: Mapping[str, Any], name: str, default: str | None = None) -> str:
    """An http:// or https:// URL option (``base_url``, a webhook's ``url``)."""
    value = options.get(name, default)
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
        raise OptionError(name, "must be an http:// or https:// URL")
    return value


def token(options: Mapping[str, Any], name: str, what: str) -> str:
    """A required secret (an access token), surrounding whitespace dropped."""
    value = options.get(name)
    if not isinstance(value, str) or not value.strip():
        raise OptionError(name, f"is required: {what}")
    return value.strip()


def choice(options: Mapping[str, Any], name: str, default: str, choices: Sequence[str]) -> str:
    """One of ``choices``, named in their order in the message."""
    value = options.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise OptionError(name, f"must be one of {', '.join(choices)}")
    return value

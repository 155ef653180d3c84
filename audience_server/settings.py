"""Settings: one frozen object built once from the ``AUDIENCE_*`` environment.

Every value is read with its surrounding whitespace removed, and a blank value counts as
unset (the default applies), except ``AUDIENCE_SEGMENT_PREFIX``, where blank means no
prefix. A value the server cannot use is a :class:`SettingsError` whose message is one line
that starts with the variable's name; it never shows a secret (an API key, a password).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite:///./audience.db"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DATABASE_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgres", "postgresql", "postgresql+psycopg")
DATABASE_EXAMPLES = "sqlite:///path/to/file.db or postgresql://user:password@host/database"
LONGEST_DURATION = timedelta(days=36500)  # a sanity bound; far from overflowing a date (9999)

_INTEGER = re.compile(r"[0-9]+(?:_[0-9]+)*")
_DURATION = re.compile(r"(?P<number>[0-9]+(?:_[0-9]+)*(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Labels of letters, digits, - and _ (Docker's service names have _), joined by dots.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_PASSWORD = re.compile(r"(//[^/:@]*:)[^/]*@")


class SettingsError(ValueError):
    """An ``AUDIENCE_*`` variable has a value the server cannot use."""


def _shown(raw: str) -> str:
    """``raw`` quoted for a one-line message (repr escapes newlines), cut short if long."""
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _spelled(value: timedelta) -> str:
    """A duration as the variables spell it: ``5m``, ``24h``, ``1.5s``."""
    seconds = value.total_seconds()
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def _duration(name: str, raw: str) -> timedelta:
    """Parse ``90``, ``90s``, ``15m``, ``24h`` or ``7d`` (plain numbers are seconds)."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None:
        raise SettingsError(
            f"{name}={_shown(raw)} is not a duration; use seconds (90) or a number with "
            "s, m, h or d (90s, 15m, 24h, 7d)"
        )
    seconds = float(match["number"].replace("_", "")) * _UNITS[match["unit"]]
    if seconds > LONGEST_DURATION.total_seconds():
        raise SettingsError(f"{name}={_shown(raw)} is too long; use at most 36500d (100 years)")
    value = timedelta(seconds=seconds)
    if value <= timedelta(0):  # also what rounds to zero microseconds
        raise SettingsError(f"{name}={_shown(raw)} must be longer than zero")
    return value


def _integer(name: str, raw: str) -> int:
    if not _INTEGER.fullmatch(text := raw.strip()):
        raise SettingsError(
            f"{name}={_shown(raw)} is not a whole number; use digits, grouped with _ if you "
            "like (100_000)"
        )
    return int(text)


def _positive_int(name: str, raw: str) -> int:
    value = _integer(name, raw)
    if value <= 0:
        raise SettingsError(f"{name}={_shown(raw)} must be greater than zero")
    return value


def _port(name: str, raw: str) -> int:
    value = _integer(name, raw)
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}={_shown(raw)} is not a port; use 1 to 65535")
    return value


def _boolean(name: str, raw: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
        raw.strip().lower()
    )
    if value is None:
        raise SettingsError(f"{name}={_shown(raw)} must be true or false (or yes/no, 1/0)")
    return value


def _path(name: str, raw: str) -> Path:
    return Path(raw.strip())


def _host(name: str, raw: str) -> str:
    text = raw.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOST_NAME.fullmatch(text.lower()) or len(text) > 253:
            raise SettingsError(
                f"{name}={_shown(raw)} is not an IP address or host name "
                "(127.0.0.1, 0.0.0.0, ::, localhost)"
            ) from None
    return text


def _log_level(name: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise SettingsError(
            f"{name}={_shown(raw)} is not a log level; use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def _database_url(name: str, raw: str) -> str:
    text = raw.strip()
    shown = _shown(_PASSWORD.sub(r"\1***@", text))
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise SettingsError(
            f"{name}={shown} is not a database URL; use {DATABASE_EXAMPLES}"
        ) from None
    if url.drivername not in DATABASE_DRIVERS:
        raise SettingsError(
            f"{name}={shown} names a database the server does not support; use {DATABASE_EXAMPLES}"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Every connection would see its own empty database.
        raise SettingsError(
            f"{name}={shown} is an in-memory database; name a file: sqlite:///path/to/file.db"
        )
    return text


def _api_keys(name: str, raw: str) -> dict[str, str]:
    """``key`` or ``tenant:key`` entries, comma separated -> {key: tenant}. Messages name a
    wrong entry by its position, never by its key."""
    keys: dict[str, str] = {}
    positions: dict[str, int] = {}
    for position, entry in enumerate(raw.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue  # a trailing or doubled comma
        tenant, _, key = entry.rpartition(":")
        tenant, key = tenant.strip() or "default", key.strip()
        if not key:
            raise SettingsError(f"{name} entry {position} has an empty key")
        if not key.isascii() or not key.isprintable():
            # Header values arrive as Latin-1 and are compared as UTF-8: such a key never matches.
            raise SettingsError(f"{name} entry {position} has a key that is not printable ASCII")
        if key in keys and keys[key] != tenant:
            raise SettingsError(
                f"{name} entry {position} gives the key of entry {positions[key]} to another tenant"
            )
        keys[key] = tenant
        positions.setdefault(key, position)
    if not keys:
        raise SettingsError(f"{name} has no key, only commas; unset it to run without keys")
    return keys


# name -> (the Settings attribute, its parser); AUDIENCE_SEGMENT_PREFIX is read on its own.
_VARIABLES: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "AUDIENCE_DATABASE_URL": ("database_url", _database_url),
    "AUDIENCE_HOST": ("host", _host),
    "AUDIENCE_PORT": ("port", _port),
    "AUDIENCE_MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
    "AUDIENCE_MAX_BATCH_USERS": ("max_batch_users", _positive_int),
    "AUDIENCE_MAX_TOTAL_BATCHES": ("max_total_batches", _positive_int),
    "AUDIENCE_SESSION_TTL": ("session_ttl", _duration),
    "AUDIENCE_SWEEP_INTERVAL": ("sweep_interval", _duration),
    "AUDIENCE_API_KEYS": ("api_keys", _api_keys),
    "AUDIENCE_LOG_LEVEL": ("log_level", _log_level),
    "AUDIENCE_DESTINATIONS": ("destinations_path", _path),
    "AUDIENCE_SYNC_TIMEOUT": ("sync_timeout", _duration),
    "AUDIENCE_DELIVERY_MAX_ATTEMPTS": ("delivery_max_attempts", _positive_int),
    "AUDIENCE_DELIVERY_RETRY_BASE": ("retry_base", _duration),
    "AUDIENCE_DELIVERY_RETRY_CAP": ("retry_cap", _duration),
    "AUDIENCE_RETENTION": ("retention", _duration),
    "AUDIENCE_WORKER": ("run_worker", _boolean),
    "AUDIENCE_WORKER_CONCURRENCY": ("worker_concurrency", _positive_int),
    "AUDIENCE_WORKER_LEASE": ("lease", _duration),
    "AUDIENCE_CHUNK_TIMEOUT": ("chunk_timeout", _duration),
    "AUDIENCE_WORKER_POLL": ("poll_interval", _duration),
    "AUDIENCE_SCRATCH_DIR": ("scratch_dir", _path),
    "AUDIENCE_METRICS_PUBLIC": ("metrics_public", _boolean),
    "AUDIENCE_READ_TIMEOUT": ("read_timeout", _duration),
    "AUDIENCE_MAX_CONNECTIONS": ("max_connections", _positive_int),
    "AUDIENCE_MAX_INFLIGHT_BYTES": ("max_inflight_bytes", _positive_int),
    "AUDIENCE_DB_LOCK_TIMEOUT": ("db_lock_timeout", _duration),
}


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from its environment, validated."""

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch_users: int = 100_000
    max_total_batches: int = 100_000
    session_ttl: timedelta = timedelta(hours=24)
    sweep_interval: timedelta = timedelta(seconds=60)
    api_keys: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    destinations_path: Path = Path("destinations.toml")
    destinations_explicit: bool = False  # named by AUDIENCE_DESTINATIONS: must exist
    segment_prefix: str = "blotout_"
    sync_timeout: timedelta = timedelta(seconds=120)
    delivery_max_attempts: int = 10
    retry_base: timedelta = timedelta(seconds=1)
    retry_cap: timedelta = timedelta(minutes=5)
    retention: timedelta = timedelta(days=7)
    worker_concurrency: int = 4
    lease: timedelta = timedelta(seconds=60)
    chunk_timeout: timedelta = timedelta(minutes=10)
    poll_interval: timedelta = timedelta(seconds=1)
    run_worker: bool = True  # serve runs the delivery worker in-process
    scratch_dir: Path | None = None  # workers' temporary files; None: <temp dir>/audience-server
    metrics_public: bool = False  # /metrics answers without an API key
    read_timeout: timedelta = timedelta(seconds=30)  # headers, or a body making no progress
    max_connections: int | None = None  # None: derived from the descriptor limit (limits.py)
    max_inflight_bytes: int = 256 * 1024 * 1024  # memory request bodies in flight may take
    db_lock_timeout: timedelta = timedelta(seconds=10)  # longest wait for the SQLite writer lock

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of ``environ`` (default: this process's), or a :class:`SettingsError`."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for name, (attribute, parse) in _VARIABLES.items():
            raw = env.get(name)
            if raw is not None and raw.strip():
                kwargs[attribute] = parse(name, raw)
        kwargs["destinations_explicit"] = "destinations_path" in kwargs
        if (raw := env.get("AUDIENCE_SEGMENT_PREFIX")) is not None:
            kwargs["segment_prefix"] = raw.strip()
        settings = cls(**kwargs)  # type: ignore[arg-type]
        _check_retry_delays(settings, env)
        return settings

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _check_retry_delays(settings: Settings, env: Mapping[str, str]) -> None:
    if settings.retry_cap >= settings.retry_base:
        return

    def shown(name: str, value: timedelta) -> str:  # as given, or the default it fell back to
        raw = env.get(name, "")
        return _shown(raw) if raw.strip() else f"{_spelled(value)} (the default)"

    cap = shown("AUDIENCE_DELIVERY_RETRY_CAP", settings.retry_cap)
    base = shown("AUDIENCE_DELIVERY_RETRY_BASE", settings.retry_base)
    raise SettingsError(
        f"AUDIENCE_DELIVERY_RETRY_CAP={cap} is shorter than AUDIENCE_DELIVERY_RETRY_BASE={base}; "
        "the longest retry delay must be at least the first"
    )

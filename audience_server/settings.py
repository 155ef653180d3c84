"""Settings: one frozen object built once from the ``AUDIENCE_*`` environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

DEFAULT_DATABASE_URL = "sqlite:///./audience.db"


class SettingsError(ValueError):
    """An ``AUDIENCE_*`` variable has a value the server cannot use."""


def _duration(name: str, raw: str) -> timedelta:
    """Parse ``90``, ``90s``, ``15m``, ``24h`` or ``7d`` (plain numbers are seconds)."""
    text = raw.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = 1
    if text and text[-1] in units:
        scale = units[text[-1]]
        text = text[:-1]
    try:
        seconds = float(text) * scale
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r} is not a duration; use seconds or a number with s, m, h or d"
        ) from None
    if seconds <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than zero")
    return timedelta(seconds=seconds)


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than zero")
    return value


def _boolean(name: str, raw: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
        raw.strip().lower()
    )
    if value is None:
        raise SettingsError(f"{name}={raw!r} must be true or false")
    return value


def _api_keys(raw: str) -> dict[str, str]:
    """``key`` or ``tenant:key`` entries, comma separated -> {key: tenant}."""
    keys: dict[str, str] = {}
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.rpartition(":")
        if not sep:
            tenant = "default"
        tenant, key = tenant.strip() or "default", key.strip()
        if not key:
            raise SettingsError("AUDIENCE_API_KEYS has an entry with an empty key")
        keys[key] = tenant
    return keys


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        if raw := env.get("AUDIENCE_DATABASE_URL"):
            kwargs["database_url"] = raw.strip()
        if raw := env.get("AUDIENCE_HOST"):
            kwargs["host"] = raw.strip()
        if raw := env.get("AUDIENCE_PORT"):
            kwargs["port"] = _positive_int("AUDIENCE_PORT", raw)
        if raw := env.get("AUDIENCE_MAX_BODY_BYTES"):
            kwargs["max_body_bytes"] = _positive_int("AUDIENCE_MAX_BODY_BYTES", raw)
        if raw := env.get("AUDIENCE_MAX_BATCH_USERS"):
            kwargs["max_batch_users"] = _positive_int("AUDIENCE_MAX_BATCH_USERS", raw)
        if raw := env.get("AUDIENCE_MAX_TOTAL_BATCHES"):
            kwargs["max_total_batches"] = _positive_int("AUDIENCE_MAX_TOTAL_BATCHES", raw)
        if raw := env.get("AUDIENCE_SESSION_TTL"):
            kwargs["session_ttl"] = _duration("AUDIENCE_SESSION_TTL", raw)
        if raw := env.get("AUDIENCE_SWEEP_INTERVAL"):
            kwargs["sweep_interval"] = _duration("AUDIENCE_SWEEP_INTERVAL", raw)
        if raw := env.get("AUDIENCE_API_KEYS"):
            kwargs["api_keys"] = _api_keys(raw)
        if raw := env.get("AUDIENCE_LOG_LEVEL"):
            kwargs["log_level"] = raw.strip().upper()
        if raw := env.get("AUDIENCE_DESTINATIONS"):
            kwargs["destinations_path"] = Path(raw.strip())
            kwargs["destinations_explicit"] = True
        if (raw := env.get("AUDIENCE_SEGMENT_PREFIX")) is not None:
            kwargs["segment_prefix"] = raw
        durations = {
            "AUDIENCE_SYNC_TIMEOUT": "sync_timeout",
            "AUDIENCE_DELIVERY_RETRY_BASE": "retry_base",
            "AUDIENCE_DELIVERY_RETRY_CAP": "retry_cap",
            "AUDIENCE_RETENTION": "retention",
            "AUDIENCE_WORKER_LEASE": "lease",
            "AUDIENCE_CHUNK_TIMEOUT": "chunk_timeout",
            "AUDIENCE_WORKER_POLL": "poll_interval",
        }
        for name, attribute in durations.items():
            if raw := env.get(name):
                kwargs[attribute] = _duration(name, raw)
        if raw := env.get("AUDIENCE_DELIVERY_MAX_ATTEMPTS"):
            kwargs["delivery_max_attempts"] = _positive_int("AUDIENCE_DELIVERY_MAX_ATTEMPTS", raw)
        if raw := env.get("AUDIENCE_WORKER_CONCURRENCY"):
            kwargs["worker_concurrency"] = _positive_int("AUDIENCE_WORKER_CONCURRENCY", raw)
        if raw := env.get("AUDIENCE_WORKER"):
            kwargs["run_worker"] = _boolean("AUDIENCE_WORKER", raw)
        if raw := env.get("AUDIENCE_SCRATCH_DIR"):
            kwargs["scratch_dir"] = Path(raw.strip())
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

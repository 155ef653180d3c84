"""``Settings.from_env``: every ``AUDIENCE_*`` variable's default, good values and bad values;
and the command: a bad server setting stops ``serve``, ``worker`` and ``migrate`` in one
line, while ``upload``, ``status`` and ``sessions`` never read the server's settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest

from audience_server import settings as settings_module
from audience_server.settings import Settings, SettingsError
from tests.servers import ServerProcess, clean_env, free_port

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass(frozen=True)
class Variable:
    """One variable: the attribute it sets, its default, and values with what they parse to."""

    attribute: str
    default: object
    good: tuple[tuple[str, object], ...]
    bad: tuple[str, ...] = ()  # none: every value is accepted


def duration(attribute: str, default: timedelta) -> Variable:
    good = (
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("1.5", timedelta(seconds=1.5)),
        (" 15M ", timedelta(minutes=15)),
        ("86_400", timedelta(days=1)),
    )
    bad = ("soon", "nan", "inf", "-inf", "1e3", "15x", "m", "-5s", "0", "0.0000001", "36501d")
    return Variable(attribute, default, good, bad)


def count(attribute: str, default: int) -> Variable:
    good = (("42", 42), ("100_000", 100_000), (" 7 ", 7))
    return Variable(attribute, default, good, ("abc", "0", "-1", "1.5", "1e3", "1__0", "_1"))


VARIABLES: dict[str, Variable] = {
    "AUDIENCE_DATABASE_URL": Variable(
        "database_url",
        "sqlite:///./audience.db",
        (
            ("sqlite:////var/lib/audience.db", "sqlite:////var/lib/audience.db"),
            ("sqlite+pysqlite:///a.db", "sqlite+pysqlite:///a.db"),
            ("postgresql://u:p@db.internal/audience", "postgresql://u:p@db.internal/audience"),
            ("postgres://db/audience", "postgres://db/audience"),
            (" postgresql+psycopg://db:5432/audience ", "postgresql+psycopg://db:5432/audience"),
        ),
        (
            "junk",
            "mysql://db/audience",
            "postgresql+psycopg2://db/audience",
            "http://example.com",
            "postgresql://db:abc/audience",
            "sqlite://",
            "sqlite:///:memory:",
        ),
    ),
    "AUDIENCE_HOST": Variable(
        "host",
        "127.0.0.1",
        (
            ("0.0.0.0", "0.0.0.0"),
            ("::", "::"),
            ("localhost", "localhost"),
            ("audience_server.internal", "audience_server.internal"),
        ),
        ("a b", "http://localhost", "0.0.0.0:8000", "host/path", "."),
    ),
    "AUDIENCE_PORT": Variable(
        "port",
        8000,
        (("1", 1), ("65535", 65535), ("8_080", 8080)),
        ("abc", "0", "65536", "-1", "80.0"),
    ),
    "AUDIENCE_MAX_BODY_BYTES": count("max_body_bytes", 64 * 1024 * 1024),
    "AUDIENCE_MAX_BATCH_USERS": count("max_batch_users", 100_000),
    "AUDIENCE_MAX_TOTAL_BATCHES": count("max_total_batches", 100_000),
    "AUDIENCE_SESSION_TTL": duration("session_ttl", timedelta(hours=24)),
    "AUDIENCE_SWEEP_INTERVAL": duration("sweep_interval", timedelta(seconds=60)),
    "AUDIENCE_API_KEYS": Variable(
        "api_keys",
        {},
        (
            ("k1", {"k1": "default"}),
            ("acme:k1, beta:k2,", {"k1": "acme", "k2": "beta"}),
            (":k1", {"k1": "default"}),
            ("acme:k1,acme:k1", {"k1": "acme"}),
        ),
        ("acme:", ",", " , ", "acme:k1,beta:k1", "acme:kü", "acme:k\t1"),
    ),
    "AUDIENCE_LOG_LEVEL": Variable(
        "log_level",
        "INFO",
        (("debug", "DEBUG"), ("INFO", "INFO"), ("Warning", "WARNING"), ("error", "ERROR")),
        ("bogus", "CRITICAL", "WARN", "10"),
    ),
    "AUDIENCE_DESTINATIONS": Variable(
        "destinations_path",
        Path("destinations.toml"),
        (("conf/destinations.toml", Path("conf/destinations.toml")),),
    ),
    "AUDIENCE_SEGMENT_PREFIX": Variable(
        "segment_prefix", "blotout_", (("acme_", "acme_"), ("", ""), ("  ", ""))
    ),
    "AUDIENCE_SYNC_TIMEOUT": duration("sync_timeout", timedelta(seconds=120)),
    "AUDIENCE_DELIVERY_MAX_ATTEMPTS": count("delivery_max_attempts", 10),
    "AUDIENCE_DELIVERY_RETRY_BASE": duration("retry_base", timedelta(seconds=1)),
    "AUDIENCE_DELIVERY_RETRY_CAP": duration("retry_cap", timedelta(minutes=5)),
    "AUDIENCE_RETENTION": duration("retention", timedelta(days=7)),
    "AUDIENCE_WORKER": Variable(
        "run_worker",
        True,
        (
            ("true", True),
            ("false", False),
            ("1", True),
            ("0", False),
            ("yes", True),
            ("no", False),
            (" TRUE ", True),
        ),
        ("maybe", "2", "on"),
    ),
    "AUDIENCE_WORKER_CONCURRENCY": count("worker_concurrency", 4),
    "AUDIENCE_WORKER_LEASE": duration("lease", timedelta(seconds=60)),
    "AUDIENCE_CHUNK_TIMEOUT": duration("chunk_timeout", timedelta(minutes=10)),
    "AUDIENCE_WORKER_POLL": duration("poll_interval", timedelta(seconds=1)),
    "AUDIENCE_SCRATCH_DIR": Variable(
        "scratch_dir", None, (("/var/tmp/audience", Path("/var/tmp/audience")),)
    ),
    "AUDIENCE_METRICS_PUBLIC": Variable(
        "metrics_public", False, (("true", True), ("no", False)), ("public",)
    ),
    "AUDIENCE_READ_TIMEOUT": duration("read_timeout", timedelta(seconds=30)),
    "AUDIENCE_MAX_CONNECTIONS": replace(count("max_connections", 0), default=None),
    "AUDIENCE_MAX_INFLIGHT_BYTES": count("max_inflight_bytes", 256 * 1024 * 1024),
    "AUDIENCE_DB_LOCK_TIMEOUT": duration("db_lock_timeout", timedelta(seconds=10)),
}
# A retry base longer than the default cap (5m) is refused (see below): its good values are
# read beside a cap long enough.
PAIRED = {"AUDIENCE_DELIVERY_RETRY_BASE": {"AUDIENCE_DELIVERY_RETRY_CAP": "36500d"}}
GOOD = [
    pytest.param(name, raw, expected, id=f"{name}={raw!r}")
    for name, variable in VARIABLES.items()
    for raw, expected in variable.good
]
BAD = [
    pytest.param(name, raw, id=f"{name}={raw!r}")
    for name, variable in VARIABLES.items()
    for raw in variable.bad
]


def documented() -> dict[str, str]:
    """The configuration table of the README: variable -> its default cell."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(AUDIENCE_[A-Z0-9_]+)` \| ([^|]*) \|", section, re.MULTILINE))


def test_every_variable_in_the_source_is_documented_and_tested() -> None:
    source = Path(settings_module.__file__).read_text()
    read = set(re.findall(r"AUDIENCE_[A-Z0-9_]*[A-Z0-9]", source))
    assert read == set(VARIABLES)
    assert read == set(documented())
    for name, variable in VARIABLES.items():
        assert variable.good, name
        anything_goes = {"AUDIENCE_DESTINATIONS", "AUDIENCE_SEGMENT_PREFIX", "AUDIENCE_SCRATCH_DIR"}
        assert variable.bad or name in anything_goes, f"{name} has no bad value tested"


@pytest.mark.parametrize("name", VARIABLES)
def test_default_from_an_empty_environment(name: str) -> None:
    variable = VARIABLES[name]
    assert getattr(Settings.from_env({}), variable.attribute) == variable.default


@pytest.mark.parametrize("name", VARIABLES)
def test_default_is_the_one_documented(name: str) -> None:
    variable = VARIABLES[name]
    cell = documented()[name].strip()
    if cell == "unset":
        assert not variable.default
        return
    value = re.match(r"`([^`]*)`", cell)
    assert value is not None, f"{name}: default cell {cell!r}"
    if value[1].startswith("<temp dir>"):  # resolved where the files are made
        assert variable.default is None
        return
    parsed = Settings.from_env({name: value[1]})
    assert getattr(parsed, variable.attribute) == variable.default


@pytest.mark.parametrize(("name", "raw", "expected"), GOOD)
def test_good_value_is_parsed(name: str, raw: str, expected: object) -> None:
    parsed = Settings.from_env({name: raw, **PAIRED.get(name, {})})
    assert getattr(parsed, VARIABLES[name].attribute) == expected


@pytest.mark.parametrize(("name", "raw"), BAD)
def test_bad_value_is_one_line_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    message = str(caught.value)
    assert message.startswith(name), message
    assert "\n" not in message


@pytest.mark.parametrize("name", [n for n in VARIABLES if n != "AUDIENCE_SEGMENT_PREFIX"])
@pytest.mark.parametrize("blank", ["", "  ", "\t\n"])
def test_blank_value_counts_as_unset(name: str, blank: str) -> None:
    assert Settings.from_env({name: blank}) == Settings.from_env({})


def test_a_named_destinations_file_must_exist_the_default_need_not() -> None:
    assert not Settings.from_env({}).destinations_explicit
    assert Settings.from_env({"AUDIENCE_DESTINATIONS": "d.toml"}).destinations_explicit


def test_retry_cap_shorter_than_base_names_both() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"AUDIENCE_DELIVERY_RETRY_BASE": "2m", "AUDIENCE_DELIVERY_RETRY_CAP": "90s"}
        )
    assert str(caught.value) == (
        "AUDIENCE_DELIVERY_RETRY_CAP='90s' is shorter than AUDIENCE_DELIVERY_RETRY_BASE='2m'; "
        "the longest retry delay must be at least the first"
    )


def test_retry_base_longer_than_the_default_cap_names_both() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AUDIENCE_DELIVERY_RETRY_BASE": "10m"})
    assert str(caught.value).startswith(
        "AUDIENCE_DELIVERY_RETRY_CAP=5m (the default) is shorter than "
        "AUDIENCE_DELIVERY_RETRY_BASE='10m'"
    )


def test_retry_cap_equal_to_base_is_fine() -> None:
    env = {"AUDIENCE_DELIVERY_RETRY_BASE": "1m", "AUDIENCE_DELIVERY_RETRY_CAP": "60s"}
    parsed = Settings.from_env(env)
    assert parsed.retry_base == parsed.retry_cap == timedelta(minutes=1)


@pytest.mark.parametrize(
    ("name", "raw", "secret"),
    [
        ("AUDIENCE_API_KEYS", "acme:s3cret-1,beta:s3cret-1", "s3cret"),
        ("AUDIENCE_API_KEYS", "acme:s3cret-1,beta:", "s3cret"),
        ("AUDIENCE_API_KEYS", "acme:s3cret-1,beta:s3crét", "s3cr"),
        ("AUDIENCE_DATABASE_URL", "mysql://user:hunter2@db/audience", "hunter2"),
        ("AUDIENCE_DATABASE_URL", "postgresql//user:hunter2@db/audience", "hunter2"),
        ("AUDIENCE_DATABASE_URL", "postgresql://user:hunter2@db:abc/audience", "hunter2"),
    ],
)
def test_messages_never_show_a_secret(name: str, raw: str, secret: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert secret not in str(caught.value)


def test_api_key_errors_name_the_entry_by_position() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AUDIENCE_API_KEYS": "acme:k1,,beta:k2,gamma:k1"})
    assert str(caught.value) == (
        "AUDIENCE_API_KEYS entry 4 gives the key of entry 1 to another tenant"
    )


def test_a_long_bad_value_is_cut_short() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AUDIENCE_PORT": "9" * 1000})
    assert len(str(caught.value)) < 200


# --- the command, as a real process ---------------------------------------------------------


def audience_server(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audience_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=clean_env(**env),
    )


def usable(tmp_path: Path) -> dict[str, str]:
    """Server settings that work, so a command that ignored a bad one would just run."""
    nothing = tmp_path / "no-destinations.toml"
    nothing.touch()
    return {
        "AUDIENCE_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
        "AUDIENCE_PORT": str(free_port()),
        "AUDIENCE_DESTINATIONS": str(nothing),
        "AUDIENCE_WORKER": "false",
        "AUDIENCE_LOG_LEVEL": "WARNING",
    }


BROKEN = {
    "AUDIENCE_PORT": "abc",
    "AUDIENCE_DATABASE_URL": "junk",
    "AUDIENCE_LOG_LEVEL": "bogus",
    "AUDIENCE_SESSION_TTL": "nan",
    "AUDIENCE_API_KEYS": ",",
}


@pytest.mark.slow
@pytest.mark.parametrize("command", [["serve"], ["worker", "--drain"], ["migrate"]])
@pytest.mark.parametrize(
    ("name", "raw"),
    [("AUDIENCE_PORT", "abc"), ("AUDIENCE_LOG_LEVEL", "bogus"), ("AUDIENCE_DATABASE_URL", "junk")],
)
def test_server_command_stops_on_a_bad_setting_in_one_line(
    tmp_path: Path, command: list[str], name: str, raw: str
) -> None:
    done = audience_server(*command, cwd=tmp_path, **(usable(tmp_path) | {name: raw}))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"audience-server: {name}="), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "a.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("port", ["0", "65536"])
def test_serve_port_flag_out_of_range_is_one_line(tmp_path: Path, port: str) -> None:
    done = audience_server("serve", "--port", port, cwd=tmp_path, **usable(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"audience-server: --port {port} is not a port; use 1 to 65535\n"


def three_users(tmp_path: Path) -> Path:
    path = tmp_path / "users.csv"
    path.write_text("email\na@example.com\nb@example.com\nc@example.com\n")
    return path


@pytest.mark.slow
def test_client_commands_ignore_broken_server_settings_when_unreachable(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    args = ["--name", "Broken", "--url", nowhere, "--max-attempts", "1"]
    done = audience_server("upload", str(three_users(tmp_path)), *args, cwd=tmp_path, **BROKEN)
    assert done.returncode == 3, done.stderr  # unreachable, not a usage error
    assert "AUDIENCE_" not in done.stderr


@pytest.mark.slow
def test_client_commands_work_with_broken_server_settings(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "server.log").start()
    try:
        url = ["--url", server.url]
        users = str(three_users(tmp_path))
        upload = audience_server(
            "upload", users, "--name", "Broken", "--session-id", "s-1", *url, cwd=tmp_path, **BROKEN
        )
        assert upload.returncode == 0, upload.stderr
        status = audience_server("status", "s-1", "--json", *url, cwd=tmp_path, **BROKEN)
        assert status.returncode == 0, status.stderr
        body = json.loads(status.stdout)
        assert (body["sessionId"], body["receivedUsers"]) == ("s-1", 3)
        sessions = audience_server("sessions", *url, cwd=tmp_path, **BROKEN)
        assert sessions.returncode == 0, sessions.stderr
        assert "s-1" in sessions.stdout
    finally:
        server.stop()

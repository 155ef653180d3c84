"""The provider registry (kind -> "module:Class", imported on use, each destination's provider
built once) and the in-memory RecordingProvider, alone and behind the real worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import orjson
import pytest
from sqlalchemy import Engine

from audience_server.app import Destinations
from audience_server.destinations import DestinationConfig, DestinationsError, OptionError
from audience_server.providers import (
    REGISTRY,
    UnknownKind,
    build,
    configured_destinations,
    provider_class,
)
from audience_server.providers.base import (
    Chunk,
    ChunkResult,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.file import FileProvider
from audience_server.providers.meta import MetaProvider
from audience_server.providers.recording import RecordingProvider
from audience_server.settings import Settings
from tests.conftest import make_users
from tests.helpers import errors, serve, status, upload

# -- the registry ----------------------------------------------------------------------------


def test_every_kind_names_a_provider_class() -> None:
    assert sorted(REGISTRY) == ["facebook", "file", "google", "klaviyo", "tiktok", "webhook"]
    for kind, target in REGISTRY.items():
        cls = provider_class(kind)
        assert f"{cls.__module__}:{cls.__qualname__}" == target
        assert callable(cls.from_config) and callable(cls.send) and callable(cls.aclose)
    assert provider_class("facebook") is MetaProvider  # the kind keeps Meta's old name


def test_an_unknown_kind_says_what_is_known() -> None:
    known = "known kinds: facebook, file, google, klaviyo, tiktok, webhook"
    with pytest.raises(UnknownKind) as caught:
        provider_class("webhok")
    assert str(caught.value) == f"unknown kind 'webhok' (did you mean 'webhook'?); {known}"
    with pytest.raises(LookupError) as far:
        provider_class("carrier-pigeon")
    assert str(far.value) == f"unknown kind 'carrier-pigeon'; {known}"


def test_a_kind_module_is_imported_only_when_used() -> None:
    code = (
        "import sys\n"
        "from audience_server.providers import provider_class\n"
        "provider_class('file')\n"
        "print(*(m for m in sys.modules if m.startswith('audience_server.providers.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = {name.removeprefix("audience_server.providers.") for name in out.split()}
    assert "file" in loaded
    assert not loaded & {"meta", "tiktok", "klaviyo", "google", "webhook", "http"}


def test_build_makes_the_provider_of_a_config(tmp_path: Path) -> None:
    config = DestinationConfig("files", "file", {"dir": str(tmp_path), "chunk_size": 5}, line=1)
    provider = build(config)
    assert isinstance(provider, FileProvider) and provider.chunk_size == 5
    with pytest.raises(OptionError, match="chunk_size: must be an integer from 1 to 1000000"):
        build(DestinationConfig("files", "file", {"chunk_size": 0}, line=1))


class Counted(RecordingProvider):
    """A provider that counts how often one is built from a config."""

    built: ClassVar[list[str]] = []

    @classmethod
    def from_config(cls, config: DestinationConfig) -> Counted:
        cls.built.append(config.id)
        return cls(chunk_size=7)


def test_each_configured_provider_is_built_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REGISTRY, "counted", f"{__name__}:Counted")
    monkeypatch.setattr(Counted, "built", [])
    path = tmp_path / "destinations.toml"
    path.write_text(
        '[[destinations]]\nid = "a"\nkind = "counted"\n\n'
        '[[destinations]]\nid = "b"\nkind = "counted"\n\n'
        f'[[destinations]]\nid = "files"\nkind = "file"\ndir = "{tmp_path}"\n'
    )
    built = configured_destinations(path, explicit=True, environ={})
    assert Counted.built == ["a", "b"]  # validating a table built the provider kept
    assert list(built) == ["a", "b", "files"]
    assert [config.id for config, _ in built.values()] == ["a", "b", "files"]
    assert isinstance(built["a"][1], Counted) and built["a"][1] is not built["b"][1]
    assert isinstance(built["files"][1], FileProvider)


def test_configured_destinations_reports_bad_options_and_kinds(tmp_path: Path) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text('[[destinations]]\nid = "w"\nkind = "webhook"\nurl = "ftp://x"\n')
    with pytest.raises(DestinationsError) as caught:
        configured_destinations(path, explicit=True, environ={})
    assert str(caught.value) == (
        f'{path} line 4: destination "w" field url: must be an http:// or https:// URL'
    )
    path.write_text('[[destinations]]\nid = "r"\nkind = "recording"\n')
    with pytest.raises(DestinationsError, match="unknown kind 'recording'"):
        configured_destinations(path, explicit=True, environ={})  # a test double, not a kind


def test_without_a_file_the_default_file_destination_is_built(tmp_path: Path) -> None:
    built = configured_destinations(tmp_path / "missing.toml", explicit=False, environ={})
    ((config, provider),) = built.values()
    assert (config.id, config.kind) == ("file", "file")
    assert isinstance(provider, FileProvider)


def test_a_large_file_is_synced_as_it_is_written_and_ends_whole(tmp_path: Path) -> None:
    provider = FileProvider(tmp_path, chunk_size=100, sync_every=1024)
    seg = Segment("file", "default", "big", "VIP", "VIP", "custom", total_users=300)
    lines = [orjson.dumps({"email": f"user{i}@example.com", "n": i}) for i in range(300)]

    async def main() -> list[int]:
        synced = []
        for index in range(3):
            part = lines[index * 100 : (index + 1) * 100]
            await provider.send(seg, Chunk(index + 1, index == 2, encoded=part))
            synced.append(seg.state["sync"].synced_to)
        return synced

    synced = asyncio.run(main())
    assert 0 < synced[0] <= synced[1]  # synced while written (one sync at a time)
    assert (tmp_path / "big.ndjson").read_bytes() == b"\n".join(lines) + b"\n"
    assert [p.name for p in tmp_path.iterdir()] == ["big.ndjson"]


# -- the recording provider ------------------------------------------------------------------


def segment(session_id: str = "s1") -> Segment:
    return Segment("rec", "default", session_id, "VIP", "VIP", "custom", total_users=3)


def test_recording_provider_records_and_answers_as_scripted() -> None:
    provider = RecordingProvider(chunk_size=2)
    provider.script(ChunkResult(invalid=1), RetryableError("busy", retry_after=5))
    users = [{"email": "a@example.com"}, {"email": "b@example.com"}]
    seg = segment()

    async def main() -> None:
        assert await provider.send(seg, Chunk(1, False, users)) == ChunkResult(invalid=1)
        with pytest.raises(RetryableError, match="busy") as caught:
            await provider.send(seg, Chunk(2, True, users[:1]))
        assert caught.value.retry_after == 5
        # a new attempt; the script is used up, so every chunk succeeds
        assert await provider.send(seg, Chunk(1, False, users)) == ChunkResult()
        assert await provider.send(seg, Chunk(2, True, users[:1])) == ChunkResult()
        await provider.aclose()

    asyncio.run(main())
    assert [(s.chunk.index, s.chunk.last, s.ok) for s in provider.sent] == [
        (1, False, True),
        (2, True, False),
        (1, False, True),
        (2, True, True),
    ]
    assert [len(attempt) for attempt in provider.attempts("s1")] == [2, 2]
    assert provider.delivered("s1") == [*users, users[0]]
    assert provider.delivered("other") is None and provider.attempts("other") == []
    assert provider.closed


def test_recording_provider_copies_what_it_is_sent() -> None:
    provider = RecordingProvider()
    users = [{"email": "a@example.com"}]
    asyncio.run(provider.send(segment(), Chunk(1, True, users)))
    users.append({"email": "b@example.com"})  # the worker reuses its buffers
    assert provider.delivered("s1") == [{"email": "a@example.com"}]


def test_an_attempt_that_failed_on_its_last_chunk_is_not_delivered() -> None:
    provider = RecordingProvider()
    provider.script(PermanentError("no"))
    with pytest.raises(PermanentError):
        asyncio.run(provider.send(segment(), Chunk(1, True, [{"email": "a@example.com"}])))
    assert provider.delivered("s1") is None


def test_recording_provider_from_config() -> None:
    config = DestinationConfig("rec", "recording", {"chunk_size": 3}, line=1)
    assert RecordingProvider.from_config(config).chunk_size == 3
    with pytest.raises(OptionError, match="chunk_size"):
        RecordingProvider.from_config(DestinationConfig("rec", "recording", {"chunk_size": 0}, 1))


# -- behind the real worker ------------------------------------------------------------------


def recording(provider: RecordingProvider) -> Destinations:
    return {"rec": (DestinationConfig("rec", "recording", {}, line=1), provider)}


def test_worker_delivers_a_three_batch_session_in_order(fast: Settings, engine: Engine) -> None:
    users = make_users(30)
    provider = RecordingProvider(chunk_size=10)
    with serve(fast, engine, recording(provider)) as client:
        assert upload(client, "three", users, 10, "?sync=true").status_code == 200
        body = status(client, "three")
    assert provider.delivered("three") == users  # sequence order, though batch 1 came last
    (attempt,) = provider.attempts("three")
    assert [(s.chunk.index, s.chunk.last) for s in attempt] == [(1, False), (2, False), (3, True)]
    assert {s.segment.segment_name for s in attempt} == {"blotout_High_Value_Customers_Q1"}
    (delivery,) = body["deliveries"]
    assert delivery == delivery | {
        "destination": "rec",
        "kind": "recording",
        "state": "succeeded",
        "attempts": 1,
        "usersSent": 30,
        "lastError": None,
    }
    assert provider.closed  # the worker released its providers when it stopped


def test_worker_retries_a_scripted_retryable_error(fast: Settings, engine: Engine) -> None:
    users = make_users(12)
    provider = RecordingProvider(chunk_size=5)
    provider.script(ChunkResult(), RetryableError("busy"))  # chunk 2 of attempt 1 fails
    with serve(fast, engine, recording(provider)) as client:
        assert upload(client, "again", users, 4, "?sync=true").status_code == 200
        body = status(client, "again")
    first, second = provider.attempts("again")
    assert [(s.chunk.index, s.ok) for s in first] == [(1, True), (2, False)]
    assert [(s.chunk.index, s.chunk.last) for s in second] == [(1, False), (2, False), (3, True)]
    assert provider.delivered("again") == users
    (delivery,) = body["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["lastError"]) == (
        "succeeded",
        2,
        None,
    )


def test_worker_reports_scripted_results_and_permanent_errors(
    fast: Settings, engine: Engine
) -> None:
    provider = RecordingProvider(chunk_size=10)
    provider.script(ChunkResult(invalid=2))
    with serve(fast, engine, recording(provider)) as client:
        assert upload(client, "counted", make_users(6), 3, "?sync=true").status_code == 200
        (delivery,) = status(client, "counted")["deliveries"]
        assert (delivery["state"], delivery["invalidUsers"]) == ("succeeded", 2)

        provider.script(PermanentError("audience is locked"))
        response = upload(client, "refused", make_users(6), 3, "?sync=true")
        assert response.status_code == 400
        assert errors(response) == ["rec: audience is locked"]
        (delivery,) = status(client, "refused")["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
    assert delivery["lastError"] == "audience is locked"

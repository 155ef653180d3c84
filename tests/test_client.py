"""The client package: its public API, and that it never imports the server."""

from __future__ import annotations

import json
import subprocess
import sys

import audience_server.client as client

# The client's own modules, and the only other ones of the package it may import.
ROOMS = ["commands", "errors", "http", "progress", "readers", "session", "spool", "state"]
SHARED = {"audience_server", "audience_server.states", "audience_server.retry"}
SERVER_LIBRARIES = ("sqlalchemy", "starlette", "uvicorn", "alembic", "psycopg", "msgspec")


def test_the_client_imports_no_server_code() -> None:
    modules = ", ".join(f"audience_server.client.{room}" for room in ROOMS)
    probe = (
        f"import json, sys, audience_server.client, {modules}; print(json.dumps(list(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    ours = {f"audience_server.client.{room}" for room in ROOMS} | {"audience_server.client"}
    assert {m for m in loaded if m.startswith("audience_server")} - ours == SHARED
    assert not [m for m in loaded if m.split(".")[0] in SERVER_LIBRARIES]


def test_the_readme_api_is_exported() -> None:
    assert callable(client.upload) and callable(client.status)
    for error in (client.Rejected, client.Unreachable, client.SessionFailed, client.InputError):
        assert issubclass(error, client.UploadError)
    assert set(client.__all__) <= set(dir(client))

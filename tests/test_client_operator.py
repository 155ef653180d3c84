"""client/commands.py: ``audience-server retry`` and ``abort`` against real server processes,
on both databases: a webhook delivery that failed is re-queued and succeeds; abort needs
``--yes`` without a terminal and a confirmation on one; refusals carry the server's words."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from audience_server.cli import build_parser
from audience_server.client.commands import _abort_command
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET, eventually, form
from tests.servers import ServerProcess, clean_env, free_port

pytestmark = pytest.mark.slow
USERS = [{"email": f"user{i}@example.com"} for i in range(5)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator's script runs it: stdin is not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "audience_server", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def upload(server: ServerProcess, key: str, total_batches: int = 1) -> None:
    """Sends batch 1 of ``total_batches`` (the whole session when 1)."""
    fields = form(key, 1, total_batches, len(USERS) * total_batches, USERS)
    files = {name: (None, value) for name, value in fields.items()}
    response = httpx2.post(f"{server.url}/audience", files=files, timeout=30)
    assert response.status_code == 200, response.text


def status(server: ServerProcess, key: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.get(f"{server.url}/audience/sessions/{key}", timeout=30).json()
    return body


@pytest.fixture
def hooked(database_url: str, tmp_path: Path, hook: WebhookEmulator) -> Iterator[ServerProcess]:
    """A server delivering to ``hook`` as ``crm``, one attempt per delivery: the first
    refusal fails it, so only a retry can deliver it."""
    toml = tmp_path / "destinations.toml"
    toml.write_text(
        f'[[destinations]]\nid = "crm"\nkind = "webhook"\nurl = "{hook.url}"\n'
        'secret = "${HOOK_SECRET}"\n'
    )
    server = ServerProcess(
        database_url,
        tmp_path / "server.log",
        AUDIENCE_DESTINATIONS=str(toml),
        HOOK_SECRET=HOOK_SECRET,
        AUDIENCE_WORKER_POLL="0.1s",
        AUDIENCE_DELIVERY_MAX_ATTEMPTS="1",
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_retry_requeues_a_failed_webhook_delivery_which_then_succeeds(
    hooked: ServerProcess, hook: WebhookEmulator
) -> None:
    hook.fail(400, times=1)
    upload(hooked, "r1")
    failed = eventually(lambda: status(hooked, "r1"), lambda s: s["state"] == "failed", 60)
    assert failed["deliveries"][0]["state"] == "failed" and len(hook.rejected) == 1

    result = cli("retry", "r1", "--url", hooked.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "re-queued: crm"
    done = eventually(lambda: status(hooked, "r1"), lambda s: s["state"] == "delivered", 60)
    assert done["deliveries"][0]["state"] == "succeeded"
    assert sorted(u["email"] for u in hook.wait_for_segment("r1")) == sorted(
        u["email"] for u in USERS
    )

    again = cli("retry", "r1", "--url", hooked.url, "--json")
    assert again.returncode == 1 and again.stdout == ""
    assert "session r1 has no failed delivery to retry." in again.stderr

    ended = cli("abort", "r1", "--yes", "--url", hooked.url)
    assert ended.returncode == 1
    assert "had already ended delivered" in ended.stderr
    assert status(hooked, "r1")["state"] == "delivered"


def test_retry_json_and_unknown_session(hooked: ServerProcess, hook: WebhookEmulator) -> None:
    hook.fail(400, times=1)
    upload(hooked, "r2")
    eventually(lambda: status(hooked, "r2"), lambda s: s["state"] == "failed", 60)
    result = cli("retry", "r2", "--url", hooked.url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sessionId": "r2", "retried": ["crm"]}

    unknown = cli("retry", "nope", "--url", hooked.url)
    assert unknown.returncode == 1
    assert "session nope does not exist." in unknown.stderr


def test_abort_without_a_terminal_needs_yes(receiving: ServerProcess) -> None:
    upload(receiving, "a1", total_batches=2)

    refused = cli("abort", "a1", "--url", receiving.url)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert status(receiving, "a1")["state"] == "receiving"

    done = cli("abort", "a1", "--yes", "--url", receiving.url)
    assert done.returncode == 0, done.stderr
    assert "aborted (aborted by an operator)" in done.stdout
    after = status(receiving, "a1")
    assert (after["state"], after["reason"]) == ("aborted", "aborted by an operator")

    upload(receiving, "a2", total_batches=2)
    as_json = cli("abort", "a2", "--yes", "--json", "--url", receiving.url)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["state"] == "aborted"

    unknown = cli("abort", "nope", "--yes", "--url", receiving.url)
    assert unknown.returncode == 1 and "session nope does not exist." in unknown.stderr


def test_an_unreachable_server_exits_3_as_for_status() -> None:
    """In process, with one attempt per request: the exit code, not the backoff, is tested."""
    url = f"http://127.0.0.1:{free_port()}"
    codes = []
    for argv in (["abort", "a1", "--yes"], ["retry", "a1"], ["status", "a1"]):
        args = build_parser().parse_args([*argv, "--url", url])
        args.max_attempts = 1
        codes.append(args.run(args))
    assert codes == [3, 3, 3]


def test_abort_on_a_terminal_asks_with_name_and_state(
    receiving: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tty path, in process: the answer comes from an injected ``ask``."""
    upload(receiving, "t1", total_batches=2)
    args = build_parser().parse_args(["abort", "t1", "--url", receiving.url])
    prompts: list[str] = []

    def answer(reply: str) -> Callable[[str], str]:
        def ask(prompt: str) -> str:
            prompts.append(prompt)
            return reply

        return ask

    assert _abort_command(args, ask=answer("\n"), is_terminal=lambda: True) == 1
    assert prompts == ["abort session t1 (High Value Customers Q1, receiving)? [y/N] "]
    assert "not aborted" in capsys.readouterr().err
    assert status(receiving, "t1")["state"] == "receiving"

    assert _abort_command(args, ask=answer("Yes\n"), is_terminal=lambda: True) == 0
    assert "aborted" in capsys.readouterr().out
    assert status(receiving, "t1")["state"] == "aborted"

    missing = build_parser().parse_args(["abort", "nope", "--url", receiving.url])
    assert _abort_command(missing, ask=answer("y\n"), is_terminal=lambda: True) == 1
    assert len(prompts) == 2  # no question about a session that does not exist

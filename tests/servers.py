"""Real server processes for the tests that need several of them, or a kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

TEST_VARIABLES = ("AUDIENCE_TEST_",)  # the suite's own settings, never the server's


def clean_env(**audience: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's without any ``AUDIENCE_*``
    variable (a developer's exported settings must not change what is tested), plus
    ``audience``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    return env | audience


def clear_audience_variables() -> None:
    """Forget the shell's ``AUDIENCE_*`` settings for this test process (not the suite's own)."""
    for name in [k for k in os.environ if k.startswith("AUDIENCE_")]:
        if not name.startswith(TEST_VARIABLES):
            del os.environ[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``audience-server serve`` in a subprocess on a free loopback port."""

    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        """``env`` adds AUDIENCE_* variables; by default no worker runs and no destination is
        configured (an empty destinations file beside the log)."""
        self.database_url = database_url
        self.log_path = log_path
        if "AUDIENCE_DESTINATIONS" not in env:
            empty = log_path.parent / "no-destinations.toml"
            empty.touch()
            env = {"AUDIENCE_DESTINATIONS": str(empty), "AUDIENCE_WORKER": "false", **env}
        self.env = env
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = clean_env(AUDIENCE_DATABASE_URL=self.database_url, **self.env)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "audience_server", "serve", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx2.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.05)  # polling for readiness, not waiting for a result
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerProcess:
    """``audience-server worker`` in a subprocess."""

    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        self.env = clean_env(AUDIENCE_DATABASE_URL=database_url, **env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "audience_server", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()

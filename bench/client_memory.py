"""Peak RSS of ``audience-server upload`` for 100,000 vs 1,000,000 users (a CSV file) sent
to a local server with its worker off: the client's memory must not grow with the file.

    .venv/bin/python -m bench.client_memory [--small 100000] [--large 1000000]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2

from bench.common import audience_server_command, free_port, server_env


def write_csv(path: Path, count: int) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "phone", "firstName", "lastName", "country", "tier"])
        for i in range(count):
            writer.writerow([f"user{i}@example.com", f"+1415{i:07d}", "Jane", "Doe", "US", i % 5])


def measure(workdir: Path, url: str, count: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one upload subprocess."""
    source = workdir / f"users-{count}.csv"
    write_csv(source, count)
    started = time.monotonic()
    options = ["--url", url, "--concurrency", "4", "--progress-interval", "3600"]
    child = subprocess.Popen(
        [*audience_server_command(), "upload", str(source), "--name", f"bench {count}", *options],
        stdout=subprocess.DEVNULL,
    )
    _, code, usage = os.wait4(child.pid, 0)
    elapsed = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"upload of {count} users failed ({code})")
    return usage.ru_maxrss / 1024, elapsed  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        (workdir / "none.toml").touch()
        port = free_port()
        env = server_env(f"sqlite:///{workdir / 'bench.db'}")
        env |= {"AUDIENCE_WORKER": "false", "AUDIENCE_DESTINATIONS": str(workdir / "none.toml")}
        server = subprocess.Popen(
            [*audience_server_command(), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx2.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.1)
            results = {count: measure(workdir, url, count) for count in (args.small, args.large)}
        finally:
            server.terminate()
            server.wait(30)
    for count, (rss, seconds) in results.items():
        print(f"{count:>10,} users: client peak RSS {rss:6.1f} MiB, {seconds:6.1f} s")
    small, large = (results[c][0] for c in (args.small, args.large))
    print(f"ratio large/small peak RSS: {large / small:.2f}")


if __name__ == "__main__":
    main()

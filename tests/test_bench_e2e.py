"""The end-to-end benchmark's harness (bench/e2e.py) runs whole on a small file: the default
server and the real client, every phase timed from the server's events, the delivered file
checked against the unique users the generator wrote (its line count)."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import orjson
import pytest

from audience_server.client import upload
from bench import e2e
from bench.common import HOST, BenchError

pytestmark = pytest.mark.slow

USERS = 5_000


def test_generated_file_counts_its_duplicates_and_is_reused(tmp_path: Path) -> None:
    made = e2e.dataset(tmp_path, USERS, seed=3)
    with made.path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == e2e.HEADER
    body = [tuple(row) for row in rows[1:]]
    assert len(body) == USERS
    assert len(set(body)) == made.unique
    assert len({row[0] for row in body}) == made.unique  # only exact repeats share an e-mail
    assert 0.005 * USERS < USERS - made.unique < 0.02 * USERS
    again = e2e.dataset(tmp_path, USERS, seed=3)
    assert again.generated_s is None  # from the cache
    assert (again.path, again.unique, again.bytes) == (made.path, made.unique, made.bytes)
    other = e2e.dataset(tmp_path, USERS, seed=4)
    assert other.path != made.path
    assert other.path.read_bytes() != made.path.read_bytes()


def test_users_option_takes_lists_and_repeats() -> None:
    args = e2e.parse_args(["--users", "1_000,300", "--users", "200"])
    assert args.users == [200, 300, 1_000]
    assert e2e.parse_args([]).users == [1_000_000]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--users", "0"])


def test_harness_runs_every_phase_and_checks_the_delivered_file(tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("audience-bench-e2e-*"))
    document = e2e.run(e2e.parse_args(["--users", str(USERS), "--results-dir", str(tmp_path)]))

    (result,) = document["runs"]
    unique = document["datasets"][str(USERS)]["unique"]
    assert result["cli_exit"] == 0
    assert result["first_byte_source"] == "socket"
    for phase in ("count", "upload", "assembly", "delivery", "whole"):
        assert result[f"{phase}_s"] > 0, phase
    assert result["whole_s"] == pytest.approx(
        result["upload_s"] + result["assembly_s"] + result["delivery_s"]
    )
    assert result["delivered_lines"] == unique == result["unique"] < USERS
    assert result["server_tree_peak_mib"] > 0
    assert result["delivery_process_peak_mib"] > 0
    assert result["client_peak_mib"] > 0
    assert any(p["role"] == "serve" for p in result["processes"])
    summary = document["summary"][str(USERS)]
    assert summary["upload_users_per_s"] == pytest.approx(USERS / result["upload_s"])
    assert document["ratios"]["whole_over_upload"]["value"] == pytest.approx(
        result["whole_s"] / result["upload_s"]
    )
    written = orjson.loads(Path(document["path"]).read_bytes())
    assert written["runs"] == document["runs"]
    # Every process stopped, every work directory gone.
    assert set(Path(tempfile.gettempdir()).glob("audience-bench-e2e-*")) == before
    for proc in result["processes"]:
        found = e2e.proc_stat(proc["pid"])
        assert found is None or found[1] != proc["start"], proc


def test_harness_follows_the_session_when_the_client_stops_waiting(tmp_path: Path) -> None:
    """When ``upload --wait`` gives up with every batch sent, the harness waits on its own;
    when no session arrived at all, the run fails."""
    data = e2e.dataset(tmp_path, USERS, seed=3)
    trial = e2e.Trial(data, timeout_s=60, keep=False)
    try:
        trial.start_server()
        with pytest.raises(BenchError, match="upload exited with 3; the session is None"):
            trial.wait_ended(3)
        with data.path.open(newline="", encoding="utf-8") as handle:
            users = [{k: v for k, v in row.items() if v} for row in csv.DictReader(handle)]
        upload(users, name="e2e follow", url=f"http://{HOST}:{trial.port}")  # no waiting
        trial.wait_ended(4)
        trial.stop_server()
        events, lines = trial.verify()
    finally:
        trial.close()
    assert events.state == "delivered"
    assert lines == data.unique
    assert events.at["complete"] <= events.at["assembled"] <= events.at["delivered"]
    assert not trial.workdir.exists()

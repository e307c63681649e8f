"""End to end through real processes: mock-serve, sync, report, payouts, status, kill -9."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import httpx
from conftest import peek, run_txagg, txagg_command, wait_for

from txagg.models import loads

FAST = ("--rate-limit", "1000", "--per", "1")


def truth(url: str, path: str) -> dict:
    return loads(httpx.get(url + path, timeout=30).content)


def without_as_of(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "asOf"}


def transactions(store) -> int:
    return store.counters().get("transactions", 0)


def assert_store_matches_truth(url: str, db: str, sample: int | None = None) -> None:
    users = truth(url, "/users")["items"]
    chosen = users if sample is None else random.Random(0).sample(users, sample)
    for expected in chosen:
        result = run_txagg("report", expected["userId"], "--db", db, "--json")
        assert result.returncode == 0, result.stderr
        assert without_as_of(loads(result.stdout)) == without_as_of(expected)
    payouts = run_txagg("payouts", "--db", db, "--json")
    assert loads(payouts.stdout)["items"] == truth(url, "/payouts")["items"]
    status = json.loads(run_txagg("status", "--db", db, "--json").stdout)
    assert status["users"] == len(users)
    assert status["transactions"] == sum(user["transactions"] for user in users)


def sync_args(url: str, db: str, *extra: str) -> list[str]:
    return ["sync", "--api-url", url, "--db", db, "--settle", "0", "--json", *FAST, *extra]


def test_sync_then_every_report_equals_the_ground_truth(mock_process, tmp_path):
    mock = mock_process("--seed", "3", "--users", "60", "--history", "12345", *FAST)
    db = str(tmp_path / "store.db")
    result = run_txagg(*sync_args(mock.url, db))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not a terminal: nothing on stderr but errors
    summary = json.loads(result.stdout)
    assert summary["new"] == 12345 and summary["complete"] is True
    assert summary["pages"] == 13 and summary["throttled"] == 0
    assert_store_matches_truth(mock.url, db)
    again = json.loads(run_txagg(*sync_args(mock.url, db)).stdout)
    assert again["new"] == 0  # nothing new: nothing counted twice


def test_kill_9_at_random_instants_loses_nothing_and_counts_nothing_twice(mock_process, tmp_path):
    mock = mock_process("--seed", "5", "--users", "40", "--history", "60000", *FAST)
    db = str(tmp_path / "store.db")
    rng = random.Random(11)
    for _ in range(5):
        process = subprocess.Popen(
            txagg_command(*sync_args(mock.url, db)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = run_txagg(*sync_args(mock.url, db))
    assert final.returncode == 0, final.stderr
    assert_store_matches_truth(mock.url, db)


def test_two_syncs_at_once_one_works_the_other_exits_75(mock_process, tmp_path):
    # A real-ish limit (5 a second) so the first sync is still working when the second starts.
    limit = ["--rate-limit", "5", "--per", "1"]
    mock = mock_process("--seed", "8", "--users", "30", "--history", "20000", *limit)
    db = str(tmp_path / "store.db")
    args = ["sync", "--api-url", mock.url, "--db", db, "--settle", "0", "--json"]
    first = subprocess.Popen(txagg_command(*args, *limit), stdout=subprocess.PIPE, text=True)
    # Its first page is stored: it holds the store, with 20 more pages (4 s) still to read.
    wait_for(lambda: peek(db, transactions) or first.poll() is not None)
    assert first.poll() is None, "the first sync ended before the second started"
    second = run_txagg(*args, *limit)
    assert second.returncode == 75
    assert "another sync" in second.stderr
    assert first.wait(timeout=60) == 0
    assert_store_matches_truth(mock.url, db)


def test_fresh_store_status_and_unknown_user(mock_process, tmp_path):
    mock = mock_process("--seed", "1", "--users", "5", "--history", "50", *FAST)
    db = str(tmp_path / "store.db")
    began = time.time()
    run_txagg(*sync_args(mock.url, db))
    unknown = run_txagg("report", "no-such-user", "--db", db)
    assert unknown.returncode == 3 and "no such user" in unknown.stderr
    status = json.loads(run_txagg("status", "--db", db, "--json").stdout)
    # The data is as fresh as the sync that just ran (settle 0), however long the runs took.
    assert status["lagSeconds"] <= time.time() - began + 1 and status["behind"] is False

"""Sync under every fault the contract allows: exact totals afterwards, honest status.

One test per fault kind (in process, the real mock on loopback), and a chaos test that runs
`txagg sync --follow` against `txagg mock-serve --faults ...` with live traffic and kill -9.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import httpx
import pytest
from conftest import peek, run_txagg, txagg_command, wait_for

from txagg import testing
from txagg.report import status_report
from txagg.store import Store
from txagg.sync import Syncer, SyncOptions, sync
from txagg.testing import sync_options
from txagg.verify import verify

FAST = dict(rate_limit=100_000, per=1)


def options(url: str, **extra) -> SyncOptions:
    chaos = dict(overlap=30, check_every=0, timeout=0.5, retry_for=30, max_repair_requests=200)
    return sync_options(url, **{**chaos, **extra})


def differing_users(store: Store, url: str) -> list[str]:
    return testing.differing_users(store, testing.ground_truth(url))


def settle_until_exact(store: Store, url: str, rounds: int = 4) -> None:
    """A final sync and verify, again while the faults leave something unexplained."""
    for _ in range(rounds):
        sync(store, options(url))
        verify(store, options(url))
        if not differing_users(store, url):
            return
    assert differing_users(store, url) == []


FAULTS = {
    # kind: (mock options, sync options, what status must show)
    "error": ({"faults": "error=0.3"}, {}, None),
    "reset": ({"faults": "reset=0.3"}, {}, None),
    "truncate": ({"faults": "truncate=0.3"}, {}, None),
    "nonjson": ({"faults": "nonjson=0.3"}, {}, None),
    "slow": ({"faults": "slow=0.3:1.5"}, {"timeout": 0.4}, None),
    "drift": ({"faults": "drift=0.5"}, {"page_size": 100}, None),
    "duplicate": ({"faults": "duplicate=0.3"}, {}, None),
    "meta": ({"faults": "meta=0.4"}, {}, None),
    "invalid": ({"faults": "invalid=0.05"}, {}, "quarantined"),
    "throttle": ({"faults": "throttle=0.25:1", "history": 1500, "seed": 1}, {}, "throttled"),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_fault_leaves_the_totals_exact(kind, start_mock, store):
    mock_options, sync_options, shown = FAULTS[kind]
    url = start_mock(**{"seed": 13, "users": 60, "history": 6000, **FAST, **mock_options})
    summary = sync(store, options(url, **sync_options))
    injected = httpx.get(url + "/faults").json()["injected"]
    assert injected.get(kind, 0) > 0, f"the mock never injected {kind}"
    if kind in ("error", "reset", "truncate", "nonjson", "slow"):
        assert summary.retries > 0
    settle_until_exact(store, url)
    status = status_report(store)
    if shown == "quarantined":
        assert status["quarantined"] == injected["invalid"]
    if shown == "throttled":
        assert status["rateBudget"]["throttled"] >= 1
    assert status["transactions"] == sum(user["transactions"] for user in testing.ground_truth(url))


@pytest.mark.parametrize("kind", ["late", "conflict", "outside"])
def test_live_faults_leave_the_totals_exact(kind, start_mock, store):
    """Faults that need live traffic: windows after the backfill, new arrivals."""
    faults = {"late": "late=0.5:2", "conflict": "conflict=0.3", "outside": "outside=0.5"}[kind]
    url = start_mock(
        seed=17, users=30, history=500, tx_per_minute=3000, live_for=3, faults=faults, **FAST
    )
    syncer = Syncer(store, options(url, interval=0.2, overlap=10))
    deadline = time.monotonic() + 6  # live traffic for 3 s, then late ones trickle in
    while time.monotonic() < deadline:
        syncer.run(defer_full_pages=True)
        time.sleep(0.2)
    syncer.close()
    assert httpx.get(url + "/faults").json()["injected"].get(kind, 0) > 0
    settle_until_exact(store, url)
    if kind == "conflict":
        assert status_report(store)["conflicts"] > 0


def cursor(store: Store) -> tuple:
    state = store.state()
    return state.get("window_start"), state.get("page"), state.get("position")


CHAOS_FAULTS = (
    "error=0.05,reset=0.03,truncate=0.03,nonjson=0.03,slow=0.03:1.5,late=0.2:2,drift=0.1,"
    "duplicate=0.05,outside=0.05,meta=0.05,invalid=0.02,conflict=0.02,throttle=0.03:1"
)


def test_chaos_follow_with_kills_ends_exact(mock_process, tmp_path):
    mock = mock_process(
        "--seed", "21", "--users", "80", "--history", "8000", "--tx-per-minute", "3000",
        "--live-for", "8", "--faults", CHAOS_FAULTS, "--rate-limit", "100000", "--per", "1",
    )  # fmt: skip
    # Its clock started before it said it was listening; a run reads up to the last whole
    # second before it starts: one more second and a run then reads the last live ones.
    live_read = time.monotonic() + 8 + 1
    db = str(tmp_path / "chaos.db")
    follow = [
        "sync", "--follow", "--api-url", mock.url, "--db", db, "--interval", "0.3",
        "--overlap", "10", "--check-every", "0.5", "--settle", "0.3", "--timeout", "0.5",
        "--retry-for", "20", "--rate-limit", "100000", "--per", "1", "--json",
    ]  # fmt: skip
    rng = random.Random(3)
    for _ in range(3):
        process = subprocess.Popen(
            txagg_command(*follow), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(1.0, 2.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = peek(db, cursor)
    last = subprocess.Popen(txagg_command(*follow), stdout=subprocess.PIPE, text=True)
    # Stopped once it has committed a page of its own (so it is following, its handlers set)
    # and the live traffic, late arrivals included, is over: however slow the machine is.
    wait_for(lambda: peek(db, cursor) not in (None, before) or last.poll() is not None)
    wait_for(lambda: time.monotonic() > live_read, timeout=30)
    assert last.poll() is None
    last.send_signal(signal.SIGTERM)
    out, _ = last.communicate(timeout=30)
    assert last.returncode == 0
    assert json.loads(out)["pages"] > 0
    with Store.open(db) as store:
        settle_until_exact(store, mock.url)
        status = json.loads(run_txagg("status", "--db", db, "--json").stdout)
        assert status["quarantined"] > 0 and status["conflicts"] > 0
        truth = testing.ground_truth(mock.url)
        assert status["transactions"] == sum(user["transactions"] for user in truth)

"""Sync against the real mock upstream (HTTP on loopback): exactness, efficiency, follow."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from conftest import START, peek, txagg_command, wait_for

from txagg.models import loads
from txagg.report import payouts_report
from txagg.store import Store
from txagg.sync import Syncer, sync
from txagg.testing import differing_users, ground_truth, sync_options

UNLIMITED = dict(rate_limit=100_000, per=1)


options = sync_options


@pytest.fixture
def store(either_store):
    """This module's contract, on both backends."""
    return either_store


def assert_exact(store: Store, url: str) -> None:
    truth = ground_truth(url)
    assert differing_users(store, truth) == []
    payouts = loads(httpx.get(url + "/payouts", timeout=30).content)["items"]
    assert payouts_report(store)["items"] == payouts
    assert store.counters()["transactions"] == sum(u["transactions"] for u in truth)


def test_backfill_reads_full_pages_only(start_mock, store):
    url = start_mock(seed=2, users=300, history=25_000, start=START, **UNLIMITED)
    summary = sync(store, options(url))
    assert summary.new == 25_000
    # 25 full pages, the empty page that ends the read, one count that checks all of it (it
    # comes with the window's middle page, already stored: 1000 duplicates). As the window's
    # start moves up behind the read, the records of the second it moves to come back once.
    assert (summary.requests, summary.pages) == (27, 26)
    moves = summary.duplicates - 1000
    assert 0 <= moves <= 25 * 2
    assert (summary.checks, summary.repairs) == (1, 0)
    assert_exact(store, url)


def test_the_same_seed_syncs_to_the_same_store(start_mock, tmp_path):
    answers = []
    for name in ("a", "b"):
        url = start_mock(seed=9, users=20, history=3000, start=START, **UNLIMITED)
        with Store.open(tmp_path / f"{name}.db") as store:
            sync(store, options(url))
            answers.append(payouts_report(store)["items"])
    assert answers[0] == answers[1] and answers[0]


def test_invalid_records_from_the_mock_are_quarantined_not_counted(start_mock, store):
    url = start_mock(seed=4, users=50, history=4000, invalid_ratio=0.05, **UNLIMITED)
    summary = sync(store, options(url))
    assert summary.quarantined > 100
    assert store.counters()["quarantined"] == summary.quarantined
    assert_exact(store, url)


def test_follow_catches_live_and_late_transactions(start_mock, store):
    url = start_mock(
        seed=6,
        users=40,
        history=2000,
        tx_per_minute=6000,
        late_ratio=0.3,
        late_max=2.0,
        **UNLIMITED,
    )
    stop = threading.Event()
    syncer = Syncer(
        store, options(url, interval=0.2, check_every=0.5, overlap=30, settle=0.5), stop=stop
    )
    follower = threading.Thread(target=syncer.follow)
    follower.start()
    try:
        # Until it has read live traffic and run two checks, however slowly the machine goes.
        wait_for(lambda: syncer.summary.checks >= 2 and syncer.summary.new > 2000)
    finally:
        stop.set()
        follower.join(timeout=30)
    assert not follower.is_alive()
    syncer.close()
    # Late ones land up to late_max behind what was already read; once they are all visible,
    # one more run with its check must leave the store equal to the upstream up to a settled
    # instant: nothing lost, nothing counted twice.
    time.sleep(2.5)
    sync(store, options(url, check_every=0, overlap=30))
    settled = store.state_value("position") // 1000 * 1000 - 3000
    upstream = upstream_count(url, settled)
    assert store.count_window(0, settled)[1] == upstream


def upstream_count(url: str, end_ms: int) -> int:
    """The upstream's own count of items with createdAt up to end_ms (whole seconds)."""
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end_ms // 1000))
    meta = httpx.get(url + "/transactions", params={"endDate": end, "limit": 1}).json()["meta"]
    return meta["totalItems"]


def test_follow_stops_cleanly_on_sigterm(mock_process, tmp_path):
    mock = mock_process("--users", "10", "--history", "500", "--tx-per-minute", "600")
    db = str(tmp_path / "s.db")
    process = subprocess.Popen(
        txagg_command(
            "sync",
            "--follow",
            "--interval",
            "0.3",
            "--api-url",
            mock.url,
            "--db",
            db,
            "--rate-limit",
            "1000",
            "--per",
            "1",
            "--settle",
            "0",
            "--json",
            "--quiet",  # no line per poll and check: nobody reads stderr until the end
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def position(after: int = 0) -> int | None:
        """The store's sync position once past ``after`` and the 500 history transactions."""
        assert process.poll() is None, process.stderr.read()
        stored = peek(db, lambda store: store.counters().get("transactions", 0)) or 0
        moment = peek(db, lambda store: store.state_value("position"))
        return moment if stored >= 500 and moment is not None and moment > after else None

    # Following (its handlers set) once it has stored the history and read a later window.
    first = wait_for(position)
    wait_for(lambda: position(after=first))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    summary = json.loads(out)
    assert summary["new"] >= 500 and summary["pages"] >= 2
    with Store.open(db) as store:
        assert store.counters()["transactions"] == summary["new"]

"""txagg verify: finds and repairs what sync missed, resumes after a kill, bounds a liar."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import FakeClock, FakeUpstream
from typer.testing import CliRunner

from txagg.cli import app
from txagg.store import Store, SyncLocked
from txagg.sync import Syncer, SyncOptions
from txagg.verify import verify

BASE_S = 1_700_000_000


def make_items(count: int, every_ms: int = 3_700, first: int = 0):
    return [
        (f"tx{n}", BASE_S * 1000 + n * every_ms, BASE_S + n * every_ms / 1000)
        for n in range(first, first + count)
    ]


def options(**extra) -> SyncOptions:
    defaults = dict(
        api_url="http://upstream.test",
        since=BASE_S * 1000,
        settle=0,
        overlap=60,
        check_every=None,
        page_size=100,
        rate_limit=10_000,
        per=1,
    )
    return SyncOptions(**{**defaults, **extra})


@pytest.fixture
def world(store):
    """A store synced from an upstream that then reveals history sync could not have seen."""
    clock = FakeClock(BASE_S + 5_000)
    shown = make_items(1000)
    upstream = FakeUpstream(list(shown), clock, True, True)
    transport = httpx.MockTransport(upstream.handle)
    syncer = Syncer(store, options(), transport=transport, clock=clock, sleep=clock.sleep)
    syncer.run()
    syncer.close()
    hidden = [item for n, item in enumerate(make_items(1000, first=5000)) if n % 97 == 0]
    # the same instants as old items, so they land deep in the already-read history
    upstream.items += [(tx_id, created - 5000 * 3_700, clock.now) for tx_id, created, _ in hidden]
    return store, upstream, transport, clock, len(hidden)


def run_verify(store, transport, clock, **extra):
    return verify(store, options(**extra), transport=transport, clock=clock)


def stored_ids(store):
    return {row[0] for row in store.conn.execute("SELECT id FROM transactions")}


def test_verify_finds_and_repairs_missing_history(world):
    store, upstream, transport, clock, hidden = world
    assert store.counters()["transactions"] == 1000
    report = run_verify(store, transport, clock)
    assert report.complete and report.repaired == hidden and report.discrepancies == []
    assert stored_ids(store) == {tx_id for tx_id, _, _ in upstream.items}
    assert report.requests < 100  # bisection, not a re-read of all history
    again = run_verify(store, transport, clock)
    assert (again.windowsChecked, again.requests, again.repaired) == (1, 1, 0)


def test_a_killed_verify_resumes_where_it_stopped(world):
    store, upstream, transport, clock, hidden = world
    first = run_verify(store, transport, clock, max_requests=6)
    assert not first.complete and store.state_value("verify")["pending"]
    second = run_verify(store, transport, clock)
    assert second.resumed and second.complete
    assert first.repaired + second.repaired == hidden
    assert stored_ids(store) == {tx_id for tx_id, _, _ in upstream.items}


def test_a_lying_count_is_reported_not_chased(store):
    clock = FakeClock(BASE_S + 5_000)
    upstream = FakeUpstream(make_items(300), clock, True, True)
    honest = upstream.handle

    def lying(request):
        response = honest(request)
        body = json.loads(response.content)
        body["meta"]["totalItems"] += 7
        return httpx.Response(200, json=body)

    transport = httpx.MockTransport(lying)
    syncer = Syncer(store, options(), transport=transport, clock=clock, sleep=clock.sleep)
    syncer.run()
    report = run_verify(store, transport, clock)
    assert report.complete and report.discrepancies
    assert report.requests < 40
    assert store.counters()["transactions"] == 300


def test_only_one_verify_at_a_time(store):
    with store.lock("verify"), pytest.raises(SyncLocked, match="another verify"):
        verify(store, options())


def test_verify_cli_exit_codes(db_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["verify", "--db", str(db_path)])
    assert missing.exit_code == 1 and "no store at" in missing.stderr
    Store.open(db_path).close()
    with Store.open(db_path) as store, store.lock("verify"):
        locked = runner.invoke(app, ["verify", "--db", str(db_path)])
    assert locked.exit_code == 75
    down = runner.invoke(
        app,
        [
            "verify",
            "--db",
            str(db_path),
            "--api-url",
            "http://127.0.0.1:9",
            "--retry-for",
            "0.2",
            "--since",
            "2023-11-14",
        ],
    )
    assert down.exit_code == 1 and "unavailable" in down.stderr


def test_verify_runs_beside_a_following_sync(start_mock, db_path):
    """Two processes' worth of writers on one store: both exact, neither blocks the other."""
    import threading
    import time

    from txagg.models import loads
    from txagg.report import user_report

    fast = dict(rate_limit=100_000, per=1)
    url = start_mock(seed=5, users=30, history=3000, tx_per_minute=3000, live_for=3, **fast)
    live = dict(api_url=url, settle=0, overlap=10, check_every=0.5, interval=0.2, **fast)
    with Store.open(db_path) as first:
        Syncer(first, SyncOptions(**live)).run()
    stop = threading.Event()
    with Store.open(db_path) as for_sync, Store.open(db_path) as for_verify:
        syncer = Syncer(for_sync, SyncOptions(**live), stop=stop)
        follower = threading.Thread(target=syncer.follow)
        follower.start()
        reports = [verify(for_verify, SyncOptions(**live)) for _ in range(3)]
        time.sleep(4)  # past the live traffic
        stop.set()
        follower.join(timeout=10)
        syncer.close()
        assert all(report.complete for report in reports)
        Syncer(for_sync, SyncOptions(**live)).run()
        truth = loads(httpx.get(url + "/users").content)["items"]
        for expected in truth:
            got = user_report(for_sync, expected["userId"])
            assert {**got, "asOf": None} == {**expected, "asOf": None}

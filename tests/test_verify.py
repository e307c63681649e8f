"""txagg verify: finds and repairs what sync missed, resumes after a kill, bounds a liar."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import START, FakeClock, FakeUpstream, page, record, run_txagg, wait_for
from typer.testing import CliRunner

from txagg.cli import app
from txagg.models import format_instant, parse_time
from txagg.store import Store, SyncLocked
from txagg.sync import Syncer, SyncOptions, sync
from txagg.testing import sync_options
from txagg.verify import NothingSynced, verify

BASE_S = 1_700_000_000


@pytest.fixture
def store(either_store):
    """This module's contract, on both backends."""
    return either_store


def make_items(count: int, every_ms: int = 3_700, first: int = 0):
    return [
        (f"tx{n}", BASE_S * 1000 + n * every_ms, BASE_S + n * every_ms / 1000)
        for n in range(first, first + count)
    ]


def options(**extra) -> SyncOptions:
    small = dict(since=BASE_S * 1000, overlap=60, check_every=None, page_size=100)
    return sync_options("http://upstream.test", **{**small, **extra})


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
    with Store.open(db_path) as store:
        store.put_state(position=BASE_S * 1000)  # synced once, so there is something to verify
    unbound = runner.invoke(app, ["verify", "--db", str(db_path)])  # no upstream, none recorded
    assert unbound.exit_code == 2 and "no upstream: pass --api-url URL" in unbound.stderr
    with Store.open(db_path) as store, store.lock("verify"):
        locked = runner.invoke(
            app, ["verify", "--db", str(db_path), "--api-url", "http://127.0.0.1:9"]
        )
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
    # The mock's clock started before it was listening; a run reads up to the last whole
    # second before it starts: one more second and the final run reads the last live ones.
    live_read = time.monotonic() + 3 + 1
    live = dict(api_url=url, settle=0, overlap=10, check_every=0.5, interval=0.2, **fast)
    with Store.open(db_path) as first:
        Syncer(first, SyncOptions(**live)).run()
    stop = threading.Event()
    with Store.open(db_path) as for_sync, Store.open(db_path) as for_verify:
        syncer = Syncer(for_sync, SyncOptions(**live), stop=stop)
        follower = threading.Thread(target=syncer.follow)
        follower.start()
        reports = [verify(for_verify, SyncOptions(**live)) for _ in range(3)]
        wait_for(lambda: time.monotonic() > live_read)  # past the live traffic
        stop.set()
        follower.join(timeout=30)
        assert not follower.is_alive()
        syncer.close()
        assert all(report.complete for report in reports)
        Syncer(for_sync, SyncOptions(**live)).run()
        truth = loads(httpx.get(url + "/users").content)["items"]
        for expected in truth:
            got = user_report(for_sync, expected["userId"])
            assert {**got, "asOf": None} == {**expected, "asOf": None}


# ---------------------------------------------------------------- empty and reversed ranges

LATER_S = 3_600  # an hour after START


def guarded_upstream(scripted, items: list):
    """A scripted upstream that answers windows of ``items`` and refuses a reversed range the
    way a real API does (HTTP 400); every reversed request is kept in ``reversed``."""
    reversed_ = []

    def answer(query: dict):
        low, high = parse_time(query["startDate"]), parse_time(query["endDate"])
        if low > high:
            reversed_.append(query)
            return 400, {}, b'{"detail": "startDate is after endDate"}'
        inside = [item for item in items if low <= parse_time(item["createdAt"]) <= high]
        limit, number = int(query["limit"]), int(query["page"])
        return page(inside[(number - 1) * limit : number * limit], len(inside))

    server = scripted([answer])
    server.reversed = reversed_
    return server


def guarded_options(url: str, **extra) -> SyncOptions:
    return options(api_url=url, since=START, page_size=10, **extra)


def killed_first_sync(store, scripted) -> object:
    """A first sync stopped after its first (full) page, in a store an earlier txagg wrote: a
    cursor at page 2 of the first window, and the position left at the window's start (where
    that version kept it until the window ended), before every stored record."""
    items = [record(n, at_s=100 + n) for n in range(25)]
    server = guarded_upstream(scripted, items)
    clock = FakeClock(START / 1000 + LATER_S)
    summary = sync(
        store, guarded_options(server.url, max_requests=1), clock=clock, sleep=clock.sleep
    )
    assert not summary.complete and store.state_value("page") == 2
    # Today the position is what the first page read up to: its latest whole second.
    assert store.state_value("position") == stored_range(store)[1] // 1000 * 1000
    store.put_state(position=store.state_value("window_start"))
    assert store.state_value("position") < stored_range(store)[0]
    return server


def stored_range(store) -> tuple[int, int]:
    return store.conn.execute(
        "SELECT min(created_at), max(created_at) FROM transactions"
    ).fetchone()


def outside_records_only(store, scripted) -> object:
    """A finished sync whose upstream served only records dated after the window asked for
    (real transactions, so they are kept): every stored record is newer than the position."""
    items = [record(n, at_s=LATER_S + 500 + n) for n in range(5)]
    server = scripted([page(items)])
    clock = FakeClock(START / 1000 + LATER_S)
    assert sync(store, guarded_options(server.url), clock=clock, sleep=clock.sleep).complete
    assert store.state_value("position") < stored_range(store)[0]
    return guarded_upstream(scripted, items)


def synced(store, scripted) -> object:
    items = [record(n, at_s=100 + n) for n in range(25)]
    server = guarded_upstream(scripted, items)
    clock = FakeClock(START / 1000 + LATER_S)
    assert sync(store, guarded_options(server.url), clock=clock, sleep=clock.sleep).complete
    return server


def run_guarded(store, server, since=None, until=None):
    return verify(store, guarded_options(server.url), since, until)


def assert_nothing_to_verify(report, server) -> None:
    assert server.reversed == []
    assert report.complete and report.requests == 0 and report.windowsChecked == 0
    assert server.requests == []


def test_verify_after_a_killed_first_sync_never_asks_for_a_reversed_range(store, scripted):
    server = killed_first_sync(store, scripted)
    server.requests.clear()
    assert_nothing_to_verify(run_guarded(store, server), server)


def test_verify_of_records_newer_than_the_position_has_nothing_to_do(store, scripted):
    server = outside_records_only(store, scripted)
    assert_nothing_to_verify(run_guarded(store, server), server)


def test_verify_without_a_position_checks_nothing_sync_has_not_claimed(store, scripted):
    future = [record(n, at_s=10 * 86_400 * 365 + n) for n in range(3)]  # dated years ahead
    store.ingest(future)
    server = guarded_upstream(scripted, future)
    assert_nothing_to_verify(run_guarded(store, server), server)


def test_since_after_the_position_or_until_before_the_oldest_is_an_empty_range(store, scripted):
    server = synced(store, scripted)
    server.requests.clear()
    position = store.state_value("position")
    oldest, _newest = stored_range(store)
    assert_nothing_to_verify(run_guarded(store, server, since=position + 60_000), server)
    assert_nothing_to_verify(run_guarded(store, server, until=oldest - 120_000), server)
    # a range that only clear_second could make reversed: both bounds inside one second
    report = run_guarded(store, server, since=oldest + 300, until=oldest + 600)
    assert server.reversed == [] and report.complete
    whole = run_guarded(store, server)
    assert server.reversed == [] and whole.complete and whole.requests == 1


def test_since_later_than_until_is_refused_before_any_request(store, scripted):
    server = synced(store, scripted)
    server.requests.clear()
    with pytest.raises(ValueError, match="since .* later than .*until"):
        run_guarded(store, server, since=START + 2000, until=START + 1000)
    assert server.requests == []


def test_verify_of_a_store_never_synced_stops_at_once(store, scripted):
    server = guarded_upstream(scripted, [record(1)])
    with pytest.raises(NothingSynced, match="nothing synced yet: run txagg sync first"):
        run_guarded(store, server)
    with pytest.raises(NothingSynced):
        run_guarded(store, server, since=START, until=START + 1000)
    assert server.requests == []


def cli_verify(db_path, server, *extra: str):
    return run_txagg(
        "verify", "--db", str(db_path), "--api-url", server.url,
        "--rate-limit", "1000", "--per", "1", "--retry-for", "1", *extra,
    )  # fmt: skip


def test_the_verify_command_on_stores_that_used_to_get_reversed_ranges(db_path, scripted):
    for prepare in (killed_first_sync, outside_records_only):
        db_path.unlink(missing_ok=True)
        with Store.open(db_path) as store:
            server = prepare(store, scripted)
        server.requests.clear()
        result = cli_verify(db_path, server)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert body["complete"] is True and body["requests"] == 0
        assert server.requests == []
    with Store.open(db_path) as store:
        position = store.state_value("position")
    later = format_instant(position + 3_600_000)
    result = cli_verify(db_path, server, "--since", later)
    assert result.returncode == 0 and json.loads(result.stdout)["requests"] == 0, result.stderr
    assert server.requests == []


def test_the_verify_command_refuses_since_after_until(db_path, scripted):
    with Store.open(db_path) as store:
        server = synced(store, scripted)
    server.requests.clear()
    result = cli_verify(db_path, server, "--since", "2023-11-15", "--until", "2023-11-14")
    assert result.returncode == 2
    assert "--since" in result.stderr and "--until" in result.stderr
    assert server.requests == []


def test_the_verify_command_on_a_store_never_synced(db_path, scripted):
    Store.open(db_path).close()
    server = guarded_upstream(scripted, [record(1)])
    result = cli_verify(db_path, server)
    assert result.returncode == 1 and result.stdout == ""
    assert "nothing synced yet: run txagg sync first" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.requests == []

"""Sync against a scripted upstream: throttling, failures, broken bodies, lying meta."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from conftest import START, FakeClock, page, paged_answer, record, sync_options, wait_for

from txagg.models import parse_time
from txagg.store import Store
from txagg.sync import Syncer, UpstreamError, parse_retry_after, sync

options = sync_options


paged = paged_answer


@pytest.fixture
def store(either_store):
    """This module's contract, on both backends."""
    return either_store


def test_429_retry_after_is_honoured_and_blocks_the_store(scripted, store):
    items = [record(n) for n in range(3)]
    server = scripted([(429, {"Retry-After": "1"}, b"{}"), paged(items)])
    began = time.monotonic()
    summary = sync(store, options(server.url))
    assert time.monotonic() - began >= 0.95
    assert (summary.throttled, summary.new, summary.complete) == (1, 3, True)
    assert store.counters()["throttled"] == 1


def test_retry_after_as_an_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 9, now=1445412470) == 10
    assert parse_retry_after("120", 9) == 120
    assert parse_retry_after("soon", 9) == 9
    assert parse_retry_after(None, 9) == 9


def test_5xx_resets_truncated_and_non_json_bodies_are_retried(scripted, store):
    items = [record(n) for n in range(5)]
    truncated = (200, {"Content-Length": "500", "Content-Type": "application/json"}, b'{"items": [')
    server = scripted(
        [
            (503, {}, b"down"),
            (500, {}, b"oops"),
            ("reset", {}, b""),
            truncated,
            (200, {"Content-Type": "text/html"}, b"<html>gateway</html>"),
            (200, {}, b'{"no": "items"}'),
            paged(items),
        ]
    )
    summary = sync(store, options(server.url))
    assert summary.retries == 6
    assert summary.new == 5 and summary.complete
    assert store.user_totals("000001").tx_count == 5


def test_an_upstream_that_stays_down_gives_a_clear_error(scripted, store):
    server = scripted([(503, {}, b"down")])
    with pytest.raises(UpstreamError, match="unavailable .*gave up after 1 s.*HTTP 503"):
        sync(store, options(server.url, retry_for=1))
    assert store.state_value("position") is None  # nothing half-done was committed


def test_unreachable_upstream(store):
    with pytest.raises(UpstreamError, match="connection failed"):
        sync(store, options("http://127.0.0.1:9", retry_for=0.5))


def test_a_4xx_is_not_retried(scripted, store):
    server = scripted([(400, {}, b'{"detail": "bad startDate"}')])
    with pytest.raises(UpstreamError, match="HTTP 400"):
        sync(store, options(server.url))
    assert len(server.requests) == 1


def test_invalid_records_are_quarantined_and_sync_goes_on(scripted, store):
    items = [record(1), record(2, amount=Decimal("0")), {"garbage": True}, record(3)]
    server = scripted([paged(items)])
    summary = sync(store, options(server.url))
    assert (summary.new, summary.quarantined) == (2, 2)
    assert store.user_totals("000001").tx_count == 2
    assert store.counters()["quarantined"] == 2


def test_meta_never_ends_a_window_pages_do(scripted, store):
    items = [record(n, at_s=n // 10) for n in range(25)]
    server = scripted([paged(items, total=3)])  # meta claims 3 items, there are 25
    summary = sync(store, options(server.url, page_size=10))
    assert summary.new == 25
    assert [q["page"] for q in server.requests] == ["1", "2", "3"]
    # The short third page ended the read: everything up to the run's end is read, and the
    # next run asks for page 3 again (its 5 records come back first).
    assert (store.state_value("page"), store.state_value("page_held")) == (3, 5)


def test_a_full_last_page_is_followed_by_an_empty_one(scripted, store):
    items = [record(n) for n in range(20)]
    server = scripted([paged(items)])
    summary = sync(store, options(server.url, page_size=10))
    assert summary.new == 20 and summary.pages == 3
    assert [q["page"] for q in server.requests] == ["1", "2", "3"]


def test_window_bounds_are_fixed_at_start_and_sent_in_the_chosen_format(scripted, store):
    server = scripted([paged([record(1)])])
    sync(store, options(server.url, date_format="iso"))
    first = server.requests[0]
    assert first["startDate"] == "2023-11-14T22:13:20Z"
    assert first["endDate"].endswith("Z") and first["limit"] == "1000"


def test_the_default_date_format_is_the_real_apis(scripted, tmp_path):
    server = scripted([paged([record(1)])])
    with Store.open(tmp_path / "other.db") as other:
        sync(other, options(server.url))
    assert server.requests[0]["startDate"] == "2023-11-14 22:13:20"


def test_max_requests_bounds_a_run_and_the_next_run_resumes(scripted, store):
    items = [record(n) for n in range(35)]
    server = scripted([paged(items)])
    first = sync(store, options(server.url, page_size=10, max_requests=2))
    assert (first.requests, first.new, first.complete) == (2, 20, False)
    assert store.state_value("page") == 3
    second = sync(store, options(server.url, page_size=10))
    assert second.new == 15 and second.complete
    assert server.requests[2]["page"] == "3"  # resumed where the first run stopped


def late_upstream(scripted):
    """An upstream that answers each window with what it holds (``shown``, a list to add to):
    20 records, one every 2 seconds from START."""
    shown = [record(n, at_s=n) for n in range(0, 40, 2)]

    def answer(query):
        low, high = parse_time(query["startDate"]), parse_time(query["endDate"])
        inside = [item for item in shown if low <= parse_time(item["createdAt"]) <= high]
        inside.sort(key=lambda item: item["createdAt"])  # listed in createdAt order
        limit, number = int(query["limit"]), int(query["page"])
        return page(inside[(number - 1) * limit : number * limit], len(inside))

    server = scripted([answer])
    server.shown = shown
    return server


def test_late_arrivals_in_the_open_window_come_with_the_next_poll(scripted, store):
    # A fake clock, so whatever the wall clock does between the runs the second one reads on
    # from where the first stopped: the last (short) page of the window, asked for again.
    clock = FakeClock(START // 1000 + 100)
    timed = dict(clock=clock, sleep=clock.sleep)
    server = late_upstream(scripted)
    sync(store, options(server.url), **timed)
    assert (store.state_value("page"), store.state_value("page_held")) == (1, 20)
    # createdAt before the position: they show up only after the first run read past them
    server.shown += [record(n, at_s=n) for n in range(1, 40, 2)]
    clock.sleep(30)
    server.requests.clear()
    summary = sync(store, options(server.url, check_every=0, overlap=3600), **timed)
    # The poll's page brings them with the 20 it held: no search, the check finds all there.
    assert (summary.new, summary.duplicates, summary.pages) == (20, 20 + 40, 1)
    assert summary.checks == 1 and summary.check_requests == 1 and summary.requests == 2
    assert store.user_totals("000001").tx_count == 40
    assert store.state_value("last_check")["stored"] == 40


def test_late_arrivals_before_the_window_are_found_and_repaired(scripted, store):
    # Pages of 5 and a 5-second overlap: the window's start moves up behind the read, to 29 s,
    # so late arrivals before it are the check's to find.
    clock = FakeClock(START // 1000 + 100)
    timed = dict(clock=clock, sleep=clock.sleep)
    server = late_upstream(scripted)
    sync(store, options(server.url, page_size=5, overlap=5, check_every=None), **timed)
    assert store.state_value("window_start") == START + 29_000
    server.shown += [record(n, at_s=n) for n in range(1, 40, 2)]
    clock.sleep(30)
    server.requests.clear()
    summary = sync(store, options(server.url, page_size=5, check_every=0, overlap=3600), **timed)
    check = store.state_value("last_check")
    assert store.user_totals("000001").tx_count == 40
    # The poll read on at page 2 of the window (29 s on): it brought the three dated past
    # where it stood (35-39 s) and repeated records pushed along by those before it. The
    # check's count and its search found the other seventeen.
    assert summary.new == 20 and check["stored"] == 23 and check["repairedTo"] == 40
    assert summary.checks == 1 and summary.check_requests > 1 and summary.discrepancies == 0


def test_a_lying_count_is_recorded_not_chased_forever(scripted, store):
    items = [record(n, at_s=n) for n in range(10)]
    server = scripted([paged(items, total=500)])  # meta always claims 500
    summary = sync(store, options(server.url, check_every=0, overlap=3600, max_repair_requests=5))
    assert summary.discrepancies >= 1
    assert len(server.requests) <= 1 + 1 + 5
    assert store.state_value("discrepancies")[0]["upstream"] == 500


def test_follow_rides_out_an_upstream_outage_and_resumes_by_itself(scripted, store):
    server = scripted([(503, {}, b"down for maintenance")])
    errors = []
    stop = threading.Event()
    syncer = Syncer(
        store,
        options(server.url, retry_for=0.2, interval=0.1),
        stop=stop,
        on_error=errors.append,
    )
    follower = threading.Thread(target=syncer.follow)
    follower.start()
    wait_for(lambda: len(errors) >= 2)  # down: reported, and still following
    assert follower.is_alive()
    server.script = [paged([record(n) for n in range(7)])]
    wait_for(lambda: store.counters().get("transactions", 0) >= 7)
    stop.set()
    follower.join(timeout=10)
    syncer.close()
    assert not follower.is_alive()
    assert store.counters()["transactions"] == 7
    assert "unavailable" in syncer.summary.errors[0]

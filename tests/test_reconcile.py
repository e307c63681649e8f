"""Late-arrival checks and their search (txagg.reconcile, and sync's use of it): what a check
looks at, what it costs to find a missing record, and where it looks first.

An in-memory upstream (httpx.MockTransport over FakeUpstream) with a fake clock, so request
counts and windows are exact."""

from __future__ import annotations

import math

import httpx
import pytest
from conftest import FakeClock, FakeUpstream

from txagg.store import Store
from txagg.sync import Syncer, SyncOptions

BASE_S = 1_700_000_000
PAGE = 10


def options(**extra) -> SyncOptions:
    return SyncOptions(
        **{
            "api_url": "http://upstream.test",
            "since": BASE_S * 1000 - 10_000,
            "settle": 2,
            "overlap": 3600,
            "check_every": 0,
            "page_size": PAGE,
            "rate_limit": 1000,
            "per": 1,
            "max_repair_requests": 200,
            **extra,
        }
    )


class Recorded(FakeUpstream):
    """FakeUpstream that keeps each request's query."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queries: list[dict] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(dict(request.url.params))
        return super().handle(request)


def syncer(store: Store, upstream: Recorded, clock: FakeClock, **extra) -> Syncer:
    transport = httpx.MockTransport(upstream.handle)
    return Syncer(store, options(**extra), transport=transport, clock=clock, sleep=clock.sleep)


def stored_ids(store: Store) -> set[str]:
    return {row[0] for row in store.conn.execute("SELECT id FROM transactions")}


# ------------------------------------------------------------------ the search's cost


@pytest.mark.parametrize("inclusive", [True, False])
@pytest.mark.parametrize("where", [0.0, 0.21, 0.5, 0.77, 0.999])
def test_one_missing_record_among_16_pages_costs_log2_requests(tmp_path, inclusive, where):
    """160 records a second apart, 16 pages; one arrives late. Counting both halves at each
    level cost 1 + 2 x 4 + 1 = 10 requests; probing pages costs at most log2(16) + 1 = 5."""
    clock = FakeClock(BASE_S + 200)
    items = [(f"tx{n}", (BASE_S + n) * 1000 + 500, BASE_S + n) for n in range(160)]
    late_n = int(where * 159)
    late = (f"tx{1000 + late_n}", (BASE_S + late_n) * 1000 + 700, BASE_S + 1000)
    upstream = Recorded(items + [late], clock, inclusive, inclusive)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock)
        sync.run()
        assert late[0] not in stored_ids(store)
        clock.now = BASE_S + 1001  # the late one is visible now
        upstream.queries.clear()
        sync.check()
        assert late[0] in stored_ids(store)
        assert len(upstream.queries) <= math.log2(16) + 1
        assert not store.state_value("discrepancies")
        assert store.state_value("late_ages")  # where it was found is remembered


def test_two_missing_records_far_apart_are_both_found(tmp_path):
    clock = FakeClock(BASE_S + 200)
    items = [(f"tx{n}", (BASE_S + n) * 1000 + 500, BASE_S + n) for n in range(160)]
    late = [(f"tx{1000 + n}", (BASE_S + n) * 1000 + 700, BASE_S + 1000) for n in (3, 150)]
    upstream = Recorded(items + late, clock, True, False)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock)
        sync.run()
        clock.now = BASE_S + 1001
        upstream.queries.clear()
        sync.check()
        assert {"tx1003", "tx1150"} <= stored_ids(store)
        assert len(upstream.queries) <= 2 * (math.log2(16) + 1)


# ------------------------------------------------------------------ what a check looks at


def test_a_check_looks_at_what_is_read_of_a_window_still_being_paged(tmp_path):
    """Following a busy upstream, a window can stay open for many pages (each poll reads the
    next full page); a late arrival in the part already read is found by the next check, not
    only once the window ends."""
    clock = FakeClock(BASE_S + 100)
    items = [(f"tx{n}", (BASE_S + n // 2) * 1000 + n % 2, BASE_S + n // 2) for n in range(150)]
    late = ("tx1000", (BASE_S + 5) * 1000 + 300, BASE_S + 101)
    upstream = Recorded(items + [late], clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        syncer(store, upstream, clock, max_requests=3).run()
        state = store.state()  # three full pages of one window: the cursor is on page 4 of it
        assert state["page"] == 4 and state["position"] == state["window_start"]
        clock.now = BASE_S + 102
        syncer(store, upstream, clock).check()
        assert "tx1000" in stored_ids(store)


def test_a_page_that_repeats_records_calls_a_check_with_any_spare_token(tmp_path):
    """Page k of a window that repeats records shows that some arrived late before it: a
    check is due as soon as one token is spare, not only once the budget is about full."""
    clock = FakeClock(BASE_S + 9.6)  # reads up to BASE + 7: 15 records, a page and a half
    items = [(f"tx{n}", (BASE_S + n // 2) * 1000 + n % 2, BASE_S + n // 2) for n in range(150)]
    late = ("tx1000", (BASE_S + 3) * 1000 + 300, BASE_S + 10)
    upstream = Recorded(items + [late], clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock, rate_limit=5, per=60, check_every=120)
        sync.following = True
        sync.run(defer_full_pages=True)  # page 1 only: the rest waits for a fuller page
        assert store.state()["page"] == 2 and not sync.late_seen
        clock.now = BASE_S + 14  # the late one shows up; page 2 repeats the record it pushed
        sync.run(defer_full_pages=True)
        assert sync.late_seen
        store.put_state(last_check_ms=int(clock.now * 1000) - 13_000)
        tokens = store.budget(5, 60, clock.now)["tokens"]
        assert 2.1 <= tokens < 4.5  # a token spare, the budget far from full
        assert sync._check_due()
        sync.late_seen = False
        assert not sync._check_due()  # without the sign: wait for an idle budget
        sync.late_seen = True
        sync.check()
        assert "tx1000" in stored_ids(store) and not sync.late_seen


# ------------------------------------------------------------------ where it looks first


def test_the_first_look_goes_where_late_arrivals_were_found(tmp_path):
    clock = FakeClock(BASE_S + 162)  # reads up to BASE + 160: the checks end there
    items = [(f"tx{n}", (BASE_S + n) * 1000 + 500, BASE_S + n) for n in range(160)]
    upstream = Recorded(items, clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock)
        sync.run()
        upstream.queries.clear()
        sync.check()  # nothing known yet: the middle page
        assert upstream.queries[0]["page"] == "8"
        store.put_state(late_ages=[20_000, 25_000, 30_000])  # found 20-30 s behind the top
        upstream.queries.clear()
        sync.check()
        assert upstream.queries[0]["page"] == "14"  # the page holding high - 25 s


def test_a_check_of_a_window_the_store_holds_nothing_of_asks_for_page_1(tmp_path):
    clock = FakeClock(BASE_S + 100)
    upstream = Recorded([], clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock)
        sync.run()
        upstream.items = [("tx1", (BASE_S + 5) * 1000, BASE_S + 5)]  # a late one, all alone
        upstream.queries.clear()
        sync.check()
        assert [query["page"] for query in upstream.queries] == ["1"]
        assert stored_ids(store) == {"tx1"}

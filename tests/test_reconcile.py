"""Late-arrival checks and their search (txagg.reconcile, and sync's use of it): what a check
looks at, what it costs to find a missing record, and where it looks first.

An in-memory upstream (httpx.MockTransport over FakeUpstream) with a fake clock, so request
counts and windows are exact."""

from __future__ import annotations

import math

import httpx
import pytest
from conftest import FakeClock, FakeUpstream

from txagg.models import format_timestamp
from txagg.settings import LOAD_WINDOW_MS, POLL_FILL_MARGIN
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
        assert state["page"] == 4 and state["as_of"] > state["window_start"]
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


# ------------------------------------------------------------------ the open window


def test_a_poll_sees_a_late_arrival_before_its_page_and_the_check_finds_it(tmp_path):
    """The window stays open about the overlap behind the read: a record inserted before the
    page a poll asks for pushes the page along, the poll repeats more known records than the
    page held, and a check is due at once; the search then stores the record."""
    clock = FakeClock(BASE_S + 62)
    items = [(f"tx{n}", (BASE_S + n // 2) * 1000 + n % 2, BASE_S + n // 2) for n in range(200)]
    late = ("tx1000", (BASE_S + 40) * 1000 + 300, BASE_S + 64)
    upstream = Recorded(items + [late], clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock, overlap=30, check_every=None)
        sync.run()  # reads up to BASE + 60: the window moved up to stay 30 s behind
        state = store.state()
        assert BASE_S * 1000 < state["window_start"] <= (BASE_S + 30) * 1000
        assert state["page_held"] < PAGE and not sync.late_seen
        assert state["window_start"] <= late[1]  # the late one lands inside the window
        clock.now = BASE_S + 66
        sync.run()
        assert sync.late_seen and late[0] not in stored_ids(store)
        sync.options = options(overlap=30, check_every=120)
        store.put_state(last_check_ms=int(clock.now * 1000) - 13_000)
        assert sync._check_due()  # long before check_every: the poll's sign is enough
        sync.check()
        assert late[0] in stored_ids(store) and not sync.late_seen


@pytest.mark.parametrize("change", ["page_size", "api_url"])
def test_another_listing_starts_a_new_window_where_all_is_read(tmp_path, change):
    """Page numbers count one upstream's listing in pages of one size: a run with another page
    size, or against another upstream (a rebind), starts a new window at asOf instead of
    asking for page k of a listing it never read."""
    clock = FakeClock(BASE_S + 40)
    items = [(f"tx{n}", (BASE_S + n) * 1000, BASE_S + n) for n in range(35)]
    upstream = Recorded(items, clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        syncer(store, upstream, clock).run()
        state = store.state()
        assert (state["page"], state["page_held"]) == (4, 5)
        other = {"page_size": 7} if change == "page_size" else {"api_url": "http://other.test"}
        clock.now = BASE_S + 50
        upstream.queries.clear()
        syncer(store, upstream, clock, check_every=None, **other).run()
        first = upstream.queries[0]
        assert (first["page"], first["startDate"]) == ("1", "2023-11-14 22:13:58")
        assert store.state()["window_start"] == state["as_of"]


def test_a_search_takes_the_next_polls_token_only_while_reading_leaves_budget_over(tmp_path):
    """Following, a search goes before the next poll (it may take that poll's token) while
    the store is fresh and reading needs at most BORROW_UP_TO_LOAD of the budget; at a higher
    load it uses only tokens the poll does not need, so reading stays fresh."""
    clock = FakeClock(BASE_S + 100)
    with Store.open(tmp_path / "s.db") as store:
        upstream = Recorded([], clock, True, True)
        sync = syncer(store, upstream, clock, rate_limit=5, per=60, page_size=1000)
        sync.following = True
        store.put_state(as_of=(BASE_S + 90) * 1000)  # 10 s behind: fresh
        for _ in range(4):  # four of the five taken: the next poll's token is about all
            assert store.take_token(5, 60, clock.now) == (0.0, False)
        assert -1 <= sync._spare_tokens() < 0
        sync.arrivals.steady = 0.5 * 5000 / 60  # 50% of the ceiling
        assert sync._spare_and_fresh()
        sync.arrivals.steady = 0.8 * 5000 / 60  # 80%
        assert not sync._spare_and_fresh()
        store.put_state(as_of=(BASE_S + 30) * 1000)  # 70 s behind: reading first
        sync.arrivals.steady = 0.2 * 5000 / 60
        assert not sync._spare_and_fresh()


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_following_at_a_heavy_load_a_short_page_closes_the_window(tmp_path, load):
    """At a light load a short page is asked for again next time (the window stays open
    behind the read); following at a heavy load it closes the window as a page of new records
    only would: the next poll asks for page 1 from where everything is read."""
    clock = FakeClock(BASE_S + 40)
    items = [(f"tx{n}", (BASE_S + n) * 1000, BASE_S + n) for n in range(35)]
    upstream = Recorded(items, clock, True, True)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, upstream, clock, check_every=None, rate_limit=5, per=60)
        sync.following = True
        sync.arrivals.steady = load * 5 * PAGE / 60  # pages a minute: that share of the budget
        sync.run()
        state = store.state()
        end = (BASE_S + 38) * 1000
        assert state["as_of"] == end
        if load == 0.5:
            assert (state["page"], state["page_held"]) == (4, 5) and sync.page_filled == 5
            assert state["window_start"] < end
        else:
            assert (state["window_start"], state["page"], state["page_held"]) == (end, 1, 0)
            assert sync.page_filled == 0
        clock.now = BASE_S + 50
        upstream.queries.clear()
        sync.run()
        asked = upstream.queries[0]
        assert asked["page"] == ("4" if load == 0.5 else "1")
        assert stored_ids(store) == {tx_id for tx_id, _, _ in items}


@pytest.mark.parametrize("load", [0.2, 0.8])
def test_the_load_is_what_the_store_holds_not_what_the_last_polls_read(tmp_path, load):
    """The load (it decides the window and what a search may borrow) is the records a second
    the store holds of the last LOAD_WINDOW_MS by createdAt, as status measures it: a poll
    that read a backlog (a follower that started behind), or one that found nothing, moves
    the pacing rate, not the load."""
    minutes = LOAD_WINDOW_MS // 60_000
    clock = FakeClock(BASE_S + minutes * 60 + 5)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, Recorded([], clock, True, True), clock, rate_limit=5, per=60)
        sync.following = True
        sync.options = options(rate_limit=5, per=60, page_size=100)  # 500 a minute at most
        per_minute = round(load * 500)
        records = [
            {
                "id": f"tx{n}",
                "userId": "u1",
                "createdAt": format_timestamp(BASE_S * 1000 + n * 60_000 // per_minute),
                "type": "earned",
                "amount": 1,
            }
            for n in range(minutes * per_minute)
        ]
        as_of = (BASE_S + minutes * 60) * 1000
        for first in range(0, len(records), 1000):
            store.ingest(records[first : first + 1000], state={"as_of": as_of})
        sync._judge_load()
        assert sync.arrivals.steady == pytest.approx(per_minute / 60, rel=0.01)
        light = sync._light_load()
        assert light is (load == 0.2)
        # the last polls read the whole backlog in a minute, then found nothing
        sync.arrivals.observe(0, clock.now - 60)
        sync.arrivals.observe(len(records), clock.now)
        assert sync.arrivals.per_second > 5 * per_minute / 60
        sync._judge_load()
        assert sync._light_load() is light
        sync.arrivals.observe(0, clock.now + 15)
        sync._judge_load()
        assert sync._light_load() is light
        # under a minute of the upstream's time since the store starts: unknown, light
        sync.options = options(rate_limit=5, per=60, page_size=100, since=as_of - 30_000)
        sync._judge_load()
        assert sync.arrivals.steady is None and sync._light_load()


@pytest.mark.parametrize("load", [0.2, 0.8])
def test_at_a_light_load_a_poll_waits_for_the_page_it_stands_on_to_fill(tmp_path, load):
    """Following, a poll comes when about a page has arrived; at a light load the page the
    cursor stands on may hold records already (a short page asked for again, or what a
    deferred full page left), so it comes when that page is full, plus POLL_FILL_MARGIN, at
    the lower of the steady rate and the last polls'."""
    clock = FakeClock(BASE_S)
    with Store.open(tmp_path / "s.db") as store:
        sync = syncer(store, Recorded([], clock, True, True), clock, rate_limit=5, per=60)
        sync.following = True
        sync.options = options(rate_limit=5, per=60, page_size=1000, interval=60)
        per_second = sync.arrivals.steady = load * 5000 / 60
        sync.page_filled = 700
        if load == 0.2:
            missing = 1000 - 700 + POLL_FILL_MARGIN * 1000
        else:  # the window closes at each short page: a whole page of new records
            missing = 1000
        assert sync._next_poll_in(per_second) == pytest.approx(max(12, missing / per_second))
        sync.page_filled = 990  # never sooner than the budget gives a token
        assert sync._next_poll_in(per_second) >= 12
        sync.page_filled = 700
        # The last polls read a backlog (twice the steady rate): at a light load the steady
        # rate paces the next poll, at a heavy one the last polls' as before.
        faster = 2 * per_second
        steady_in = missing / per_second if load == 0.2 else missing / faster
        assert sync._next_poll_in(faster) == pytest.approx(max(12, steady_in))
        # A lull (the last polls found a tenth of it): the next poll waits longer, either way.
        assert sync._next_poll_in(per_second / 10) == pytest.approx(
            min(60, missing * 10 / per_second)
        )

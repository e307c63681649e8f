"""Property-based tests of the window / overlap logic (hypothesis).

An in-memory upstream (httpx.MockTransport) and a fake clock: transactions become visible up to
``overlap`` after their createdAt, windows may be inclusive or exclusive at either end, pages
shift while they are read, runs happen at arbitrary times and are cut off after arbitrary
numbers of requests (a kill between two commits). Whatever happens, once everything is visible
and one more run has checked, the store holds exactly the upstream's set.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
from conftest import FakeClock, FakeUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txagg.store import Store
from txagg.sync import Syncer, SyncOptions

BASE_S = 1_700_000_000
OVERLAP_S = 60
SETTLE_S = 2


def run_once(path, transport, clock, keeps_open: bool | None = None, **extra) -> dict:
    """One sync run on the store at ``path`` (from BASE - 10 s, no rate limit to speak of);
    returns the sync state it leaves. ``keeps_open`` False: a short page closes the window, as
    following at a heavy load does."""
    options = SyncOptions(
        api_url="http://upstream.test",
        since=BASE_S * 1000 - 10_000,
        settle=SETTLE_S,
        rate_limit=1000,
        per=1,
        **extra,
    )
    with Store.open(path) as store:
        syncer = Syncer(store, options, transport=transport, clock=clock, sleep=clock.sleep)
        if keeps_open is not None:
            syncer._keeps_window_open = lambda: keeps_open
        try:
            syncer.run()
        finally:
            syncer.close()
        return store.state()


arrivals = st.lists(
    st.tuples(
        st.integers(0, 600),  # createdAt, seconds after BASE
        st.sampled_from([0, 0, 1, 500, 999]),  # milliseconds: many on a whole second
        st.floats(0, OVERLAP_S - SETTLE_S - 1),  # how late it becomes visible
    ),
    min_size=1,
    max_size=120,
)
runs = st.lists(
    st.tuples(st.integers(0, 700), st.one_of(st.none(), st.integers(1, 4))),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrivals=arrivals,
    runs=runs,
    inclusive_start=st.booleans(),
    inclusive_end=st.booleans(),
    page_size=st.sampled_from([3, 10, 1000]),
    broken_every=st.sampled_from([0, 0, 5]),
)
def test_the_store_ends_equal_to_the_upstream(
    tmp_path_factory, arrivals, runs, inclusive_start, inclusive_end, page_size, broken_every
):
    items = [
        (f"tx{n}", (BASE_S + second) * 1000 + millis, BASE_S + second + millis / 1000 + delay)
        for n, (second, millis, delay) in enumerate(arrivals)
    ]
    clock = FakeClock(BASE_S)
    # some records break the schema: quarantined, never counted, and no false alarm either
    broken = {
        tx_id for n, (tx_id, _, _) in enumerate(items) if broken_every and n % broken_every == 1
    }
    upstream = FakeUpstream(items, clock, inclusive_start, inclusive_end, broken)
    transport = httpx.MockTransport(upstream.handle)
    path = tmp_path_factory.mktemp("prop") / "store.db"

    def run(max_requests=None):
        run_once(
            path,
            transport,
            clock,
            overlap=OVERLAP_S,
            check_every=0,
            page_size=page_size,
            max_requests=max_requests,
            max_repair_requests=200,
        )

    for at, max_requests in sorted(runs, key=lambda r: r[0]):
        clock.now = max(clock.now, BASE_S + at)
        run(max_requests)
    clock.now = max(clock.now, BASE_S + 700 + OVERLAP_S)  # everything is visible by now
    run()
    with Store.open(path) as store:
        stored = {row[0] for row in store.conn.execute("SELECT id FROM transactions")}
        valid = {tx_id for tx_id, _, _ in items} - broken
        assert stored == valid
        assert store.counters().get("transactions", 0) == len(valid)
        assert store.counters().get("quarantined", 0) == len(broken)
        totals = sum(row[0] for row in store.conn.execute("SELECT earned FROM users"))
        assert totals == 100 * len(valid)
        assert not store.state_value("discrepancies")


def test_the_fake_upstream_is_honest():
    clock = FakeClock(BASE_S + 10)
    upstream = FakeUpstream([("tx1", BASE_S * 1000, BASE_S)], clock, True, True)
    day = datetime.fromtimestamp(BASE_S, UTC).strftime("%Y-%m-%d %H:%M:%S")
    request = httpx.Request(
        "GET",
        "http://u/transactions",
        params={"startDate": day, "endDate": day, "page": 1, "limit": 5},
    )
    body = json.loads(upstream.handle(request).content)
    assert body["meta"]["totalItems"] == 1 and body["items"][0]["id"] == "tx1"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    # Dense: many records share a second (and some a millisecond) across page edges.
    arrivals=st.lists(
        st.tuples(st.integers(0, 90), st.sampled_from([0, 0, 1, 500, 999])),
        min_size=1,
        max_size=150,
    ),
    runs=st.lists(
        st.tuples(
            st.integers(0, 100),
            st.one_of(st.none(), st.integers(1, 4)),
            st.booleans(),  # whether a short page keeps the window open (the load may change)
        ),
        max_size=12,
    ),
    inclusive_start=st.booleans(),
    inclusive_end=st.booleans(),
    page_size=st.sampled_from([2, 3, 10]),
)
def test_polls_alone_read_everything_as_the_window_start_moves_up(
    tmp_path_factory, arrivals, runs, inclusive_start, inclusive_end, page_size
):
    """No late arrivals and no checks: the polls alone must read every record, however the
    open window's start moves up behind them (to the second before a page read at least the
    overlap back, pages renumbered) or closes at a short page (following at a heavy load),
    with records sharing a second or a millisecond across page edges, either boundary rule,
    and runs cut off after any number of requests."""
    items = [
        (f"tx{n}", (BASE_S + second) * 1000 + millis, BASE_S + second + millis / 1000)
        for n, (second, millis) in enumerate(arrivals)
    ]
    clock = FakeClock(BASE_S)
    upstream = FakeUpstream(items, clock, inclusive_start, inclusive_end, set())
    transport = httpx.MockTransport(upstream.handle)
    path = tmp_path_factory.mktemp("polls") / "store.db"
    since = BASE_S * 1000 - 10_000
    starts = []

    def run(max_requests=None, keeps_open=True):
        state = run_once(
            path,
            transport,
            clock,
            keeps_open,
            overlap=5,
            check_every=None,
            page_size=page_size,
            max_requests=max_requests,
        )
        starts.append(state["window_start"])

    for at, max_requests, keeps_open in sorted(runs, key=lambda r: r[0]):
        clock.now = max(clock.now, BASE_S + at)
        run(max_requests, keeps_open)
    clock.now = max(clock.now, BASE_S + 100)
    run()
    with Store.open(path) as store:
        stored = {row[0] for row in store.conn.execute("SELECT id FROM transactions")}
        assert stored == {tx_id for tx_id, _, _ in items}
        assert store.state_value("last_check") is None  # no check helped
    # Pages enough, over seconds enough: the start must have moved up.
    spread = len({second for second, _ in arrivals})
    if spread >= 6 * page_size and len(arrivals) >= 6 * page_size:
        assert max(starts) > since

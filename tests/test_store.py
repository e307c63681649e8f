"""The store contract, on both backends: every test taking ``location`` or ``store`` runs on a
SQLite file and on a PostgreSQL store (a schema of its own in the test session's database)."""

import sqlite3
from decimal import Decimal

import httpx
import pytest
from conftest import START as START_MS
from conftest import record, run_sql, run_txagg

from txagg.store import (
    MIGRATIONS_TABLE,
    SCHEMA_VERSION,
    TOKEN_MARGIN,
    NoStore,
    NotAStore,
    Store,
    StoreTooNew,
    SyncLocked,
)


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    """Where a fresh store goes: a SQLite file, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(location):
    with Store.open(location) as opened:
        yield opened


def is_sqlite(store) -> bool:
    return isinstance(store.conn, sqlite3.Connection)


def schema_version(location) -> int:
    """The backend's schema version: a PostgreSQL store has migrations of its own (replicas)."""
    if isinstance(location, str):
        from txagg.store.postgres_schema import PG_SCHEMA_VERSION

        return PG_SCHEMA_VERSION
    return SCHEMA_VERSION


def test_a_fresh_store_records_its_migrations(store):
    rows = store.conn.execute(f"SELECT version, name FROM {MIGRATIONS_TABLE}").fetchall()
    assert [version for version, _ in rows] == list(range(1, schema_version(store.path) + 1))
    if is_sqlite(store):
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_migrates_nothing_twice(location):
    Store.open(location).close()
    with Store.open(location) as again:
        count = again.conn.execute(f"SELECT count(*) FROM {MIGRATIONS_TABLE}").fetchone()[0]
        assert count == schema_version(location)


def test_a_newer_store_is_refused_clearly(location):
    Store.open(location).close()
    run_sql(
        location,
        f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, 'from the future', 'x')",
        (schema_version(location) + 1,),
    )
    with pytest.raises(StoreTooNew, match="newer txagg"):
        Store.open(location)
    with pytest.raises(StoreTooNew, match="newer txagg"):
        Store.open(location, create=False, read_only=True)


def test_files_that_are_not_stores_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(NotAStore, match="not a SQLite database"):
        Store.open(junk)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE something (x)")
    conn.commit()
    conn.close()
    with pytest.raises(NotAStore, match="not a txagg store"):
        Store.open(other)
    with pytest.raises(NoStore, match="txagg sync"):
        Store.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_ingest_is_idempotent_and_keeps_totals_exact(store):
    page = [
        record(1, amount=Decimal("0.1")),
        record(2, amount=Decimal("0.2")),
        record(3, kind="spent", amount=Decimal("0.05")),
        record(4, kind="payout", amount=Decimal("0.15"), at_s=9),
    ]
    first = store.ingest(page)
    again = store.ingest(page)
    assert (first.new, first.duplicates, first.new_users) == (4, 0, 1)
    assert (again.new, again.duplicates) == (0, 4)
    totals = store.user_totals("000001")
    assert (totals.earned, totals.spent, totals.payout, totals.tx_count) == (30, 5, 15, 4)
    assert totals.last_tx_at == 1_700_000_009_000
    assert store.counters()["transactions"] == 4
    assert store.counters()["users"] == 1


def test_conflicts_keep_the_first_version_and_are_recorded_once(store):
    store.ingest([record(1, amount=Decimal("10"))])
    changed = record(1, amount=Decimal("99"))
    assert store.ingest([changed]).conflicts == 1
    assert store.ingest([changed]).conflicts == 0  # the same conflict seen again
    inside_one_page = store.ingest([record(2), record(2, amount=Decimal("3"))])
    assert (inside_one_page.new, inside_one_page.conflicts) == (1, 1)
    assert store.user_totals("000001").earned == 1000 + 150
    assert store.counters()["conflicts"] == 2


def test_invalid_records_are_quarantined_with_their_reason_never_counted(store):
    bad = [record(1, amount=Decimal("-1")), {"id": "x"}, "not even an object"]
    result = store.ingest(bad + [record(2)])
    assert (result.new, result.quarantined) == (1, 3)
    assert store.ingest(bad).quarantined == 0  # the same broken records again: kept once
    rows = store.conn.execute("SELECT raw, reason, times_seen FROM quarantine").fetchall()
    reasons = sorted(reason for _, reason, _ in rows)
    assert reasons == [
        "amount is not positive",
        "missing field: userId, createdAt, type, amount",
        "record is not a JSON object",
    ]
    assert all(times == 2 for _, _, times in rows)
    assert '"amount": -1' in next(raw for raw, reason, _ in rows if "positive" in reason)
    assert store.user_totals("000001").tx_count == 1


def test_rows_totals_and_cursor_change_together_or_not_at_all(store):
    def exploding_state(result):
        raise RuntimeError("killed between the rows and the cursor")

    with pytest.raises(RuntimeError):
        store.ingest([record(1)], state=exploding_state)
    assert store.user_totals("000001") is None
    assert store.counters() == {}
    store.ingest([record(1)], state={"position": 5})
    assert store.state_value("position") == 5 and store.user_totals("000001").tx_count == 1


def test_the_rate_budget_is_shared_by_every_connection(location):
    with Store.open(location) as one, Store.open(location) as two:
        now = 1000.0
        taken = [(one, two)[i % 2].take_token(5, 60, now)[0] for i in range(4)]
        assert taken == [0.0] * 4
        # the fifth would leave less than the safety margin: it waits for the margin to refill
        assert two.take_token(5, 60, now)[0] == pytest.approx(12.0 * TOKEN_MARGIN)
        assert one.take_token(5, 60, now + 12 * TOKEN_MARGIN)[0] == 0.0
        assert two.take_token(5, 60, now + 12 * TOKEN_MARGIN)[0] == pytest.approx(12.0)
        two.block_until(now + 100, now)
        assert one.take_token(5, 60, now + 50)[0] == pytest.approx(50.0, abs=0.01)
        assert one.counters()["requests"] == 5 and one.counters()["throttled"] == 1


def test_only_one_sync_lock_at_a_time(location):
    with Store.open(location) as one, Store.open(location) as two:
        with one.sync_lock():
            with pytest.raises(SyncLocked, match="another sync"):
                with two.sync_lock():
                    pass
        with two.sync_lock():
            pass


def test_window_counts_bracket_either_boundary_rule(store):
    store.ingest([record(1, at_s=0), record(2, at_s=5), record(3, at_s=10), {"id": "bad"}])
    start = 1_700_000_000_000
    assert store.count_window(start, start + 10_000) == (1, 3)
    assert store.count_window(start + 1, start + 9_999) == (1, 1)


def test_payouts_by_user_and_period(store):
    store.ingest(
        [
            record(1, user="000002", kind="payout", amount=Decimal("5"), at_s=0),
            record(2, user="000001", kind="payout", amount=Decimal("2.5"), at_s=10),
            record(3, user="000001", kind="payout", amount=Decimal("1"), at_s=20),
            record(4, user="000003", kind="earned", amount=Decimal("1"), at_s=20),
        ]
    )
    assert store.payouts() == [("000001", 350, 2), ("000002", 500, 1)]
    assert store.payouts(limit=1) == [("000001", 350, 2)]
    assert store.payouts(after="000001") == [("000002", 500, 1)]
    since = 1_700_000_010_000
    assert store.payouts(since=since) == [("000001", 350, 2)]
    assert store.payouts(since=since, until=since + 10_000) == [("000001", 250, 1)]


def test_window_bounds_avoid_seconds_that_hold_a_record(store):
    start = 1_700_000_000_000
    store.ingest([record(1, at_s=10), record(2, at_s=9), record(3, at_s=11)])
    assert store.clear_second(start + 10_500) == start + 8_000  # 10 and 9 are taken
    # nothing clear above the floor: the second itself, ambiguous but never an empty window
    assert store.clear_second(start + 10_500, floor=start + 9_000) == start + 10_000
    # a cut may move either way, inside (floor, ceiling)
    assert store.clear_second(start + 10_500, floor=start + 8_000, ceiling=start + 20_000) == (
        start + 12_000
    )
    assert store.clear_second(start + 12_345) == start + 12_000


MAX_TOTAL_CENTS = 10**18  # the documented per-user maximum of earned, spent and payout
MAX_SCR = Decimal(10**11)  # models.MAX_AMOUNT_CENTS in SCR: the largest valid amount


def test_totals_stop_at_their_maximum_and_what_would_pass_it_is_quarantined(store, location):
    from txagg import store as store_module
    from txagg.server import ServeConfig, start_in_thread

    n = 0
    for at_s, kind in enumerate(["spent"] * 100 + ["payout"] * 100):  # 100,000 of each
        store.ingest([record(n + i, kind=kind, amount=MAX_SCR, at_s=at_s) for i in range(1000)])
        n += 1000
    totals = store.user_totals("000001")
    assert (totals.spent, totals.payout, totals.tx_count) == (MAX_TOTAL_CENTS,) * 2 + (200_000,)
    past = (
        [record(n + i, kind="payout", amount=MAX_SCR, at_s=300) for i in range(999)]
        + [record(n + 999, kind="spent", amount=Decimal("0.01"), at_s=300)]
        + [record(n + 1000, kind="earned", amount=Decimal("1.5"), at_s=301)]
        + [record(n + 1001, user="000002", kind="payout", amount=MAX_SCR, at_s=302)]
    )
    result = store.ingest(list(reversed(past)), state={"as_of": START_MS + 400_000})
    assert (result.new, result.quarantined) == (2, 1000)
    again = store.ingest(past)  # the same page again, in another order: nothing changes
    assert (again.new, again.quarantined, again.duplicates) == (0, 0, 2)
    totals = store.user_totals("000001")
    assert (totals.earned, totals.spent, totals.payout) == (150, MAX_TOTAL_CENTS, MAX_TOTAL_CENTS)
    assert (totals.tx_count, totals.payout_count) == (200_001, 100_000)
    assert all(type(value) is int for value in (totals.earned, totals.spent, totals.payout))
    assert store.counters()["quarantined"] == 1000
    reasons = dict(
        store.conn.execute(
            "SELECT reason, count(*) FROM quarantine WHERE times_seen = 2 GROUP BY reason"
        ).fetchall()
    )
    assert reasons == {
        "would push the user's payout total past the maximum of 10000000000000000 SCR": 999,
        "would push the user's spent total past the maximum of 10000000000000000 SCR": 1,
    }
    expected = [("000001", MAX_TOTAL_CENTS, 100_000), ("000002", 10**13, 1)]
    assert store.payouts() == expected
    assert store.payouts(since=START_MS, until=START_MS + 1_000_000) == expected

    report = (
        '{"userId": "000001", "balance": -19999999999999998.5, "earned": 1.5, '
        '"spent": 10000000000000000, "payout": 10000000000000000, '
        '"paidOut": 10000000000000000, "transactions": 200001, '
        '"lastTransactionAt": "2023-11-14T22:18:21.000Z", "asOf": "2023-11-14T22:20:00Z"}\n'
    )
    fast = run_txagg("report", "000001", "--db", str(location), "--json")
    assert (fast.returncode, fast.stdout, fast.stderr) == (0, report, "")
    full = run_txagg("report", "000001", "--db", str(location), "--eur-per-scr", "0.915")
    assert full.returncode == 0, full.stderr
    assert full.stdout == report.replace(
        '"paidOut": 10000000000000000', '"paidOut": 9150000000000000'
    )
    url, stop = start_in_thread(ServeConfig(db=location, port=0))
    try:
        answer = httpx.get(f"{url}/users/000001", timeout=30)
    finally:
        stop()
    assert (answer.status_code, answer.text + "\n") == (200, report)
    assert store_module.MAX_TOTAL_CENTS == MAX_TOTAL_CENTS

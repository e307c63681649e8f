"""One active syncer, fenced, on a PostgreSQL store: ``sync --follow`` on several machines
(here: processes), one leading, the others standing by and taking over when it dies or hangs;
a leader paused past its lease commits nothing when it wakes, and steps down.

Against the real PostgreSQL and real ``txagg`` processes; every wait is a wait_for with a
generous deadline, never a guess at how long something takes."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

import psycopg
import pytest
from conftest import new_pg_store_url, peek, record, run_sql, run_txagg, wait_for
from test_shapes import check

from txagg import shapes
from txagg.store import Store, StoreError, SyncLocked
from txagg.testing import differing_users, ground_truth, sync_options, txagg_command

LEASE = 10.0  # the followers' failover budget: a lease of 5 s, renewed every 1.7 s
FAULTS = "error=0.05,reset=0.03,truncate=0.03,duplicate=0.05"


# ---------------------------------------------------------------- fencing, directly


def stalled_holder(first: Store, held: ExitStack, stall: Callable[[object], None]) -> list:
    """``first`` takes the sync lease (3 s) and stops renewing it (a pause) while one of its
    write transactions is stalled in ``stall(steps)``; returns a list that gets what that
    transaction raised (None: nothing) once it ends."""
    held.enter_context(first.lock("sync", lease=3.0))
    lease = first._leases["sync"]
    lease.stopping.set()
    lease.thread.join()
    inside = threading.Event()
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            with first.transaction() as steps:
                inside.set()
                stall(steps)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 (what the stalled write raised)
            outcome.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    held.callback(writer.join)
    assert inside.wait(30)
    return outcome


def take_over(second: Store, held: ExitStack, timeout: float) -> float:
    """Seconds until ``second`` holds the sync lease (3 s), asking every 0.3 s."""

    def taken() -> bool:
        try:
            held.enter_context(second.lock("sync", lease=3.0))
            return True
        except SyncLocked:
            return False

    began = time.monotonic()
    wait_for(taken, timeout=timeout, every=0.3)
    return time.monotonic() - began


def test_a_stale_leaders_commit_cannot_land(pg_url):
    """The first holder is paused past its lease (its renewal stops) while inside a write
    transaction: the server ends its session, the second takes the lease, and whatever the
    first does when it wakes raises and writes nothing."""
    with Store.open(pg_url) as first, Store.open(pg_url) as second, ExitStack() as held:
        first.ingest([record(1)], state={"position": 1})
        wake = threading.Event()

        def left_open(steps) -> None:  # a transaction left open meanwhile
            steps.execute("UPDATE sync_state SET value = '99' WHERE name = 'position'")
            wake.wait(60)

        outcome = stalled_holder(first, held, left_open)
        held.callback(wake.set)
        # the stopped transaction was ended by the server: nobody waited a lease on it
        assert take_over(second, held, timeout=30) < 6
        second.ingest([record(3)], state={"position": 3})
        wake.set()
        wait_for(lambda: outcome, timeout=30)
        assert isinstance(outcome[0], StoreError), outcome
        with pytest.raises(SyncLocked, match="lost the sync lock"):
            first.ingest([record(2)], state={"position": 2})
        with pytest.raises(SyncLocked, match="lost the sync lock"):
            first.take_token(5, 60)
        with pytest.raises(SyncLocked, match="lost the sync lock"):
            first.put_state(position=4)
        assert run_sql(pg_url, "SELECT epoch FROM store_locks WHERE name = 'sync'") == [(2,)]
        assert second.state_value("position") == 3
        assert second.counters()["transactions"] == 2
        assert second.user_totals("000001").tx_count == 2


def test_a_holder_stalled_inside_a_statement_is_ended_once_its_lease_ran_out(pg_url, caplog):
    """A holder stopped in the middle of the protocol (between two messages of a statement:
    its session is not idle, so no idle-in-transaction timeout ends it) keeps its locks, and a
    server that cannot hear the cut keeps them for hours. Here a statement that does not end
    (pg_sleep) stands in for it: once the lease has run out, the process asking for it ends
    that session and takes over; nobody waits on it longer than the lease."""
    with Store.open(pg_url) as first, Store.open(pg_url) as second, ExitStack() as held:
        outcome = stalled_holder(first, held, lambda steps: steps.execute("SELECT pg_sleep(120)"))
        with caplog.at_level("WARNING"):
            # the lease runs 1.5 s: taken well before the stuck statement would have ended
            assert take_over(second, held, timeout=60) < 15
        assert "ended the session" in caplog.text
        second.ingest([record(5)], state={"position": 5})
        wait_for(lambda: outcome, timeout=30)
        assert isinstance(outcome[0], StoreError), outcome
        assert second.state_value("position") == 5
        assert run_sql(pg_url, "SELECT epoch FROM store_locks WHERE name = 'sync'") == [(2,)]


def test_a_stalled_holder_that_cannot_be_ended_is_held_not_a_crash(pg_url, caplog, monkeypatch):
    """Ending a stalled holder's session can fail (it runs as another role, which this one
    may not signal): the lease is then held, as before, with a warning saying why."""
    from txagg.store import postgres_lease

    refused = "SELECT 1, 1 / 0 WHERE %(name)s <> '' AND %(high)s > 0 AND %(low)s >= 0"
    monkeypatch.setattr(postgres_lease, "_END_STALLED", refused)
    with Store.open(pg_url) as first, Store.open(pg_url) as second, ExitStack() as held:
        stalled_holder(first, held, lambda steps: steps.execute("SELECT pg_sleep(60)"))
        expired = "SELECT expires_at <= now() FROM store_locks WHERE name = 'sync'"
        wait_for(lambda: run_sql(pg_url, expired) == [(True,)], timeout=30)
        with caplog.at_level("WARNING"), pytest.raises(SyncLocked, match="try again later"):
            second.lock("sync", lease=3.0).__enter__()
        assert "cannot end the stalled session" in caplog.text
        assert "division by zero" in caplog.text
        run_sql(  # the stalled statement ends here, not in a minute
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND query = 'SELECT pg_sleep(60)' AND pid <> pg_backend_pid()",
        )


def test_a_term_ended_by_a_lost_lease_counts_in_the_summary(pg_url, start_mock):
    """A leader whose lease is taken from it stands by; stopped, its summary adds up every
    term it led: what it stored before the lease was lost counts."""
    from txagg.store.postgres_lease import owner_id
    from txagg.sync import sync

    url = start_mock(users=20, history=1500, tx_per_minute=600, rate_limit=1000, per=1)
    options = sync_options(url, interval=0.2, lease=LEASE)
    stop = threading.Event()
    done: list = []
    with Store.open(pg_url) as store:
        leading = threading.Thread(
            target=lambda: done.append(sync(store, options, follow=True, standby=True, stop=stop))
        )
        leading.start()
        try:
            wait_for(lambda: peek(pg_url, lambda s: s.counters().get("transactions", 0)) > 1500)
            # another process takes the lease over (as after this one was cut off past it)
            run_sql(
                pg_url,
                "UPDATE store_locks SET owner = 'elsewhere:1:x', epoch = epoch + 1, "
                "expires_at = now() + interval '1 hour', holder_pid = NULL WHERE name = 'sync'",
            )
            me = owner_id().rsplit(":", 1)[0] + ":"  # this process, whatever its term
            wait_for(
                lambda: any(s["owner"].startswith(me) for s in peek(pg_url, standbys_of)),
                timeout=30,
            )
        finally:
            stop.set()
            leading.join(60)
        stored = store.counters()["transactions"]
    assert done and done[0].new == stored and done[0].requests > 0
    assert done[0].as_of is not None


def standbys_of(store: Store) -> list[dict]:
    return store.leadership()["standbys"]


def test_status_shows_the_leader_and_the_standbys(pg_url):
    with Store.open(pg_url) as leader, Store.open(pg_url) as standby:
        assert leader.leadership()["owner"] is None
        with leader.lock("sync", lease=30.0):
            standby.standby_seen("other-host:4242:abcdef")
            leader.put_state(position=1)
            result = run_txagg("status", "--db", pg_url, "--json")
            assert result.returncode == 0, result.stderr
            body = check(shapes.StatusReport, result.stdout)["leader"]
            assert body["active"] is True and body["epoch"] == 1
            assert body["owner"] == leader._leases["sync"].owner
            assert body["leaseUntil"] is not None
            assert [(s["host"], s["pid"]) for s in body["standbys"]] == [("other-host", 4242)]
            table = run_txagg("status", "--db", pg_url, "--format", "table")
            assert "Leader" in table.stdout and "other-host:4242" in table.stdout
        standby.standby_gone("other-host:4242:abcdef")
        assert standby.leadership()["standbys"] == []
        assert standby.leadership()["active"] is False


# ---------------------------------------------------------------- real processes


class Follower:
    """``txagg sync --follow`` in a subprocess, its stderr collected line by line; ``prefix``
    runs it under a command that execs it in place (``ip netns exec NAME``)."""

    def __init__(self, name: str, db: str, *args: str, prefix: tuple[str, ...] = ()):
        self.name = name
        self.process = subprocess.Popen(
            [
                *prefix,
                *txagg_command("sync", "--follow", "--db", f"{db}&application_name={name}", *args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def said(self, text: str, after: int = 0) -> bool:
        return any(text in line for line in self.lines[after:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait()
        self.reader.join(10)
        self.process.stderr.close()


def test_a_stopped_standby_counts_only_what_it_stored(pg_url, start_mock):
    """A standby's store grows by the leader's work: when stopped it says it stored nothing."""
    url = start_mock(users=5, history=20, rate_limit=1000, per=1)
    fast = ("--rate-limit", "1000", "--per", "1")
    assert run_txagg("sync", "--db", pg_url, "--api-url", url, *fast).returncode == 0
    with Store.open(pg_url) as leader, leader.lock("sync", lease=LEASE):
        standby = Follower("txagg-standby", pg_url, "--lease", str(LEASE), *fast)
        try:
            wait_for(lambda: standby.said("standing by: leader "), timeout=30)
            leader.ingest([record(900_001), record(900_002)])
            standby.process.send_signal(signal.SIGTERM)
            assert standby.process.wait(timeout=60) == 0
            standby.reader.join(10)
        finally:
            standby.stop()
    stopped = [line for line in standby.lines if "stopped: " in line]
    assert stopped and "stopped: 0 new transactions stored (22 in the store)" in stopped[0], (
        standby.lines
    )


AUDIT = """
CREATE TABLE commit_audit (
    id bigserial PRIMARY KEY, app text, owner text, epoch bigint,
    at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION audit_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO commit_audit (app, owner, epoch)
    SELECT current_setting('application_name'), owner, epoch FROM store_locks
    WHERE name = 'sync';
    RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE ON sync_state
    FOR EACH STATEMENT EXECUTE FUNCTION audit_commit();
"""


def commits(db: str, app: str, after: int = 0) -> int:
    """Write transactions of sync state by the follower ``app`` (rows of the audit) after the
    audit row ``after``."""
    return run_sql(db, "SELECT count(*) FROM commit_audit WHERE app = ? AND id > ?", (app, after))[
        0
    ][0]


def last_audit(db: str) -> int:
    return run_sql(db, "SELECT coalesce(max(id), 0) FROM commit_audit")[0][0]


def leader_pid(db: str) -> int | None:
    found = peek(db, lambda store: store.leadership())
    if not found or not found["active"] or found["owner"] is None:
        return None
    return int(found["owner"].split(":")[1])


def standby_pids(db: str) -> list[int]:
    found = peek(db, lambda store: store.leadership()) or {"standbys": []}
    return [int(standby["owner"].split(":")[1]) for standby in found["standbys"]]


def audited_store(mock_process, pg_database: str, seed: int):
    """A faulty upstream with 40 s of live traffic and a new store synced from it once, its
    commits audited: (the mock, the store's URL, the followers' options, when the traffic
    ends on the monotonic clock)."""
    fast = ("--rate-limit", "20", "--per", "1")
    mock = mock_process(
        "--seed", str(seed), "--users", "40", "--history", "3000", "--tx-per-minute", "600",
        "--live-for", "40", "--faults", FAULTS, *fast,
    )  # fmt: skip
    live_ends = time.monotonic() + 41  # --live-for, from about when the mock started
    db = new_pg_store_url(pg_database)
    common = ["--settle", "0", "--interval", "1", "--lease", str(LEASE), *fast]
    first = run_txagg("sync", "--api-url", mock.url, "--db", db, *common)
    assert first.returncode == 0, first.stderr
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(AUDIT)
    return mock, db, common, live_ends


def exact_and_fenced(mock_url: str, db: str, live_ends: float, pids: dict[str, int]) -> list:
    """Once the live traffic ends, the store catches up to the upstream's ground truth exactly,
    and every commit was made by the holder of the lease (``pids``: application name to pid),
    in epoch order; the epochs of the commits."""
    wait_for(lambda: time.monotonic() > live_ends, timeout=90, every=0.5)
    truth = ground_truth(mock_url)
    wait_for(lambda: peek(db, lambda store: differing_users(store, truth)) == [], timeout=90)
    total = sum(user["transactions"] for user in truth)
    assert peek(db, lambda store: store.counters()["transactions"]) == total
    rows = run_sql(db, "SELECT app, owner, epoch FROM commit_audit ORDER BY id")
    wrong = [row for row in rows if int(row[1].split(":")[1]) != pids.get(row[0])]
    assert wrong == []
    epochs = [row[2] for row in rows]
    assert epochs == sorted(epochs)
    return epochs


def test_failover_under_live_traffic_with_faults(mock_process, pg_database):
    """Two followers against a faulty upstream with live traffic. The leader is stopped
    (SIGSTOP) past its lease: the standby takes over and commits; woken (SIGCONT), the old
    leader steps down and commits nothing. Then the new leader is killed (kill -9): the other
    takes over. At the end the store is the upstream's ground truth, exactly, and every commit
    was made by the holder of the lease at that moment."""
    mock, db, common, live_ends = audited_store(mock_process, pg_database, seed=12)

    a = Follower("txagg-a", db, *common)
    b = None
    try:
        wait_for(lambda: leader_pid(db) == a.pid, timeout=30)
        wait_for(lambda: a.said("leading: epoch 2"), timeout=30)
        b = Follower("txagg-b", db, *common)
        wait_for(lambda: b.said("standing by: leader "), timeout=30)
        assert b.said(f":{a.pid}:") and b.said("epoch 2")
        # status names the leader and the standby; a cron sync exits 75 meanwhile
        status = json.loads(run_txagg("status", "--db", db, "--json").stdout)["leader"]
        assert status["pid"] == a.pid and status["active"] and status["epoch"] == 2
        wait_for(lambda: b.pid in standby_pids(db), timeout=30)
        cron = run_txagg("sync", "--db", db, *common)
        assert cron.returncode == 75, cron.stderr
        assert "another sync" in cron.stderr
        assert commits(db, "txagg-a") > 0 and commits(db, "txagg-b") == 0

        # the leader hangs past its lease: the standby takes over and commits
        a.process.send_signal(signal.SIGSTOP)
        stopped_at = last_audit(db)
        wait_for(lambda: leader_pid(db) == b.pid, timeout=45)
        wait_for(lambda: commits(db, "txagg-b", stopped_at) > 0, timeout=45)
        assert b.said("leading: epoch ")

        # it wakes: it steps down, and nothing it does lands
        woken_at = last_audit(db)
        seen = len(a.lines)
        a.process.send_signal(signal.SIGCONT)
        wait_for(lambda: a.said("standing by: leader ", after=seen), timeout=45)
        assert a.said("stepping down", after=seen) or a.said("lost", after=seen)
        wait_for(lambda: commits(db, "txagg-b", woken_at) > 1, timeout=45)
        assert commits(db, "txagg-a", stopped_at) == 0
        assert a.process.poll() is None, "the old leader exited instead of standing by"

        # the new leader dies: the other takes over at once (its session is gone)
        b.process.send_signal(signal.SIGKILL)
        b.process.wait()
        killed_at = last_audit(db)
        seen = len(a.lines)
        wait_for(lambda: leader_pid(db) == a.pid, timeout=45)
        wait_for(lambda: commits(db, "txagg-a", killed_at) > 0, timeout=45)
        assert a.said("leading: epoch ", after=seen)

        epochs = exact_and_fenced(mock.url, db, live_ends, {"txagg-a": a.pid, "txagg-b": b.pid})
        assert len(set(epochs)) >= 3  # a, b, a again
        a.process.send_signal(signal.SIGTERM)
        assert a.process.wait(timeout=60) == 0
    finally:
        a.stop()
        if b is not None:
            b.stop()

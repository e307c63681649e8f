"""The PostgreSQL store beyond the shared contract (test_store.py runs that on both backends):
opening and its refusals, the lease behind the sync and verify locks, the missing extra, and
every command answering byte for byte as it does from SQLite."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import START, new_pg_store_url, peek, record, run_sql, run_txagg, wait_for

from txagg.models import loads
from txagg.store import NoStore, NotAStore, Store, StoreError, SyncLocked
from txagg.testing import FakeClock, differing_users, ground_truth, sync_options

FAST = ("--rate-limit", "1000", "--per", "1")


# ---------------------------------------------------------------- opening


def test_what_is_not_a_store_is_refused_and_read_commands_create_nothing(pg_url):
    with pytest.raises(NoStore, match="run 'txagg sync' first"):
        Store.open(pg_url, create=False, read_only=True)
    assert [] == run_sql(
        pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    ), "a read command created tables"


def test_a_schema_holding_other_tables_is_not_a_store(pg_url):
    run_sql(pg_url, "CREATE TABLE something (x integer)")
    with pytest.raises(NotAStore, match="not a txagg store"):
        Store.open(pg_url)


def test_a_read_only_store_writes_nothing(pg_url):
    with Store.open(pg_url) as store:
        store.ingest([record(1)], state={"position": 1})
    with Store.open(pg_url, create=False, read_only=True) as reader:
        with pytest.raises(StoreError, match="read-only"):
            reader.put_state(position=2)
        assert reader.state_value("position") == 1


def test_an_unreachable_server_or_a_missing_database_is_said_clearly(pg_database):
    with pytest.raises(StoreError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1: "):
        Store.open("postgresql://postgres@127.0.0.1:1/txagg?connect_timeout=3")
    missing = pg_database.rsplit("/", 1)[0] + "/txagg_no_such_database"
    with pytest.raises(StoreError, match="database txagg_no_such_database does not exist"):
        Store.open(missing)


def test_messages_never_show_the_password(pg_url):
    url = pg_url.replace("postgres@", "postgres:s3cret@")
    with Store.open(url) as store:
        assert "s3cret" not in str(store.path) and str(store.path).startswith("postgresql://")
    with pytest.raises(StoreError) as refused:
        Store.open(url.replace("127.0.0.1:5432", "127.0.0.1:1"))
    assert "s3cret" not in str(refused.value)


def test_a_url_that_went_through_a_path_is_refused_and_makes_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="postgresql://USER@HOST"):
        Store.open(Path("postgresql://postgres@127.0.0.1/db"))
    assert list(tmp_path.iterdir()) == []


def test_without_the_extra_a_url_names_it_and_makes_no_folder(tmp_path):
    # psycopg made unimportable in a child process, as in an install without the extra.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.argv[0] = 'txagg'; "
        "from txagg.__main__ import main; main()"
    )
    url = "postgresql://postgres@127.0.0.1:5432/txagg"
    for args in (
        ["report", "000001", "--json", "--db", url],
        ["status", "--db", url],
        ["sync", "--db", url, "--api-url", "http://127.0.0.1:1"],
    ):
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        assert "pipx install 'txagg[postgres]'" in result.stderr
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no folder called postgresql:


# ---------------------------------------------------------------- the lease


def test_a_killed_holder_releases_the_lock_at_once(pg_url):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from txagg.store import Store\n"
            "with Store.open(sys.argv[1]) as store, store.sync_lock():\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            pg_url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with Store.open(pg_url) as store:
            with pytest.raises(SyncLocked, match="another sync"):
                with store.sync_lock():
                    pass
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            began = time.monotonic()

            def taken() -> bool:
                try:
                    with store.sync_lock():
                        return True
                except SyncLocked:
                    return False

            wait_for(taken, timeout=30)
            # well before the lease would have run out: the holder's session is gone
            assert time.monotonic() - began < 10
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_lapsed_lease_is_taken_over_and_its_old_holder_can_no_longer_write(pg_url, monkeypatch):
    from txagg.store import postgres_lease

    monkeypatch.setattr(postgres_lease, "LOCK_RENEW_SECONDS", 3600.0)  # no renewal in between
    with Store.open(pg_url) as first, Store.open(pg_url) as second:
        with first.sync_lock():
            first.ingest([record(1)], state={"position": 1})
            # the first holder hangs past its lease (here: the lease is made to lapse)
            run_sql(pg_url, "UPDATE store_locks SET expires_at = now() - interval '1 second'")
            with second.sync_lock():
                with pytest.raises(SyncLocked, match="lost the sync lock"):
                    first.ingest([record(2)], state={"position": 2})
                with pytest.raises(SyncLocked, match="lost the sync lock"):
                    first.take_token(5, 60)
                second.ingest([record(3)], state={"position": 3})
                assert run_sql(pg_url, "SELECT epoch FROM store_locks") == [(2,)]
            # the first holder leaving does not free the lock it lost to the second
        assert second.state_value("position") == 3
        assert second.counters()["transactions"] == 2
        assert second.user_totals("000001").tx_count == 2


def test_the_lease_is_renewed_while_held(pg_url, monkeypatch):
    from txagg.store import postgres_lease

    monkeypatch.setattr(postgres_lease, "LOCK_TTL_SECONDS", 1.0)
    monkeypatch.setattr(postgres_lease, "LOCK_RENEW_SECONDS", 0.2)
    with Store.open(pg_url) as holder, Store.open(pg_url) as other:
        with holder.lock("verify"):
            time.sleep(2.5)  # past the lease: renewed meanwhile
            with pytest.raises(SyncLocked, match="another verify"):
                with other.lock("verify"):
                    pass
            holder.put_state(still="mine")
        with other.lock("verify"):  # released at the end of the block
            pass


# ---------------------------------------------------------------- the commands


def _synced_pair(start_mock, tmp_path, pg_url) -> tuple[list[str], list[str]]:
    """The same upstream synced, with the same clock, into a SQLite file and into PostgreSQL;
    and a few of its users, the one with the most payouts first."""
    url = start_mock(
        seed=12, users=40, history=6000, invalid_ratio=0.02, start=START, rate_limit=10**5, per=1
    )
    locations = [str(tmp_path / "store.db"), pg_url]
    for location in locations:
        clock = FakeClock(START / 1000 + 30)
        with Store.open(location) as store:
            from txagg.sync import sync

            summary = sync(store, sync_options(url), clock=clock, sleep=clock.sleep)
            assert summary.new == 6000 and summary.quarantined > 0
            truth = ground_truth(url)
            assert differing_users(store, truth) == []
    users = [user["userId"] for user in sorted(truth, key=lambda user: -user["payout"])]
    return locations, users[:3]


def test_every_read_command_answers_byte_for_byte_as_from_sqlite(start_mock, tmp_path, pg_url):
    (sqlite_db, pg_db), users = _synced_pair(start_mock, tmp_path, pg_url)
    commands = [
        ["report", users[0], "--json"],
        ["report", users[1], "--json", "--eur-per-scr", "0.915"],
        ["report", "no-such-user", "--json"],
        ["payouts", "--json"],
        ["payouts", "--json", "--since", "2023-11-14T12:00:00Z", "--until", "2023-11-14T20:00Z"],
        ["status", "--json"],
    ]
    for command in commands:
        answers = [run_txagg(*command, "--db", db) for db in (sqlite_db, pg_db)]
        one, two = answers
        assert one.returncode == two.returncode == (3 if "no-such-user" in command else 0)
        if command[0] == "status":
            bodies = [json.loads(answer.stdout) for answer in answers]
            assert bodies[1]["store"].startswith("postgresql://")
            assert bodies[0]["leader"] is None  # SQLite has no leader to show
            assert bodies[1]["leader"]["epoch"] == 1  # the sync that filled it
            for body in bodies:
                # where it is; seconds since asOf; who synced it
                del body["store"], body["lagSeconds"], body["leader"]
            assert bodies[0] == bodies[1]
            assert json.dumps(bodies[0]) == json.dumps(bodies[1])
        else:
            assert one.stdout == two.stdout, command
            assert one.stderr.replace(sqlite_db, "DB") == two.stderr.replace(pg_db, "DB")


def test_serve_answers_byte_for_byte_as_from_sqlite(start_mock, tmp_path, pg_url):
    from txagg.server import ServeConfig, start_in_thread

    answers = []
    locations, users = _synced_pair(start_mock, tmp_path, pg_url)
    for db in locations:
        url, stop = start_in_thread(ServeConfig(db=db, port=0))
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                answers.append(
                    [
                        (answer.status_code, answer.headers.get("etag"), answer.content)
                        for answer in (
                            client.get(f"/users/{users[0]}"),
                            client.get("/users/nobody"),
                            client.get("/payouts", params={"limit": 7}),
                            client.get("/payouts", params={"limit": 5, "after": users[2]}),
                            client.get("/payouts", params={"since": "2023-11-14T15:00:00Z"}),
                        )
                    ]
                )
        finally:
            stop()
    assert answers[0] == answers[1]
    assert answers[0][0][0] == 200 and answers[0][1][0] == 404


def test_sync_verify_and_report_through_the_command_line(mock_process, pg_database):
    mock = mock_process("--seed", "3", "--users", "60", "--history", "12345", *FAST)
    db = new_pg_store_url(pg_database)
    args = ["sync", "--api-url", mock.url, "--db", db, "--settle", "0", "--json", *FAST]
    result = run_txagg(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["new"] == 12345 and summary["complete"] is True
    assert json.loads(run_txagg(*args).stdout)["new"] == 0  # nothing counted twice
    with Store.open(db, create=False, read_only=True) as store:
        assert differing_users(store, ground_truth(mock.url)) == []
    verified = run_txagg("verify", "--db", db, "--json", *FAST)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["discrepancies"] == []
    status = run_txagg("status", "--db", db, "--json", "--check")
    assert status.returncode == 0, status.stdout + status.stderr
    body = json.loads(status.stdout)
    assert body["transactions"] == 12345 and body["upstream"] == mock.url
    user = ground_truth(mock.url)[0]
    env = {"TXAGG_DB": db}  # the variable too, through report's fast path
    report = run_txagg("report", user["userId"], env=env)
    assert report.returncode == 0, report.stderr
    assert {**loads(report.stdout), "asOf": None} == {**user, "asOf": None}


def test_kill_9_at_any_instant_loses_nothing_and_counts_nothing_twice(mock_process, pg_database):
    mock = mock_process("--seed", "5", "--users", "40", "--history", "60000", *FAST)
    db = new_pg_store_url(pg_database)
    args = ["sync", "--api-url", mock.url, "--db", db, "--settle", "0", "--json", *FAST]
    for delay in (0.6, 0.9, 1.2):
        process = subprocess.Popen(
            [sys.executable, "-m", "txagg", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = run_txagg(*args)  # at once: the killed holders' lease is free
    assert final.returncode == 0, final.stderr
    with Store.open(db, create=False, read_only=True) as store:
        assert differing_users(store, ground_truth(mock.url)) == []
        assert store.counters()["transactions"] == 60000


def test_two_syncs_at_once_one_works_the_other_exits_75(mock_process, pg_database):
    limit = ["--rate-limit", "5", "--per", "1"]  # slow enough to still be working
    mock = mock_process("--seed", "8", "--users", "30", "--history", "20000", *limit)
    db = new_pg_store_url(pg_database)
    args = ["sync", "--api-url", mock.url, "--db", db, "--settle", "0", "--json", *limit]
    first = subprocess.Popen([sys.executable, "-m", "txagg", *args], stdout=subprocess.PIPE)
    try:
        wait_for(
            lambda: (
                peek(db, lambda store: store.counters().get("transactions"))
                or first.poll() is not None
            )
        )
        assert first.poll() is None, "the first sync ended before the second started"
        second = run_txagg(*args)
        assert second.returncode == 75, second.stderr
        assert "another sync" in second.stderr
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stdout.close()
    with Store.open(db, create=False, read_only=True) as store:
        assert differing_users(store, ground_truth(mock.url)) == []

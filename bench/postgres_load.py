"""Ingest throughput into PostgreSQL next to SQLite, through ``Store.ingest`` end to end; and
with ``--failover``, how long a standby ``sync --follow`` takes to commit its first page after
the leader is killed (kill -9) or stopped (SIGSTOP); and with ``--indexes``, whether a BRIN index
on ``transactions.created_at`` would do in place of the B-tree.

    python bench/postgres_load.py [--transactions 200000] [--users 10000]
                                  [--server postgresql://postgres@127.0.0.1:5432]
    python bench/postgres_load.py --failover [--runs 10] [--lease 30]
    python bench/postgres_load.py --indexes [--transactions 2000000] [--users 10000]

The same upstream pages (1000 records each, decoded as sync decodes them: amounts as Decimal)
go into a fresh SQLite file and into a fresh PostgreSQL database of the run's own (dropped at the
end), one ``Store.ingest`` per page with its sync cursor, as sync stores them: parsing,
validation, the rows, the totals, the counters and the cursor, one database transaction a page.
Prints transactions/s on both and their ratio, and the bytes each transaction takes on disk
(SQLite: the file; PostgreSQL: pg_total_relation_size of the store's tables, indexes included).

``--failover``: a mock upstream with live traffic (100 transactions a second, so every poll has a
page to commit), two ``txagg sync --follow --lease SECONDS --interval 1`` on one store, and a
trigger that stamps every write of the sync state with the database's clock and the lease epoch
it was made under. Each run signals the leader, and measures from just before the signal to the
first write of the next epoch (the standby's first page: its cursor moves with it). Each signal
comes a random 0 to lease/5 seconds after the leader and the standby are both at work, so the
runs fall at every phase of the renewals (every lease/6) and of the asking (every lease/10).
``kill -9``: the killed leader is replaced by a new follower, which stands by; ``SIGSTOP``: the
stopped one is woken (SIGCONT) once the standby committed, steps down and stands by. Prints
every run, then median and max of each.

``--indexes``: ``--transactions`` go into a database of the run's own through ``Store.ingest``, in
arrival order: createdAt order but for 1% that arrive up to 150 s late (as the upstream's late
arrivals do). Then, with the store's B-tree on ``created_at``, with a BRIN index of the default
pages_per_range in its place, and with one of 16 pages a range, after VACUUM (ANALYZE): the
index's size, the table's (heap) size, the whole store's bytes per transaction, the times of
``count_window`` over 300 five-minute windows spread over the data and of ``clear_second`` at
300 moments (median and p99, after one warm-up pass), and the transactions/s of a further tenth of
``--transactions`` ingested with that index in place (each index its own, later, batch).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MockServer, machine, percentile, txagg  # noqa: E402

from txagg.models import format_timestamp, parse_created_at  # noqa: E402
from txagg.store import Store  # noqa: E402

START_MS = 1_700_000_000_000
KINDS = ("earned", "earned", "earned", "spent", "payout")


def pages(transactions: int, users: int, seed: int = 1) -> list[list[dict]]:
    """Upstream pages of 1000 records, in createdAt order, a few per millisecond at most."""
    rng = random.Random(seed)
    created = START_MS
    out = []
    for _ in range(transactions // 1000):
        page = []
        for _ in range(1000):
            created += rng.randint(0, 40)
            page.append(
                {
                    "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "userId": f"{rng.randrange(users):06d}",
                    "createdAt": format_timestamp(created),
                    "type": rng.choice(KINDS),
                    "amount": Decimal(rng.randint(1, 500_000)) / 100,
                }
            )
        out.append(page)
    return out


def arrivals(
    transactions: int, users: int, late: float = 0.01, late_ms: int = 150_000, seed: int = 1
) -> list[list[dict]]:
    """``pages()``'s records in the order the upstream shows them: a share ``late`` of them
    appear up to ``late_ms`` after their createdAt, the rest at it; pages of 1000 again."""
    rng = random.Random(seed)
    shown = []
    for page in pages(transactions, users, seed):
        for record in page:
            at = parse_created_at(record["createdAt"])
            shown.append((at + rng.randint(0, late_ms) if rng.random() < late else at, record))
    shown.sort(key=lambda pair: pair[0])
    records = [record for _, record in shown]
    return [records[i : i + 1000] for i in range(0, len(records), 1000)]


def load(store, batches: list[list[dict]]) -> float:
    """Ingest every page with its cursor, as sync does; seconds taken."""
    began = time.perf_counter()
    for number, page in enumerate(batches, 1):
        last = START_MS + number  # stands for the window cursor sync keeps
        store.ingest(page, state={"window_start": START_MS, "page": number + 1, "position": last})
    return time.perf_counter() - began


AUDIT = """
CREATE TABLE bench_commits (id bigserial PRIMARY KEY, epoch bigint, at double precision);
CREATE FUNCTION bench_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_commits (epoch, at)
    SELECT epoch, extract(epoch FROM clock_timestamp()) FROM store_locks WHERE name = 'sync';
    RETURN NULL;
END $$;
CREATE TRIGGER bench_commit AFTER INSERT OR UPDATE ON sync_state
    FOR EACH STATEMENT EXECUTE FUNCTION bench_commit();
"""


def wait(condition, timeout: float = 120.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("the followers did not get there in time")
        time.sleep(every)
    return result


def failover(server: str, runs: int, lease: float) -> None:
    """--failover: see the module's docstring."""
    import psycopg

    print(machine())
    name = f"txagg_bench_{os.getpid()}_{secrets.token_hex(3)}"
    rate = ("--rate-limit", "20", "--per", "1")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        admin.execute(f'CREATE DATABASE "{name}"')
        followers: list[subprocess.Popen] = []
        mock = MockServer("--users", "1000", "--history", "5000", "--tx-per-minute", "6000", *rate)
        try:
            db = f"{server}/{name}"
            args = ["--db", db, "--settle", "0", "--interval", "1", "--lease", str(lease), *rate]
            subprocess.run(
                txagg("sync", "--api-url", mock.url, *args), check=True, capture_output=True
            )
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(AUDIT)
                lease_row = "SELECT owner, epoch FROM store_locks WHERE name = 'sync'"
                standbys = "SELECT owner FROM store_locks WHERE name LIKE 'standby:sync:%'"

                def follower() -> subprocess.Popen:
                    process = subprocess.Popen(
                        txagg("sync", "--follow", *args),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    followers.append(process)
                    return process

                def leader() -> tuple[subprocess.Popen, int] | None:
                    owner, epoch = conn.execute(lease_row).fetchone()
                    pid = int(owner.split(":")[1])
                    found = [p for p in followers if p.pid == pid and p.poll() is None]
                    return (found[0], epoch) if found else None

                def standing_by(process: subprocess.Popen) -> bool:
                    rows = conn.execute(standbys).fetchall()
                    return any(int(row[0].split(":")[1]) == process.pid for row in rows)

                def first_commit(epoch: int) -> float | None:
                    row = conn.execute(
                        "SELECT min(at) FROM bench_commits WHERE epoch > %s", (epoch,)
                    ).fetchone()
                    return row[0]

                follower()
                wait(leader)
                results: dict[str, list[float]] = {"kill -9": [], "SIGSTOP": []}
                for run in range(runs):
                    for kind in results:
                        if len(followers) - sum(p.poll() is not None for p in followers) < 2:
                            follower()
                        process, epoch = wait(leader)
                        other = next(p for p in followers if p.poll() is None and p is not process)
                        wait(lambda other=other: standing_by(other))
                        # a page of this epoch committed: the leader is at work
                        wait(
                            lambda epoch=epoch: conn.execute(
                                "SELECT 1 FROM bench_commits WHERE epoch = %s", (epoch,)
                            ).fetchone()
                        )
                        # at a random moment of the renewal and asking cycles (else every
                        # run would hit the same phase: right after the standby's first ask)
                        time.sleep(random.uniform(0, lease / 5))
                        began = time.time()
                        if kind == "kill -9":
                            process.send_signal(signal.SIGKILL)
                            process.wait()
                        else:
                            process.send_signal(signal.SIGSTOP)
                        committed = wait(lambda epoch=epoch: first_commit(epoch))
                        if kind == "SIGSTOP":
                            process.send_signal(signal.SIGCONT)
                        results[kind].append(committed - began)
                        print(f"run {run + 1:>2} {kind:<8} {committed - began:6.2f} s", flush=True)
        finally:
            for process in followers:
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                process.wait()
            mock.stop()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"PostgreSQL {version}; --lease {lease:g} (a lease of {lease / 2:g} s)")
    print("seconds from the signal to the standby's first page committed:")
    for kind, seconds in results.items():
        print(
            f"{kind:<8} median {statistics.median(seconds):5.2f}  max {max(seconds):5.2f}  "
            f"min {min(seconds):5.2f}  ({len(seconds)} runs)"
        )


WINDOW_MS = 5 * 60_000
PROBES = 300
INDEXES = {
    "B-tree (the store's)": None,
    "BRIN": "USING brin (created_at)",
    "BRIN, 16 pages/range": "USING brin (created_at) WITH (pages_per_range = 16)",
}
# count_window's statement on transactions, for its plan
WINDOW_SQL = (
    "SELECT count(*), sum(CASE WHEN created_at = %s OR created_at = %s THEN 1 ELSE 0 END) "
    "FROM transactions WHERE created_at >= %s AND created_at <= %s"
)


def timed(call, calls: list[tuple]) -> list[float]:
    """Seconds of each call, measured on a second pass (the first warms the cache)."""
    for args in calls:
        call(*args)
    seconds = []
    for args in calls:
        began = time.perf_counter()
        call(*args)
        seconds.append(time.perf_counter() - began)
    return seconds


def indexes(server: str, transactions: int, users: int) -> None:
    """--indexes: see the module's docstring."""
    import psycopg

    print(machine())
    further = max(1, transactions // 10_000)  # pages of 1000
    batches = arrivals(transactions + len(INDEXES) * further * 1000, users)
    first, more = batches[: transactions // 1000], batches[transactions // 1000 :]
    rng = random.Random(2)
    name = f"txagg_bench_indexes_{os.getpid()}"
    rows = []
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            with (
                Store.open(f"{server}/{name}") as store,
                psycopg.connect(f"{server}/{name}", autocommit=True) as conn,
            ):
                first_seconds = load(store, first)
                low, high = conn.execute(
                    "SELECT min(created_at), max(created_at) FROM transactions"
                ).fetchone()
                step = (high - low - WINDOW_MS) // (PROBES - 1)
                windows = [(low + i * step, low + i * step + WINDOW_MS) for i in range(PROBES)]
                moments = [(rng.randint(low, high),) for _ in range(PROBES)]
                for number, (label, create) in enumerate(INDEXES.items()):
                    if create:
                        conn.execute("DROP INDEX transactions_created_at")
                        conn.execute(
                            f"CREATE INDEX transactions_created_at ON transactions {create}"
                        )
                    conn.execute("VACUUM (ANALYZE) transactions")
                    index_bytes, table_bytes, count = conn.execute(
                        "SELECT pg_relation_size('transactions_created_at'), "
                        "pg_relation_size('transactions'), count(*) FROM transactions"
                    ).fetchone()
                    plan = conn.execute(
                        f"EXPLAIN (FORMAT JSON) {WINDOW_SQL}", (*windows[0], *windows[0])
                    ).fetchone()[0][0]["Plan"]
                    while "Plans" in plan:
                        plan = plan["Plans"][0]
                    plan = plan["Node Type"]
                    counts = timed(store.count_window, windows)
                    clears = timed(store.clear_second, moments)
                    per = store.size_bytes() / count
                    added = more[number * further : (number + 1) * further]
                    rate = sum(map(len, added)) / load(store, added)
                    rows.append((label, index_bytes, table_bytes, per, counts, clears, rate, plan))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"PostgreSQL {version}")
    print(
        f"{transactions:,} transactions ({transactions / first_seconds:,.0f} tx/s), "
        f"{users:,} users, over {(high - low) / 3_600_000:.1f} h, 1% up to 150 s late; "
        f"then {further * 1000:,} more with each index"
    )
    print(
        f"{PROBES} count_window of {WINDOW_MS // 60_000} min and {PROBES} clear_second, "
        f"ms median/p99; sizes before each index's batch, after VACUUM (ANALYZE)"
    )
    print(
        f"{'created_at index':<22}{'index':>11}{'table':>10}{'B/tx':>6}"
        f"{'count_window':>15}{'clear_second':>15}{'ingest tx/s':>13}  scan"
    )
    for label, index_bytes, table_bytes, per, counts, clears, rate, scan in rows:
        figures = [
            f"{statistics.median(v) * 1000:.2f}/{percentile(v, 0.99) * 1000:.2f}"
            for v in (counts, clears)
        ]
        print(
            f"{label:<22}{index_bytes / 1024:>8,.0f} kB{table_bytes / 2**20:>8.1f}MB{per:>6.0f}"
            f"{figures[0]:>15}{figures[1]:>15}{rate:>13,.0f}  {scan}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transactions", type=int, help="default 200000; with --indexes, 2000000")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument(
        "--server",
        default=os.environ.get("TXAGG_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432"),
        help="a PostgreSQL server URL without a database: the run creates and drops its own",
    )
    parser.add_argument("--failover", action="store_true", help="measure failover instead")
    parser.add_argument(
        "--indexes", action="store_true", help="B-tree or BRIN on created_at, instead"
    )
    parser.add_argument("--runs", type=int, default=10, help="--failover: runs of each kind")
    parser.add_argument("--lease", type=float, default=30.0, help="--failover: sync's --lease")
    args = parser.parse_args()
    if args.failover:
        failover(args.server, args.runs, args.lease)
        return
    if args.indexes:
        indexes(args.server, args.transactions or 2_000_000, args.users)
        return
    import psycopg

    batches = pages(args.transactions or 200_000, args.users)
    count = sum(len(page) for page in batches)
    print(machine())

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bench.db"
        with Store.open(path) as store:
            sqlite_seconds = load(store, batches)
            assert store.counters()["transactions"] == count
        sqlite_bytes = sum(
            os.path.getsize(f"{path}{suffix}")
            for suffix in ("", "-wal")
            if os.path.exists(f"{path}{suffix}")
        )

    name = f"txagg_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            admin.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                "('shared_buffers', 'synchronous_commit', 'fsync', 'wal_level')"
            ).fetchall()
        )
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            with Store.open(f"{args.server}/{name}") as store:
                pg_seconds = load(store, batches)
                assert store.counters()["transactions"] == count
                pg_bytes = store.size_bytes()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"PostgreSQL {version}, {', '.join(f'{k}={v}' for k, v in sorted(settings.items()))}")
    print(f"{count:,} transactions in {len(batches)} pages of 1000, {args.users:,} users")
    sqlite_rate, pg_rate = count / sqlite_seconds, count / pg_seconds
    print(f"SQLite:     {sqlite_rate:>9,.0f} tx/s  ({sqlite_seconds:.2f} s)")
    print(f"PostgreSQL: {pg_rate:>9,.0f} tx/s  ({pg_seconds:.2f} s)")
    print(f"PostgreSQL / SQLite: {pg_rate / sqlite_rate:.2f}")
    sqlite_per, pg_per = sqlite_bytes / count, pg_bytes / count
    print(f"bytes per transaction: SQLite {sqlite_per:.0f}, PostgreSQL {pg_per:.0f}")


if __name__ == "__main__":
    main()

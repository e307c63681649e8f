"""Ingest throughput into PostgreSQL next to SQLite, through ``Store.ingest`` end to end.

    python bench/postgres_load.py [--transactions 200000] [--users 10000]
                                  [--server postgresql://postgres@127.0.0.1:5432]

The same upstream pages (1000 records each, decoded as sync decodes them: amounts as Decimal)
go into a fresh SQLite file and into a fresh PostgreSQL database of the run's own (dropped at the
end), one ``Store.ingest`` per page with its sync cursor, as sync stores them: parsing,
validation, the rows, the totals, the counters and the cursor, one database transaction a page.
Prints transactions/s on both and their ratio, and the bytes each transaction takes on disk
(SQLite: the file; PostgreSQL: pg_total_relation_size of the store's tables, indexes included).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from txagg.models import format_timestamp  # noqa: E402
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


def load(store, batches: list[list[dict]]) -> float:
    """Ingest every page with its cursor, as sync does; seconds taken."""
    began = time.perf_counter()
    for number, page in enumerate(batches, 1):
        last = START_MS + number  # stands for the window cursor sync keeps
        store.ingest(page, state={"window_start": START_MS, "page": number + 1, "position": last})
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument(
        "--server",
        default=os.environ.get("TXAGG_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432"),
        help="a PostgreSQL server URL without a database: the run creates and drops its own",
    )
    args = parser.parse_args()
    import psycopg

    batches = pages(args.transactions, args.users)
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

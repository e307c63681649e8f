"""A full disk, a read-only store, a damaged file: a clear error, and nothing half-written."""

from __future__ import annotations

import pytest
from conftest import record, run_txagg

from txagg.store import Store, StoreError


def test_a_full_disk_fails_clearly_and_keeps_the_store_whole(store):
    store.ingest([record(n) for n in range(10)], state={"position": 1})
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    big_page = [record(n, user=f"{n:06d}") for n in range(100, 3100)]
    with pytest.raises(StoreError, match="disk holding .* is full"):
        store.ingest(big_page, state={"position": 2})
    assert store.counters()["transactions"] == 10
    assert store.state_value("position") == 1
    assert store.conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 10


def test_a_read_only_store_fails_clearly(store):
    store.conn.execute("PRAGMA query_only = ON")
    with pytest.raises(StoreError, match="read-only"):
        store.ingest([record(1)])


def test_a_damaged_store_is_a_clear_failure_for_every_command(db_path):
    with Store.open(db_path) as store:
        store.ingest([record(n, user=f"{n:06d}") for n in range(2000)])
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db_path.read_bytes())
    page_size = 4096
    for offset in range(page_size * 2, len(data), page_size):
        data[offset : offset + 64] = b"\xff" * 64  # scribble over every b-tree page header
    db_path.write_bytes(bytes(data))
    for args in (["report", "000005"], ["payouts"], ["status"]):
        result = run_txagg(*args, "--db", str(db_path), "--json")
        assert result.returncode == 1, (args, result.stdout)
        assert "damaged" in result.stderr and "Traceback" not in result.stderr

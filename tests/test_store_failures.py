"""A full disk, a read-only store, a damaged file: a clear error, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_impossible_totals_in_a_store_are_a_clear_failure_never_a_traceback(db_path):
    """A users row no ingest can write (by hand, or an older binary): refused on every read path."""
    import sqlite3

    import httpx

    from txagg.server import ServeConfig, start_in_thread

    with Store.open(db_path) as store:
        store.ingest([record(n, user=f"{n:06d}", kind="payout") for n in range(3)])
    corruptions = [
        ("000000", "earned", 1e30),
        ("000001", "spent", 9 * 10**18),
        ("000002", "payout", "lots"),
    ]
    conn = sqlite3.connect(db_path)
    for user, column, value in corruptions:
        conn.execute(f"UPDATE users SET {column} = ? WHERE user_id = ?", (value, user))
    conn.commit()
    conn.close()
    for user, column, _ in corruptions:
        for args in (["--json"], ["--eur-per-scr", "1"]):  # the fast path, then the full CLI
            result = run_txagg("report", user, "--db", str(db_path), *args)
            assert (result.returncode, result.stdout) == (1, ""), (user, args, result.stdout)
            assert result.stderr.startswith("Error: the store ") and result.stderr.count("\n") == 1
            assert f"user '{user}' has an impossible {column} total" in result.stderr
    payouts = run_txagg("payouts", "--db", str(db_path))
    assert payouts.returncode == 1 and payouts.stderr.count("\n") == 1
    assert "impossible payout total" in payouts.stderr and "Traceback" not in payouts.stderr

    url, stop = start_in_thread(ServeConfig(db=db_path, port=0))
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = [client.get(f"/users/{user}") for user, _, _ in corruptions]
            answers.append(client.get("/payouts"))
    finally:
        stop()
    for answer in answers:
        assert answer.status_code == 500, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert "impossible" in answer.json()["detail"]


def test_amounts_too_large_to_add_up_are_a_clear_failure(db_path):
    import sqlite3

    with Store.open(db_path) as store:
        store.ingest([record(n, kind="payout") for n in range(3)])
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE transactions SET amount = ?", (2**62,))
    conn.commit()
    conn.close()
    result = run_txagg("payouts", "--db", str(db_path), "--since", "2000-01-01")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1 and "too large to add up" in result.stderr


REMOUNT_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


@pytest.fixture
def read_only():
    """run(target, *args): txagg with ``target`` (a folder or a file) read-only for it.

    As root, permission bits change nothing, so ``target`` is bind-mounted read-only in a
    private mount namespace (writes fail with EROFS, as on a read-only volume); as anyone else,
    taking the write bits away is enough.
    """
    import os
    import subprocess
    import sys

    from conftest import txagg_command

    restore: list = []

    def run(target, *args: str):
        if os.geteuid() != 0:
            for path in [target, *(target.iterdir() if target.is_dir() else [])]:
                restore.append((path, path.stat().st_mode))
                path.chmod(0o555 if path.is_dir() else 0o444)
            command = txagg_command(*args)
        else:
            command = ["unshare", "-m", "sh", "-c", REMOUNT_READ_ONLY, "sh", str(target)]
            command += txagg_command(*args)
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    if os.geteuid() == 0:
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", REMOUNT_READ_ONLY, "sh", sys.prefix, "true"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            pytest.skip(f"cannot mount read-only here (root ignores permissions): {probe.stderr}")
    yield run
    for path, mode in reversed(restore):
        path.chmod(mode)


def _crash_after_a_write(db_path) -> None:
    """A process that commits one more transaction and dies without closing the store."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from conftest import record\n"
        "from txagg.store import Store\n"
        "store = Store.open(sys.argv[1])\n"
        "store.ingest([record(99, user='000005', kind='payout')])\n"
        "os._exit(0)\n"
    )
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", script, str(db_path)], check=True, cwd=tests)


READS = (
    ["report", "000005", "--json"],
    ["report", "000005", "--eur-per-scr", "1"],
    ["payouts", "--json"],
    ["status", "--json"],
)


def _comparable(args: list[str], stdout: str) -> str:
    if args[0] != "status":
        return stdout
    body = json.loads(stdout)
    body.pop("lagSeconds")  # seconds since asOf: the only figure that moves between two runs
    return json.dumps(body)


@pytest.mark.parametrize("crashed", [False, True], ids=["closed cleanly", "writer killed"])
def test_a_store_in_a_read_only_folder_reads_like_any_other(db_path, read_only, crashed):
    with Store.open(db_path) as store:
        store.ingest(
            [record(n, user=f"{n % 7:06d}", kind=("earned", "payout")[n % 2]) for n in range(50)],
            state={"as_of": 1_700_000_100_000},
        )
    if crashed:
        _crash_after_a_write(db_path)
    folder = db_path.parent

    def files() -> dict[str, bytes]:
        # the -shm is SQLite's shared-memory index, which readers that may write it update
        return {
            p.name: b"" if p.name.endswith("-shm") else p.read_bytes() for p in folder.iterdir()
        }

    before = files()
    assert set(before) == (
        {"store.db", "store.db-wal", "store.db-shm"} if crashed else {"store.db"}
    )
    outputs = []
    for args in READS:
        writable = run_txagg(*args, "--db", str(db_path))
        assert writable.returncode == 0, writable.stderr
        locked = read_only(folder, *args, "--db", str(db_path))
        assert (locked.returncode, locked.stderr) == (0, ""), args
        assert _comparable(args, locked.stdout) == _comparable(args, writable.stdout), args
        outputs.append(locked.stdout)
    # 7 of the 50 are user 000005's; the killed writer's commit, still in the -wal, is the 8th
    assert f'"transactions": {8 if crashed else 7}' in outputs[0]
    assert files() == before


def test_a_read_only_store_file_reads_like_any_other(db_path, read_only):
    with Store.open(db_path) as store:
        store.ingest([record(n, user="000005", kind="payout") for n in range(5)])
    before = db_path.read_bytes()
    for args in READS:
        writable = run_txagg(*args, "--db", str(db_path))
        locked = read_only(db_path, *args, "--db", str(db_path))
        assert (locked.returncode, locked.stderr) == (0, ""), args
        assert _comparable(args, locked.stdout) == _comparable(args, writable.stdout), args
    assert db_path.read_bytes() == before


def test_a_wal_that_cannot_be_read_in_a_read_only_folder_is_explained(db_path, read_only):
    with Store.open(db_path) as store:
        store.ingest([record(n) for n in range(5)])
    _crash_after_a_write(db_path)
    Path(f"{db_path}-shm").unlink()  # the index SQLite needs to read the -wal, and cannot rebuild
    for args in READS:
        result = read_only(db_path.parent, *args, "--db", str(db_path))
        assert (result.returncode, result.stdout) == (1, ""), args
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"{db_path}-wal holds changes" in result.stderr, result.stderr
        assert "writable" in result.stderr

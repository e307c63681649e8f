"""Ingest throughput end to end against an unthrottled local mock, and client CPU per page.

    python bench/ingest_throughput.py [--history 300000]

1. `txagg sync` as a subprocess against `txagg mock-serve` (another process): transactions/s.
2. The same sync in this process: CPU time of the client alone per 1000-item page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MockServer, machine, timed_sync  # noqa: E402

from txagg.store import Store  # noqa: E402
from txagg.sync import SyncOptions, sync  # noqa: E402

UNTHROTTLED = ("--rate-limit", "1000000", "--per", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=300_000)
    args = parser.parse_args()
    print(machine())
    with (
        MockServer("--history", str(args.history), "--users", "10000", *UNTHROTTLED) as mock,
        tempfile.TemporaryDirectory() as scratch,
    ):
        db = Path(scratch) / "a.db"
        summary, seconds = timed_sync(mock.url, db, *UNTHROTTLED)
        print(
            f"end to end (subprocess, incl. start-up): {summary['new']} transactions in "
            f"{seconds:.2f} s = {summary['new'] / seconds:,.0f} tx/s, "
            f"{summary['requests']} requests, {summary['new'] / summary['pages']:.0f} items/page"
        )

        with Store.open(Path(scratch) / "b.db") as store:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = sync(
                store, SyncOptions(api_url=mock.url, settle=0, rate_limit=1_000_000, per=1)
            )
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(
            f"in process: {result.new / wall:,.0f} tx/s; client CPU {cpu / result.pages * 1000:.1f}"
            f" ms per 1000-item page ({result.pages} pages, {cpu:.2f} s CPU, {wall:.2f} s wall)"
        )


if __name__ == "__main__":
    main()

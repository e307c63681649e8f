"""Backfill efficiency under a time-scaled rate limit (5 requests per second, the real 5/min x60).

    python bench/backfill_efficiency.py [--history 200000]

Prints items per request, 429s drawn and the requests the budget allowed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MockServer, machine, timed_sync  # noqa: E402

LIMIT = ("--rate-limit", "5", "--per", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=200_000)
    args = parser.parse_args()
    print(machine())
    with (
        MockServer("--history", str(args.history), "--users", "5000", *LIMIT) as mock,
        tempfile.TemporaryDirectory() as scratch,
    ):
        summary, seconds = timed_sync(mock.url, Path(scratch) / "s.db", *LIMIT)
    per_request = summary["new"] / summary["requests"]
    allowed = 5 + 5 * seconds
    print(
        f"backfill of {summary['new']} transactions: {summary['requests']} requests "
        f"({summary['pages']} pages, {summary['checks']} checks) in {seconds:.1f} s"
    )
    print(
        f"items per request {per_request:.1f} = {per_request / 10:.2f}% of the 1000 ceiling; "
        f"429s drawn: {summary['throttled']}; budget allowed {allowed:.0f} requests"
    )


if __name__ == "__main__":
    main()

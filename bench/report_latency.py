"""Wall time of `txagg report USER --json` on a store of 1,000,000 users.

    python bench/report_latency.py [--users 1000000] [--runs 50] [--db /tmp/txagg-bench-1m.db]

Builds the store once (through Store.ingest, the real ingest path) and reuses it.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary_ms, txagg  # noqa: E402

from txagg.models import format_timestamp  # noqa: E402
from txagg.store import Store  # noqa: E402


def build(path: Path, users: int) -> None:
    rng = random.Random(1)
    began = time.perf_counter()
    with Store.open(path) as store:
        if store.counters().get("users", 0) >= users:
            return
        base = 1_700_000_000_000
        for start in range(0, users, 1000):
            page = []
            for n in range(start, min(users, start + 1000)):
                for kind in ("earned", "payout"):
                    page.append(
                        {
                            "id": f"{kind[0]}-{n}",
                            "userId": f"{n:07d}",
                            "createdAt": format_timestamp(base + n * 10),
                            "type": kind,
                            "amount": Decimal(rng.randint(1, 100_000)) / 100,
                        }
                    )
            store.ingest(page, state={"as_of": base + users * 10})
    print(f"built {users} users in {time.perf_counter() - began:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--db", type=Path, default=Path("/tmp/txagg-bench-1m.db"))
    args = parser.parse_args()
    build(args.db, args.users)
    rng = random.Random(2)

    def timed(command: list[str]) -> float:
        began = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - began

    report, baseline = [], []
    for _ in range(args.runs):
        user = f"{rng.randrange(args.users):07d}"
        report.append(timed(txagg("report", user, "--json", "--db", str(args.db))))
        baseline.append(
            timed(
                [
                    sys.executable,
                    "-c",
                    "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
                    "q='select * from users where user_id=?'; "
                    "print(c.execute(q, (sys.argv[2],)).fetchone())",
                    str(args.db),
                    user,
                ]
            )
        )
    print(machine())
    print(f"txagg report USER --json on {args.users} users: {summary_ms(report)}")
    print(f"python + sqlite3 single lookup (floor):     {summary_ms(baseline)}")


if __name__ == "__main__":
    main()

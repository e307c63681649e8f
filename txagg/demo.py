"""``txagg demo``: a mock upstream, a sync and the answers, checked against the ground truth."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .report import payouts_report, user_report
from .store import Store
from .sync import SyncOptions, sync
from .testing import differing_users, ground_truth

DEMO_USERS = 50
DEMO_HISTORY = 5000
DEMO_RATE = (5, 1.0)  # five requests a second: the real limit, sixty times faster


def run_demo(db: Path | None = None) -> dict:
    """Run the whole loop once and return what a newcomer should see."""
    from .mock import MockConfig, start_in_thread

    rate, per = DEMO_RATE
    config = MockConfig(
        port=0, seed=7, users=DEMO_USERS, history=DEMO_HISTORY, rate_limit=rate, per=per
    )
    url, stop_mock = start_in_thread(config)
    with tempfile.TemporaryDirectory() as scratch:
        path = db or Path(scratch) / "demo.db"
        try:
            started = time.monotonic()
            with Store.open(path) as store:
                summary = sync(store, SyncOptions(api_url=url, rate_limit=rate, per=per, settle=0))
                seconds = time.monotonic() - started
                truth = ground_truth(url)
                mismatches = differing_users(store, truth)
                richest = max(truth, key=lambda item: item["payout"])["userId"]
                return {
                    "upstream": url,
                    "store": str(path),
                    "sync": summary.as_dict(),
                    "seconds": round(seconds, 2),
                    "report": user_report(store, richest),
                    "payouts": payouts_report(store)["items"][:10],
                    "users": len(truth),
                    "mismatches": mismatches,
                }
        finally:
            stop_mock()

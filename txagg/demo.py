"""``txagg demo``: a mock upstream, a sync and the answers, checked against the ground truth.

The demo's mock serves the same data every run (a fixed seed and a fixed clock anchor), so a
store given with ``--db`` can be demoed again: the second sync finds nothing new and the store
still matches the truth. A store the demo did not fill is refused, never mixed with mock data.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .models import format_instant, parse_time
from .report import payouts_report, user_report
from .store import Store
from .sync import SyncOptions, sync
from .testing import differing_users, ground_truth

DEMO_USERS = 50
DEMO_HISTORY = 5000
DEMO_SEED = 7
# The clock anchor: the history's createdAt values end here, the same ones every run.
DEMO_START = parse_time("2023-03-16T12:35:00Z")
DEMO_RATE = (5, 1.0)  # five requests a second: the real limit, sixty times faster
# The sync state entry that says which demo data a store holds.
DEMO_MARK = "demo_upstream"


class DemoRefused(Exception):
    """The store holds data the demo did not put there."""


def demo_upstream() -> dict:
    """What the demo's mock serves, as recorded in a store it fills."""
    return {
        "seed": DEMO_SEED,
        "users": DEMO_USERS,
        "history": DEMO_HISTORY,
        "start": format_instant(DEMO_START),
    }


def claim(store: Store) -> None:
    """Mark a fresh store as the demo's, or check it is already; DemoRefused otherwise."""
    mark = store.state_value(DEMO_MARK)
    if mark == demo_upstream():
        return
    counters = store.counters()
    used = store.state() or counters.get("transactions") or counters.get("quarantined")
    if mark is not None or used:
        raise DemoRefused(
            f"{store.path} holds data the demo did not put there: give the demo a store of "
            "its own (a new file with --db, or no --db for a temporary one)"
        )
    store.put_state(**{DEMO_MARK: demo_upstream()})


def run_demo(db: Path | str | None = None) -> dict:
    """Run the whole loop once and return what a newcomer should see."""
    from .mock import MockConfig, start_in_thread

    rate, per = DEMO_RATE
    config = MockConfig(
        port=0,
        seed=DEMO_SEED,
        users=DEMO_USERS,
        history=DEMO_HISTORY,
        start=DEMO_START,
        rate_limit=rate,
        per=per,
    )
    with tempfile.TemporaryDirectory() as scratch:
        path = db or Path(scratch) / "demo.db"
        with Store.open(path) as store:
            claim(store)
            url, stop_mock = start_in_thread(config)
            try:
                started = time.monotonic()
                options = SyncOptions(api_url=url, rate_limit=rate, per=per, settle=0)
                summary = sync(store, options)
                seconds = time.monotonic() - started
                truth = ground_truth(url)
                mismatches = differing_users(store, truth)
                richest = max(truth, key=lambda item: item["payout"])["userId"]
                return {
                    "upstream": url,
                    "store": str(store.path),
                    "sync": summary.as_dict(),
                    "seconds": round(seconds, 2),
                    "report": user_report(store, richest),
                    "payouts": payouts_report(store)["items"][:10],
                    "users": len(truth),
                    "mismatches": mismatches,
                }
            finally:
                stop_mock()

"""How soon `sync --follow` stores a late arrival, simulated: the real Syncer, store and budget
on a fake clock, against an in-memory upstream that follows the contract (createdAt order,
pages of at most 1000, 5 requests a minute enforced by the store's shared budget).

    python bench/late_arrivals.py --load 0.5
    python bench/late_arrivals.py --load 0.2 --seeds 6 --minutes 240 --late-per-minute 0.25
    python bench/late_arrivals.py --load 0.5 --scale 10

Traffic arrives as a Poisson stream at LOAD x 5000 transactions a simulated minute; about
LATE_PER_MINUTE of them show up late: createdAt up to --late-max seconds (default 150, half the
overlap) before they become visible. For each late arrival: the simulated seconds from becoming
visible to being in the store, pooled over the seeds (p50, p90, p99, max), with the lag
(`now - asOf` at each page) and what the checks cost. Hours of following take about a minute:
no sleeping, no network. `bench/follow_load.py` measures the same with real processes.

With --scale S the run is time-scaled as `bench/follow_load.py --scale S` is: every duration
of the sync (budget period, overlap, settle, interval, check cadence) S times shorter and the
traffic S times denser, figures in simulated time. What does not scale is the contract's
whole second (the upstream's dates are to the second): at --scale 10 it is ten simulated
seconds, and the figures show what that costs. Compare --scale 1 with --scale S to see how far a
real-process run at that scale can be taken at its word.
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, percentile  # noqa: E402

from txagg.models import format_timestamp, parse_time  # noqa: E402
from txagg.store import Store  # noqa: E402
from txagg.sync import Syncer, SyncOptions  # noqa: E402
from txagg.testing import FakeClock  # noqa: E402

T0 = 1_700_000_000
# The sync's durations that --scale shortens, as bench/follow_load.py scales them.
SCALED_OPTIONS = ("per", "overlap", "settle", "interval", "check_every", "timeout", "retry_for")


class Upstream:
    """Transactions as (createdAt ms, id, visible-at s), sorted; answers /transactions."""

    def __init__(self, items: list[tuple[int, str, float]], clock: FakeClock):
        self.items = sorted(items)
        self.clock = clock

    def handle(self, request: httpx.Request) -> httpx.Response:
        query = request.url.params
        start, end = parse_time(query["startDate"]), parse_time(query["endDate"])
        page, limit = int(query["page"]), int(query["limit"])
        low = bisect.bisect_left(self.items, (start,))
        high = bisect.bisect_right(self.items, (end, "\uffff"))
        visible = [item for item in self.items[low:high] if item[2] <= self.clock.now]
        chunk = visible[(page - 1) * limit : page * limit]
        body = [
            {
                "id": tx_id,
                "userId": f"{int(tx_id[2:]) % 997:06d}",
                "createdAt": format_timestamp(created),
                "type": "earned",
                "amount": 1,
            }
            for created, tx_id, _visible in chunk
        ]
        meta = {"totalItems": len(visible), "itemCount": len(body), "currentPage": page}
        return httpx.Response(200, json={"items": body, "meta": meta})


def traffic(args, seed: int) -> tuple[list[tuple[int, str, float]], dict[str, float]]:
    rng = random.Random(seed)
    scale = args.scale
    per_second = 5000 * args.load / 60 * scale
    late_share = args.late_per_minute / (5000 * args.load)
    items, late, t, n = [], {}, 0.0, 0
    while t < args.minutes * 60 / scale:
        t += rng.expovariate(per_second)
        n += 1
        visible = T0 + t
        created = int(visible * 1000)
        # Not in the first minutes: a late one must not predate where the store starts.
        if t > (args.late_max + 10) / scale and rng.random() < late_share:
            created = int((visible - rng.random() * args.late_max / scale) * 1000)
            late[f"tx{n}"] = visible
        items.append((created, f"tx{n}", visible))
    return items, late


def follow(args, seed: int) -> tuple[dict[str, float], list[float], dict]:
    items, late = traffic(args, seed)
    scale = args.scale
    clock = FakeClock(T0)
    upstream = Upstream(items, clock)
    stop = threading.Event()
    found: dict[str, float] = {}
    lags: list[float] = []
    traffic_ends = T0 + args.minutes * 60 / scale
    end = traffic_ends + 300 / scale
    live: dict[str, int] = {}  # the checks made while the traffic lasted
    with tempfile.TemporaryDirectory() as scratch, Store.open(Path(scratch) / "s.db") as store:

        def sleep(seconds: float) -> None:
            # Everything since the last sleep happened at clock.now: look before time moves on.
            waiting = [tx for tx in late if tx not in found and late[tx] <= clock.now]
            if waiting:
                marks = ",".join("?" * len(waiting))
                query = f"SELECT id FROM transactions WHERE id IN ({marks})"
                for (tx_id,) in store.conn.execute(query, waiting):
                    found[tx_id] = (clock.now - late[tx_id]) * scale
            if clock.now >= traffic_ends and not live:
                live["checks"] = syncer.summary.checks
            clock.now += seconds
            if clock.now > end:
                stop.set()

        def on_page(_summary) -> None:
            lags.append((clock.now - store.state_value("as_of") / 1000) * scale)

        defaults = SyncOptions(api_url="http://upstream.test", since=(T0 - 10) * 1000)
        options = replace(
            defaults,
            **{name: getattr(defaults, name) / scale for name in SCALED_OPTIONS},
        )
        syncer = Syncer(
            store,
            options,
            transport=httpx.MockTransport(upstream.handle),
            clock=clock,
            sleep=sleep,
            stop=stop,
            on_page=on_page,
        )
        summary = syncer.follow()
        syncer.close()
    costs = {
        "late": len(late),
        "missed": len(late) - len(found),
        "requests": summary.requests,
        "checks": summary.checks,
        "live_checks": live.get("checks", summary.checks),
        "check_requests": summary.check_requests,
        "minutes": (end - T0) / 60 * scale,
    }
    return found, lags, costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=float, default=0.5, help="share of 5000 tx/min")
    parser.add_argument("--minutes", type=float, default=240, help="simulated minutes a seed")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--late-per-minute", type=float, default=0.25)
    parser.add_argument("--late-max", type=float, default=150.0, help="seconds")
    parser.add_argument("--scale", type=float, default=1.0, help="time-scaled S times")
    args = parser.parse_args()
    print(machine())
    print(
        f"load {args.load:.0%} of 5000/min, {args.seeds} x {args.minutes:g} simulated minutes, "
        f"{args.late_per_minute:g} late a minute (up to {args.late_max:g} s late)"
        + (f", time-scaled x{args.scale:g}" if args.scale != 1 else "")
    )
    took, lags, totals = [], [], {}
    for seed in range(1, args.seeds + 1):
        found, lag, costs = follow(args, seed)
        took += found.values()
        lags += lag
        for key, value in costs.items():
            totals[key] = totals.get(key, 0) + value
    took.sort()
    lags.sort()
    budget = 5 * totals["minutes"]
    print(
        f"late arrivals, visible to stored (simulated s): p50 {percentile(took, 0.5):.0f}, "
        f"p90 {percentile(took, 0.9):.0f}, p99 {percentile(took, 0.99):.0f}, max {took[-1]:.0f} "
        f"(n={len(took)}; {totals['missed']} of {totals['late']} not stored by the end)"
    )
    print(
        f"lag at each page (simulated s): p50 {percentile(lags, 0.5):.0f}, "
        f"p99 {percentile(lags, 0.99):.0f}, max {lags[-1]:.0f}"
    )
    print(
        f"requests {totals['requests']} of a budget of {budget:.0f}; checks {totals['checks']} "
        f"({totals['live_checks']} while the traffic lasted), "
        f"their requests {totals['check_requests']}"
    )


if __name__ == "__main__":
    main()

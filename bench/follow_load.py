"""`txagg sync --follow` against a live mock carrying a given share of the upstream's ceiling.

    python bench/follow_load.py --load 0.8 --minutes 30 --scale 10
    python bench/follow_load.py --load 1.0 --minutes 30 --scale 10 --faults default
    python bench/follow_load.py --load 0.5 --minutes 160 --scale 2 --late-per-minute 0.5

Time-scaled: with --scale 10 every duration (rate window, interval, overlap, settle, check
cadence, timeouts) is ten times shorter and the traffic ten times denser, so 30 simulated
minutes take 3 real ones; the mock does its share itself (`mock-serve --time-scale`, given its
options in simulated units), the sync's options are scaled here. Figures, and the --faults spec
printed, are in simulated time. Prints lag p50/p99/max,
requests used against the budget, 429s drawn, what the late-arrival checks cost, and whether
the store ends exactly equal to the mock's ground truth. With --late-per-minute N, about N live
transactions a (simulated) minute show up late (createdAt up to half the overlap before they
become visible), and the time from each one becoming visible to being in the store is printed
(p50/p99/max).

One thing does not scale: the upstream's dates are to the whole second (the contract's
`YYYY-MM-DD HH:MM:SS`), so at --scale 10 a window's end moves in steps of ten simulated
seconds. Polls then read shorter pages, fewer requests are left for checks and late arrivals
are stored later than at full time (`bench/late_arrivals.py --scale 10` shows by how much, on a
fake clock). Late-arrival figures are taken at --scale 2, where a second is two simulated ones
and the simulation shows no difference from full time.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MockServer, machine, percentile, txagg  # noqa: E402

from txagg.models import loads, parse_time  # noqa: E402
from txagg.store import Store  # noqa: E402
from txagg.testing import differing_users  # noqa: E402

# Every fault kind the mock knows, at rates a bad day might bring; durations in simulated
# seconds (the mock divides them by its --time-scale): slow answers come after twice the sync's
# 30 s timeout, late arrivals up to half its 300 s overlap late, throttles ask for 12 s.
DEFAULT_FAULTS = (
    "error=0.03,reset=0.01,truncate=0.01,nonjson=0.01,slow=0.01:60,late=0.1:150,"
    "drift=0.05,duplicate=0.02,outside=0.02,meta=0.02,invalid=0.002,conflict=0.005,"
    "throttle=0.02:12"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=float, default=0.8, help="share of 5000 tx/min")
    parser.add_argument("--minutes", type=float, default=30, help="simulated minutes")
    parser.add_argument("--scale", type=float, default=10)
    parser.add_argument("--seed", type=int, default=42, help="the mock's seed")
    parser.add_argument("--faults", default="", help="a --faults spec, or 'default'")
    parser.add_argument(
        "--late-per-minute", type=float, default=0.0, help="late arrivals a simulated minute"
    )
    args = parser.parse_args()
    s = args.scale
    per = 60 / s
    settle, interval, overlap, check_every, timeout = 5 / s, 30 / s, 300 / s, 120 / s, 30 / s
    faults = DEFAULT_FAULTS if args.faults == "default" else args.faults
    live_seconds = args.minutes * 60 / s
    # The mock's options in simulated units: --time-scale makes them real.
    mock_args = [
        "--users",
        "2000",
        "--history",
        "20000",
        "--seed",
        str(args.seed),
        "--tx-per-minute",
        str(5000 * args.load),
        "--live-for",
        str(args.minutes * 60),
        "--rate-limit",
        "5",
        "--per",
        "60",
        "--time-scale",
        str(s),
    ] + (["--faults", faults] if faults else [])
    if args.late_per_minute:
        ratio = args.late_per_minute / (5000 * args.load)
        mock_args += ["--late-ratio", str(ratio), "--late-max", str(0.5 * 300)]
    sync_args = [
        "--rate-limit",
        "5",
        "--per",
        str(per),
        "--settle",
        str(settle),
        "--overlap",
        str(overlap),
        "--check-every",
        str(check_every),
        "--timeout",
        str(timeout),
        "--retry-for",
        str(300 / s),
    ]
    print(machine())
    print(
        f"load {args.load:.0%} of 5000/min, {args.minutes} simulated minutes at x{s:g}, "
        f"faults: {faults or 'none'}"
    )
    if args.late_per_minute and s > 2:
        print(
            f"note: at x{s:g} the upstream's whole second is {s:g} simulated seconds, and late "
            "arrivals are stored later than at full time (see the docstring): use --scale 2"
        )
    with MockServer(*mock_args) as mock, tempfile.TemporaryDirectory() as scratch:
        db = str(Path(scratch) / "soak.db")
        # The backlog first, as a cron run would: the figures below are for following.
        run_json("sync", "--api-url", mock.url, "--db", db, *sync_args)
        follower = subprocess.Popen(
            txagg(
                "sync",
                "--follow",
                "--interval",
                str(interval),
                "--api-url",
                mock.url,
                "--db",
                db,
                "--json",
                "--quiet",  # no line per poll and check: stderr is read only if it dies
                *sync_args,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lags, late, times = sample_lag(
            db, follower, live_seconds + overlap + 2 * interval, s, mock.url
        )
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=60)
        summary = json.loads(out)
        caught_up = print_follow_figures(args, lags, summary, overlap, interval)
        if args.late_per_minute:
            found = [took for took, _visible in late.values() if took is not None]
            print(
                f"late arrivals, visible to stored (simulated s): {lag_figures(found)}, "
                f"{len(late) - len(found)} of {len(late)} not stored by the end of following",
                flush=True,
            )
            # Those that became visible once the store had caught up (not queued behind the
            # backfill): what following at this load gives.
            since = times[caught_up] if caught_up < len(times) else float("inf")
            after = [
                took for took, visible in late.values() if took is not None and visible >= since
            ]
            print(f"  of them visible after the first catch-up: {lag_figures(after)}", flush=True)
        began = time.monotonic()
        final = run_json(
            "sync", "--api-url", mock.url, "--db", db, "--check-every", "0", *sync_args
        )
        rounds = []
        for _ in range(3):  # a lying count may hide a window from one verify; not from three
            rounds.append(run_json(
                "verify", "--api-url", mock.url, "--db", db, "--rate-limit", "5", "--per",
                str(per), "--timeout", str(timeout), "--retry-for", str(300 / s),
            ))  # fmt: skip
            if not rounds[-1]["discrepancies"] and compare(mock.url, db)[0]:
                break
        repair_minutes = (time.monotonic() - began) * s / 60
        exact, wrong = compare(mock.url, db)
        with Store.open(db) as store:
            counters = store.counters()
    print(f"final sync: {final['new']} new, {final['requests']} requests")
    for number, verified in enumerate(rounds, 1):
        print(
            f"verify {number}: {verified['requests']} requests, {verified['windowsDiffering']} "
            f"windows differing, {verified['repaired']} repaired, "
            f"{len(verified['discrepancies'])} discrepancies"
        )
    print(f"final sync and verify took {repair_minutes:.0f} simulated minutes")
    print(
        f"store: {counters.get('transactions')} transactions, "
        f"{counters.get('quarantined', 0)} quarantined, {counters.get('conflicts', 0)} "
        f"conflicts, {counters.get('throttled', 0)} 429s in all"
    )
    print(f"exact against the ground truth: {'yes' if exact else 'NO: ' + ', '.join(wrong[:5])}")


def print_follow_figures(args, lags, summary, overlap, interval) -> int:
    """Prints the lag and the run's costs; returns the index of the first lag sample after the
    first catch-up."""
    s = args.scale
    elapsed = args.minutes * 60 + (overlap + 2 * interval) * s
    budget = 5 + elapsed / 12
    print(f"lag (simulated s), whole run: {lag_figures(lags)}")
    caught_up = next((i for i, lag in enumerate(lags) if lag <= interval * s), len(lags))
    print(
        f"lag (simulated s), after the first catch-up ({caught_up * 0.5 * s:.0f} s): "
        f"{lag_figures(lags[caught_up:])}"
    )
    print(
        f"follow: {summary['requests']} requests in {elapsed / 60:.0f} simulated minutes "
        f"(budget {budget:.0f}), {summary['new']} new, {summary['throttled']} 429s drawn, "
        f"{summary['retries']} retries, {len(summary['errors'])} errors reported"
    )
    per_1000 = 1000 * summary["checkRequests"] / max(1, summary["requests"])
    print(
        f"late-arrival checks: {summary['checks']} checks, {summary['checkRequests']} requests "
        f"= {per_1000:.0f} per 1000 requests, {summary['repairs']} windows re-read",
        flush=True,
    )
    return caught_up


def lag_figures(lags: list[float]) -> str:
    if not lags:
        return "no samples"
    return (
        f"p50 {statistics.median(lags):.0f}, p99 {percentile(lags, 0.99):.0f}, "
        f"max {max(lags):.0f} (n={len(lags)})"
    )


def sample_lag(
    db: str, follower: subprocess.Popen, seconds: float, scale: float, url: str
) -> tuple[list[float], dict[str, tuple[float | None, float]], list[float]]:
    """Lag (simulated seconds) sampled every half second of real time, with when each sample
    was taken (real time); and for each late arrival the mock reports, the simulated seconds
    from it becoming visible to being stored (None while not stored) and when it became
    visible (real time)."""
    lags: list[float] = []
    times: list[float] = []
    late: dict[str, float | None] = {}
    visible_at: dict[str, float] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end and follower.poll() is None:
        time.sleep(0.5)
        for item in httpx.get(url + "/faults", timeout=30).json()["lateArrivals"]:
            if item["id"] not in late:
                late[item["id"]] = None
                visible_at[item["id"]] = parse_time(item["visibleAt"]) / 1000
        try:
            with Store.open(db, create=False) as store:
                as_of = store.state_value("as_of")
                pending = [tx_id for tx_id, took in late.items() if took is None]
                now = time.time()
                for tx_id in stored_ids(store, pending):
                    late[tx_id] = max(0.0, now - visible_at[tx_id]) * scale
        except Exception:  # not created yet
            continue
        if as_of is not None:
            lags.append(max(0.0, time.time() - as_of / 1000) * scale)
            times.append(time.time())
    if follower.poll() is not None:
        raise SystemExit(f"sync --follow died: {follower.stderr.read()}")
    return lags, {tx_id: (took, visible_at[tx_id]) for tx_id, took in late.items()}, times


def stored_ids(store: Store, ids: list[str]) -> list[str]:
    found = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found += [
            row[0]
            for row in store.conn.execute(
                f"SELECT id FROM transactions WHERE id IN ({marks})", chunk
            )
        ]
    return found


def run_json(*args: str) -> dict:
    result = subprocess.run(txagg(*args, "--json"), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"txagg {args[0]} failed: {result.stderr}")
    return json.loads(result.stdout)


def compare(url: str, db: str) -> tuple[bool, list[str]]:
    truth = loads(httpx.get(url + "/users", timeout=60).content)["items"]
    with Store.open(db) as store:
        wrong = differing_users(store, truth)
    return not wrong, wrong


if __name__ == "__main__":
    main()

"""``txagg verify``: reconcile the stored history with the upstream, window by window.

The whole range is one count request when all is well. A window whose count differs is split
in two (both halves counted at once, so counts that do not add up expose a lying ``meta``
instead of being chased), down to pieces of one page, which are re-read. The windows still to
do are saved after every step, so a killed verify resumes where it stopped. It draws on the
same shared rate budget as sync and writes through the same idempotent ingest, so it is safe
beside a running sync; a second verify on the same store exits at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .errors import (  # noqa: F401 (NothingSynced, ReversedRange re-exported)
    NothingSynced,
    RequestLimitReached,
    ReversedRange,
    SyncStopped,
)
from .models import format_instant, parse_time
from .options import SyncOptions, SyncSummary
from .reconcile import Reconciler
from .store import Store
from .upstream import Upstream

ONE_SECOND = 1000


@dataclass
class VerifyReport:
    since: str | None = None
    until: str | None = None
    requests: int = 0
    windowsChecked: int = 0
    windowsDiffering: int = 0
    reread: int = 0
    repaired: int = 0  # transactions found missing and added
    discrepancies: list[dict] = field(default_factory=list)
    complete: bool = False
    resumed: bool = False
    empty: bool = False  # the range held nothing to verify (no request was sent)

    def as_dict(self) -> dict:
        return asdict(self)


class Verifier:
    def __init__(
        self,
        store: Store,
        options: SyncOptions,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        on_window: Callable[[VerifyReport], None] | None = None,
        transport=None,
    ):
        self.store = store
        self.options = options
        self.stop = stop or threading.Event()
        self.on_window = on_window or (lambda report: None)
        self.summary = SyncSummary()
        self.upstream = Upstream(store, options, self.summary, self._sleep, transport, clock)
        self.reconciler = Reconciler(store, self.upstream, self.summary, options.page_size)
        self.report = VerifyReport()

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise SyncStopped()

    def close(self) -> None:
        self.upstream.close()

    def default_range(self) -> tuple[int, int | None]:
        """From the oldest stored record to the sync position: what sync claims to have.

        The end is None while sync has no position yet (it claims nothing). The start may be
        after the end: a first sync stopped inside its first window, or records the upstream
        served from outside the window asked for, leave records newer than the position.
        Raises NothingSynced for a store with neither a position nor a transaction.
        """
        oldest = self.store.oldest_created_at()
        position = self.store.state_value("position")
        if position is None and oldest is None:
            raise NothingSynced()
        low = self.options.since if oldest is None else oldest
        return low // ONE_SECOND * ONE_SECOND, position

    def bounds(self, since: int | None, until: int | None) -> tuple[int, int | None, bool]:
        """(start, end, empty): the range to verify, its bounds on clear seconds.

        An empty range (its start after its end, or no end while sync has no position) is
        nothing to verify: the upstream is never asked for a reversed window, which it would
        refuse. Raises NothingSynced or ReversedRange (``since`` given after ``until``).
        """
        if since is not None and until is not None and since > until:
            raise ReversedRange(
                f"since ({format_instant(since)}) is later than until ({format_instant(until)})"
            )
        low, high = self.default_range()
        low = low if since is None else since
        high = high if until is None else until
        if high is None or low > high:
            return low, high, True
        low = self.store.clear_second(low)
        high = self.store.clear_second(high, floor=low)
        return low, high, low > high  # clear_second never crosses the bounds: a safeguard

    def run(self, since: int | None = None, until: int | None = None) -> VerifyReport:
        """Verify [since, until] (default: ``default_range``); raises NothingSynced or
        ReversedRange before any request."""
        low, high, empty = self.bounds(since, until)
        self.report.since = format_instant(low)
        self.report.until = None if high is None else format_instant(high)
        if empty or high is None:
            self.report.empty = self.report.complete = True
            return self.report
        saved = self.store.state_value("verify")
        if saved and saved["range"] == [low, high] and saved["pending"]:
            pending = saved["pending"]
            self.report.resumed = True
        else:
            pending = [[low, high, None]]
        earlier = self.store.state_value("discrepancies", [])
        try:
            while pending:
                if self.stop.is_set():  # a stop asked for while a request was under way
                    raise SyncStopped()
                window = pending.pop()
                pending.extend(reversed(self._step(*window)))
                self.store.put_state(verify={"range": [low, high], "pending": pending})
                self._sync_report()
                self.on_window(self.report)
            self.report.complete = True
            self._settle(low, high, earlier)
        except (RequestLimitReached, SyncStopped):
            pass
        self._sync_report()
        return self.report

    def _step(self, low: int, high: int, known_total: int | None) -> list[list]:
        """Check one window; return the windows it splits into (in time order)."""
        total = self.reconciler.count(low, high) if known_total is None else known_total
        open_, closed = self.store.count_window(low, high)
        self.report.windowsChecked += 1
        if total is not None and open_ <= total <= closed:
            return []
        self.report.windowsDiffering += 1
        if total is None:
            self.reconciler.discrepancy(low, high, None, "the upstream gave no count")
        elif total < open_:
            self.reconciler.discrepancy(
                low, high, total, "the upstream counts fewer than the store holds"
            )
        elif (middle := self.reconciler.split_point(low, high, total)) is None:
            before = self.store.counters().get("transactions", 0)
            self.reconciler.reread(low, high, total, [self.options.max_repair_requests])
            self.report.reread += 1
            self.report.repaired += self.store.counters().get("transactions", 0) - before
        else:
            return self._split(low, middle, high, total)
        return []

    def _split(self, low: int, middle: int, high: int, total: int) -> list[list]:
        budget = [4]  # two cuts at most, the requests come off --max-requests as usual
        halves = self.reconciler.halves(low, middle, high, total, budget)
        return [list(half) for half in halves or []]

    def _settle(self, low: int, high: int, earlier: list[dict]) -> None:
        """A complete verify of [low, high] settles the discrepancies recorded before it in
        windows inside that range: it counted them again, and recorded anew whatever it still
        could not explain. Those recorded meanwhile (by a sync's check) stay."""
        settled = [found for found in earlier if _inside(found, low, high)]
        if not settled:
            return
        self.store.edit_state(
            "discrepancies", lambda recorded: [d for d in recorded if d not in settled], []
        )

    def _sync_report(self) -> None:
        self.report.requests = self.summary.requests
        self.report.discrepancies = self.reconciler.found


def _inside(found: dict, low: int, high: int) -> bool:
    try:
        start, end = (parse_time(moment) for moment in found["window"])
    except (KeyError, TypeError, ValueError):
        return False
    return low <= start and end <= high


def verify(store: Store, options: SyncOptions, since=None, until=None, **kwargs) -> VerifyReport:
    """Take the store's verify lock and reconcile [since, until] (default: all that is stored).

    Raises NothingSynced (a store never synced) or ReversedRange (since after until) before
    any request; an empty range is a complete report with ``empty`` set and no request."""
    with store.lock("verify"):
        verifier = Verifier(store, options, **kwargs)
        try:
            return verifier.run(since, until)
        finally:
            verifier.close()

"""Sync: read the upstream's transactions into the store, exactly once each, within the budget.

How a run reads (see docs/design.md for the reasoning):

* A run fixes its end ``E = now - settle`` when it starts and never moves past it.
* The cursor is an open window's start ``S`` and a page number. Pages of ``[S, E]`` are read
  with the largest page size; each page, the totals it moves and the new cursor are committed in
  one database transaction. A full page moves the cursor to the next page; a short one means
  everything up to ``E`` is read, and the next run asks for that page again with a later ``E``.
  Since the upstream lists items in createdAt order, the items not shown yet are exactly the ones
  after that offset. ``S`` moves up, to just before the first record of a page read at least
  ``overlap`` behind, so the window covers the overlap: a page that repeats more known records
  than it held last time shows a late arrival before it, at no cost. Following at a heavy load
  a short page closes the window instead (the next one starts at ``E``). ``meta`` never
  ends a read early; in ``--follow`` it only tells whether to ask for the next page now or later.
* Late arrivals: a check counts ``[verified_until or as_of - overlap, as_of]`` with one
  request, which reads the window's page where late arrivals have tended to be; a shortfall is
  searched for and repaired by ``reconcile.Reconciler``. Checks run every ``check_every``
  seconds, sooner while the budget is idle or as soon as a page shows a late arrival (it
  repeats records they pushed along); following, a repair holds back a poll by one token
  period at most and is taken up by later checks where it stopped.
* Every request goes through ``upstream.Upstream``: a token from the rate budget kept in the
  store, shared by every process on it (a 429 blocks them all), bounded time and size, retries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial

import httpx

from .errors import (  # noqa: F401 (re-exported: sync's failures)
    RequestLimitReached,
    SyncStopped,
    Throttled,
    TransientError,
    UpstreamError,
)
from .models import dates_inside, format_instant
from .options import SyncOptions, SyncProgress, SyncSummary
from .reconcile import Reconciler
from .settings import (  # noqa: F401 (PAGE_SIZE, MAX_RESPONSE_BYTES re-exported)
    BORROW_UP_TO_LOAD,
    IDLE_BUDGET_SHORT,
    LATE_AGES_KEPT,
    LOAD_WINDOW_MS,
    MAX_RESPONSE_BYTES,
    MAX_UNRELIABLE_BACKOFF,
    MIN_CHECK_SECONDS,
    PAGE_SIZE,
    PAGE_STARTS_KEPT,
    POLL_FILL_MARGIN,
    REPAIR_SPARE_TOKENS,
    STALE_AFTER_SECONDS,
    TOKEN_MARGIN,
)
from .store import Store
from .upstream import Page, Upstream, parse_retry_after  # noqa: F401 (re-exported)
from .window import ArrivalRate, next_cursor_after

log = logging.getLogger("txagg.sync")


class Syncer:
    """Runs sync against one store. ``run()`` catches up once; ``follow()`` keeps at it."""

    def __init__(
        self,
        store: Store,
        options: SyncOptions,
        *,
        on_page: Callable[[SyncSummary], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_progress: Callable[[SyncProgress], None] | None = None,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
    ):
        self.store = store
        self.options = options
        self.summary = SyncSummary()
        self.on_page = on_page or (lambda summary: None)
        self.on_error = on_error or (lambda message: None)
        self.on_progress = on_progress
        self.progress = SyncProgress(page_size=options.page_size)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.pause = sleep or self._sleep
        self.upstream = Upstream(store, options, self.summary, self.pause, transport, clock)
        if on_progress is not None:
            self.upstream.on_wait = self._waiting
        self.following = False
        self.arrivals = ArrivalRate()  # following: new transactions a second, smoothed
        self.page_filled = 0  # following: records the cursor's page held at the last poll
        self.late_seen = False  # a page repeated records: some arrived late before it
        self.reconciler = Reconciler(store, self.upstream, self.summary, options.page_size)
        self.reconciler.may_spend = self._spare_and_fresh
        self.reconciler.may_go_on = self._fresh_enough
        self.reconciler.spendable = lambda: self._spare_tokens() if self.following else math.inf

    def close(self) -> None:
        self.upstream.close()

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise SyncStopped()

    def _spare_and_fresh(self, spare: float = 0.0) -> bool:
        """Following, a search for a shortfall may hold back the next poll while the store is
        less than half the freshness promise (a minute) behind: each of its steps may take the
        token that poll would use (``spare`` 0), the poll then waiting for the next one. While
        reading leaves a good share of the budget over (BORROW_UP_TO_LOAD) it goes first
        altogether: a step may wait for a token itself (REPAIR_SPARE_TOKENS). What it leaves,
        later checks take up where it stood (the windows still to repair are saved). A run that
        is not following has no later read to hold back: it repairs within its request
        budget."""
        if not self.following:
            return True
        floor = REPAIR_SPARE_TOKENS if self._light_load() else spare
        return self._fresh_enough() and self._spare_tokens() >= floor

    def _light_load(self) -> bool:
        """Whether reading takes at most BORROW_UP_TO_LOAD of the budget (at the arrival rate
        seen so far; unknown counts as light)."""
        options = self.options
        per_second = self.arrivals.steady
        if per_second is None:
            return True
        pages = per_second * options.per / options.page_size  # pages a budget period brings
        return pages <= BORROW_UP_TO_LOAD * options.rate_limit

    def _judge_load(self) -> None:
        """The load (``arrivals.steady``): the records a second the store holds of the last
        LOAD_WINDOW_MS before ``as_of`` (or since the store starts, if later), by createdAt;
        unknown over less than a minute."""
        as_of = self.store.state_value("as_of")
        low = None if as_of is None else max(self.options.since, as_of - LOAD_WINDOW_MS)
        if low is None or as_of - low < 60_000:
            self.arrivals.steady = None
            return
        self.arrivals.steady = self.store.count_window(low, as_of)[1] * 1000 / (as_of - low)

    def _keeps_window_open(self) -> bool:
        """Whether a short page leaves the window open (asked for again next time). Following
        at a heavy load it closes it instead, the next window starting at ``end`` with a page
        of new records only: reading takes most of the budget there, and a page that comes
        back holding records would cost a share of a request at every poll."""
        return not self.following or self._light_load()

    def _fresh_enough(self) -> bool:
        return not self.following or self._behind_ms() < STALE_AFTER_SECONDS * 500

    def _behind_ms(self) -> int:
        as_of = self.store.state_value("as_of")
        return 0 if as_of is None else self._now_ms() - as_of

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------ cursor

    def _cursor(self) -> tuple[int, int, int, int]:
        state = self.store.state()
        since = self.options.since
        start = state.get("window_start", since)
        return start, state.get("page", 1), state.get("position", start), state.get("as_of", start)

    # ------------------------------------------------------------ one catch-up

    def run(self, *, defer_full_pages: bool = False) -> SyncSummary:
        """Read everything up to now - settle; returns the summary (complete=False if cut short)."""
        end = int(self.clock() - self.options.settle) * 1000
        start = self._cursor()[0]
        before = _counts(self.summary)
        try:
            try:
                caught_up = self._read_until(end, defer_full_pages)
            except RequestLimitReached:
                self._say_poll(start, end, before, caught_up=False)
                raise
            self._say_poll(start, end, before, caught_up)
            if caught_up and self._check_due():
                self.check()
            self.summary.complete = caught_up
        except RequestLimitReached:
            self.summary.complete = False
        self._finish_summary()
        return self.summary

    def _read_until(self, end: int, defer_full_pages: bool) -> bool:
        limit = self.options.page_size
        while True:
            start, page, _position, as_of = self._cursor()
            if as_of >= end or start >= end:
                return True
            listing = [self.options.api_url, limit]
            if self.store.state_value("listing", listing) != listing:
                # Pages counted in another upstream's listing (a rebind) or in pages of another
                # size: start a new window where everything is read.
                start, page = as_of, 1
                self.store.put_state(window_start=start, page=page, page_held=0, page_starts=[])
            start, page = self._move_window_start(start, page, as_of)
            state = self.store.state()
            held = state.get("page_held", 0)
            result = self.upstream.fetch(start, end, page, limit)
            full = len(result.items) >= limit
            starts = state.get("page_starts") or []
            dated = dates_inside(result.items, start, end)
            if full and dated:
                starts = (starts + [[page, min(dated)]])[-PAGE_STARTS_KEPT:]
            keep_open = self._keeps_window_open()
            next_cursor = partial(
                next_cursor_after,
                full,
                start,
                page,
                as_of,
                end,
                len(result.items) if keep_open else None,
                starts,
                listing,
            )
            ingested = self.store.ingest(result.items, state=next_cursor)
            if (page > 1 or held) and ingested.duplicates > held:
                # Page k of the window starts where the pages before it ended, unless records
                # were inserted before it since: the known records it repeats beyond those it
                # held last time are what they pushed along.
                self.late_seen = True
            self.summary.pages += 1
            self.summary.add_ingest(ingested)
            self.on_page(self.summary)
            if self.on_progress is not None:
                self._tell_progress(start, end, page, len(result.items), result.total)
            if not full:
                self.page_filled = len(result.items) if keep_open else 0
                return True
            # What the next page holds already, if it is left for the next poll (below).
            self.page_filled = 0 if result.total is None else max(0, result.total - page * limit)
            # Following, ask now only for a page the upstream says is full: a few leftover
            # items ride along with the next poll's instead of costing a request of their own.
            full_page_promised = result.total is not None and result.total >= (page + 1) * limit
            if defer_full_pages and not full_page_promised:
                return True

    def _move_window_start(self, start: int, page: int, as_of: int) -> tuple[int, int]:
        """Keep the open window's start about ``overlap`` behind ``as_of``: move it up to the
        whole second before the first record of a page read full at least that far back, and
        number the pages from there.

        That page's first record sat at offset ``(j - 1) x limit`` when it was read, and every
        record dated before it came before it, so the new window lacks at most that many of
        the old one's records: its page ``page - j + 1`` starts at or before where reading
        stands (records inserted since, or sharing that second, come back as known ones),
        never after. Only the upstream's own listing is trusted, never the store's counts. The
        pages remembered are those read since the last move (the move's offset is not exact)."""
        state = self.store.state()
        latest = as_of - int(self.options.overlap * 1000)
        chosen = None
        for number, first in state.get("page_starts") or []:
            moved = (first - 1) // 1000 * 1000
            if number < page and start < moved <= latest:
                chosen = number, moved, first
        if chosen is None:
            return start, page
        number, moved, first = chosen
        # Records of that second before the page's first one come back at the new page's
        # start: known, and not late arrivals.
        sharing = max(0, self.store.count_window(moved, first)[1] - 1)
        page = page - number + 1
        self.store.put_state(
            window_start=moved,
            page=page,
            page_held=state.get("page_held", 0) + sharing,
            page_starts=[],
        )
        return moved, page

    # ------------------------------------------------------------ what it says

    def _tell_progress(self, start: int, end: int, page: int, items: int, total: int | None):
        progress = self.progress
        progress.window_start, progress.window_end, progress.page = start, end, page
        progress.read = (page - 1) * progress.page_size + items
        progress.total = total
        progress.waiting, progress.blocked = 0.0, False
        self.on_progress(progress)

    def _waiting(self, seconds: float, blocked: bool) -> None:
        self.progress.waiting, self.progress.blocked = seconds, blocked
        self.on_progress(self.progress)

    def _say_poll(self, start: int, end: int, before: dict, caught_up: bool) -> None:
        """One INFO line per poll: the window read, what it brought, the lag, the requests."""
        done = {name: value - before[name] for name, value in _counts(self.summary).items()}
        as_of = self.store.state_value("as_of")
        lag = None if as_of is None else max(0, self._behind_ms() // 1000)
        window = f"{format_instant(start)}..{format_instant(max(start, end))}"
        records = done["new"] + done["duplicates"] + done["quarantined"] + done["conflicts"]
        words = [
            f"poll: window {window}",
            _count(done["pages"], "page"),
            _count(records, "record"),
            f"{done['new']} new",
        ]
        words += [f"{done[name]} {name}" for name in ("quarantined", "conflicts") if done[name]]
        words.append("lag unknown" if lag is None else f"lag {lag} s")
        words.append(_count(done["requests"], "request"))
        if not caught_up:
            words.append("more to read")
        log.info(
            ", ".join(words),
            extra={
                "event": "poll",
                "windowStart": format_instant(start),
                "windowEnd": format_instant(max(start, end)),
                "records": records,
                **done,
                "caughtUp": caught_up,
                "asOf": None if as_of is None else format_instant(as_of),
                "lagSeconds": lag,
            },
        )

    def _say_check(self, found: dict, requests: int, discrepancies: int) -> None:
        """One INFO line per late-arrival check: its window, the upstream's count against
        the store's, and what was repaired."""
        start, end = found.get("window", [None, None])
        words = [f"check: window {start}..{end}"]
        if found.get("resumed"):
            words.append("resumed the repair left pending")
        elif found.get("upstream") is None:
            words.append(f"the upstream gave no count (stored {found.get('stored')})")
        else:
            words.append(f"upstream {found['upstream']} vs stored {found['stored']}")
        if "repairedTo" in found:
            words.append(f"repaired to {found['repairedTo']}")
        elif found.get("notChased"):
            words.append("not chased (its counts have proved unreliable)")
        elif not found.get("resumed") and found.get("upstream") == found.get("stored"):
            words.append("nothing to repair")
        pending = len(self.reconciler.pending)
        if pending:
            words.append(f"{_count(pending, 'window')} still to repair")
        if discrepancies:
            words.append(f"{_count(discrepancies, 'discrepancy')} recorded")
        words.append(_count(requests, "request"))
        log.info(
            ", ".join(words),
            extra={
                "event": "check",
                "windowStart": start,
                "windowEnd": end,
                "upstream": found.get("upstream"),
                "stored": found.get("stored"),
                "repairedTo": found.get("repairedTo"),
                "resumed": bool(found.get("resumed")),
                "pendingWindows": pending,
                "discrepancies": discrepancies,
                "requests": requests,
            },
        )

    # ------------------------------------------------------------ late arrivals

    def _check_due(self) -> bool:
        """A check is due every ``check_every`` seconds; sooner (down to one token period, and
        following, never twice within MIN_CHECK_SECONDS) while the shared budget is about full,
        i.e. idle."""
        options = self.options
        if options.check_every is None:
            return False
        last = self.store.state_value("last_check_ms")
        if last is None:
            return True
        elapsed = (self._now_ms() - last) / 1000
        if elapsed >= options.check_every:
            return True
        # Following, never twice within MIN_CHECK_SECONDS, however large the budget.
        soonest = options.per / options.rate_limit
        if self.following:
            soonest = max(soonest, MIN_CHECK_SECONDS)
        if elapsed < min(options.check_every, soonest):
            return False
        if self.late_seen or self.store.state_value("repair_pending"):
            # A page that showed a late arrival, or a search under way: a token the next poll
            # does not need, or at a light load any token (see _spare_and_fresh).
            return self._spare_and_fresh(spare=1.0)
        # Otherwise early only with the bucket about full (the budget is idle): the check's
        # count, a search's first steps and the next poll's token all fit in it.
        tokens = self._spare_tokens() + 1 + TOKEN_MARGIN
        return tokens >= max(options.rate_limit - IDLE_BUDGET_SHORT, 2 + TOKEN_MARGIN)

    def _spare_tokens(self) -> float:
        """Tokens in the shared budget beyond the one the next poll needs (and its margin)."""
        options = self.options
        tokens = self.store.budget(options.rate_limit, options.per, self.clock())["tokens"]
        return tokens - 1 - TOKEN_MARGIN

    def check(self) -> dict:
        """Reconcile what late arrivals may still change: [verified_until or as_of - overlap,
        as_of], ``as_of`` being where everything before has been read (within a window still
        being paged, too: a check need not wait for the window to end). A window counts as
        verified once a check ran ``overlap`` after its end, when every late arrival the
        contract allows is visible."""
        _start, _page, _position, as_of = self._cursor()
        now_ms = self._now_ms()
        overlap_ms = int(self.options.overlap * 1000)
        verified = self.store.state_value("verified_until", self.options.since)
        low = max(self.options.since, min(verified, as_of - overlap_ms))
        low = self.store.clear_second(low)
        # The top bound moves down a few seconds at most: what it leaves out waits for the
        # next check, which starts at or below it anyway.
        high = self.store.clear_second(as_of, floor=max(low, as_of - 3000))
        found: dict = {"at": format_instant(now_ms)}
        if high > low:
            self.summary.checks += 1
            distrust = self.store.state_value("counts_unreliable")
            chase = distrust is None or now_ms >= distrust["retryAtMs"]
            budget = [self.options.max_repair_requests]
            before = self.summary.requests
            discrepancies = self.summary.discrepancies
            pending = self.store.state_value("repair_pending")
            ages = self.store.state_value("late_ages") or []
            self.reconciler.arrived = []
            try:
                found.update(
                    self.reconciler.reconcile(
                        low, high, budget, chase=chase, pending=pending, late_ages=ages
                    )
                )
            finally:
                self.summary.check_requests += self.summary.requests - before
                found_ages = [high - at for at in self.reconciler.arrived if low <= at <= high]
                if found_ages:
                    self.store.put_state(late_ages=(ages + found_ages)[-LATE_AGES_KEPT:])
            self.late_seen = self.late_seen and bool(found.get("resumed"))
            self._judge_counts(distrust, chase, now_ms)
            self._say_check(
                found,
                self.summary.requests - before,
                self.summary.discrepancies - discrepancies,
            )
            if self.reconciler.pending:
                # Not verified past what is still to repair: the next checks take it up.
                high = min(high, min(window[0] for window in self.reconciler.pending))
        verified = max(verified, min(high, now_ms - overlap_ms))
        self.store.put_state(
            last_check=found,
            last_check_ms=now_ms,
            verified_until=verified,
            repair_pending=self.reconciler.pending or None,
        )
        return found

    def _judge_counts(self, distrust: dict | None, chased: bool, now_ms: int) -> None:
        """Counts that prove wrong are not chased again at every check: until ``retryAt``
        (doubling each time they prove wrong again, up to MAX_UNRELIABLE_BACKOFF) a check
        costs one count request; counts that agree again end the distrust."""
        why = self.reconciler.unreliable
        if why is None:
            if distrust is not None:
                self.store.put_state(counts_unreliable=None)
                log.warning("the upstream's counts agree with the store again")
            return
        if distrust is not None and not chased:
            return
        strikes = 1 if distrust is None else distrust["strikes"] + 1
        backoff = min(MAX_UNRELIABLE_BACKOFF, (self.options.check_every or 120.0) * 2**strikes)
        retry_at = now_ms + int(backoff * 1000)
        self.store.put_state(
            counts_unreliable={
                "since": distrust["since"] if distrust else format_instant(now_ms),
                "why": why,
                "strikes": strikes,
                "retryAt": format_instant(retry_at),
                "retryAtMs": retry_at,
            }
        )
        if distrust is None:
            log.warning(
                "the upstream's counts are unreliable (%s): checks stop chasing them for %.0f s",
                why,
                backoff,
            )

    # ------------------------------------------------------------ forever

    def follow(self) -> SyncSummary:
        """Poll until ``stop`` is set; survive upstream outages.

        Polls are paced to the upstream's arrival rate: the next one comes when about a full
        page has arrived (a short page costs a whole request for a few items), but never later
        than ``interval`` seconds, which bounds the staleness, nor sooner than the budget
        refills a token.
        """
        rate = self.arrivals
        self.following = True
        while not self.stop.is_set():
            started = self.clock()
            new_before = self.summary.new
            check = True
            try:
                self.run(defer_full_pages=True)
                if self.summary.complete is False and self.options.max_requests is not None:
                    break
                rate.observe(self.summary.new - new_before, self.clock())
                self._judge_load()
            except UpstreamError as error:
                self._report_error(error)
                check = False  # the upstream is failing: no extra requests until it answers
            except SyncStopped:
                break
            try:
                self._wait_for_next_poll(started, rate, check)
            except UpstreamError as error:
                self._report_error(error)
            except (SyncStopped, RequestLimitReached):
                break
        self._finish_summary()
        return self.summary

    def _report_error(self, error: UpstreamError) -> None:
        self.summary.errors = (self.summary.errors + [str(error)])[-5:]
        self.on_error(str(error))

    def _wait_for_next_poll(self, started: float, rate: ArrivalRate, check: bool = True) -> None:
        """Sleep until the next poll, running a late-arrival check meanwhile whenever one is
        due (with spare tokens they are due often: every token period at low load)."""
        poll_at = started + self._next_poll_in(rate.per_second)
        step = self.options.per / self.options.rate_limit
        # Not in the last moment before a poll (a second, or a quarter of a token period if
        # that is shorter): the check would hold it back.
        guard = min(1.0, step / 4)
        while (left := poll_at - self.clock()) > 0:
            self.pause(min(left, step))
            if check and self.clock() < poll_at - guard and self._check_due():
                self.check()

    def _next_poll_in(self, arrivals_per_second: float | None) -> float:
        """When about a full page waits at the cursor: a page's worth of arrivals, or at a
        light load (the window kept open) what the cursor's page lacks, plus POLL_FILL_MARGIN
        of a page so that arrivals a little slower than their rate still fill it. There the
        rate is the lower of the last polls' and the steady one (a poll that read a backlog
        must not bring the next one too soon, and a lull must slow polls down at once): a
        poll that comes early reads a short page, and the next one few new records."""
        options = self.options
        token_period = options.per / options.rate_limit
        if not arrivals_per_second:
            return options.interval
        missing = options.page_size
        if self._light_load():
            missing += POLL_FILL_MARGIN * options.page_size - min(self.page_filled, missing)
            arrivals_per_second = min(arrivals_per_second, self.arrivals.steady or math.inf)
        full_page_in = missing / arrivals_per_second
        return min(options.interval, max(token_period, full_page_in))

    def _finish_summary(self) -> None:
        _start, _page, position, as_of = self._cursor()
        self.summary.position = format_instant(position)
        self.summary.as_of = format_instant(as_of)
        self.summary.lag_seconds = max(0, (self._now_ms() - as_of) // 1000)
        self.store.put_state(
            last_run={
                "at": format_instant(self._now_ms()),
                "requests": self.summary.requests,
                "newTransactions": self.summary.new,
                "complete": self.summary.complete,
                "behind": self.summary.lag_seconds > STALE_AFTER_SECONDS,
            }
        )


# The summary's counts a poll line gives for that poll alone.
_COUNTED = (
    "pages",
    "new",
    "duplicates",
    "quarantined",
    "conflicts",
    "requests",
    "retries",
    "throttled",
)


def _counts(summary: SyncSummary) -> dict[str, int]:
    return {name: getattr(summary, name) for name in _COUNTED}


def _count(number: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{number} {noun if number == 1 else plural}"


def sync(store: Store, options: SyncOptions, **kwargs) -> SyncSummary:
    """Take the store's sync lock and catch up once (``follow=True``: keep following).

    ``standby=True`` with ``follow``, on a store whose lock is a lease machines share
    (PostgreSQL): while another process leads, stand by instead of raising SyncLocked, take
    over when its lease lapses, and step back to standing by when the lease is lost
    (``lead_or_stand_by``). Otherwise SyncLocked leaves at once."""
    follow = kwargs.pop("follow", False)
    standby = kwargs.pop("standby", False)
    if follow and standby and store.shares_leadership:
        from .leadership import lead_or_stand_by

        return lead_or_stand_by(store, options, **kwargs)
    with store.sync_lock():
        syncer = Syncer(store, options, **kwargs)
        try:
            return syncer.follow() if follow else syncer.run()
        finally:
            syncer.close()

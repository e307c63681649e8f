"""Sync: read the upstream's transactions into the store, exactly once each, within the budget.

How a run reads (see docs/design.md for the reasoning):

* A run fixes its end ``E = now - settle`` when it starts and never moves past it.
* The cursor is a window start ``S`` and a page number. Pages of ``[S, E]`` are read with the
  largest page size; each page, the totals it moves and the new cursor are committed in one
  database transaction. A full page moves the cursor to the next page of the same window: a later
  run continues there with a later ``E``, and since the upstream lists items in createdAt order,
  the items it has not shown yet are exactly the ones after that offset. A short or empty page
  ends the window: the position becomes ``E`` and the next window starts there. ``meta`` never
  ends a window; in ``--follow`` it only tells whether to ask for the next page now or later.
* Late arrivals: a ``limit=1`` request returns ``meta.totalItems`` for ``[position - overlap,
  position]``; when the store holds fewer, the window is bisected with more count requests down
  to pieces of one page, and those are re-read. One request per check, whatever the load.
* Every request takes a token from the rate budget kept in the store, shared by every process on
  it; a 429 blocks the whole store until its Retry-After.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from . import __version__
from .bounded_http import ACCEPT_ENCODING, BodyError, BoundedTransport, read_body
from .errors import (  # noqa: F401 (re-exported: sync's failures)
    RequestLimitReached,
    SyncStopped,
    Throttled,
    TransientError,
    UpstreamError,
)
from .models import (
    InvalidRecord,
    format_instant,
    format_query_time,
    loads,
    parse_created_at,
    raw_text,
)
from .settings import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    CHECK_EVERY,
    INTERVAL_SECONDS,
    MAX_BLOCK_SECONDS,
    MAX_DISCREPANCIES,
    MAX_REPAIR_REQUESTS,
    MAX_RESPONSE_BYTES,
    MAX_UNRELIABLE_BACKOFF,
    OVERLAP_SECONDS,
    PAGE_SIZE,
    PER_SECONDS,
    RATE_LIMIT,
    REREAD_WAIT_TOKENS,
    RETRY_FOR_SECONDS,
    SETTLE_SECONDS,
    STALE_AFTER_SECONDS,
    TIMEOUT_SECONDS,
    TOKEN_MARGIN,
)
from .store import IngestCounts, IngestResult, Store

log = logging.getLogger("txagg.sync")



@dataclass
class SyncOptions:
    api_url: str
    since: int = 0  # ms: where a fresh store starts
    rate_limit: int = RATE_LIMIT
    per: float = PER_SECONDS
    overlap: float = OVERLAP_SECONDS
    settle: float = SETTLE_SECONDS
    max_requests: int | None = None
    date_format: str = "sql"
    page_size: int = PAGE_SIZE
    timeout: float = TIMEOUT_SECONDS  # seconds for a whole request: connect, headers and body
    max_response_bytes: int = MAX_RESPONSE_BYTES
    retry_for: float = RETRY_FOR_SECONDS  # give up on a failing upstream after this long
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    interval: float = INTERVAL_SECONDS  # --follow: seconds between polls
    check_every: float | None = CHECK_EVERY  # seconds between late-arrival checks; None: never
    max_repair_requests: int = MAX_REPAIR_REQUESTS  # per check: what a lying meta may cost


@dataclass
class SyncSummary(IngestCounts):
    """What a run did; ``as_dict`` is the JSON summary of ``sync --json`` (camelCase keys)."""

    requests: int = 0
    pages: int = 0
    throttled: int = 0
    retries: int = 0
    checks: int = 0
    check_requests: int = 0  # requests spent on late-arrival checks and their repairs
    repairs: int = 0
    discrepancies: int = 0
    complete: bool = False
    position: str | None = None
    as_of: str | None = None
    lag_seconds: int | None = None
    errors: list[str] = field(default_factory=list)

    JSON_KEYS = {  # the summary's JSON keys, in their documented order
        "requests": "requests",
        "pages": "pages",
        "new": "new",
        "duplicates": "duplicates",
        "quarantined": "quarantined",
        "conflicts": "conflicts",
        "throttled": "throttled",
        "retries": "retries",
        "checks": "checks",
        "check_requests": "checkRequests",
        "repairs": "repairs",
        "discrepancies": "discrepancies",
        "complete": "complete",
        "position": "position",
        "as_of": "asOf",
        "lag_seconds": "lagSeconds",
        "errors": "errors",
    }

    def as_dict(self) -> dict:
        values = asdict(self)
        return {key: values[name] for name, key in self.JSON_KEYS.items()}


@dataclass
class Page:
    items: list
    total: int | None  # meta.totalItems when the upstream gave a sane one


def parse_retry_after(value: str | None, default: float, now: float | None = None) -> float:
    """Retry-After as seconds or as an HTTP date; ``default`` when absent or unreadable;
    never more than MAX_BLOCK_SECONDS, whatever the upstream says."""
    return min(_retry_after(value, default, now), MAX_BLOCK_SECONDS)


def _retry_after(value: str | None, default: float, now: float | None) -> float:
    if not value:
        return default
    value = value.strip()[:64]
    if value.isascii() and value.isdigit():
        return float(value) if len(value) < 16 else math.inf
    try:
        moment = email.utils.parsedate_to_datetime(value)
        stamp = moment.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return default
    now = time.time() if now is None else now
    return max(0.0, stamp - now)


class Upstream:
    """The Transaction API seen through the shared budget, with retries."""

    def __init__(
        self,
        store: Store,
        options: SyncOptions,
        summary: SyncSummary,
        sleep: Callable[[float], None],
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.options = options
        self.summary = summary
        self.sleep = sleep
        self.clock = clock
        self.bounded = BoundedTransport() if transport is None else None
        self.http = httpx.Client(
            base_url=options.api_url.rstrip("/"),
            timeout=options.timeout,
            headers={
                "User-Agent": f"txagg/{__version__}",
                "Accept": "application/json",
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            transport=transport or self.bounded,
        )
        jitter = wait_exponential_jitter(
            multiplier=options.backoff_initial,
            max=options.backoff_max,
            jitter=options.backoff_initial,
        )

        def wait(retry_state) -> float:
            # After a 429 the budget already waits out Retry-After; add no backoff on top.
            if isinstance(retry_state.outcome.exception(), Throttled):
                return 0.0
            self.summary.retries += 1
            return jitter(retry_state)

        self.retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait,
            stop=stop_after_delay(options.retry_for),
            sleep=sleep,
            reraise=True,
        )

    def close(self) -> None:
        self.http.close()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def fetch(self, start_ms: int, end_ms: int, page: int, limit: int) -> Page:
        try:
            for attempt in self.retrying:
                with attempt:
                    return self._fetch_once(start_ms, end_ms, page, limit)
        except Throttled as error:
            raise UpstreamError(
                f"the upstream kept answering 429 for {self.options.retry_for:.0f} s ({error})"
            ) from None
        except TransientError as error:
            raise UpstreamError(
                f"the upstream at {self.options.api_url} is unavailable "
                f"(gave up after {self.options.retry_for:.0f} s): {error}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_token(self) -> None:
        """Wait for a token of the shared budget. Waiting out a 429's block counts against
        ``retry_for`` and is said on stderr (through logging); the ordinary refill is not."""
        options = self.options
        if options.max_requests is not None and self.summary.requests >= options.max_requests:
            raise RequestLimitReached()
        blocked_for = 0.0
        told = False
        while True:
            wait, blocked = self.store.take_token(options.rate_limit, options.per, self.clock())
            if wait == 0.0:
                self.summary.requests += 1
                return
            if blocked:
                if blocked_for >= options.retry_for:
                    raise UpstreamError(
                        f"the upstream's 429 blocked the rate budget for {blocked_for:.0f} s, "
                        f"longer than --retry-for ({options.retry_for:.0f} s)"
                    )
                if not told and wait >= 1.0:
                    log.warning(
                        "waiting %.0f s: the upstream answered 429 Too Many Requests "
                        "(Retry-After is capped at %.0f s)",
                        wait,
                        MAX_BLOCK_SECONDS,
                    )
                    told = True
                step = min(wait, 5.0, max(0.01, options.retry_for - blocked_for))
                blocked_for += step
            else:
                step = min(wait, 5.0)
            self.sleep(step)

    def _fetch_once(self, start_ms: int, end_ms: int, page: int, limit: int) -> Page:
        self._take_token()
        params = {
            "startDate": format_query_time(start_ms, self.options.date_format),
            "endDate": format_query_time(end_ms, self.options.date_format),
            "page": page,
            "limit": limit,
        }
        timeout = self.options.timeout
        try:
            with self._deadline(), self.http.stream("GET", "/transactions", params=params) as r:
                return self._answer(r)
        except httpx.TimeoutException:
            raise TransientError(f"no complete answer within {timeout:g} s") from None
        except httpx.TransportError as error:
            raise TransientError(f"connection failed: {error}") from None

    def _deadline(self):
        if self.bounded is None:  # a transport given by the caller (tests): its own bounds
            return _no_deadline()
        return self.bounded.deadline(self.options.timeout)

    def _answer(self, response: httpx.Response) -> Page:
        if response.status_code == 429:
            default = self.options.per / self.options.rate_limit
            retry_after = parse_retry_after(response.headers.get("Retry-After"), default)
            self.summary.throttled += 1
            self.store.block_until(self.clock() + retry_after, self.clock())
            raise Throttled(retry_after)
        if response.status_code >= 500:
            raise TransientError(f"HTTP {response.status_code}")
        if response.status_code != 200:
            try:
                raw = read_body(response, 300, truncate=True).decode("utf-8", "replace")
                text = "".join(ch if ch.isprintable() else " " for ch in raw)
            except BodyError:
                text = ""
            raise UpstreamError(
                f"the upstream refused {response.request.url}: HTTP {response.status_code} "
                f"{text}"
            )
        try:
            content = read_body(response, self.options.max_response_bytes)
        except BodyError as error:
            raise TransientError(str(error)) from None
        return _parse_page(content)


class _no_deadline:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _parse_page(content: bytes) -> Page:
    """The items and the count of one answer; an unreadable body is a TransientError."""
    try:
        body = loads(content)
    except RecursionError:
        raise TransientError("the upstream sent JSON nested too deeply to read") from None
    except ValueError:
        raise TransientError("the upstream sent a body that is not JSON (truncated?)") from None
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise TransientError("the upstream sent JSON without an 'items' list")
    meta = body.get("meta")
    total = meta.get("totalItems") if isinstance(meta, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        total = None
    return Page(body["items"], total)


class Reconciler:
    """Compares windows of the store with the upstream's counts and re-reads what is short.

    One ``limit=1`` request gives the upstream's count for a window. A shortfall is bisected
    with more counts down to pieces of one page, which are re-read. ``budget`` (a one-item
    list, shared down the recursion) bounds the requests, so an upstream whose ``meta`` lies
    costs a fixed amount; what stays unexplained is recorded as a discrepancy for ``status``.
    """

    def __init__(self, store: Store, upstream: Upstream, summary: SyncSummary, page_size: int):
        self.store = store
        self.upstream = upstream
        self.summary = summary
        self.page_size = page_size
        self.found: list[dict] = []  # the discrepancies recorded by this reconciler
        self.unreliable: str | None = None  # why the upstream's counts proved wrong, if they did
        # Asked before each repair step: False defers the rest of a repair to a later check
        # (sync uses it to keep its reads fresh while a repair waits for tokens).
        self.may_spend: Callable[[], bool] = lambda: True
        # How many requests a repair may send now without waiting: a re-read is started only
        # when it can finish with at most REREAD_WAIT_TOKENS more (a re-read cut short would be
        # read again from its first page), and once started it only stops for ``may_go_on``.
        self.spendable: Callable[[], float] = lambda: math.inf
        self.may_go_on: Callable[[], bool] = lambda: True
        self.deferred = False
        self.pending: list[list[int]] = []

    def reconcile(
        self,
        low: int,
        high: int,
        budget: list[int],
        *,
        chase: bool = True,
        pending: list[list[int]] | None = None,
    ) -> dict:
        """Count [low, high] upstream and repair a shortfall. With ``chase`` False (counts known
        to lie) a difference is only reported, never bisected or recorded again.

        A repair stopped by ``may_spend`` leaves its windows still to do in ``self.pending``;
        passed back as ``pending``, they are taken up where they stood, without counting
        [low, high] again."""
        self.unreliable = None
        self.deferred = False
        self.pending = []
        if pending and chase:
            self.pending = self._repair([list(window) for window in pending], budget)
            return {"window": [format_instant(low), format_instant(high)], "resumed": True}
        budget[0] -= 1
        total = self.count(low, high)
        open_, closed = self.store.count_window(low, high)
        found = {
            "window": [format_instant(low), format_instant(high)],
            "upstream": total,
            "stored": closed,
        }
        if total is not None and open_ <= total <= closed:
            return found
        if not chase:
            found["notChased"] = "the upstream's counts have proved unreliable"
            self.unreliable = "its counts still differ from what it serves"
        elif total is None:
            self.discrepancy(low, high, None, "the upstream gave no count", unreliable=True)
        elif total > closed:
            self.pending = self._repair([[low, high, total]], budget)
            found["repairedTo"] = self.store.count_window(low, high)[1]
        else:
            self.discrepancy(
                low, high, total, "the upstream counts fewer than the store holds", unreliable=True
            )
        return found

    def count(self, start: int, end: int) -> int | None:
        """The upstream's count for [start, end]; whatever records the answer carries (an
        upstream may ignore ``limit``) are stored like any others."""
        answer = self.upstream.fetch(start, end, 1, 1)
        if answer.items:
            self.summary.add_ingest(self.store.ingest(answer.items))
        return answer.total

    def split_point(self, start: int, end: int, total: int) -> int | None:
        """Where to cut [start, end] in two, or None when it is small enough to read whole."""
        if total <= self.page_size:
            return None
        middle = self.store.clear_second(start + (end - start) // 2, floor=start, ceiling=end)
        return middle if start < middle < end else None

    def halves(
        self, start: int, middle: int, end: int, total: int, budget: list[int]
    ) -> list[tuple[int, int, int]] | None:
        """Count both halves of [start, end]; None (a discrepancy recorded) when they do not
        add up to the whole. A record the store does not know may sit exactly on the cut, left
        out of both halves by an upstream with exclusive bounds: so a second cut is tried one
        second earlier before the counts are called unreliable."""
        for _cut in range(2):
            if not self.may_spend():
                self.deferred = True
                return None
            if budget[0] < 2:
                self.discrepancy(start, end, total, "repair budget spent")
                return None
            budget[0] -= 2
            left, right = self.count(start, middle), self.count(middle, end)
            if left is None or right is None:
                self.discrepancy(start, end, total, "the upstream gave no count", unreliable=True)
                return None
            if left + right > total + max(2, total // 50):
                # Halves that hold more than the whole: no late arrival explains that much.
                self.discrepancy(
                    start, end, total, "the upstream's halves count more than the whole",
                    unreliable=True,
                )
                return None
            if left + right + self.store.count_window(middle, middle)[1] >= total:
                return [(start, middle, left), (middle, end, right)]
            middle = self.store.clear_second(middle - 1000, floor=start, ceiling=end)
            if not start < middle < end:
                break
        self.discrepancy(start, end, total, "the upstream's counts do not add up", unreliable=True)
        return None

    def _repair(self, pending: list[list[int]], budget: list[int]) -> list[list[int]]:
        """Bisect and re-read the windows ``[start, end, upstream count]`` still short, oldest
        first; returns those left when ``may_spend`` says stop (none when done or budget out)."""
        while pending:
            start, end, total = pending.pop()
            if total <= self.store.count_window(start, end)[1]:
                continue
            if not self.may_spend():
                self.deferred = True
                return pending + [[start, end, total]]
            middle = self.split_point(start, end, total)
            if middle is None or self._rereading_is_cheaper(start, end, total, budget):
                if not self.reread(start, end, total, budget):
                    return pending + [[start, end, total]]
                continue
            halves = self.halves(start, middle, end, total, budget)
            if halves is None:
                if self.deferred:
                    return pending + [[start, end, total]]
                continue
            for low, high, half in reversed(halves):
                if half > self.store.count_window(low, high)[1]:
                    pending.append([low, high, half])
        return []

    def _rereading_is_cheaper(self, start: int, end: int, total: int, budget: list[int]) -> bool:
        """Bisecting finds one missing record in about 2 log2(pages) + 1 requests; many missing
        records in a few pages are found sooner by reading those pages again."""
        pages = -(-total // self.page_size)
        if pages > budget[0] or pages > self.spendable() + REREAD_WAIT_TOKENS:
            return False
        missing = total - self.store.count_window(start, end)[1]
        return pages <= missing * (2 * math.ceil(math.log2(pages)) + 1)

    def reread(self, start: int, end: int, total: int, budget: list[int]) -> bool:
        """Read a small window again; record a discrepancy only for what stays unexplained.

        A record whose createdAt is unusable has no place in any window of the store, so the
        store's count alone would always come up short where one stands. Having just been
        served ``total`` distinct records that may belong here (and stored every valid one),
        nothing in this window can be missing. Returns False when ``may_spend`` stopped it.
        """
        self.summary.repairs += 1
        served: set[str] = set()
        undated: set[str] = set()
        page = 1
        while budget[0] > 0:
            if not (self.may_spend() if page == 1 else self.may_go_on()):
                self.deferred = True
                return False
            budget[0] -= 1
            result = self.upstream.fetch(start, end, page, self.page_size)
            inside, no_date = _keys_inside(result.items, start, end)
            served.update(inside)
            undated.update(no_date)
            self.summary.add_ingest(self.store.ingest(result.items))
            self.summary.pages += 1
            if len(result.items) < self.page_size:
                break
            page += 1
        stored = self.store.count_window(start, end)[1]
        if stored >= total:
            return True
        if len(served) < total:
            self.discrepancy(start, end, total, "still short after re-reading", unreliable=True)
        elif undated and stored + len(undated) == total:
            # Explained by records whose createdAt is unusable: from now on they count in this
            # window, so later checks find it complete instead of bisecting down to it again.
            self.store.place_quarantined(sorted(undated), start)
        return True

    def discrepancy(
        self, start: int, end: int, total: int | None, why: str, *, unreliable: bool = False
    ) -> dict:
        if unreliable:
            self.unreliable = why
        self.summary.discrepancies += 1
        found = {
            "window": [format_instant(start), format_instant(end)],
            "upstream": total,
            "stored": self.store.count_window(start, end)[1],
            "why": why,
            "at": format_instant(self.upstream.now_ms()),
        }
        recorded = self.store.state_value("discrepancies", [])
        self.store.put_state(discrepancies=(recorded + [found])[-MAX_DISCREPANCIES:])
        self.found.append(found)
        return found


class Syncer:
    """Runs sync against one store. ``run()`` catches up once; ``follow()`` keeps at it."""

    def __init__(
        self,
        store: Store,
        options: SyncOptions,
        *,
        on_page: Callable[[SyncSummary], None] | None = None,
        on_error: Callable[[str], None] | None = None,
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
        self.stop = stop or threading.Event()
        self.clock = clock
        self.pause = sleep or self._sleep
        self.upstream = Upstream(store, options, self.summary, self.pause, transport, clock)
        self.following = False
        self.reconciler = Reconciler(store, self.upstream, self.summary, options.page_size)
        self.reconciler.may_spend = self._fresh_enough_to_repair
        self.reconciler.may_go_on = self._fresh_enough
        self.reconciler.spendable = lambda: self._spare_tokens() if self.following else math.inf

    def close(self) -> None:
        self.upstream.close()

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise SyncStopped()

    def _fresh_enough_to_repair(self) -> bool:
        """Following, a repair never holds back the next read: each of its requests takes a
        token only when one is left for the next poll, and only while the store is less than
        half the freshness promise behind. What it leaves, later checks take up (the windows
        still to repair are saved). A run that is not following has no later read to hold
        back: it repairs within its request budget."""
        if not self.following:
            return True
        return self._fresh_enough() and self._spare_tokens() >= 1

    def _fresh_enough(self) -> bool:
        if not self.following:
            return True
        as_of = self.store.state_value("as_of")
        return as_of is None or self._now_ms() - as_of < STALE_AFTER_SECONDS * 500

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
        try:
            caught_up = self._read_until(end, defer_full_pages)
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
            start, page, position, as_of = self._cursor()
            if start >= end:
                return True
            result = self.upstream.fetch(start, end, page, limit)
            full = len(result.items) >= limit
            next_cursor = partial(_next_cursor, full, start, page, as_of, end)
            ingested = self.store.ingest(result.items, state=next_cursor)
            self.summary.pages += 1
            self.summary.add_ingest(ingested)
            self.on_page(self.summary)
            if not full:
                return True
            # Following, ask now only for a page the upstream says is full: a few leftover
            # items ride along with the next poll's instead of costing a request of their own.
            full_page_promised = result.total is not None and result.total >= (page + 1) * limit
            if defer_full_pages and not full_page_promised:
                return True

    # ------------------------------------------------------------ late arrivals

    def _check_due(self) -> bool:
        """A check is due every ``check_every`` seconds; sooner (down to one token period)
        while the shared budget is about full, i.e. idle."""
        options = self.options
        if options.check_every is None:
            return False
        last = self.store.state_value("last_check_ms")
        if last is None:
            return True
        elapsed = (self._now_ms() - last) / 1000
        if elapsed >= options.check_every:
            return True
        if elapsed < min(options.check_every, options.per / options.rate_limit):
            return False
        if self.store.state_value("repair_pending"):
            return self._spare_tokens() >= 1  # a repair under way goes on with any spare token
        # Early only with the bucket about full: the check's count, a repair's first steps and
        # the next poll's token all fit in it.
        tokens = self._spare_tokens() + 1 + TOKEN_MARGIN
        return tokens >= max(options.rate_limit - 0.5, 2 + TOKEN_MARGIN)

    def _spare_tokens(self) -> float:
        """Tokens in the shared budget beyond the one the next poll needs (and its margin)."""
        options = self.options
        tokens = self.store.budget(options.rate_limit, options.per, self.clock())["tokens"]
        return tokens - 1 - TOKEN_MARGIN

    def check(self) -> dict:
        """Reconcile what late arrivals may still change: [verified_until or position - overlap,
        position]. A window counts as verified once a check ran ``overlap`` after its end,
        when every late arrival the contract allows is visible."""
        _start, _page, position, _as_of = self._cursor()
        now_ms = self._now_ms()
        overlap_ms = int(self.options.overlap * 1000)
        verified = self.store.state_value("verified_until", self.options.since)
        low = max(self.options.since, min(verified, position - overlap_ms))
        low = self.store.clear_second(low)
        # The top bound moves down a few seconds at most: what it leaves out waits for the
        # next check, which starts at or below it anyway.
        high = self.store.clear_second(position, floor=max(low, position - 3000))
        found: dict = {"at": format_instant(now_ms)}
        if high > low:
            self.summary.checks += 1
            distrust = self.store.state_value("counts_unreliable")
            chase = distrust is None or now_ms >= distrust["retryAtMs"]
            budget = [self.options.max_repair_requests]
            before = self.summary.requests
            pending = self.store.state_value("repair_pending")
            try:
                found.update(
                    self.reconciler.reconcile(low, high, budget, chase=chase, pending=pending)
                )
            finally:
                self.summary.check_requests += self.summary.requests - before
            self._judge_counts(distrust, chase, now_ms)
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
        rate = ArrivalRate()
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
        while (left := poll_at - self.clock()) > 0:
            self.pause(min(left, step))
            if check and self.clock() < poll_at - 1 and self._check_due():
                self.check()

    def _next_poll_in(self, arrivals_per_second: float | None) -> float:
        token_period = self.options.per / self.options.rate_limit
        if not arrivals_per_second:
            return self.options.interval
        full_page_in = self.options.page_size / arrivals_per_second
        return min(self.options.interval, max(token_period, full_page_in))

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


def _keys_inside(items: list, start: int, end: int) -> tuple[set[str], set[str]]:
    """The distinct records of a page that may stand in [start, end] (those dated inside it and
    those whose date is unusable; ones returned from outside the window are left out), and
    among them the ones whose date is unusable, as the quarantine keeps their text."""
    keys, undated = set(), set()
    for item in items:
        try:
            moment = parse_created_at(item.get("createdAt") if isinstance(item, dict) else None)
        except InvalidRecord:
            moment = None
        if moment is None:
            undated.add(raw_text(item))
            keys.add(raw_text(item))
        elif start <= moment <= end:
            keys.add(raw_text(item))
    return keys, undated


class ArrivalRate:
    """New transactions a second, smoothed over the last few polls."""

    def __init__(self):
        self.per_second: float | None = None
        self._last: float | None = None

    def observe(self, arrived: int, now: float) -> None:
        if self._last is not None and now > self._last:
            sample = arrived / (now - self._last)
            self.per_second = sample if self.per_second is None else (self.per_second + sample) / 2
        self._last = now


def _next_cursor(
    full: bool, start: int, page: int, as_of: int, end: int, ingested: IngestResult
) -> dict:
    """The cursor after a page of [start, end]: the next page, or the next window."""
    if not full:
        return {"window_start": end, "page": 1, "position": end, "as_of": max(as_of, end)}
    # Pages come in createdAt order: everything before this page's latest second has been read.
    if ingested.max_created_at is not None:
        as_of = max(as_of, min(end, ingested.max_created_at // 1000 * 1000))
    return {"window_start": start, "page": page + 1, "position": start, "as_of": as_of}


def sync(store: Store, options: SyncOptions, **kwargs) -> SyncSummary:
    """Take the store's sync lock and catch up once (``follow=True``: keep following)."""
    follow = kwargs.pop("follow", False)
    with store.sync_lock():
        syncer = Syncer(store, options, **kwargs)
        try:
            return syncer.follow() if follow else syncer.run()
        finally:
            syncer.close()

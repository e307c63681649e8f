"""The Transaction API seen through the shared rate budget: one request at a time, bounded in
time and size (``bounded_http``), retried with backoff while the failure is transient, every
answer parsed into a ``Page`` of records and the upstream's count."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from . import __version__
from .bounded_http import ACCEPT_ENCODING, BodyError, BoundedTransport, read_body
from .errors import RequestLimitReached, Throttled, TransientError, Unreachable, UpstreamError
from .models import format_query_time, loads
from .options import SyncOptions, SyncSummary
from .settings import MAX_BLOCK_SECONDS
from .store import Store

log = logging.getLogger("txagg.sync")


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
        # Told how long each wait for the budget lasts (seconds, and whether a 429 is why),
        # then 0.0 once the token is taken: for a progress display.
        self.on_wait: Callable[[float, bool], None] | None = None
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
            before_sleep=_say_retry,
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
        waited = False
        while True:
            wait, blocked = self.store.take_token(options.rate_limit, options.per, self.clock())
            if wait == 0.0:
                self.summary.requests += 1
                if waited and self.on_wait is not None:
                    self.on_wait(0.0, False)
                return
            if self.on_wait is not None:
                self.on_wait(wait, blocked)
                waited = True
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
            # Never a sleep too short to move a clock: a wait of a few ns could spin for good.
            self.sleep(max(step, 0.001))

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
            reason = f"no complete answer within {timeout:g} s"
            raise Unreachable(reason, reason) from None
        except httpx.TransportError as error:
            raise Unreachable(f"connection failed: {error}", _brief(error)) from None

    def _deadline(self):
        if self.bounded is None:  # a transport given by the caller (tests): its own bounds
            return contextlib.nullcontext()
        return self.bounded.deadline(self.options.timeout)

    def _answer(self, response: httpx.Response) -> Page:
        if response.status_code == 429:
            default = self.options.per / self.options.rate_limit
            retry_after = parse_retry_after(response.headers.get("Retry-After"), default)
            self.summary.throttled += 1
            now = self.clock()
            self.store.block_until(now + retry_after, now)
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
                f"the upstream refused {response.request.url}: HTTP {response.status_code} {text}"
            )
        try:
            content = read_body(response, self.options.max_response_bytes)
        except BodyError as error:
            raise TransientError(str(error)) from None
        return _parse_page(content)


def _say_retry(retry_state) -> None:
    """One line on stderr (through logging, at WARNING) before each retry: an upstream that
    does not answer is never silent. A 429's wait is said where the budget waits it out."""
    error = retry_state.outcome.exception()
    if isinstance(error, Throttled):
        return
    if isinstance(error, Unreachable):
        what, reason = "unreachable", error.reason
    else:
        what, reason = "failing", str(error)
    log.warning(
        "upstream %s: %s; retry %d in %s s",
        what,
        reason,
        retry_state.attempt_number,
        _seconds(retry_state.next_action.sleep),
    )


def _brief(error: Exception) -> str:
    """A transport error in a few words: "connection refused", not "[Errno 111] Connection
    refused"."""
    text = " ".join(str(error).split()) or type(error).__name__
    if text.startswith("[Errno") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.rstrip(".")
    return text[:1].lower() + text[1:200]


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 1 else f"{value:.2g}"


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

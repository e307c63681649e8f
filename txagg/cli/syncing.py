"""``sync`` and ``verify``: reading the upstream, with progress on a terminal."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from .. import output
from ..binding import record_failure, recorder
from ..errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    NothingSynced,
    exit_code,
)
from ..models import format_instant
from ..output import Format
from ..report import (
    never_synced,
)
from ..settings import LEASE_SECONDS, MIN_LEASE_SECONDS
from ..store import (
    Store,
    SyncLocked,
)
from .app import app
from .common import (
    FOLLOW_OPTIONS,
    UPSTREAM_OPTIONS,
    ApiUrlOption,
    DbOption,
    check_api_url,
    fail,
    log,
    open_store,
    output_options,
    parse_instant,
    quiet,
    resolve_options,
    say,
    show,
    sync_options_from,
    upstream_options,
)

# ------------------------------------------------------------------ sync


@app.command()
@output_options
@sync_options_from(FOLLOW_OPTIONS, UPSTREAM_OPTIONS)
def sync(
    api_url: ApiUrlOption = None,
    db: DbOption = None,
    since: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_SYNC_SINCE",
            metavar="TIME",
            help="Where a fresh store starts (UTC; default: the beginning), ignored with a "
            "warning once the store has a sync position.",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            envvar="TXAGG_SYNC_FOLLOW",
            help="Keep syncing until stopped (SIGINT or SIGTERM).",
        ),
    ] = False,
    rebind: Annotated[
        bool,
        typer.Option(
            "--rebind",
            envvar="TXAGG_REBIND",
            help="Move the store to --api-url on purpose: it belongs to that upstream from its "
            "first answer on (the data already stored stays).",
        ),
    ] = False,
    lease: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_LEASE",
            metavar="SECONDS",
            min=MIN_LEASE_SECONDS,
            help="With --follow on a PostgreSQL store, the failover budget: one process leads, "
            "the others stand by and take over within this many seconds when it dies, hangs or "
            "is cut off (its lease runs half of it, renewed every sixth).",
        ),
    ] = LEASE_SECONDS,
    sync_settings: dict | None = None,
    output_format: Format = Format.json,
) -> None:
    """Pull new transactions into the store, once (for cron) or --follow.

    The first sync binds the store to its upstream: later runs use it without --api-url and
    refuse another one unless --rebind. With --follow on a PostgreSQL store, any number of
    machines may run it: one leads, the others stand by (without --follow, or on SQLite, a
    sync exits 75 while another one works)."""
    from ..sync import UpstreamError
    from ..sync import sync as run_sync

    check_api_url(api_url)
    since_ms = parse_instant(since, "--since")
    if rebind and api_url is None:
        raise typer.BadParameter("--rebind needs the upstream to move to", param_hint="'--api-url'")
    options = resolve_options(db, api_url, sync_settings, rebind=rebind, since=since_ms)
    options.lease = lease
    stop = stop_on_signals() if follow else threading.Event()
    with (
        open_store(db, create=True) as store,
        SyncProgressDisplay(store, options, following=follow) as display,
    ):
        stored_before = store.counters().get("transactions", 0)

        def on_error(message: str) -> None:
            say(logging.WARNING, message)
            record_failure(store, message)

        try:
            summary = run_sync(
                store,
                options,
                follow=follow,
                standby=True,
                stop=stop,
                on_page=recorder(store, options, display.on_page),
                on_error=on_error,
                on_progress=display.on_progress,
            )
        except SyncLocked as error:
            raise fail(str(error), exit_code(error)) from None
        except UpstreamError as error:
            record_failure(store, str(error))
            raise fail(str(error), exit_code(error)) from None
        except KeyboardInterrupt:  # Ctrl-C without --follow: every page read is committed
            display.stop()
            # Without --follow the store's lock was this run's alone: what it grew by is its own.
            stored = store.counters().get("transactions", 0) - stored_before
            saved = what_was_saved(store, stored)
            raise fail(f"sync interrupted: {saved}", EXIT_INTERRUPTED) from None
        if stop.is_set():
            display.stop()
            # Its own new transactions: a standby's store grew by the leader's work meanwhile.
            tell(f"stopped: {what_was_saved(store, summary.new)}")
    show(output.SYNC, summary.as_dict(), output_format)


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event: the work stops between two commits."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@app.command()
@output_options
@sync_options_from(UPSTREAM_OPTIONS)
def verify(
    api_url: ApiUrlOption = None,
    db: DbOption = None,
    since: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_VERIFY_SINCE",
            metavar="TIME",
            help="Start of the range (UTC; default: the oldest stored transaction).",
        ),
    ] = None,
    until: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_VERIFY_UNTIL",
            metavar="TIME",
            help="End of the range (UTC; default: the sync position).",
        ),
    ] = None,
    sync_settings: dict | None = None,
    output_format: Format = Format.json,
) -> None:
    """Reconcile the stored history with the upstream window by window, and repair it.

    Exits 5 when it stops before the end of its range (--max-requests spent; run it again to
    resume), 130 when interrupted."""
    from ..sync import UpstreamError
    from ..verify import ReversedRange
    from ..verify import verify as run_verify

    check_api_url(api_url)
    since_ms = parse_instant(since, "--since")
    until_ms = parse_instant(until, "--until")
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        raise typer.BadParameter(
            f"the start {since!r} is later than the end {until!r}",
            param_hint="'--since' / '--until'",
        )
    stop = stop_on_signals()
    with open_store(db) as store:
        if never_synced(store):  # said before anything about the upstream
            raise fail(str(NothingSynced()), exit_code(NothingSynced()))
        options = upstream_options(store, api_url, sync_settings)
        try:
            report = run_verify(store, options, since_ms, until_ms, stop=stop)
        except (SyncLocked, UpstreamError, NothingSynced, ReversedRange) as error:
            raise fail(str(error), exit_code(error)) from None
    show(output.VERIFY, report.as_dict(), output_format)
    if not report.complete:
        if stop.is_set():
            raise fail("verify interrupted: run it again to resume", EXIT_INTERRUPTED)
        raise fail(
            "verify stopped before the end of its range (--max-requests spent): "
            "run it again to resume",
            EXIT_INCOMPLETE,
        )


class SyncProgressDisplay:
    """sync's progress line on a terminal's stderr; nothing elsewhere, nor with -q (stdout
    stays the result). When the upstream's count allows (its meta.totalItems for the window
    being read), a total, a percentage and an ETA at the budget's pace; the wait for the rate
    budget ("next request in 11 s"); the run's counts."""

    def __init__(self, store: Store, options, *, following: bool = False) -> None:
        self.store = store
        self.options = options
        self.following = following
        self.progress = None
        self.summary = None
        self.read = 0
        self.total: int | None = None
        self.eta_at: float | None = None
        self.wait_until: float | None = None
        self.blocked = False

    def __enter__(self) -> SyncProgressDisplay:
        if sys.stderr.isatty() and not quiet():
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
        )
        from rich.text import Text

        display = self

        class Status(ProgressColumn):
            def render(self, task) -> Text:
                return Text(display.status())

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(text_format_no_percentage=""),
            Status(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("following" if self.following else "syncing", total=None)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_page(self, summary) -> None:
        self.summary = summary

    def on_progress(self, progress) -> None:
        """``Syncer(on_progress=)``: after each page, and while waiting for the budget."""
        if self.progress is None:
            return
        import math
        import time

        from ..settings import TOKEN_MARGIN

        now = time.monotonic()
        if progress.waiting > 0:
            self.wait_until, self.blocked = now + progress.waiting, progress.blocked
            return
        self.wait_until = None
        self.read = progress.read
        # The contract does not promise meta right: a count below what was read is no total.
        total = progress.total
        self.total = total if total is not None and total >= progress.read else None
        self.eta_at = None
        if self.total is not None and progress.page_size:
            options = self.options
            requests = math.ceil((self.total - progress.read) / progress.page_size)
            budget = self.store.budget(options.rate_limit, options.per)
            spare = max(0, math.floor(budget["tokens"] - TOKEN_MARGIN))
            waits = max(0, requests - spare) * options.per / options.rate_limit
            self.eta_at = now + budget["blockedFor"] + waits
        self.progress.update(self.task, total=self.total, completed=progress.read)

    def status(self) -> str:
        """The counts, the ETA and the wait, as of now (redrawn several times a second)."""
        import time

        now = time.monotonic()
        read = f"{self.read:,}" if self.total is None else f"{self.read:,}/{self.total:,}"
        parts = [f"{read} read"]
        if self.summary is not None:
            parts += [f"{self.summary.new:,} new", _plural(self.summary.requests, "request")]
        if self.eta_at is not None:
            parts.append(f"ETA {_duration(self.eta_at - now)}")
        if self.wait_until is not None and self.wait_until > now:
            why = "the upstream answered 429" if self.blocked else "waiting for the rate budget"
            parts.append(f"{why}: next request in {_duration(self.wait_until - now)}")
        return " · ".join(parts)


def _plural(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _duration(seconds: float) -> str:
    """11 s, 13 min, 2 h 05 min."""
    import math

    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def what_was_saved(store: Store, new: int) -> str:
    """What a stopped run leaves (the cursor is committed with every page): the ``new``
    transactions it stored and from which instant the next run continues."""
    stored = store.counters().get("transactions", 0)
    as_of = store.state_value("as_of")
    text = f"{_plural(new, 'new transaction')} stored ({stored:,} in the store)"
    if as_of is None:
        return f"{text}; the next run starts where this one did"
    return f"{text}; the next run continues from {format_instant(as_of)}"


def tell(message: str) -> None:
    """A note for the person at the terminal ("Stopped: ..."), else an INFO line (journal)."""
    if not sys.stderr.isatty():
        log.info(message)
    elif not quiet():
        print(message[:1].upper() + message[1:], file=sys.stderr)

"""The ``txagg`` command line: thin commands that parse options, call the core, format results.

Core errors are exceptions; this edge turns them into a message on stderr and an exit code:
0 success, 1 failure, 2 bad usage, 3 no such user, 4 ``status --check`` found the store
unhealthy, 5 ``verify`` stopped before the end of its range, 75 another sync holds the store,
130 interrupted (the codes are defined in ``errors``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .binding import normalise_url, options_for, record_failure, recorder
from .errors import (
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_NO_SUCH_USER,
    BadUpstreamUrl,
    NothingSynced,
    NoUpstream,
    OtherUpstream,
    Unhealthy,
    exit_code,
)
from .models import dumps, parse_time
from .report import (
    DEFAULT_EUR_PER_SCR,
    UnknownUser,
    check_health,
    never_synced,
    parse_eur_rate,
    payouts_report,
    status_report,
    user_report,
)
from .settings import PER_SECONDS, RATE_LIMIT
from .store import Store, StoreError, SyncLocked, default_db_path, explain

app = typer.Typer(
    name="txagg",
    help="An exact, fresh, local copy of a rate-limited Transaction API, aggregated per user.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class DateFormat(StrEnum):
    sql = "sql"
    iso = "iso"


DateFormatOption = Annotated[
    DateFormat,
    typer.Option(help="How window bounds are sent: sql (YYYY-MM-DD HH:MM:SS) or iso."),
]


DbOption = Annotated[
    Optional[Path],
    typer.Option(
        "--db",
        envvar="TXAGG_DB",
        help="Store file. Default: ~/.local/share/txagg/txagg.db.",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (the default when stdout is not a terminal).")
]
RateOption = Annotated[int, typer.Option("--rate-limit", min=1, help="Requests allowed ...")]
PerOption = Annotated[float, typer.Option("--per", min=0.001, help="... per this many seconds.")]
# The budget a store was synced with is remembered: these default to it (binding.budget_for).
StoreRateOption = Annotated[
    Optional[int],
    typer.Option(
        "--rate-limit",
        min=1,
        help=f"Requests allowed ... Default: the store's budget, else {RATE_LIMIT}.",
        show_default=False,
    ),
]
StorePerOption = Annotated[
    Optional[float],
    typer.Option(
        "--per",
        min=0.001,
        help=f"... per this many seconds. Default: the store's, else {PER_SECONDS:g}.",
        show_default=False,
    ),
]
REMEMBERED = ("rate_limit", "per")  # options whose default is what the store remembers
ApiUrlOption = Annotated[
    Optional[str],
    typer.Option(
        envvar="TXAGG_API_URL",
        help="The Transaction API's base URL. Default: the store's own upstream (recorded by "
        "its first sync); there is no other default.",
        show_default=False,
    ),
]
MaxRequestsOption = Annotated[
    Optional[int], typer.Option(min=1, help="Stop after this many upstream requests.")
]
TimeoutOption = Annotated[
    float, typer.Option(min=0.1, help="Seconds a whole request may take: connect, headers, body.")
]
RetryForOption = Annotated[
    float, typer.Option(min=0.0, help="Give up on a failing upstream after this many seconds.")
]
IntervalOption = Annotated[
    float, typer.Option(min=0.0, help="--follow: at most this many seconds between polls.")
]
OverlapOption = Annotated[
    float,
    typer.Option(min=0.0, help="How far behind its position (s) late arrivals are caught."),
]
SettleOption = Annotated[
    float, typer.Option(min=0.0, help="Read only up to now minus this many seconds.")
]
EurOption = Annotated[
    str,
    typer.Option("--eur-per-scr", envvar="TXAGG_EUR_PER_SCR", help="EUR paid out per SCR."),
]
CheckEveryOption = Annotated[
    float, typer.Option(min=0.0, help="Seconds between late-arrival checks.")
]

# Option groups, defined once: each is a list of (SyncOptions field, its option). Their defaults
# are SyncOptions' own, but for the budget (REMEMBERED: the store's own); ``sync_options_from``
# adds them to a command and hands them over as a dict of SyncOptions fields.
UPSTREAM_OPTIONS = [
    ("rate_limit", StoreRateOption),
    ("per", StorePerOption),
    ("max_requests", MaxRequestsOption),
    ("date_format", DateFormatOption),
    ("timeout", TimeoutOption),
    ("retry_for", RetryForOption),
]
FOLLOW_OPTIONS = [
    ("interval", IntervalOption),
    ("overlap", OverlapOption),
    ("settle", SettleOption),
    ("check_every", CheckEveryOption),
]


def sync_options_from(*groups: list[tuple[str, object]]):
    """Add the options of ``groups`` to a command, sqlite-utils' ``@output_options`` style: the
    command gets them back as one ``sync_settings`` dict of SyncOptions fields (those in
    REMEMBERED None when not given: the store's own apply)."""

    def decorate(command):
        from dataclasses import MISSING, fields

        from .sync import SyncOptions

        defaults = {
            item.name: item.default for item in fields(SyncOptions) if item.default is not MISSING
        }
        names = [name for group in groups for name, _ in group]
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "sync_settings"]
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=option,
                default=None
                if name in REMEMBERED
                else DateFormat(defaults[name])
                if name == "date_format"
                else defaults[name],
            )
            for group in groups
            for name, option in group
        ]

        @functools.wraps(command)
        def wrapper(**kwargs):
            settings = {name: kwargs.pop(name) for name in names}
            if "date_format" in settings:
                settings["date_format"] = settings["date_format"].value
            return command(**kwargs, sync_settings=settings)

        del wrapper.__wrapped__
        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


# ------------------------------------------------------------------ helpers


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    print(f"Error: {message}", file=sys.stderr)
    return typer.Exit(code)


class _StderrLines(logging.Handler):
    """txagg's log records as lines on the stderr of the moment ("Warning: ...")."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.capitalize()}: {self.format(record)}"
            print(line, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def log_to_stderr(level: int = logging.WARNING) -> None:
    """Say txagg's warnings (retries, 429 waits, counts that lie) on stderr, one line each.
    The commands that talk to the upstream call it; ``level`` is what a quieter option would
    raise."""
    logger = logging.getLogger("txagg")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrLines)), None)
    if handler is None:
        handler = _StderrLines()
        logger.addHandler(handler)
    handler.setLevel(level)


def check_api_url(api_url: str | None) -> None:
    """Refuse a URL txagg cannot use at once, before any store or request: a usage error."""
    if api_url is None:
        return
    try:
        normalise_url(api_url)
    except BadUpstreamUrl as error:
        raise typer.BadParameter(str(error), param_hint="'--api-url'") from None


def upstream_options(store: Store | None, api_url: str | None, settings: dict, **kwargs):
    """The SyncOptions of a run on ``store`` (None: no store yet): the store's upstream unless
    given, its remembered budget unless given. No upstream, or another one than the store's,
    is a usage error (exit 2) in one line; warnings go to stderr."""
    try:
        options, warnings = options_for(store, api_url, settings, **kwargs)
    except BadUpstreamUrl as error:
        raise typer.BadParameter(str(error), param_hint="'--api-url'") from None
    except (NoUpstream, OtherUpstream) as error:
        raise fail(str(error), exit_code(error)) from None
    for warning in warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    return options


def resolve_options(db: Path | None, api_url: str | None, settings: dict, **kwargs):
    """``upstream_options`` for the store at ``db``, read without creating one."""
    path = Path(db or default_db_path())
    if not path.exists():
        return upstream_options(None, api_url, settings, **kwargs)
    with open_store(path, create=True) as store:  # an empty file: sync makes a store there
        return upstream_options(store, api_url, settings, **kwargs)


def wants_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def print_json(body: object) -> None:
    sys.stdout.write(dumps(body) + "\n")
    sys.stdout.flush()


@contextmanager
def open_store(
    db: Path | None, *, create: bool = False, read_only: bool = False
) -> Iterator[Store]:
    """The store, with every store failure inside the block turned into a clear exit 1.

    ``read_only``: for the read commands, which never create, migrate or write a store."""
    path = db or default_db_path()
    try:
        with Store.open(path, create=create, read_only=read_only) as store:
            yield store
    except StoreError as error:
        raise fail(str(error)) from None
    except sqlite3.Error as error:
        raise fail(explain(error, Path(path))) from None


def parse_instant(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=option) from None


def parse_rate(text: str) -> Decimal:
    try:
        return parse_eur_rate(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--eur-per-scr") from None


def run_listening(name: str, run, config) -> None:
    """Run an HTTP server until stopped; say where it listens once it does (on stdout: what
    scripts wait for), and turn what stops it into a clear failure."""

    def on_ready(url: str) -> None:
        print(f"txagg {name} listening on {url}", flush=True)

    try:
        run(config, on_ready=on_ready)
    except StoreError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot listen on {config.host}:{config.port}: {error}") from None


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("userId", "field") else "right")
    for row in rows:
        table.add_row(*("" if cell is None else dumps(cell).strip('"') for cell in row))
    Console().print(table)


# ------------------------------------------------------------------ report / payouts / status


@app.command()
def report(
    user_id: Annotated[str, typer.Argument(help="The user's id, e.g. 074092.")],
    db: DbOption = None,
    json_: JsonOption = False,
    eur_per_scr: EurOption = str(DEFAULT_EUR_PER_SCR),
) -> None:
    """One user's balance, earned, spent, payout and paidOut."""
    rate = parse_rate(eur_per_scr)
    with open_store(db, read_only=True) as store:
        try:
            body = user_report(store, user_id, rate)
        except UnknownUser as error:
            raise fail(str(error), EXIT_NO_SUCH_USER) from None
        except NothingSynced as error:
            raise fail(str(error)) from None
    if wants_json(json_):
        print_json(body)
    else:
        print_table(f"user {user_id}", ["field", "value"], [[k, v] for k, v in body.items()])


@app.command()
def payouts(
    db: DbOption = None,
    json_: JsonOption = False,
    since: Annotated[
        Optional[str], typer.Option(help="Only payouts requested at or after this time (UTC).")
    ] = None,
    until: Annotated[
        Optional[str], typer.Option(help="Only payouts requested before this time (UTC).")
    ] = None,
) -> None:
    """The requested payouts, one row per user with all their payout requests added up."""
    since_ms = parse_instant(since, "--since")
    until_ms = parse_instant(until, "--until")
    with open_store(db, read_only=True) as store:
        body = payouts_report(store, since=since_ms, until=until_ms)
    if wants_json(json_):
        print_json(body)
    else:
        rows = [[item["userId"], item["amount"], item["count"]] for item in body["items"]]
        print_table(f"payouts (as of {body['asOf']})", ["userId", "amount", "count"], rows)


@app.command()
def status(
    db: DbOption = None,
    json_: JsonOption = False,
    rate_limit: StoreRateOption = None,
    per: StorePerOption = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="For monitoring: exit 4 when the store is more than 2 minutes behind, has "
            "discrepancies recorded, or its last run failed or ended early (status printed "
            "all the same).",
        ),
    ] = False,
) -> None:
    """Where sync stands: upstream, position, lag, counts, quarantine, conflicts, rate budget."""
    with open_store(db, read_only=True) as store:
        body = status_report(store, rate=rate_limit, per=per)
    if wants_json(json_):
        print_json(body)
    else:
        print_status_table(body)
    if check:
        try:
            check_health(body)
        except Unhealthy as error:
            raise fail(str(error), exit_code(error)) from None


def print_status_table(body: dict) -> None:
    rows = []
    for key, value in body.items():
        if isinstance(value, dict):
            rows.extend([f"{key}.{sub}", item] for sub, item in value.items())
        elif isinstance(value, list):
            rows.append([key, str(len(value))])
        else:
            rows.append([key, value])
    print_table("txagg status", ["field", "value"], [[k, _cell(v)] for k, v in rows])


def _cell(value: object) -> object:
    return dumps(value) if isinstance(value, (list, dict, bool)) else value


# ------------------------------------------------------------------ sync


@app.command()
@sync_options_from(FOLLOW_OPTIONS, UPSTREAM_OPTIONS)
def sync(
    api_url: ApiUrlOption = None,
    db: DbOption = None,
    json_: JsonOption = False,
    since: Annotated[
        Optional[str],
        typer.Option(
            help="Where a fresh store starts (UTC). Default: the beginning. Ignored, with a "
            "warning, once the store has a sync position."
        ),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep syncing until stopped.")] = False,
    rebind: Annotated[
        bool,
        typer.Option(
            "--rebind",
            help="Move the store to --api-url on purpose: it belongs to that upstream from its "
            "first answer on (the data already stored stays).",
        ),
    ] = False,
    sync_settings: dict | None = None,
) -> None:
    """Pull new transactions into the store, once (for cron) or --follow.

    The first sync binds the store to its upstream: later runs use it without --api-url and
    refuse another one unless --rebind."""
    from .sync import UpstreamError
    from .sync import sync as run_sync

    log_to_stderr()
    check_api_url(api_url)
    since_ms = parse_instant(since, "--since")
    if rebind and api_url is None:
        raise typer.BadParameter("--rebind needs the upstream to move to", param_hint="--api-url")
    options = resolve_options(db, api_url, sync_settings, rebind=rebind, since=since_ms)
    stop = stop_on_signals() if follow else threading.Event()
    with open_store(db, create=True) as store, _progress() as on_page:

        def on_error(message: str) -> None:
            print(f"Warning: {message}", file=sys.stderr)
            record_failure(store, message)

        try:
            summary = run_sync(
                store,
                options,
                follow=follow,
                stop=stop,
                on_page=recorder(store, options, on_page),
                on_error=on_error,
            )
        except SyncLocked as error:
            raise fail(str(error), exit_code(error)) from None
        except UpstreamError as error:
            record_failure(store, str(error))
            raise fail(str(error), exit_code(error)) from None
    if wants_json(json_):
        print_json(summary.as_dict())
    else:
        body = summary.as_dict()
        print_table("sync", ["field", "value"], [[k, _cell(v)] for k, v in body.items()])


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event: the work stops between two commits."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@app.command()
@sync_options_from(UPSTREAM_OPTIONS)
def verify(
    api_url: ApiUrlOption = None,
    db: DbOption = None,
    json_: JsonOption = False,
    since: Annotated[
        Optional[str],
        typer.Option(help="Start of the range (UTC). Default: the oldest stored transaction."),
    ] = None,
    until: Annotated[
        Optional[str], typer.Option(help="End of the range (UTC). Default: the sync position.")
    ] = None,
    sync_settings: dict | None = None,
) -> None:
    """Reconcile the stored history with the upstream window by window, and repair it.

    Exits 5 when it stops before the end of its range (--max-requests spent; run it again to
    resume), 130 when interrupted."""
    from .sync import UpstreamError
    from .verify import ReversedRange
    from .verify import verify as run_verify

    log_to_stderr()
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
    body = report.as_dict()
    if wants_json(json_):
        print_json(body)
    else:
        print_table("verify", ["field", "value"], [[k, _cell(v)] for k, v in body.items()])
    if not report.complete:
        if stop.is_set():
            raise fail("verify interrupted: run it again to resume", EXIT_INTERRUPTED)
        raise fail(
            "verify stopped before the end of its range (--max-requests spent): "
            "run it again to resume",
            EXIT_INCOMPLETE,
        )


class _progress:
    """A rich progress line on a terminal's stderr; nothing at all otherwise."""

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        task = self.progress.add_task("syncing")

        def on_page(summary) -> None:
            self.progress.update(
                task,
                description=f"{summary.pages} pages, {summary.new} new, "
                f"{summary.duplicates} duplicates, {summary.requests} requests",
            )

        return on_page

    def __exit__(self, *exc) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()


# ------------------------------------------------------------------ mock-serve / demo


@app.command()
@sync_options_from(FOLLOW_OPTIONS, UPSTREAM_OPTIONS)
def serve(
    db: DbOption = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' on every route but /healthz.",
            show_default=False,
        ),
    ] = None,
    max_age: Annotated[
        int,
        typer.Option(
            min=0, max=120, help="Cache-Control max-age (s); shrinks as the data ages past 2 min."
        ),
    ] = 30,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (for several cores).")] = 1,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Keep syncing in this process (from the store's upstream or --api-url).",
        ),
    ] = False,
    api_url: ApiUrlOption = None,
    eur_per_scr: EurOption = str(DEFAULT_EUR_PER_SCR),
    sync_settings: dict | None = None,
) -> None:
    """Serve the HTTP API over the store (--follow: and keep it synced, in one process)."""
    from .server import ServeConfig
    from .server import serve as run_server

    log_to_stderr()
    options = None
    if follow:
        check_api_url(api_url)
        options = resolve_options(db, api_url, sync_settings)
    try:
        config = ServeConfig(
            db=db or default_db_path(),
            host=host,
            port=port,
            token=token,
            max_age=max_age,
            workers=workers,
            follow=follow,
            sync_options=options,
            eur_per_scr=parse_rate(eur_per_scr),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    run_listening("serve", run_server, config)


def _time_scale(value: float) -> float:
    """mock-serve --time-scale: checked by the mock, refused as bad usage naming the option."""
    from .mock.config import check_time_scale

    try:
        return check_time_scale(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


@app.command("mock-serve")
def mock_serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    seed: Annotated[int, typer.Option(help="Same seed and options, same data.")] = 1,
    users: Annotated[int, typer.Option(min=1, help="How many users.")] = 100,
    history: Annotated[
        int, typer.Option(min=0, help="Transactions already in the past at start.")
    ] = 1000,
    history_span: Annotated[
        float, typer.Option(min=1.0, help="Seconds of past the history covers.")
    ] = 86400.0,
    tx_per_minute: Annotated[
        float, typer.Option(min=0.0, help="New transactions a minute while it runs.")
    ] = 0.0,
    rate_limit: RateOption = RATE_LIMIT,
    per: PerOption = PER_SECONDS,
    late_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of new transactions that arrive late.")
    ] = 0.0,
    late_max: Annotated[float, typer.Option(min=0.0, help="How late at most (seconds).")] = 0.0,
    invalid_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of extra invalid records served.")
    ] = 0.0,
    start: Annotated[
        Optional[str], typer.Option(help="Fix the clock anchor (UTC) for identical createdAt.")
    ] = None,
    faults: Annotated[
        str,
        typer.Option(
            help="Inject upstream faults, e.g. error=0.1,truncate=0.05 (see docs/mock.md)."
        ),
    ] = "",
    live_for: Annotated[
        Optional[float],
        typer.Option(min=0.0, help="Stop the live traffic this many seconds after start."),
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            callback=_time_scale,
            help="Run time N times faster: N times the --tx-per-minute, and --per, --late-max, "
            "--live-for and the --faults durations N times shorter (the history as given).",
        ),
    ] = 1.0,
) -> None:
    """Run the rate-limited fake Transaction API, with its ground truth at /users."""
    from .mock import MockConfig, serve

    try:
        config = MockConfig(
            host=host,
            port=port,
            seed=seed,
            users=users,
            history=history,
            history_span=history_span,
            tx_per_minute=tx_per_minute,
            rate_limit=rate_limit,
            per=per,
            late_ratio=late_ratio,
            late_max=late_max,
            invalid_ratio=invalid_ratio,
            start=parse_instant(start, "--start"),
            faults=faults,
            live_for=live_for,
            time_scale=time_scale,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    run_listening("mock-serve", serve, config)


@app.command()
def demo(
    db: Annotated[
        Optional[Path],
        typer.Option("--db", help="Store file, kept for the next run. Default: a temporary one."),
    ] = None,
) -> None:
    """A first run: start a mock upstream, sync it, show a report and the payouts.

    The demo's mock serves the same data every run, so a store kept with --db can be demoed
    again (its sync then finds nothing new); a store holding other data is refused.
    """
    from .demo import run_demo

    try:
        result = run_demo(db)
    except StoreError as error:
        raise fail(str(error)) from None
    except Exception as error:  # the demo must explain itself, never dump a traceback
        raise fail(f"demo failed: {error}") from None
    summary = result["sync"]
    print(f"Mock upstream: {result['upstream']} ({result['users']} users)")
    print(
        f"Synced {summary['new']} transactions in {summary['requests']} requests "
        f"({summary['pages']} pages) in {result['seconds']} s into {result['store']}"
    )
    report_body = result["report"]
    print_table(
        f"txagg report {report_body['userId']}",
        ["field", "value"],
        [[key, value] for key, value in report_body.items()],
    )
    rows = [[item["userId"], item["amount"], item["count"]] for item in result["payouts"]]
    print_table("txagg payouts (first 10)", ["userId", "amount", "count"], rows)
    if result["mismatches"]:
        raise fail(f"{len(result['mismatches'])} users differ from the mock's ground truth")
    print(f"All {result['users']} users match the mock's ground truth to the cent.")

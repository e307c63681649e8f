"""The ``txagg`` command line: thin commands that parse options, call the core, format results.

Core errors are exceptions; this edge turns them into a message on stderr and an exit code:
0 success, 1 failure, 2 bad usage, 3 no such user, 75 another sync holds the store.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .models import dumps, parse_time
from .report import DEFAULT_EUR_PER_SCR, UnknownUser, payouts_report, status_report, user_report
from .store import Store, StoreError, SyncLocked, default_db_path, explain

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_SUCH_USER = 3
EXIT_LOCKED = 75

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
DEFAULT_API_URL = "http://127.0.0.1:8000"
ApiUrlOption = Annotated[
    str, typer.Option(envvar="TXAGG_API_URL", help="The Transaction API's base URL.")
]
MaxRequestsOption = Annotated[
    Optional[int], typer.Option(min=1, help="Stop after this many upstream requests.")
]
TimeoutOption = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer.")]
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


# ------------------------------------------------------------------ helpers


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    print(f"Error: {message}", file=sys.stderr)
    return typer.Exit(code)


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
        rate = Decimal(text)
    except InvalidOperation:
        rate = Decimal(-1)
    if not rate.is_finite() or rate <= 0:
        raise typer.BadParameter(f"not a positive number: {text!r}", param_hint="--eur-per-scr")
    return rate


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
    rate_limit: RateOption = 5,
    per: PerOption = 60.0,
) -> None:
    """Where sync stands: position, lag, counts, quarantine, conflicts, rate budget."""
    with open_store(db, read_only=True) as store:
        body = status_report(store, rate=rate_limit, per=per)
    if wants_json(json_):
        print_json(body)
        return
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
def sync(
    api_url: ApiUrlOption = DEFAULT_API_URL,
    db: DbOption = None,
    json_: JsonOption = False,
    since: Annotated[
        Optional[str],
        typer.Option(help="Where a fresh store starts (UTC). Default: the beginning."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep syncing until stopped.")] = False,
    interval: IntervalOption = 30.0,
    rate_limit: RateOption = 5,
    per: PerOption = 60.0,
    overlap: OverlapOption = 300.0,
    settle: SettleOption = 5.0,
    check_every: Annotated[
        float, typer.Option(min=0.0, help="Seconds between late-arrival checks.")
    ] = 120.0,
    max_requests: MaxRequestsOption = None,
    date_format: DateFormatOption = DateFormat.sql,
    timeout: TimeoutOption = 30.0,
    retry_for: RetryForOption = 300.0,
) -> None:
    """Pull new transactions into the store, once (for cron) or --follow."""
    from .sync import SyncOptions, UpstreamError
    from .sync import sync as run_sync

    options = SyncOptions(
        api_url=api_url,
        since=parse_instant(since, "--since") or 0,
        rate_limit=rate_limit,
        per=per,
        overlap=overlap,
        settle=settle,
        max_requests=max_requests,
        date_format=date_format.value,
        timeout=timeout,
        retry_for=retry_for,
        interval=interval,
        check_every=check_every,
    )
    stop = stop_on_signals() if follow else threading.Event()
    with open_store(db, create=True) as store, _progress() as on_page:
        try:
            summary = run_sync(
                store,
                options,
                follow=follow,
                stop=stop,
                on_page=on_page,
                on_error=lambda message: print(f"Warning: {message}", file=sys.stderr),
            )
        except SyncLocked as error:
            raise fail(str(error), EXIT_LOCKED) from None
        except UpstreamError as error:
            raise fail(str(error)) from None
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
def verify(
    api_url: ApiUrlOption = DEFAULT_API_URL,
    db: DbOption = None,
    json_: JsonOption = False,
    since: Annotated[
        Optional[str],
        typer.Option(help="Start of the range (UTC). Default: the oldest stored transaction."),
    ] = None,
    until: Annotated[
        Optional[str], typer.Option(help="End of the range (UTC). Default: the sync position.")
    ] = None,
    rate_limit: RateOption = 5,
    per: PerOption = 60.0,
    max_requests: MaxRequestsOption = None,
    date_format: DateFormatOption = DateFormat.sql,
    timeout: TimeoutOption = 30.0,
    retry_for: RetryForOption = 300.0,
) -> None:
    """Reconcile the stored history with the upstream window by window, and repair it."""
    from .sync import SyncOptions, UpstreamError
    from .verify import NothingSynced, ReversedRange
    from .verify import verify as run_verify

    since_ms = parse_instant(since, "--since")
    until_ms = parse_instant(until, "--until")
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        raise typer.BadParameter(
            f"the start {since!r} is later than the end {until!r}",
            param_hint="'--since' / '--until'",
        )
    options = SyncOptions(
        api_url=api_url,
        rate_limit=rate_limit,
        per=per,
        max_requests=max_requests,
        date_format=date_format.value,
        timeout=timeout,
        retry_for=retry_for,
    )
    with open_store(db) as store:
        try:
            report = run_verify(store, options, since_ms, until_ms, stop=stop_on_signals())
        except SyncLocked as error:
            raise fail(str(error), EXIT_LOCKED) from None
        except (UpstreamError, NothingSynced) as error:
            raise fail(str(error)) from None
        except ReversedRange as error:  # checked above; kept for callers of the core
            raise fail(str(error), EXIT_USAGE) from None
    body = report.as_dict()
    if wants_json(json_):
        print_json(body)
    else:
        print_table("verify", ["field", "value"], [[k, _cell(v)] for k, v in body.items()])


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
        bool, typer.Option("--follow", help="Keep syncing from --api-url in this process.")
    ] = False,
    api_url: ApiUrlOption = DEFAULT_API_URL,
    interval: IntervalOption = 30.0,
    rate_limit: RateOption = 5,
    per: PerOption = 60.0,
    overlap: OverlapOption = 300.0,
    settle: SettleOption = 5.0,
    eur_per_scr: EurOption = str(DEFAULT_EUR_PER_SCR),
) -> None:
    """Serve the HTTP API over the store (--follow: and keep it synced, in one process)."""
    from .server import ServeConfig
    from .server import serve as run_server
    from .sync import SyncOptions

    options = None
    if follow:
        options = SyncOptions(
            api_url=api_url,
            rate_limit=rate_limit,
            per=per,
            overlap=overlap,
            settle=settle,
            interval=interval,
        )
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

    def on_ready(url: str) -> None:
        print(f"txagg serve listening on {url}", flush=True)

    try:
        run_server(config, on_ready=on_ready)
    except StoreError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot listen on {host}:{port}: {error}") from None


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
    rate_limit: RateOption = 5,
    per: PerOption = 60.0,
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
) -> None:
    """Run the rate-limited fake Transaction API, with its ground truth at /users."""
    from .mock_server import MockConfig, serve

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
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    def on_ready(url: str) -> None:
        print(f"txagg mock-serve listening on {url}", flush=True)

    try:
        serve(config, on_ready=on_ready)
    except OSError as error:
        raise fail(f"cannot listen on {host}:{port}: {error}") from None


@app.command()
def demo(
    db: Annotated[
        Optional[Path], typer.Option("--db", help="Store file. Default: a temporary one.")
    ] = None,
) -> None:
    """A first run: start a mock upstream, sync it, show a report and the payouts."""
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

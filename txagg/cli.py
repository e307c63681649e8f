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
from typer.core import TyperCommand

from . import __version__, logs, output
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
from .models import dumps, format_instant, parse_time
from .output import FORMAT_HELP, Format, default_format
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
from .settings import PAYOUTS_PAGE_MAX, PER_SECONDS, RATE_LIMIT
from .store import (
    Store,
    StoreError,
    SyncLocked,
    default_db_path,
    explain,
    is_postgres_url,
    store_exists,
)


class _Command(TyperCommand):
    """Help as click writes it: a required argument is USER_ID in the usage line and in its
    row (typer writes {USER_ID} and USER_ID <str>)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def format_options(self, ctx, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((param.metavar or record[0], record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _App(typer.Typer):
    """typer.Typer whose every command also gets the logging options (``logging_options``):
    -v/--verbose, -q/--quiet and --log-format belong to each command, after its own."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        register = super().command(*args, **kwargs)
        return lambda function: register(logging_options(function))


app = _App(
    name="txagg",
    no_args_is_help=True,  # the help is _main's
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"txagg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            expose_value=False,
            help="Print txagg's version and exit.",
        ),
    ] = False,
) -> None:
    """An exact, fresh, local copy of a rate-limited Transaction API, aggregated per user.

    Every option can also be set by the TXAGG_ variable its help names (the command line wins);
    -v, -q and --log-format, options of every command, say more, less, or in JSON on stderr."""


class DateFormat(StrEnum):
    sql = "sql"
    iso = "iso"


# Every option has a TXAGG_ variable: TXAGG_ and the option's name (--api-url: TXAGG_API_URL)
# wherever the option means the same; the command's name too where the same name means
# something else on another command (--since of payouts: TXAGG_PAYOUTS_SINCE), and
# TXAGG_MOCK_ for every option of mock-serve, the fake upstream (docs/cli.md lists them all).
DateFormatOption = Annotated[
    DateFormat,
    typer.Option(
        envvar="TXAGG_DATE_FORMAT",
        metavar="[sql|iso]",
        help="How window bounds are sent: sql (YYYY-MM-DD HH:MM:SS) or iso (ISO 8601).",
    ),
]


def _store_file(value: str | Path | None) -> Path | str | None:
    """--db, as given, into where the store is: a ``postgresql://`` URL stays a string (never a
    path), anything else is a file path; a folder is bad usage, said at once and naming the
    option. The one place a --db value is converted."""
    if value is None or is_postgres_url(value):
        return value
    path = Path(value)
    if path.is_dir():
        raise typer.BadParameter(
            f"{path} is a folder, not a store file: give a file in it, e.g. {path / 'txagg.db'}"
        )
    return path


DbOption = Annotated[
    Optional[str],
    typer.Option(
        "--db",
        envvar="TXAGG_DB",
        metavar="PATH_OR_URL",
        callback=_store_file,
        help="The store: a file (default: ~/.local/share/txagg/txagg.db), or a "
        "postgresql://USER@HOST:PORT/DATABASE URL (the postgres extra).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", envvar="TXAGG_JSON", help="The same as --format json.")
]
FormatOption = Annotated[
    Optional[Format],
    typer.Option(
        "--format",
        envvar="TXAGG_FORMAT",
        metavar=f"[{'|'.join(Format)}]",
        help=FORMAT_HELP,
        show_default=False,
    ),
]
RateOption = Annotated[  # mock-serve's own budget
    int,
    typer.Option(
        "--rate-limit",
        envvar="TXAGG_MOCK_RATE_LIMIT",
        metavar="N",
        min=1,
        help="Requests the mock answers per --per seconds before it answers 429.",
    ),
]
PerOption = Annotated[
    float,
    typer.Option(
        "--per",
        envvar="TXAGG_MOCK_PER",
        metavar="SECONDS",
        min=0.001,
        help="The period of --rate-limit, in seconds.",
    ),
]
# The budget a store was synced with is remembered: these default to it (binding.budget_for).
StoreRateOption = Annotated[
    Optional[int],
    typer.Option(
        "--rate-limit",
        envvar="TXAGG_RATE_LIMIT",
        metavar="N",
        min=1,
        help=f"Requests the upstream allows per --per seconds (default: the store's budget, "
        f"else {RATE_LIMIT}).",
        show_default=False,
    ),
]
StorePerOption = Annotated[
    Optional[float],
    typer.Option(
        "--per",
        envvar="TXAGG_PER",
        metavar="SECONDS",
        min=0.001,
        help=f"The period of --rate-limit, in seconds (default: the store's, else "
        f"{PER_SECONDS:g}).",
        show_default=False,
    ),
]
REMEMBERED = ("rate_limit", "per")  # options whose default is what the store remembers
ApiUrlOption = Annotated[
    Optional[str],
    typer.Option(
        envvar="TXAGG_API_URL",
        metavar="URL",
        help="The Transaction API's base URL (default: the store's own upstream, recorded by "
        "its first sync; there is no other).",
        show_default=False,
    ),
]
MaxRequestsOption = Annotated[
    Optional[int],
    typer.Option(
        envvar="TXAGG_MAX_REQUESTS",
        metavar="N",
        min=1,
        help="Stop after this many upstream requests.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_TIMEOUT",
        metavar="SECONDS",
        min=0.1,
        help="Seconds a whole request may take: connect, headers and body.",
    ),
]
RetryForOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_RETRY_FOR",
        metavar="SECONDS",
        min=0.0,
        help="Give up on a failing upstream after this many seconds.",
    ),
]
IntervalOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_INTERVAL",
        metavar="SECONDS",
        min=0.0,
        help="With --follow, the longest pause between two polls, in seconds.",
    ),
]
OverlapOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_OVERLAP",
        metavar="SECONDS",
        min=0.0,
        help="How far behind its position, in seconds, late arrivals are still caught.",
    ),
]
SettleOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_SETTLE",
        metavar="SECONDS",
        min=0.0,
        help="Read only up to this many seconds before now.",
    ),
]
EurOption = Annotated[
    str,
    typer.Option(
        "--eur-per-scr",
        envvar="TXAGG_EUR_PER_SCR",
        metavar="RATE",
        help="EUR paid out per SCR, for paidOut.",
    ),
]
CheckEveryOption = Annotated[
    float,
    typer.Option(
        envvar="TXAGG_CHECK_EVERY",
        metavar="SECONDS",
        min=0.0,
        help="Seconds between two late-arrival checks.",
    ),
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


def output_options(command):
    """Add the output options, defined once for every command that prints an answer
    (sqlite-utils' ``@output_options`` style): ``--format`` and its alias ``--json``, placed
    after ``--db``. The command gets the chosen ``output.Format`` as ``output_format``.

    The choice needs the command's context (where each option came from): the command's own
    ``typer.Context`` parameter if it has one, else one added here."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "output_format"]
    at = next((i + 1 for i, p in enumerate(own) if p.name == "db"), len(own))
    kind = own[at].kind if at < len(own) else inspect.Parameter.KEYWORD_ONLY
    added = [
        inspect.Parameter("format_", kind, annotation=FormatOption, default=None),
        inspect.Parameter("json_", kind, annotation=JsonOption, default=False),
    ]
    context = next((p.name for p in own if p.annotation is typer.Context), None)
    if context is None:
        added.append(
            inspect.Parameter("output_context", kind, annotation=typer.Context, default=None)
        )
    parameters = own[:at] + added + own[at:]

    @functools.wraps(command)
    def wrapper(**kwargs):
        where = kwargs[context] if context else kwargs.pop("output_context")
        chosen = chosen_format(kwargs.pop("format_"), kwargs.pop("json_"), where)
        return command(**kwargs, output_format=chosen)

    del wrapper.__wrapped__
    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def chosen_format(requested: Format | None, json_flag: bool, context: typer.Context) -> Format:
    """--format, else --json, else the default (``output.default_format``: a table on a
    terminal, JSON otherwise). --json with another --format is bad usage; when one of the two
    comes from the environment, the one on the command line wins."""
    if requested is None or requested is Format.json:
        return requested or default_format(terminal=not wants_json(json_flag))
    if not json_flag:
        return requested
    given = {
        name
        for name in ("format_", "json_")
        if getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"
    }
    if len(given) == 1:
        return requested if "format_" in given else Format.json
    raise typer.BadParameter(
        f"--json is --format json: it cannot go with --format {requested}",
        param_hint="'--format' / '--json'",
    )


# ------------------------------------------------------------------ helpers


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    say(logging.ERROR, message)
    return typer.Exit(code)


log = logging.getLogger("txagg.cli")


def say(level: int, message: str) -> None:
    """One line on stderr (``Error: ...``, ``Warning: ...``) through txagg's log handler, so
    it follows -q and --log-format; printed as it is when no command set the handler up."""
    if logs.handler() is None:
        print(f"{logging.getLevelName(level).capitalize()}: {message}", file=sys.stderr)
    else:
        log.log(level, message)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


VerboseOption = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        envvar="TXAGG_VERBOSE",
        help="Say more on stderr: -v adds a line per poll and per check (INFO), -vv DEBUG.",
        show_default=False,
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        envvar="TXAGG_QUIET",
        help="Say only errors on stderr: no warnings, no retry lines and no progress display.",
    ),
]
LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        envvar="TXAGG_LOG_FORMAT",
        metavar="[text|json]",
        help="How stderr lines are written: text, or JSON lines (ts, level, logger, message "
        "and the line's fields) for log shippers.",
    ),
]
LOGGING_OPTIONS = [
    ("verbose", VerboseOption, 0),
    ("quiet", QuietOption, False),
    ("log_format", LogFormatOption, LogFormat.text),
]


def logging_options(command):
    """Add -v/--verbose, -q/--quiet and --log-format to a command (``_App`` adds them to
    every command) and set up txagg's stderr lines from them before it runs."""
    signature = inspect.signature(command, eval_str=True)
    names = [name for name, _, _ in LOGGING_OPTIONS]
    own = [p for p in signature.parameters.values() if p.name not in names]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=value)
        for name, option, value in LOGGING_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        more, less, log_format = (kwargs.pop(name) for name in names)
        configure_logging(more - less, log_format, following=bool(kwargs.get("follow")))
        return command(**kwargs)

    del wrapper.__wrapped__
    wrapper.__signature__ = signature.replace(parameters=own + added)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    return wrapper


def configure_logging(verbosity: int, log_format: LogFormat, *, following: bool = False) -> None:
    """txagg's lines on stderr, pip-style: the verbosity is the -v count minus -q (so they
    cancel out). -1: errors only; 0: warnings too (and, for a command that --follow's with
    stderr not a terminal, a journal or a log file, the INFO line per poll and check); 1:
    INFO; 2: DEBUG (an internal error's traceback too)."""
    if verbosity < 0:
        level = logging.ERROR
    elif verbosity == 0:
        level = logging.INFO if following and not sys.stderr.isatty() else logging.WARNING
    else:
        level = logging.INFO if verbosity == 1 else logging.DEBUG
    logs.configure(level, log_format.value)


def quiet() -> bool:
    """-q was given: no warnings and no progress display."""
    return not logging.getLogger(logs.LOGGER).isEnabledFor(logging.WARNING)


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
        say(logging.WARNING, warning)
    return options


def resolve_options(db: Path | str | None, api_url: str | None, settings: dict, **kwargs):
    """``upstream_options`` for the store at ``db``, read without creating one."""
    location = db or default_db_path()
    try:
        exists = store_exists(location)
    except StoreError as error:
        raise fail(str(error)) from None
    if not exists:
        return upstream_options(None, api_url, settings, **kwargs)
    with open_store(location, create=True) as store:  # an empty file: sync makes a store there
        return upstream_options(store, api_url, settings, **kwargs)


def wants_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def show(view: output.View, body: dict, output_format: Format, **table_options) -> None:
    """Print an answer in ``output_format`` (``output.render``); a reader that stops early
    (``| head``) ends the command quietly."""
    try:
        for text in output.render(view, body, output_format, **table_options):
            sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        raise typer.Exit(EXIT_FAILURE) from None


@contextmanager
def open_store(
    db: Path | str | None, *, create: bool = False, read_only: bool = False
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
        raise typer.BadParameter(str(error), param_hint=f"'{option}'") from None


def parse_rate(text: str) -> Decimal:
    try:
        return parse_eur_rate(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--eur-per-scr'") from None


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
@output_options
def report(
    user_id: Annotated[str, typer.Argument(metavar="USER_ID", help="The user's id, e.g. 074092.")],
    db: DbOption = None,
    eur_per_scr: EurOption = str(DEFAULT_EUR_PER_SCR),
    output_format: Format = Format.json,
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
    show(output.REPORT, body, output_format)


@app.command()
@output_options
def payouts(
    db: DbOption = None,
    since: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_PAYOUTS_SINCE",
            metavar="TIME",
            help="Only payouts requested at or after this time (UTC).",
        ),
    ] = None,
    until: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_PAYOUTS_UNTIL",
            metavar="TIME",
            help="Only payouts requested before this time (UTC).",
        ),
    ] = None,
    limit: Annotated[
        Optional[int],
        typer.Option(
            envvar="TXAGG_PAYOUTS_LIMIT",
            metavar="N",
            min=1,
            max=PAYOUTS_PAGE_MAX,
            help="Only the first N users in userId order, as GET /payouts pages them (at most "
            f"{PAYOUTS_PAGE_MAX}; default: every user).",
            show_default=False,
        ),
    ] = None,
    output_format: Format = Format.json,
) -> None:
    """The requested payouts, one row per user with all their payout requests added up."""
    since_ms = parse_instant(since, "--since")
    until_ms = parse_instant(until, "--until")
    with open_store(db, read_only=True) as store:
        body = payouts_report(store, since=since_ms, until=until_ms, limit=limit)
    show(output.PAYOUTS, body, output_format, limit=limit)


@app.command()
@output_options
def status(
    db: DbOption = None,
    rate_limit: StoreRateOption = None,
    per: StorePerOption = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            envvar="TXAGG_CHECK",
            help="For monitoring: exit 4 when the store is more than 2 minutes behind, has "
            "discrepancies recorded, or its last run failed or ended early (the status is "
            "printed all the same).",
        ),
    ] = False,
    output_format: Format = Format.json,
) -> None:
    """Where sync stands: upstream, position, lag, counts, quarantine, conflicts, rate budget."""
    with open_store(db, read_only=True) as store:
        body = status_report(store, rate=rate_limit, per=per)
    show(output.STATUS, body, output_format)
    if check:
        try:
            check_health(body)
        except Unhealthy as error:
            raise fail(str(error), exit_code(error)) from None


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
    sync_settings: dict | None = None,
    output_format: Format = Format.json,
) -> None:
    """Pull new transactions into the store, once (for cron) or --follow.

    The first sync binds the store to its upstream: later runs use it without --api-url and
    refuse another one unless --rebind."""
    from .sync import UpstreamError
    from .sync import sync as run_sync

    check_api_url(api_url)
    since_ms = parse_instant(since, "--since")
    if rebind and api_url is None:
        raise typer.BadParameter("--rebind needs the upstream to move to", param_hint="'--api-url'")
    options = resolve_options(db, api_url, sync_settings, rebind=rebind, since=since_ms)
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
            saved = what_was_saved(store, stored_before)
            raise fail(f"sync interrupted: {saved}", EXIT_INTERRUPTED) from None
        if stop.is_set():
            display.stop()
            tell(f"stopped: {what_was_saved(store, stored_before)}")
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
    from .sync import UpstreamError
    from .verify import ReversedRange
    from .verify import verify as run_verify

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

        from .settings import TOKEN_MARGIN

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


def what_was_saved(store: Store, stored_before: int) -> str:
    """What a stopped run leaves (the cursor is committed with every page): how many
    transactions it stored and from which instant the next run continues."""
    stored = store.counters().get("transactions", 0)
    as_of = store.state_value("as_of")
    text = f"{_plural(stored - stored_before, 'new transaction')} stored ({stored:,} in the store)"
    if as_of is None:
        return f"{text}; the next run starts where this one did"
    return f"{text}; the next run continues from {format_instant(as_of)}"


def tell(message: str) -> None:
    """A note for the person at the terminal ("Stopped: ..."), else an INFO line (journal)."""
    if not sys.stderr.isatty():
        log.info(message)
    elif not quiet():
        print(message[:1].upper() + message[1:], file=sys.stderr)


# ------------------------------------------------------------------ mock-serve / demo


@app.command()
@sync_options_from(FOLLOW_OPTIONS, UPSTREAM_OPTIONS)
def serve(
    db: DbOption = None,
    host: Annotated[
        str,
        typer.Option(
            envvar="TXAGG_HOST",
            metavar="HOST",
            help="The interface to bind (0.0.0.0: every interface).",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_PORT",
            metavar="PORT",
            min=0,
            max=65535,
            help="The port to listen on (0: any free one).",
        ),
    ] = 8080,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_TOKEN",
            metavar="TOKEN",
            help="Require 'Authorization: Bearer TOKEN' on every route but /healthz.",
            show_default=False,
        ),
    ] = None,
    max_age: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_MAX_AGE",
            metavar="SECONDS",
            min=0,
            max=120,
            help="Cache-Control max-age in seconds, shrinking as the data ages past 2 minutes.",
        ),
    ] = 30,
    workers: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_WORKERS",
            metavar="N",
            min=1,
            help="How many server processes answer requests (for several cores).",
        ),
    ] = 1,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            envvar="TXAGG_SERVE_FOLLOW",
            help="Keep syncing in this process, from the store's upstream or --api-url.",
        ),
    ] = False,
    api_url: ApiUrlOption = None,
    eur_per_scr: EurOption = str(DEFAULT_EUR_PER_SCR),
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log",
            envvar="TXAGG_ACCESS_LOG",
            help="Log one line per request on stderr: client, request, status, bytes, time.",
        ),
    ] = False,
    sync_settings: dict | None = None,
) -> None:
    """Serve the HTTP API over the store (--follow: and keep it synced, in one process)."""
    from .server import ServeConfig
    from .server import serve as run_server

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
            access_log=access_log,
        )
    except ValueError as error:
        raise bad_config(error, ServeConfig) from None

    run_listening("serve", run_server, config)


def bad_config(error: ValueError, config_class: type) -> typer.BadParameter:
    """A server config's ValueError ("workers must be at least 1", "the token must not be
    empty") as bad usage naming the option it is about (the field its message starts with)."""
    import re
    from dataclasses import fields

    message = str(error)
    named = re.match(r"(?:the )?([a-z_]+)", message)
    known = {field.name for field in fields(config_class)}
    hint = f"'--{named[1].replace('_', '-')}'" if named and named[1] in known else None
    return typer.BadParameter(message, param_hint=hint)


def _time_scale(value: float) -> float:
    """mock-serve --time-scale: checked by the mock, refused as bad usage naming the option."""
    from .mock.config import check_time_scale

    try:
        return check_time_scale(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


@app.command("mock-serve")
def mock_serve(
    host: Annotated[
        str,
        typer.Option(envvar="TXAGG_MOCK_HOST", metavar="HOST", help="The interface to bind."),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_MOCK_PORT",
            metavar="PORT",
            min=0,
            max=65535,
            help="The port to listen on (0: any free one).",
        ),
    ] = 8000,
    seed: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_MOCK_SEED", metavar="N", help="Same seed and options, same data."
        ),
    ] = 1,
    users: Annotated[
        int, typer.Option(envvar="TXAGG_MOCK_USERS", metavar="N", min=1, help="How many users.")
    ] = 100,
    history: Annotated[
        int,
        typer.Option(
            envvar="TXAGG_MOCK_HISTORY",
            metavar="N",
            min=0,
            help="How many transactions are already in the past at start.",
        ),
    ] = 1000,
    history_span: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_HISTORY_SPAN",
            metavar="SECONDS",
            min=1.0,
            help="How many seconds of past the history covers.",
        ),
    ] = 86400.0,
    tx_per_minute: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_TX_PER_MINUTE",
            metavar="N",
            min=0.0,
            help="New transactions a minute while it runs.",
        ),
    ] = 0.0,
    rate_limit: RateOption = RATE_LIMIT,
    per: PerOption = PER_SECONDS,
    late_ratio: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_LATE_RATIO",
            metavar="RATIO",
            min=0.0,
            max=1.0,
            help="The share of new transactions that arrive late.",
        ),
    ] = 0.0,
    late_max: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_LATE_MAX",
            metavar="SECONDS",
            min=0.0,
            help="How late, in seconds, a late transaction arrives at most.",
        ),
    ] = 0.0,
    invalid_ratio: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_INVALID_RATIO",
            metavar="RATIO",
            min=0.0,
            max=1.0,
            help="The share of extra invalid records served.",
        ),
    ] = 0.0,
    start: Annotated[
        Optional[str],
        typer.Option(
            envvar="TXAGG_MOCK_START",
            metavar="TIME",
            help="Fix the clock anchor (UTC), for the same createdAt from run to run.",
        ),
    ] = None,
    faults: Annotated[
        str,
        typer.Option(
            envvar="TXAGG_MOCK_FAULTS",
            metavar="SPEC",
            help="Inject upstream faults, e.g. error=0.1,truncate=0.05 (see docs/mock.md).",
        ),
    ] = "",
    live_for: Annotated[
        Optional[float],
        typer.Option(
            envvar="TXAGG_MOCK_LIVE_FOR",
            metavar="SECONDS",
            min=0.0,
            help="Stop the live traffic this many seconds after start.",
        ),
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            envvar="TXAGG_MOCK_TIME_SCALE",
            metavar="N",
            callback=_time_scale,
            help="Run time N times faster: N times the --tx-per-minute, and --per, --late-max, "
            "--live-for and the --faults durations N times shorter (the history as given).",
        ),
    ] = 1.0,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log",
            envvar="TXAGG_MOCK_ACCESS_LOG",
            help="Log one line per request on stderr: client, request, status, bytes, time.",
        ),
    ] = False,
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
            access_log=access_log,
        )
    except ValueError as error:
        raise bad_config(error, MockConfig) from None

    run_listening("mock-serve", serve, config)


@app.command()
def demo(
    db: Annotated[
        Optional[str],
        typer.Option(
            "--db",
            envvar="TXAGG_DEMO_DB",
            metavar="PATH_OR_URL",
            callback=_store_file,
            help="A store file to keep for the next run (default: a temporary one).",
            show_default=False,
        ),
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

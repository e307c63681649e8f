"""What the commands share: option types and groups (defaults from the core, each defined
once), the output options, logging set-up, and the helpers that open stores, resolve the
upstream, print results and turn core errors into exit codes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import logs, output
from ..binding import normalise_url, options_for
from ..errors import (
    EXIT_FAILURE,
    BadUpstreamUrl,
    NoUpstream,
    OtherUpstream,
    exit_code,
)
from ..models import dumps, parse_time
from ..output import FORMAT_HELP, Format, default_format
from ..report import (
    parse_eur_rate,
)
from ..settings import PER_SECONDS, RATE_LIMIT
from ..store import (
    Store,
    StoreError,
    default_db_path,
    explain,
    is_postgres_url,
    store_exists,
)


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

        from ..sync import SyncOptions

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

"""``serve``, ``mock-serve`` and ``demo``: the HTTP servers and the one-command tour."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..report import (
    DEFAULT_EUR_PER_SCR,
)
from ..settings import PER_SECONDS, RATE_LIMIT
from ..store import (
    StoreError,
    default_db_path,
)
from .app import app
from .common import (
    FOLLOW_OPTIONS,
    UPSTREAM_OPTIONS,
    ApiUrlOption,
    DbOption,
    EurOption,
    PerOption,
    RateOption,
    _store_file,
    check_api_url,
    fail,
    parse_instant,
    parse_rate,
    print_table,
    resolve_options,
    run_listening,
    sync_options_from,
)

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
    from ..server import ServeConfig
    from ..server import serve as run_server

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
    from ..mock.config import check_time_scale

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
    from ..mock import MockConfig, serve

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
    from ..demo import run_demo

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

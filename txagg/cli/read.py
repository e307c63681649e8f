"""``report``, ``payouts`` and ``status``: the answers from the store."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import output
from ..errors import (
    EXIT_NO_SUCH_USER,
    NothingSynced,
    Unhealthy,
    exit_code,
)
from ..output import Format
from ..report import (
    DEFAULT_EUR_PER_SCR,
    UnknownUser,
    check_health,
    payouts_report,
    status_report,
    user_report,
)
from ..settings import PAYOUTS_PAGE_MAX
from .app import app
from .common import (
    DbOption,
    EurOption,
    StorePerOption,
    StoreRateOption,
    fail,
    open_store,
    output_options,
    parse_instant,
    parse_rate,
    show,
)

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

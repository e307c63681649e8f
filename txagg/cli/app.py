"""The typer application: its command class (click-style help), the logging options every
command gets, ``--version``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand

from .. import __version__
from .common import logging_options


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

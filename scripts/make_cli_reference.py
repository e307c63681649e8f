"""Write docs/cli.md from the commands' own --help (tests/test_docs.py fails when they drift).

python scripts/make_cli_reference.py
"""

from __future__ import annotations

from pathlib import Path

import typer.main
from typer.testing import CliRunner

from txagg.cli import app

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
INTRO = """# txagg command-line reference

Generated from `txagg --help` by `python scripts/make_cli_reference.py`; a test fails when this
page and the commands drift apart. Exit codes: `0` success, `1` failure (message on stderr),
`2` bad usage (a bad `--api-url`, no upstream, or another upstream than the store's), `3` no
such user, `4` `status --check` found the store unhealthy, `5` `verify` stopped before the end
of its range (run it again to resume), `75` another sync holds the store (try again later),
`130` interrupted.

`sync`, `verify` and `serve --follow` have no default `--api-url`: the first `sync` binds the
store to its upstream, later runs use that one and refuse another unless `sync --rebind`. They
also default `--rate-limit` / `--per` to the budget the store was last synced with.

`report`, `payouts`, `status`, `verify` and `sync` print a table when stdout is a terminal and
JSON otherwise, as they always did; `--format table|json|ndjson|csv` (env `TXAGG_FORMAT`) picks
one, and `--json` is `--format json`. Tables show money with two decimals and times in UTC with
how long ago; `ndjson` is one object a line (`payouts`: one per user); `csv` a header row, then
one row per payout or for the answer. docs/design.md ("Output formats") has the details.
"""

CONVENTIONS = """## Conventions

Every command takes `-h` as well as `--help`; `txagg --version` prints the version. Shell
completion (bash, zsh, fish, PowerShell): `txagg --install-completion` installs it for the
current shell, `txagg --show-completion` prints the script to install by hand.

**Environment variables.** Every option can be set by a `TXAGG_` variable instead, named in the
command's help and in the table under it; an option on the command line wins over its variable.
The variable is `TXAGG_` and the option's name (`--api-url`: `TXAGG_API_URL`) wherever the
option means the same thing. Where one name means different things on different commands the
command's name is added: `--since` is `TXAGG_PAYOUTS_SINCE`, `TXAGG_SYNC_SINCE` or
`TXAGG_VERIFY_SINCE`, `--follow` `TXAGG_SYNC_FOLLOW` or `TXAGG_SERVE_FOLLOW`, and demo's `--db`
`TXAGG_DEMO_DB`. The options of `mock-serve`, the fake upstream, are `TXAGG_MOCK_` and their
name (`TXAGG_MOCK_PORT`), so that settings meant for the real upstream never reach it (the
logging options aside, the same for every command). A flag's
variable takes `1`/`true`/`yes` or `0`/`false`/`no`; `TXAGG_VERBOSE=2` is `-vv`. One variable
has no option: `TXAGG_DEBUG=1` shows the traceback of an internal error (as `-vv` does).

**Logging.** stdout is the result; what a command says while it works goes to stderr, one line
each. `-v`/`--verbose`, `-q`/`--quiet` and `--log-format` are options of every command, given
after its name like the others (`txagg sync --follow -v`):

- by default: errors (`Error: ...`) and warnings, such as each retry of an upstream that does
  not answer (`Warning: upstream unreachable: connection refused; retry 3 in 8 s`), a 429's
  wait, counts that lie;
- `sync --follow` and `serve --follow` with stderr not a terminal (a journal, a log file) also
  write one line per poll (the window read, pages, records, new transactions, lag, requests)
  and one per late-arrival check (its window, the upstream's count against the store's, what
  was repaired):
  `Info: 2024-05-01T12:00:05.120Z poll: window 2024-05-01T11:59:30Z..2024-05-01T12:00:00Z,
  1 page, 12 records, 12 new, lag 5 s, 1 request`;
- `-v` shows those INFO lines on a terminal and for every command, `-vv` DEBUG lines too (and an
  internal error's traceback); `-q` shows errors only (no warnings, no progress display);
  `-q -v` cancel out, as in pip;
- `--log-format json` writes JSON lines for log shippers: `ts`, `level`, `logger`, `message`
  and the line's fields (`event` is `poll`, `check` or `access`, with their figures:
  `windowStart`, `new`, `lagSeconds`, `requests`, `upstream`, `stored`, `repairedTo`, ...).

`serve --access-log` and `mock-serve --access-log` (off by default) add one line per request,
whatever the level: `Info: 2024-05-01T12:00:05.311Z 127.0.0.1 "GET /users/074092 HTTP/1.1" 200
231 0.4 ms`.

**Progress.** `sync` with stderr on a terminal (and no `-q`) shows a progress line there: when
the upstream gives a count (`meta.totalItems`), the share of the window read, a percentage and
an ETA at the budget's pace; the wait for the rate budget (`next request in 11 s`); the run's
counts. Every page is committed with the cursor, so Ctrl-C loses nothing: `sync` says how many
transactions it stored and from which instant the next run continues, and exits 130
(`--follow` stops between two commits, says the same, prints its summary and exits 0).
"""


def variables(name: str) -> str:
    """The table of a command's options and their variables."""
    command = typer.main.get_command(app).commands[name]
    rows = ["| option | variable |", "| --- | --- |"]
    for param in command.params:
        if param.param_type_name != "option":
            continue
        option = ", ".join(f"`{opt}`" for opt in sorted(param.opts, key=len))
        envvar = param.envvar if isinstance(param.envvar, str) else None
        rows.append(f"| {option} | {f'`{envvar}`' if envvar else '(none)'} |")
    return "\n".join(rows) + "\n"


def help_text(*command: str) -> str:
    result = CliRunner().invoke(
        app,
        [*command, "--help"],
        prog_name="txagg",
        terminal_width=100,
        env={"COLUMNS": "100", "NO_COLOR": "1"},
    )
    return result.output.rstrip() + "\n"


def reference() -> str:
    parts = [INTRO, CONVENTIONS, "## txagg\n", "```\n" + help_text() + "```\n"]
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        parts.append(f"## txagg {name}\n")
        parts.append("```\n" + help_text(name) + "```\n")
        parts.append(variables(name))
    return "\n".join(parts)


if __name__ == "__main__":
    REFERENCE.write_text(reference())
    print(f"wrote {REFERENCE}")

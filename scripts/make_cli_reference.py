"""Write docs/cli.md from the commands' own --help (tests/test_docs.py fails when they drift).

python scripts/make_cli_reference.py
"""

from __future__ import annotations

from pathlib import Path

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
"""


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
    parts = [INTRO, "## txagg\n", "```\n" + help_text() + "```\n"]
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        parts.append(f"## txagg {name}\n")
        parts.append("```\n" + help_text(name) + "```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    REFERENCE.write_text(reference())
    print(f"wrote {REFERENCE}")

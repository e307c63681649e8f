"""docs/operations.md and the systemd units under docs/systemd: every txagg command and option
they use is real, the restart policies follow the exit codes, systemd accepts the units, the
alert rules name real metrics, and the backup example makes a usable copy of a live store."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from txagg.errors import EXIT_FAILURE, EXIT_LOCKED, EXIT_USAGE
from txagg.store import Store
from txagg.testing import txagg_command

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
UNITS = ROOT / "docs" / "systemd"
UNIT_COMMANDS = {"txagg-sync.service": "sync", "txagg-serve.service": "serve"}
INSTALLED = "/usr/local/bin/txagg"  # where the documented pipx install puts the command

# Documented while the option is being added to the command: checked like any other as soon as
# the command's --help lists it.
AHEAD_OF_THE_COMMAND = {("status", "--check")}


# ------------------------------------------------------------------ helpers


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: keep each setting on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start(path: Path) -> list[str]:
    (line,) = parse_unit(path)["Service"]["ExecStart"]
    return shlex.split(line)


@functools.cache
def raw_help(*command: str) -> str:
    """``txagg [COMMAND] --help`` as printed."""
    result = subprocess.run(
        txagg_command(*command, "--help"), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def help_text(command: str) -> str:
    """``txagg COMMAND --help``, whitespace collapsed (the help wraps at the terminal width)."""
    return " ".join(raw_help(command).split())


def options_of(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text(command)))


@functools.cache
def commands() -> frozenset[str]:
    listing = raw_help().split("Commands:", 1)[1]
    return frozenset(re.findall(r"^  ([a-z][a-z-]*)  ", listing, flags=re.MULTILINE))


def check_options(command: str, words: list[str], where: str) -> None:
    assert command in commands(), f"{where}: 'txagg {command}' is not a txagg command"
    for word in words:
        if not word.startswith("--"):
            continue
        option = word.split("=", 1)[0]
        if (command, option) in AHEAD_OF_THE_COMMAND and option not in options_of(command):
            continue
        assert option in options_of(command), f"{where}: 'txagg {command}' has no {option}"


def fenced_blocks(language: str | None = None) -> list[str]:
    text = OPERATIONS.read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    return [body for lang, body in blocks if language is None or lang == language]


def documented_invocations() -> list[tuple[str, list[str], str]]:
    """Every ``txagg COMMAND ...`` in operations.md's code blocks and inline code:
    (command, the words after it up to a shell operator, the line)."""
    text = OPERATIONS.read_text()
    lines = [line for block in fenced_blocks() for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S))
    found = []
    for line in lines:
        for match in re.finditer(r"(?:^|[\s/'])txagg\s+([a-z][a-z-]*)([^|;>&'\n]*)", line):
            if match[1] in commands():
                found.append((match[1], match[2].split(), line))
    return found


def txagg_script() -> str:
    """An executable that runs this checkout's txagg: the environment's own script, or a
    wrapper around ``python -m txagg``."""
    script = Path(sys.executable).with_name("txagg")
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("txagg")
    return found or ""


# ------------------------------------------------------------------ the units


def test_the_units_exist_and_run_real_txagg_commands_and_options():
    for name, command in UNIT_COMMANDS.items():
        path = UNITS / name
        assert path.is_file(), f"docs/systemd/{name} is missing"
        assert f"(systemd/{name})" in OPERATIONS.read_text(), f"operations.md must link {name}"
        argv = exec_start(path)
        assert argv[0] == INSTALLED, f"{name}: ExecStart must run {INSTALLED}"
        assert argv[1] == command
        check_options(command, argv[2:], name)
    assert "--follow" in exec_start(UNITS / "txagg-sync.service")


def test_the_units_environment_is_read_by_their_command():
    for name, command in UNIT_COMMANDS.items():
        service = parse_unit(UNITS / name)["Service"]
        variables = re.findall(r"\b(TXAGG_[A-Z_]+)=", " ".join(service.get("Environment", [])))
        assert "TXAGG_DB" in variables
        for variable in variables:
            assert f"env var: {variable}" in help_text(command), f"{name}: {variable}"


def test_the_restart_policies_follow_the_exit_codes():
    for name in UNIT_COMMANDS:
        service = parse_unit(UNITS / name)["Service"]
        assert service["Restart"] == ["on-failure"], name
        assert int(service["RestartSec"][0]) > 0, name
        prevented = {int(code) for code in " ".join(service["RestartPreventExitStatus"]).split()}
        assert EXIT_USAGE in prevented, f"{name}: a usage error is not fixed by restarting"
        assert EXIT_FAILURE not in prevented, f"{name}: failures (exit 1) must restart"
        assert parse_unit(UNITS / name)["Install"]["WantedBy"] == ["multi-user.target"]
    sync = parse_unit(UNITS / "txagg-sync.service")["Service"]
    assert str(EXIT_LOCKED) in sync["RestartPreventExitStatus"][0].split()


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed here, so the units cannot be verified by systemd",
)
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path):
    """The units as shipped, with ExecStart pointing at this checkout's txagg (systemd checks
    that the binary exists and is executable)."""
    binary = txagg_script()
    if not binary:
        binary = str(tmp_path / "txagg")
        Path(binary).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m txagg "$@"\n')
        Path(binary).chmod(0o755)
    copies = []
    for name in UNIT_COMMANDS:
        text = (UNITS / name).read_text()
        assert f"ExecStart={INSTALLED} " in text
        copy = tmp_path / name
        copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={binary} "))
        copies.append(copy)

    def verify(*paths: Path) -> tuple[int, list[str]]:
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).splitlines()
        about_ours = [line for line in output if any(p.name in line for p in paths)]
        return result.returncode, about_ours

    code, complaints = verify(*copies)
    assert code == 0 and complaints == [], complaints

    # The check is real here: a unit whose command does not exist is refused.
    broken = tmp_path / "broken" / "txagg-sync.service"
    broken.parent.mkdir()
    broken.write_text(copies[0].read_text().replace(binary, str(tmp_path / "no-such-txagg")))
    code, complaints = verify(broken)
    assert code != 0 and complaints, "systemd-analyze verify did not notice a missing binary"


# ------------------------------------------------------------------ operations.md


def test_every_txagg_command_in_operations_md_is_real():
    invocations = documented_invocations()
    assert {command for command, _, _ in invocations} >= {"sync", "serve", "status", "verify"}
    for command, words, line in invocations:
        check_options(command, words, line)


def test_the_cron_lines_use_the_installed_command_and_log_stderr():
    cron = [
        line
        for block in fenced_blocks()
        for line in block.splitlines()
        if re.match(r"^(\*|\d+|\*/\d+) ", line) and " txagg " in line
    ]
    assert any(" sync " in line for line in cron)
    for line in cron:
        assert line.split()[5] == "txagg", f"run as the txagg user: {line}"
        assert f"{INSTALLED} " in line, f"cron's PATH is short: use {INSTALLED}: {line}"
        # stderr goes to the log with stdout, or (a check) to cron's mail on failure
        assert "2>&1" in line or "||" in line, f"stderr is not logged: {line}"


def test_the_environment_variables_in_operations_md_exist():
    text = OPERATIONS.read_text()
    supported = set()
    for command in commands():
        supported |= set(re.findall(r"env var: (TXAGG_[A-Z_]+)", help_text(command)))
    main = (ROOT / "txagg" / "__main__.py").read_text()
    supported |= set(re.findall(r'"(TXAGG_[A-Z_]+)"', main))  # read outside the options
    assert set(re.findall(r"\bTXAGG_[A-Z_]+\b", text)) <= supported
    assert supported <= set(re.findall(r"\bTXAGG_[A-Z_]+\b", text)), "document every variable"


def exposed_metric_names() -> set[str]:
    """Every sample name txagg serve's /metrics can show, from its own collector."""
    from txagg.server.metrics import Metrics

    facts = dict.fromkeys(
        ("lag", "as_of", "transactions", "users", "quarantined", "conflicts"), 1.0
    )
    facts.update(requests=1, throttled=1)
    metrics = Metrics(lambda: facts, lambda: 0)
    metrics.observe("/users/{userId}", "GET", 200, 0.001)
    text = metrics.exposition().decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()}


def test_the_alert_rules_use_real_metric_names():
    (rules,) = [block for block in fenced_blocks("yaml") if "groups:" in block]
    used = set(re.findall(r"\btxagg_[a-z_]+", rules))
    assert {"txagg_sync_lag_seconds", "txagg_sync_errors_total"} <= used
    assert used <= exposed_metric_names()
    try:
        import yaml
    except ImportError:
        return
    (group,) = yaml.safe_load(rules)["groups"]
    for rule in group["rules"]:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
    for block in fenced_blocks("yaml"):
        yaml.safe_load(block)


def test_the_backup_example_copies_a_live_store(tmp_path: Path):
    """operations.md's Python backup, run while a connection still holds the last commit in
    the -wal: the copy is a store on its own, with that commit."""
    (example,) = fenced_blocks("python")
    live, backups = tmp_path / "live" / "txagg.db", tmp_path / "backups"
    backups.mkdir()
    assert '"/var/lib/txagg/txagg.db"' in example and "/var/backups/txagg/" in example
    example = example.replace("/var/lib/txagg/txagg.db", str(live))
    example = example.replace("/var/backups/txagg/", f"{backups}/")
    record = {
        "id": "00000000-0000-4000-8000-000000000001",
        "userId": "074092",
        "createdAt": "2023-03-16T12:33:11.000Z",
        "type": "payout",
        "amount": Decimal("30"),
    }
    with Store.open(live) as store:
        store.ingest([record])
        assert Path(f"{live}-wal").stat().st_size > 0  # the commit is still in the -wal
        result = subprocess.run(
            [sys.executable, "-c", example], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    (copy,) = backups.glob("txagg-*.db")
    assert not Path(f"{copy}-wal").exists() or Path(f"{copy}-wal").stat().st_size == 0
    with Store.open(copy, create=False, read_only=True) as restored:
        totals = restored.user_totals("074092")
        assert totals is not None and totals.payout == 3000

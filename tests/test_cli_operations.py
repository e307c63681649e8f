"""The command line's conventions and what it says while it works: --version, -h, shell
completion, metavars, option errors, a TXAGG_ variable for every option, -v/-q/--log-format,
the line per poll and per check, the access logs, and sync's progress and Ctrl-C on a real
terminal (a pseudo-terminal). Every test taking ``filled`` or ``either_location`` runs on a
SQLite file and on a PostgreSQL store."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import typer.main
from conftest import record
from typer.testing import CliRunner

import txagg
from txagg.cli import app
from txagg.store import Store
from txagg.testing import txagg_command

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "cli.md"
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there
FAST = ("--rate-limit", "1000", "--per", "1", "--settle", "0")
runner = CliRunner()


def invoke(*args, env: dict | None = None):
    """The command in-process, with no TXAGG_ variable but those of ``env``."""
    environment = no_txagg_env(**(env or {}))
    return runner.invoke(app, [str(a) for a in args], prog_name="txagg", env=environment)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess (stdout a pipe), with no TXAGG_ variable but ``env``."""
    return subprocess.run(
        txagg_command(*args), capture_output=True, text=True, env=clean_env(**env), timeout=120
    )


def commands() -> dict:
    return typer.main.get_command(app).commands


def options_of(command) -> list:
    return [p for p in command.params if p.param_type_name == "option"]


def clean_env(**extra: str) -> dict:
    """This environment without any TXAGG_ variable, plus ``extra`` (for a subprocess)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TXAGG_")}
    return {**env, **extra}


def no_txagg_env(**extra: str) -> dict:
    """The same for CliRunner, whose ``env`` changes the environment: None removes."""
    return {**{name: None for name in os.environ if name.startswith("TXAGG_")}, **extra}


@pytest.fixture(autouse=True)
def _leave_logging_as_it_was():
    """The commands run here in-process set the txagg logger up: undo it afterwards."""
    import logging

    logger = logging.getLogger("txagg")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logging.getLogger("txagg.access").setLevel(logging.NOTSET)


@pytest.fixture
def filled(either_location):
    """A filled store on each backend in turn: what ``--db`` takes (a path, or a URL)."""
    with Store.open(either_location) as store:
        store.ingest(
            [
                record(1, user="074092", kind="earned", amount=Decimal("1.2"), at_s=0),
                record(2, user="074092", kind="payout", amount=Decimal("30"), at_s=2),
            ],
            state={"as_of": 1_700_000_100_000, "position": 1_700_000_100_000},
        )
    return either_location


# ------------------------------------------------------------------ conventions


def test_version_comes_from_the_package():
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"txagg {txagg.__version__}\n")
    assert metadata.version("txagg") == txagg.__version__  # pyproject and __init__ agree
    real = run("--version")
    assert (real.returncode, real.stdout) == (0, result.stdout)


def test_h_is_help_everywhere():
    assert invoke("-h").stdout == invoke("--help").stdout
    assert "-h, --help" in invoke("-h").stdout
    for name in commands():
        short, long = invoke(name, "-h"), invoke(name, "--help")
        assert short.exit_code == 0 and short.stdout == long.stdout, name
        assert "-h, --help" in short.stdout, name


def test_shell_completion_is_enabled_and_completes_commands():
    group = invoke("--help").stdout
    assert "--install-completion" in group and "--show-completion" in group
    script = run("--show-completion", "bash", SHELL="/bin/bash")
    assert script.returncode == 0 and "_TXAGG_COMPLETE" in script.stdout, script.stderr
    completed = subprocess.run(
        txagg_command(),
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "_TXAGG_COMPLETE": "complete_bash",
            "COMP_WORDS": "txagg sy",
            "COMP_CWORD": "1",
        },
    )
    assert "sync" in completed.stdout.split(), completed


def test_help_shows_metavars_as_click_users_expect():
    texts = {name: invoke(name, "--help").stdout for name in commands()}
    for name, text in texts.items():
        for typer_style in ("<str>", "<int", "<float", "<path>"):
            assert typer_style not in text, (name, typer_style)
        assert "{" not in text.splitlines()[0], name  # Usage: ... USER_ID, not {USER_ID}
    assert "Usage: txagg report [OPTIONS] USER_ID" in texts["report"]
    sync = " ".join(texts["sync"].split())
    for shown in (
        "--api-url URL",
        "--rate-limit N",
        "--per SECONDS",
        "--since TIME",
        "--interval SECONDS",
        "--max-requests N",
        "--date-format [sql|iso]",
        "--log-format [text|json]",
        "-v, --verbose",
        "-q, --quiet",
    ):
        assert shown in sync, shown
    assert re.search(r"--db [A-Z_]+ ", texts["sync"])
    assert "--port PORT" in texts["serve"] and "--faults SPEC" in texts["mock-serve"]


# Options whose help is written elsewhere: --format's is output.FORMAT_HELP.
HELP_WRITTEN_ELSEWHERE = {"--format"}


def test_every_option_has_one_sentence_of_help():
    for name, command in commands().items():
        for option in options_of(command):
            if option.name == "help" or set(option.opts) & HELP_WRITTEN_ELSEWHERE:
                continue
            assert option.help, (name, option.opts)
            text = option.help.strip()
            assert text.endswith("."), (name, option.opts, text)
            assert not re.search(r"[.!?]\s+[A-Z]", text), (name, option.opts, text)


@pytest.mark.parametrize(
    "args, option",
    [
        (["sync", "--rate-limit", "0"], "'--rate-limit'"),
        (["sync", "--per", "-1"], "'--per'"),
        (["status", "--per", "0"], "'--per'"),
        (["sync", "--api-url", DEAD, "--since", "garbage"], "'--since'"),
        (["payouts", "--since", "last tuesday"], "'--since'"),
        (["verify", "--until", "soon"], "'--until'"),
        (["sync", "--interval", "-1"], "'--interval'"),
        (["sync", "--date-format", "klingon"], "'--date-format'"),
        (["sync", "--log-format", "xml"], "'--log-format'"),
        (["serve", "--workers", "0"], "'--workers'"),
        (["serve", "--token", ""], "'--token'"),
        (["mock-serve", "--users", "9999999"], "'--users'"),
        (["mock-serve", "--start", "garbage"], "'--start'"),
        (["report", "074092", "--eur-per-scr", "-1"], "'--eur-per-scr'"),
    ],
)
def test_a_bad_value_is_bad_usage_naming_the_option(args, option, tmp_path):
    store = [] if args[0] == "mock-serve" else ["--db", tmp_path / "s.db"]
    result = invoke(*args, *store)
    assert result.exit_code == 2, result.output
    assert option in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [["report", "074092"], ["payouts"], ["status"], ["sync", "--api-url", DEAD], ["demo"]],
)
def test_a_folder_for_db_is_bad_usage_naming_the_option(args, tmp_path):
    result = invoke(*args, "--db", tmp_path)
    assert result.exit_code == 2, result.output
    assert "'--db'" in result.stderr and "is a folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_fast_path_leaves_a_folder_for_db_to_the_full_cli(tmp_path):
    result = run("report", "074092", "--json", "--db", str(tmp_path))
    assert result.returncode == 2 and "'--db'" in result.stderr, result.stderr


# ------------------------------------------------------------------ environment variables


def reference_sections() -> dict[str, str]:
    """docs/cli.md's text under each '## txagg COMMAND' heading."""
    parts = re.split(r"^## txagg ([a-z-]+)\n", REFERENCE.read_text(), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


LOGGING_OPTIONS = {"--verbose", "--quiet", "--log-format"}  # every command's, the same


def test_every_option_of_every_command_has_a_variable_shown_and_documented():
    sections = reference_sections()
    meaning: dict[str, set[str]] = {}
    for name, command in commands().items():
        help_text = " ".join(invoke(name, "--help").stdout.split())
        section = sections[name]
        seen = set()
        for option in options_of(command):
            if option.name == "help":
                continue
            variable = option.envvar
            long = max(option.opts, key=len)
            assert isinstance(variable, str), f"txagg {name} {long} has no variable"
            assert re.fullmatch(r"TXAGG_[A-Z_]+", variable), variable
            # TXAGG_, maybe the command, then the option's own name
            assert variable.endswith(long[2:].upper().replace("-", "_")), (name, long)
            if name == "mock-serve" and long not in LOGGING_OPTIONS:
                assert variable.startswith("TXAGG_MOCK_"), (long, variable)
            assert f"env var: {variable}" in help_text, (name, long)
            row = rf"\| (`-\w`, )?`{re.escape(long)}` \| `{variable}` \|"
            assert re.search(row, section), (name, long)
            assert variable not in seen, (name, variable)
            seen.add(variable)
            meaning.setdefault(variable, set()).add(long)
    # One variable is one option, whichever command reads it.
    assert {variable: opts for variable, opts in meaning.items() if len(opts) > 1} == {}
    for shared in ("TXAGG_DB", "TXAGG_API_URL", "TXAGG_RATE_LIMIT", "TXAGG_LOG_FORMAT"):
        assert shared in meaning


def test_a_variable_sets_its_option_and_the_command_line_wins(filled):
    told = invoke("status", "--db", filled, "--json", env={"TXAGG_RATE_LIMIT": "9"})
    assert told.exit_code == 0 and json.loads(told.stdout)["rateBudget"]["limit"] == 9
    both = invoke(
        "status", "--db", filled, "--json", "--rate-limit", "7", env={"TXAGG_RATE_LIMIT": "0"}
    )
    assert both.exit_code == 0 and json.loads(both.stdout)["rateBudget"]["limit"] == 7
    bad = invoke("status", "--db", filled, env={"TXAGG_RATE_LIMIT": "0"})
    assert bad.exit_code == 2 and "TXAGG_RATE_LIMIT" in bad.stderr
    later = invoke("payouts", "--db", filled, "--json", env={"TXAGG_PAYOUTS_SINCE": "2030-01-01"})
    assert later.exit_code == 0 and json.loads(later.stdout)["items"] == []
    # The same name on another command is another variable.
    assert invoke("payouts", "--db", filled, "--json", env={"TXAGG_SYNC_SINCE": "x"}).exit_code == 0


# ------------------------------------------------------------------ logging


def test_quiet_hides_the_retry_lines_but_not_the_error(either_location):
    db = str(either_location)
    loud = run("sync", "--db", db, "--api-url", DEAD, "--retry-for", "2.5")
    assert "Warning: upstream unreachable" in loud.stderr
    quiet = run("sync", "--db", db, "--api-url", DEAD, "--retry-for", "2.5", "-q")
    assert quiet.returncode == 1
    (line,) = quiet.stderr.splitlines()
    assert line.startswith("Error: the upstream at") and "unavailable" in line


def test_verbose_shows_a_line_per_poll_and_per_check(tmp_path, start_mock):
    url = start_mock(users=10, history=1500, rate_limit=1000, per=1)
    db = tmp_path / "s.db"
    plain = invoke("sync", "--db", db, "--api-url", url, *FAST)
    assert plain.exit_code == 0 and plain.stderr == ""
    db = tmp_path / "again.db"
    result = invoke("sync", "--db", db, "--api-url", url, *FAST, "-v")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    poll = rf"Info: {stamp} poll: window \S+\.\.\S+, 2 pages, 1500 records, 1500 new, lag \d+ s, "
    assert re.match(poll + "2 requests$", lines[0]), lines
    check = rf"Info: {stamp} check: window \S+\.\.\S+, upstream 1500 vs stored 1500, nothing to "
    assert re.match(check + r"repair, 1 request$", lines[1]), lines
    assert json.loads(result.stdout)["new"] == 1500  # stdout stays the result


def test_log_format_json_writes_json_lines_with_the_fields(tmp_path, start_mock):
    url = start_mock(users=10, history=1500, rate_limit=1000, per=1)
    db = tmp_path / "s.db"
    result = invoke("sync", "--db", db, "--api-url", url, *FAST, "-v", "--log-format", "json")
    assert result.exit_code == 0, result.output
    poll, check = (json.loads(line) for line in result.stderr.splitlines())
    assert {"ts", "level", "logger", "message"} <= set(poll)
    assert (poll["level"], poll["logger"], poll["event"]) == ("info", "txagg.sync", "poll")
    assert poll["message"].startswith("poll: window ")
    assert (poll["pages"], poll["new"], poll["requests"]) == (2, 1500, 2)
    assert poll["lagSeconds"] >= 0 and poll["windowEnd"] == poll["asOf"]
    assert (check["event"], check["upstream"], check["stored"]) == ("check", 1500, 1500)
    # warnings and errors too: every stderr line is JSON
    dead = run(
        "sync", "--db", str(tmp_path / "d.db"), "--api-url", DEAD, "--retry-for", "1.5",
        "--log-format", "json",
    )  # fmt: skip
    lines = [json.loads(line) for line in dead.stderr.splitlines()]
    assert {line["level"] for line in lines} == {"warning", "error"}
    assert lines[-1]["level"] == "error" and "unavailable" in lines[-1]["message"]


def test_verbose_twice_shows_an_internal_errors_traceback(filled, monkeypatch, capsys):
    from txagg import __main__ as entry

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("txagg.cli.read.user_report", broken)
    # --eur-per-scr: the full CLI, not report's fast path
    argv = ["txagg", "report", "074092", "--db", str(filled), "--eur-per-scr", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 1
    assert "internal error: RuntimeError('a bug')" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*sys.argv, "-vv"])
    with pytest.raises(RuntimeError, match="a bug"):
        entry.main()


class Lines:
    """A process's stderr, read line by line in a thread (so it never fills its pipe)."""

    def __init__(self, stream):
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))

    def until(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"not seen in time; seen: {self.seen[-20:]}")


def test_following_into_a_log_says_each_poll_and_check_and_what_a_stop_saved(
    either_location, start_mock
):
    url = start_mock(users=10, history=1500, tx_per_minute=600, rate_limit=1000, per=1)
    process = subprocess.Popen(
        txagg_command(
            "sync", "--follow", "--db", str(either_location), "--api-url", url,
            "--rate-limit", "20", "--per", "1", "--settle", "0", "--interval", "0.3",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )  # fmt: skip
    lines = Lines(process.stderr)
    try:
        lines.until(lambda line: " poll: window " in line and " 1000 new" in line)
        lines.until(lambda line: " poll: window " in line)  # the next poll
        lines.until(lambda line: " check: window " in line and " vs stored " in line)
    finally:
        process.send_signal(signal.SIGINT)
        out = process.stdout.read()
        assert process.wait(timeout=60) == 0
    stopped = lines.until(lambda line: " stopped: " in line)
    saved = re.search(r"stopped: ([\d,]+) new transactions stored \([\d,]+ in the store\); "
                      r"the next run continues from \d{4}-\S+Z$", stopped)  # fmt: skip
    assert saved, stopped
    assert all(line.startswith("Info: ") for line in lines.seen), lines.seen
    summary = json.loads(out)
    assert summary["new"] >= 1000
    assert int(saved.group(1).replace(",", "")) == summary["new"]


def test_serve_follow_logs_its_polls_and_both_servers_log_requests(either_location, start_mock):
    url = start_mock(users=10, history=20, rate_limit=1000, per=1)
    db = str(either_location)
    assert invoke("sync", "--db", db, "--api-url", url, *FAST).exit_code == 0
    serve = subprocess.Popen(
        txagg_command(
            "serve", "--db", db, "--port", "0", "--follow", "--access-log",
            "--rate-limit", "20", "--per", "1", "--settle", "0", "--interval", "0.3",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )  # fmt: skip
    mock = subprocess.Popen(
        txagg_command("mock-serve", "--port", "0", "--history", "5", "--access-log",
                      "--log-format", "json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )  # fmt: skip
    try:
        served, mocked = Lines(serve.stderr), Lines(mock.stderr)
        server_url = serve.stdout.readline().rsplit(" ", 1)[1].strip()
        mock_url = mock.stdout.readline().rsplit(" ", 1)[1].strip()
        served.until(lambda line: " poll: window " in line)
        httpx.get(server_url + "/users/nobody%0Aforged?x=1", timeout=10)
        access = served.until(lambda line: '"GET /users/' in line)
        assert re.fullmatch(
            r'Info: \S+Z 127\.0\.0\.1 "GET /users/nobody%0Aforged\?x=1 HTTP/1\.1" 404 \d+ '
            r"[\d.]+ ms",
            access,
        ), access
        httpx.get(mock_url + "/transactions?limit=1", timeout=10)
        line = json.loads(mocked.until(lambda line: "/transactions" in line))
        assert (line["event"], line["status"], line["method"]) == ("access", 200, "GET")
        assert line["path"] == "/transactions?limit=1" and line["bytes"] > 0
        assert line["logger"] == "txagg.access" and line["durationMs"] >= 0
    finally:
        for process in (serve, mock):
            process.terminate()
            process.wait(timeout=30)


def test_without_access_log_a_server_logs_no_requests(filled):
    serve = subprocess.Popen(
        txagg_command("serve", "--db", str(filled), "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        url = serve.stdout.readline().rsplit(" ", 1)[1].strip()
        assert httpx.get(url + "/users/074092", timeout=10).status_code == 200
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    assert err == ""


# ------------------------------------------------------------------ on a terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def with_stderr_on_a_terminal(*args: str, interrupt_when=None, timeout: float = 120):
    """Run txagg with stderr on a pseudo-terminal 200 columns wide and stdout a pipe; send
    SIGINT (Ctrl-C) once ``interrupt_when(what the terminal shows)`` holds. Returns (exit
    code, stdout, what the terminal showed, escape sequences removed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    process = subprocess.Popen(
        txagg_command(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=clean_env(COLUMNS="200", TERM="xterm-256color"),
    )
    os.close(follower)
    shown = b""
    interrupted = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every end of the terminal is closed: it has exited
                break
            if not chunk:
                break
            shown += chunk
        text = ANSI.sub("", shown.decode("utf-8", "replace"))
        if interrupt_when is not None and not interrupted and interrupt_when(text):
            process.send_signal(signal.SIGINT)
            interrupted = True
    os.close(leader)
    out, _ = process.communicate(timeout=60)
    return process.returncode, out.decode(), ANSI.sub("", shown.decode("utf-8", "replace"))


def test_sync_on_a_terminal_shows_progress_and_says_what_ctrl_c_saved(tmp_path, start_mock):
    url = start_mock(users=10, history=3500, rate_limit=1000, per=1)
    db = str(tmp_path / "s.db")
    # A budget of 2 requests per 20 s: one at once, one a second later, then 11 s apart.
    budget = ("--rate-limit", "2", "--per", "20", "--settle", "0")

    def waiting_after_two_pages(text: str) -> bool:
        return "2,000/3,500" in text and "next request in" in text

    code, out, shown = with_stderr_on_a_terminal(
        "sync", "--db", db, "--api-url", url, *budget, interrupt_when=waiting_after_two_pages
    )
    assert code == 130, shown
    assert out == ""  # stdout stays the result: none when interrupted
    assert "syncing" in shown and "57%" in shown and "ETA " in shown, shown
    assert re.search(r"waiting for the rate budget: next request in \d+ s", shown), shown
    assert " poll: " not in shown  # INFO lines on a terminal only with -v
    assert re.search(
        r"Error: sync interrupted: 2,000 new transactions stored \(2,000 in the store\); "
        r"the next run continues from \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n",
        shown,
    ), shown
    with Store.open(db) as store:
        assert store.counters()["transactions"] == 2000
    # The next run continues there, and -v shows its poll lines on the terminal too.
    code, out, shown = with_stderr_on_a_terminal("sync", "--db", db, *FAST, "-v")
    assert code == 0, shown
    assert json.loads(out)["new"] == 1500
    assert re.search(r"Info: \S+ poll: window \S+, 2 pages, 1500 records, 1500 new", shown)


def test_quiet_shows_no_progress_on_a_terminal(tmp_path, start_mock):
    url = start_mock(users=10, history=1500, rate_limit=1000, per=1)
    code, out, shown = with_stderr_on_a_terminal(
        "sync", "--db", str(tmp_path / "s.db"), "--api-url", url, *FAST, "-q"
    )
    assert (code, shown) == (0, "") and json.loads(out)["new"] == 1500


def test_following_on_a_terminal_says_what_ctrl_c_saved_and_exits_0(tmp_path, start_mock):
    url = start_mock(users=10, history=1500, rate_limit=1000, per=1)
    code, out, shown = with_stderr_on_a_terminal(
        "sync", "--follow", "--db", str(tmp_path / "s.db"), "--api-url", url, *FAST,
        "--interval", "0.3",
        interrupt_when=lambda text: "1,500 new" in text,
    )  # fmt: skip
    assert code == 0, shown
    assert "following" in shown
    assert re.search(
        r"Stopped: 1,500 new transactions stored \(1,500 in the store\); the next run "
        r"continues from \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n",
        shown,
    ), shown
    assert json.loads(out)["new"] == 1500  # the summary, on stdout as ever

"""The command line through typer's CliRunner: exit codes, messages, JSON shapes. Every test
taking ``filled`` or ``either_location`` runs on a SQLite file and on a PostgreSQL store; those
about files take ``filled_file``."""

import json
import subprocess
import sys
from decimal import Decimal

import pytest
from conftest import record, run_txagg
from typer.testing import CliRunner

from txagg.cli import app
from txagg.store import Store

runner = CliRunner()


def fill(location):
    """Two users' transactions in the store at ``location``, synced up to 22:15:00Z."""
    with Store.open(location) as store:
        store.ingest(
            [
                record(1, user="074092", kind="earned", amount=Decimal("1.2"), at_s=0),
                record(2, user="074092", kind="spent", amount=Decimal("12"), at_s=1),
                record(3, user="074092", kind="payout", amount=Decimal("30"), at_s=2),
                record(4, user="000007", kind="earned", amount=Decimal("0.1"), at_s=3),
                record(5, user="000007", kind="earned", amount=Decimal("0.2"), at_s=4),
                record(6, user="000007", kind="payout", amount=Decimal("0.3"), at_s=5),
            ],
            state={"as_of": 1_700_000_100_000, "position": 1_700_000_100_000},
        )
    return location


@pytest.fixture
def filled(either_location):
    """A filled store on each backend in turn: what ``--db`` takes (a path, or a URL)."""
    return fill(either_location)


@pytest.fixture
def filled_file(db_path):
    """A filled SQLite store: its file's path."""
    return fill(db_path)


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def test_report_json_is_exact_and_in_the_documented_shape(filled):
    result = invoke("report", "074092", "--db", filled, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        '{"userId": "074092", "balance": -40.8, "earned": 1.2, "spent": 12, "payout": 30, '
        '"paidOut": 30, "transactions": 3, "lastTransactionAt": "2023-11-14T22:13:22.000Z", '
        '"asOf": "2023-11-14T22:15:00Z"}\n'
    )
    tiny = json.loads(invoke("report", "000007", "--db", filled, "--json").stdout)
    assert (tiny["earned"], tiny["balance"]) == (0.3, 0)


def test_paid_out_uses_the_configured_rate(filled):
    result = invoke("report", "074092", "--db", filled, "--json", "--eur-per-scr", "0.915")
    assert '"paidOut": 27.45' in result.stdout
    result = invoke("report", "074092", "--db", filled, "--eur-per-scr", "minus one")
    assert result.exit_code == 2 and "not a positive number" in result.output


@pytest.mark.parametrize(
    "rate", ["1e30", "1000001", "0.1234567890123456789012", "NaN", "0", "x" * 999]
)
def test_an_absurd_rate_is_a_usage_error(filled, rate):
    result = invoke("report", "074092", "--db", filled, "--json", "--eur-per-scr", rate)
    assert result.exit_code == 2 and "--eur-per-scr" in result.output, result.output


def test_paid_out_is_exact_at_the_largest_total_and_rate():
    from txagg.report import MAX_EUR_PER_SCR, to_eur
    from txagg.store import MAX_TOTAL_CENTS

    assert to_eur(MAX_TOTAL_CENTS, MAX_EUR_PER_SCR) == Decimal(MAX_TOTAL_CENTS) * 10**4
    # 9999999999999999.99 x 0.12345678901234567891 = 1234567890123456.78786...
    assert to_eur(MAX_TOTAL_CENTS - 1, Decimal("0.12345678901234567891")) == Decimal(
        "1234567890123456.79"
    )


def test_unknown_user_exits_3(filled):
    result = invoke("report", "999999", "--db", filled, "--json")
    assert result.exit_code == 3
    assert result.stderr == "Error: no such user: 999999\n"
    assert result.stdout == ""


# SQLite only: about a file that must not be created.
def test_no_store_is_a_clear_failure_and_creates_nothing(tmp_path):
    missing = tmp_path / "none.db"
    result = invoke("report", "074092", "--db", missing)
    assert result.exit_code == 1 and "no store at" in result.stderr
    assert not missing.exists()


def test_bad_usage_exits_2(filled):
    assert invoke("report", "--db", filled).exit_code == 2
    assert invoke("report", "1", "--no-such-flag").exit_code == 2
    assert invoke("sync", "--rate-limit", "0").exit_code == 2
    assert invoke("sync", "--date-format", "klingon").exit_code == 2
    bad_time = invoke("payouts", "--db", filled, "--since", "last tuesday")
    assert bad_time.exit_code == 2 and "not a date/time" in bad_time.output


def test_payouts_json(filled):
    result = invoke("payouts", "--db", filled, "--json")
    assert result.exit_code == 0
    assert result.stdout == (
        '{"items": [{"userId": "000007", "amount": 0.3, "count": 1}, '
        '{"userId": "074092", "amount": 30, "count": 1}], "asOf": "2023-11-14T22:15:00Z"}\n'
    )
    since = invoke("payouts", "--db", filled, "--since", "2023-11-14 22:13:23")
    assert [i["userId"] for i in json.loads(since.stdout)["items"]] == ["000007"]
    until = invoke("payouts", "--db", filled, "--until", "2023-11-14T22:13:23Z")
    assert [i["userId"] for i in json.loads(until.stdout)["items"]] == ["074092"]


def test_status_json_names_everything_an_operator_needs(filled):
    body = json.loads(invoke("status", "--db", filled, "--json").stdout)
    assert body["transactions"] == 6 and body["users"] == 2
    assert body["quarantined"] == 0 and body["conflicts"] == 0
    assert body["asOf"] == "2023-11-14T22:15:00Z" and body["behind"] is True
    assert set(body["rateBudget"]) >= {"limit", "tokensAvailable", "throttled", "requests"}
    # 6 transactions in the 10 minutes before asOf: 0 a minute, far below what 5/min can read
    assert body["load"] == {
        "recentPerMinute": 0,
        "ceilingPerMinute": 5000,
        "sustainablePerMinute": 4500,
        "fallsBehind": False,
    }
    fast = json.loads(invoke("status", "--db", filled, "--rate-limit", "5", "--per", "1").stdout)
    assert fast["load"]["ceilingPerMinute"] == 300_000


def test_tables_on_a_terminal_json_in_a_pipe(filled, monkeypatch):
    monkeypatch.setattr("txagg.cli.common.wants_json", lambda flag: flag)
    table = invoke("report", "074092", "--db", filled)
    assert table.exit_code == 0 and "balance" in table.stdout and "-40.8" in table.stdout
    assert not table.stdout.startswith("{")


def test_a_second_sync_on_a_locked_store_exits_75(filled):
    with Store.open(filled) as store, store.sync_lock():
        result = invoke("sync", "--db", filled, "--api-url", "http://127.0.0.1:9")
    assert result.exit_code == 75
    assert "another sync" in result.stderr


def test_sync_against_a_dead_upstream_fails_clearly(either_location):
    result = invoke(
        "sync", "--db", either_location, "--api-url", "http://127.0.0.1:9", "--retry-for", "0.3"
    )
    assert result.exit_code == 1
    assert "unavailable" in result.stderr and "Traceback" not in result.output


def test_the_fast_path_answers_exactly_like_the_full_cli(filled):
    for user in ("074092", "000007"):
        fast = run_txagg("report", user, "--db", str(filled), "--json")
        full = invoke("report", user, "--db", filled, "--json")
        assert (fast.returncode, fast.stdout) == (0, full.stdout)
    fast = run_txagg("report", "999999", "--db", str(filled))
    full = invoke("report", "999999", "--db", filled)
    assert (fast.returncode, fast.stderr) == (3, full.stderr)
    env_db = run_txagg("report", "074092", env={"TXAGG_DB": str(filled)})
    assert env_db.stdout == invoke("report", "074092", "--db", filled).stdout


READ_COMMANDS = (
    ["report", "074092", "--json"],  # the fast path
    ["report", "074092", "--eur-per-scr", "1"],  # the full CLI
    ["payouts"],
    ["status"],
)


# SQLite only: about files (empty, junk, foreign, missing) and their bytes.
def test_read_commands_never_create_or_change_a_file(tmp_path):
    import sqlite3

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a store at all\n" * 300)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (text)")
    conn.commit()
    conn.close()
    missing = tmp_path / "missing.db"
    expected = {
        empty: f"Error: {empty} is an empty file, not a txagg store",
        junk: f"Error: {junk} is not a txagg store (not a SQLite database)",
        foreign: f"Error: {foreign} is a SQLite database but not a txagg store",
        missing: f"Error: no store at {missing}: run 'txagg sync' first",
    }
    files = {path: path.read_bytes() for path in (empty, junk, foreign)}
    for path, message in expected.items():
        for args in [*READ_COMMANDS, ["serve", "--port", "0"]]:
            result = run_txagg(*args, "--db", str(path), timeout=60)
            assert (result.returncode, result.stdout) == (1, ""), (path.name, args, result)
            assert result.stderr.startswith(message), (path.name, args, result.stderr)
            assert result.stderr.count("\n") == 1, result.stderr
            assert {p: p.read_bytes() for p in files} == files, (path.name, args)
            assert sorted(tmp_path.iterdir()) == sorted(files), (path.name, args)


# SQLite only: compares the store file's bytes and its folder's listing.
def test_read_commands_leave_a_store_as_they_found_it(filled_file):
    with Store.open(filled_file) as store:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert sorted(p.name for p in filled_file.parent.iterdir()) == [filled_file.name]
    before = filled_file.read_bytes()
    for args in READ_COMMANDS:
        result = run_txagg(*args, "--db", str(filled_file))
        assert result.returncode == 0, (args, result.stderr)
        assert filled_file.read_bytes() == before, args
        assert sorted(p.name for p in filled_file.parent.iterdir()) == [filled_file.name], args


# SQLite only: the fast path serves SQLite files; a PostgreSQL URL goes to the full CLI.
def test_the_report_fast_path_loads_only_what_a_lookup_needs(tmp_path):
    """``report USER --json`` in a shell loop: no module of sync, binding, the CLI, PostgreSQL or
    the servers, however the modules it does load grow (a top-level import costs every call)."""
    Store.open(tmp_path / "s.db").close()
    code = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        f"sys.argv = ['txagg', 'report', '000001', '--json', '--db', {str(tmp_path / 's.db')!r}]\n"
        "runpy.run_module('txagg', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "nothing synced yet" in result.stderr
    loaded = set(json.loads(result.stderr.strip().splitlines()[-1]))
    needed = {"txagg", "txagg.errors", "txagg.models", "txagg.report", "txagg.settings"}
    needed |= {"txagg.store"} | {f"txagg.store.{name}" for name in STORE_MODULES}
    assert {name for name in loaded if name.startswith("txagg")} <= needed
    assert not {"typer", "rich", "httpx", "pydantic", "psycopg", "tenacity"} & loaded


STORE_MODULES = ("base", "budget", "ingest", "schema", "sqlite")

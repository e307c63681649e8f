"""What the read commands print: --format json|ndjson|csv|table, its --json alias, and the
tables a person sees on a terminal (through a real pseudo-terminal where detection matters)."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import record, run_txagg, txagg_command
from typer.testing import CliRunner

from txagg import output, shapes
from txagg.cli import app
from txagg.output import Format
from txagg.settings import PAYOUTS_PAGE_MAX
from txagg.store import Store

runner = CliRunner()
AS_OF = 1_700_000_100_000  # 2023-11-14T22:15:00Z
NOW = AS_OF / 1000 + 150  # two and a half minutes later

LAST_CHECK = {
    "at": "2023-11-14T22:15:00Z",
    "window": ["2023-11-14T22:10:00Z", "2023-11-14T22:14:57Z"],
    "upstream": 6,
    "stored": 6,
}
DISCREPANCY = {
    "window": ["2023-11-14T22:00:00Z", "2023-11-14T22:05:00Z"],
    "upstream": 9,
    "stored": 7,
    "why": "the upstream counts fewer than the store holds",
    "at": "2023-11-14T22:14:00Z",
}


@pytest.fixture
def filled(db_path: Path) -> Path:
    with Store.open(db_path) as store:
        store.ingest(
            [
                record(1, user="074092", kind="earned", amount=Decimal("1.2"), at_s=0),
                record(2, user="074092", kind="spent", amount=Decimal("12"), at_s=1),
                record(3, user="074092", kind="payout", amount=Decimal("30"), at_s=2),
                record(4, user="000007", kind="earned", amount=Decimal("0.1"), at_s=3),
                record(5, user="000007", kind="earned", amount=Decimal("0.2"), at_s=4),
                record(6, user="000007", kind="payout", amount=Decimal("0.3"), at_s=5),
                record(7, user="5", kind="earned", amount=Decimal("2000000"), at_s=6),
                record(8, user="5", kind="payout", amount=Decimal("1234567.8"), at_s=7),
            ],
            state={
                "as_of": AS_OF,
                "position": AS_OF,
                "last_check": LAST_CHECK,
                "discrepancies": [DISCREPANCY],
            },
        )
    return db_path


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(*args, env=None) -> str:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


# ---------------------------------------------------------------- the formats, one place


def test_the_formats_and_their_default_are_defined_once():
    assert [f.value for f in Format] == ["table", "json", "ndjson", "csv"]
    assert output.default_format(terminal=True) is Format.table
    assert output.default_format(terminal=False) is Format.json
    for command in ("report", "payouts", "status", "verify", "sync"):
        help_text = invoke(command, "--help").stdout
        assert "--format [table|json|ndjson|csv]" in help_text, command
        assert "--json" in help_text and "TXAGG_FORMAT" in help_text, command


@pytest.mark.parametrize(
    "args",
    [["report", "074092"], ["payouts"], ["status"], ["payouts", "--since", "2023-11-14"]],
)
def test_format_json_is_json_byte_for_byte_and_still_the_default_in_a_pipe(filled, args):
    def same_clock(text: str) -> str:
        # status says its lag, which moves with the clock between two runs: that number aside
        return re.sub(r'"lagSeconds": \d+', '"lagSeconds": 0', text)

    alias = same_clock(ok(*args, "--db", filled, "--json"))
    assert same_clock(ok(*args, "--db", filled, "--format", "json")) == alias
    assert same_clock(ok(*args, "--db", filled, "--format=json", "--json")) == alias
    assert same_clock(ok(*args, "--db", filled)) == alias  # not a terminal: JSON, as always
    json.loads(alias)


def test_the_fast_path_takes_format_json_and_gives_way_to_the_other_formats(filled):
    full = ok("report", "074092", "--db", filled, "--json")
    for args in (["--format", "json"], ["--format=json"], []):
        fast = run_txagg("report", "074092", "--db", str(filled), *args)
        assert (fast.returncode, fast.stdout, fast.stderr) == (0, full, ""), args
    table = run_txagg("report", "074092", "--db", str(filled), "--format", "table")
    assert table.returncode == 0 and table.stdout.startswith("User 074092\n"), table
    from_env = run_txagg("report", "074092", "--db", str(filled), env={"TXAGG_FORMAT": "csv"})
    assert from_env.stdout.splitlines()[0].startswith("userId,balance,"), from_env
    bad = run_txagg("report", "074092", "--db", str(filled), "--format", "JSON")
    assert bad.returncode == 2 and bad.stdout == "", bad


def test_the_fast_path_recognises_format_json_only(filled, capsys, monkeypatch):
    from txagg.__main__ import _fast_report

    monkeypatch.delenv("TXAGG_FORMAT", raising=False)
    for args in (["--format", "json"], ["--format=json"], ["--json", "--format", "json"]):
        assert _fast_report(["report", "074092", "--db", str(filled), *args]) == 0, args
        assert capsys.readouterr().out == ok("report", "074092", "--db", filled, "--json")
    for args in (["--format", "csv"], ["--format=table"], ["--json", "--format", "ndjson"]):
        assert _fast_report(["report", "074092", "--db", str(filled), *args]) is None, args
    assert _fast_report(["report", "074092", "--db", str(filled), "--format"]) is None
    monkeypatch.setenv("TXAGG_FORMAT", "json")
    assert _fast_report(["report", "074092", "--db", str(filled), "--json"]) is None


def test_json_with_another_format_is_bad_usage_unless_one_comes_from_the_environment(filled):
    both = invoke("payouts", "--db", filled, "--json", "--format", "csv")
    assert both.exit_code == 2 and "--json is --format json" in both.output
    assert both.stdout == ""
    alias = ok("payouts", "--db", filled, "--json")
    assert ok("payouts", "--db", filled, "--json", env={"TXAGG_FORMAT": "csv"}) == alias
    assert ok("payouts", "--db", filled, env={"TXAGG_FORMAT": "csv"}).startswith("userId,")
    csv_env_json = ok("payouts", "--db", filled, "--format", "csv", env={"TXAGG_JSON": "1"})
    assert csv_env_json.startswith("userId,")
    both_env = invoke("payouts", "--db", filled, env={"TXAGG_JSON": "1", "TXAGG_FORMAT": "csv"})
    assert both_env.exit_code == 2 and "--json is --format json" in both_env.output
    bad = invoke("payouts", "--db", filled, "--format", "xml")
    assert bad.exit_code == 2 and "xml" in bad.output


def test_ndjson_streams_one_payout_a_line_in_the_payout_shape(filled):
    text = ok("payouts", "--db", filled, "--format", "ndjson")
    lines = text.splitlines()
    assert lines == [
        '{"userId": "000007", "amount": 0.3, "count": 1}',
        '{"userId": "074092", "amount": 30, "count": 1}',
        '{"userId": "5", "amount": 1234567.8, "count": 1}',
    ]
    for line in lines:
        shapes.adapter(shapes.Payout).validate_json(line, strict=True)
    for args in (["report", "074092"], ["status"]):
        one = ok(*args, "--db", filled, "--format", "ndjson")
        assert one.count("\n") == 1 and isinstance(json.loads(one), dict), args
    assert ok("payouts", "--db", filled, "--format", "ndjson", "--since", "2030-01-01") == ""


def test_csv_has_a_header_and_exact_money(filled):
    rows = list(csv.reader(io.StringIO(ok("payouts", "--db", filled, "--format", "csv"))))
    assert rows == [
        ["userId", "amount", "count"],
        ["000007", "0.30", "1"],
        ["074092", "30.00", "1"],
        ["5", "1234567.80", "1"],
    ]
    empty = ok("payouts", "--db", filled, "--format", "csv", "--since", "2030-01-01")
    assert empty == "userId,amount,count\n"
    report = list(
        csv.DictReader(io.StringIO(ok("report", "000007", "--db", filled, "--format", "csv")))
    )
    assert report == [
        {
            "userId": "000007",
            "balance": "0.00",
            "earned": "0.30",
            "spent": "0.00",
            "payout": "0.30",
            "paidOut": "0.30",
            "transactions": "3",
            "lastTransactionAt": "2023-11-14T22:13:25.000Z",
            "asOf": "2023-11-14T22:15:00Z",
        }
    ]
    rate = ok("report", "074092", "--db", filled, "--format", "csv", "--eur-per-scr", "0.915")
    assert next(csv.DictReader(io.StringIO(rate)))["paidOut"] == "27.45"


def test_status_csv_columns_stay_put_and_lists_are_json_once(filled):
    text = ok("status", "--db", filled, "--format", "csv")
    header, row = csv.reader(io.StringIO(text))
    assert tuple(header) == output.STATUS_COLUMNS
    status = dict(zip(header, row, strict=True))
    assert status["rateBudget.limit"] == "5" and status["behind"] == "true"
    assert status["lastRun.at"] == ""  # never ran: an empty cell, the column is there
    assert json.loads(status["lastCheck.window"]) == LAST_CHECK["window"]
    assert json.loads(status["discrepancies"]) == [DISCREPANCY]


# ---------------------------------------------------------------- payouts --limit


def test_payouts_limit_is_a_bounded_positive_integer(filled):
    first = json.loads(ok("payouts", "--db", filled, "--limit", "1"))
    assert [item["userId"] for item in first["items"]] == ["000007"]
    assert json.loads(ok("payouts", "--db", filled, "--limit", PAYOUTS_PAGE_MAX))["items"][2]
    for bad in ("0", "-1", str(PAYOUTS_PAGE_MAX + 1), "ten", "1.5"):
        result = invoke("payouts", "--db", filled, "--limit", bad)
        assert result.exit_code == 2 and "--limit" in result.output, (bad, result.output)


# ---------------------------------------------------------------- tables


def test_money_counts_and_instants_for_people():
    assert output.money(Decimal("1234567.8")) == "1,234,567.80"
    assert output.money(Decimal("-40.8")) == "-40.80"
    assert output.money(Decimal("30"), separators=False) == "30.00"
    assert output.money(Decimal("10000000000000000000000")) == "10,000,000,000,000,000,000,000.00"
    assert [output.ago(s) for s in (-0.4, -42, -150, -7200, -200_000, 30, 90)] == [
        "just now",
        "42 s ago",
        "2 min ago",
        "2 h ago",
        "2 d ago",
        "in 30 s",
        "in 1 min",
    ]
    assert output.when("2023-11-14T22:15:00Z", NOW) == "2023-11-14 22:15:00 UTC (2 min ago)"
    assert output.when("2023-11-14T22:13:22.371Z", NOW).startswith("2023-11-14 22:13:22.371 UTC")
    assert output.when(None, NOW) == "-"
    assert output.label("windowsChecked") == "windows checked"
    assert output.label("lagSeconds") == "lag"


def test_the_report_table_aligns_money_on_the_right():
    body = {
        "userId": "074092",
        "balance": Decimal("-40.8"),
        "earned": Decimal("1234567.2"),
        "spent": Decimal("12"),
        "payout": Decimal("30"),
        "paidOut": Decimal("27.45"),
        "transactions": 3,
        "lastTransactionAt": "2023-11-14T22:13:22.000Z",
        "asOf": "2023-11-14T22:15:00Z",
    }
    assert output.report_table(body, now=NOW) == (
        "User 074092\n"
        "  balance                 -40.80\n"
        "  earned            1,234,567.20\n"
        "  spent                    12.00\n"
        "  payout                   30.00\n"
        "  paid out (EUR)           27.45\n"
        "  transactions                 3\n"
        "  last transaction  2023-11-14 22:13:22 UTC (4 min ago)\n"
        "  as of             2023-11-14 22:15:00 UTC (2 min ago)\n"
    )


def test_the_payouts_table_has_a_total_row(filled):
    body = {
        "items": [
            {"userId": "000007", "amount": Decimal("0.3"), "count": 1},
            {"userId": "5", "amount": Decimal("1234567.8"), "count": 1200},
        ],
        "asOf": "2023-11-14T22:15:00Z",
    }
    assert output.payouts_table(body, now=NOW) == (
        "Payouts as of 2023-11-14 22:15:00 UTC (2 min ago)\n"
        "\n"
        "user                   amount  count\n"
        "---------------  ------------  -----\n"
        "000007                   0.30      1\n"
        "5                1,234,567.80  1,200\n"
        "---------------  ------------  -----\n"
        "total (2 users)  1,234,568.10  1,201\n"
    )
    cut = output.payouts_table(body, now=NOW, limit=2)
    assert cut.endswith("(--limit 2: more users may follow)\n")
    empty = output.payouts_table({"items": [], "asOf": None}, now=NOW)
    assert empty == "Payouts (never synced)\n\nno payouts requested\n"
    forced = ok("payouts", "--db", filled, "--format", "table", "--limit", "2")
    assert "total (2 users)" in forced and "30.30" in forced and "--limit 2" in forced


def test_the_status_table_is_in_sections_and_shows_each_value_once(filled):
    text = ok("status", "--db", filled, "--format", "table")
    titles = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert titles == [
        "Store",
        "Freshness",
        "Upstream",
        "Budget",
        "Last run",
        "Last check",
        "Discrepancies",
    ]
    assert not re.search(r"[a-z][A-Z]", text.replace(str(filled), "")), text  # no camelCase
    assert '"' not in text and "\\" not in text and "[" not in text  # nothing JSON-encoded
    assert "2023-11-14 22:10:00 .. 22:14:57 UTC (" in text  # lastCheck.window
    assert re.search(r"\n  1\. +2023-11-14 22:00:00 \.\. 22:05:00 UTC \(", text)
    assert "upstream 9, stored 7: the upstream counts fewer than the store holds" in text
    assert re.search(r"  transactions +8\n", text)
    assert "behind: more than the 120 s promised" in text
    assert re.search(r"\n  rate +5 per 60 s\n", text)
    last_run = text.split("Last run\n")[1].split("\n\n")[0]
    assert last_run == "  none yet"


def test_the_status_table_names_what_a_run_recorded():
    body = {
        "store": "/s.db",
        "upstream": "https://api.example.com",
        "position": "2023-11-14T22:17:25Z",
        "asOf": "2023-11-14T22:17:25Z",
        "lagSeconds": 5,
        "behind": False,
        "window": {"start": "2023-11-14T22:17:25Z", "nextPage": 1},
        "transactions": 1_234_567,
        "users": 100,
        "quarantined": 0,
        "conflicts": 0,
        "verifiedUntil": None,
        "load": {
            "recentPerMinute": None,
            "ceilingPerMinute": 5000,
            "sustainablePerMinute": 4500,
            "fallsBehind": False,
        },
        "discrepancies": [],
        "upstreamCounts": {
            "reliable": False,
            "since": "2023-11-14T22:00:00Z",
            "why": "its counts still differ from what it serves",
            "nextRepair": "2023-11-14T22:20:00Z",
        },
        "lastCheck": {**LAST_CHECK, "notChased": "the upstream's counts have proved unreliable"},
        "lastRun": {
            "at": "2023-11-14T22:17:30Z",
            "complete": False,
            "error": "upstream unavailable",
            "somethingNew": 3,
        },
        "rateBudget": {
            "limit": 5,
            "perSeconds": Decimal("60"),
            "tokensAvailable": Decimal("4.35"),
            "blockedForSeconds": Decimal("12.5"),
            "requests": 12,
            "throttled": 1,
        },
    }
    text = output.status_table(body, now=NOW)
    assert "  state                 fresh: within the 120 s promised\n" in text
    assert "  lag                         5 s\n" in text
    assert "  transactions          1,234,567\n" in text
    assert "  unreliable since      2023-11-14 22:00:00 UTC (17 min ago)\n" in text
    assert "  next repair           2023-11-14 22:20:00 UTC (in 2 min)\n" in text
    assert "  blocked for              12.5 s\n" in text
    assert "  error                 upstream unavailable\n" in text
    assert "  something new                 3\n" in text  # a key recorded later
    assert "  not chased            the upstream's counts have proved unreliable\n" in text
    assert text.endswith("Discrepancies\n  none\n")


def test_verify_and_sync_tables_list_what_they_found():
    verify = {
        "since": "2023-11-14T22:00:00Z",
        "until": "2023-11-14T22:15:00Z",
        "requests": 3,
        "windowsChecked": 3,
        "windowsDiffering": 1,
        "reread": 1,
        "repaired": 0,
        "discrepancies": [DISCREPANCY],
        "complete": True,
        "resumed": False,
        "empty": False,
    }
    text = output.verify_table(verify, now=NOW)
    assert text.startswith("Verify\n  since              2023-11-14 22:00:00 UTC (")
    assert "  windows differing  1\n" in text and "  complete           yes\n" in text
    assert "Discrepancies\n  1.                 2023-11-14 22:00:00 .. 22:05:00 UTC" in text
    sync = output.sync_table(
        {"requests": 2, "new": 1500, "lagSeconds": 3, "errors": ["retry 1 in 1 s"]}, now=NOW
    )
    assert sync == (
        "Sync\n"
        "  requests      2\n"
        "  new       1,500\n"
        "  lag         3 s\n"
        "\n"
        "Errors\n"
        "  1.        retry 1 in 1 s\n"
    )


def test_sync_and_verify_print_every_format(start_mock, tmp_path):
    url = start_mock(users=5, history=200, seed=3, rate_limit=1000, per=1)
    db = tmp_path / "s.db"
    fast = ["--rate-limit", "1000", "--per", "1", "--settle", "0"]
    table = ok("sync", "--api-url", url, "--db", db, *fast, "--format", "table")
    assert table.startswith("Sync\n") and re.search(r"  new +200\n", table), table
    rows = list(csv.DictReader(io.StringIO(ok("sync", "--db", db, *fast, "--format", "csv"))))
    assert len(rows) == 1 and rows[0]["new"] == "0" and rows[0]["complete"] == "true"
    checked = ok("verify", "--db", db, *fast[:4], "--format", "table")
    assert checked.startswith("Verify\n") and "Discrepancies\n  none\n" in checked, checked
    one = ok("verify", "--db", db, *fast[:4], "--format", "ndjson")
    assert one.count("\n") == 1 and json.loads(one)["complete"] is True
    assert ok("sync", "--db", db, *fast, "--format", "json").startswith('{"requests": ')


# ---------------------------------------------------------------- on a real terminal


def on_a_terminal(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run txagg with its stdout on a pseudo-terminal: (exit code, what it printed)."""
    leader, follower = pty.openpty()
    full_env = {**os.environ, "COLUMNS": "100", **(env or {})}
    full_env.pop("TXAGG_FORMAT", None)
    process = subprocess.Popen(
        txagg_command(*args), stdout=follower, stderr=subprocess.PIPE, env=full_env
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = process.wait(timeout=60)
    process.stderr.close()
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def test_a_terminal_gets_tables_and_json_when_asked(filled):
    code, text = on_a_terminal("report", "074092", "--db", str(filled))
    assert code == 0 and text.startswith("User 074092\n"), text
    assert re.search(r"  balance +-40\.80\n", text) and " UTC (" in text
    code, text = on_a_terminal("payouts", "--db", str(filled))
    assert code == 0 and re.search(r"total \(3 users\) +1,234,598\.10 +3\n", text), text
    code, text = on_a_terminal("status", "--db", str(filled))
    assert code == 0 and "\nFreshness\n" in text and "\nDiscrepancies\n" in text, text
    code, text = on_a_terminal("report", "074092", "--db", str(filled), "--json")
    assert code == 0 and json.loads(text)["balance"] == -40.8
    code, text = on_a_terminal("payouts", "--db", str(filled), "--format", "ndjson")
    assert code == 0 and len(text.splitlines()) == 3


def test_a_reader_that_stops_early_ends_the_listing_quietly(filled):
    command = txagg_command("payouts", "--db", str(filled), "--format", "ndjson")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # nobody reads
    _, err = process.communicate(timeout=60)
    assert b"Traceback" not in err and b"internal error" not in err, err

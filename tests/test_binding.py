"""A store belongs to one upstream; what it remembers (upstream, budget, a failed run); bad
URLs; the retries said on stderr; ``status --check``; the exit codes of verify cut short."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from conftest import START, page, record, run_txagg, txagg_command, wait_for
from typer.testing import CliRunner

from txagg.binding import normalise_url
from txagg.cli import app
from txagg.errors import BadUpstreamUrl
from txagg.models import format_instant, parse_time
from txagg.settings import PER_SECONDS, RATE_LIMIT, STALE_AFTER_SECONDS
from txagg.store import Store

runner = CliRunner()
BUDGET = ("--rate-limit", "100000", "--per", "1", "--retry-for", "5")  # verify's options
FAST = (*BUDGET, "--settle", "0")  # sync's and serve's
NO_UPSTREAM = "Error: no upstream: pass --api-url URL (or set TXAGG_API_URL)\n"
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def items(count: int = 3) -> list[dict]:
    return [record(n, user=f"{n % 2:06d}", at_s=n) for n in range(count)]


def windowed(records: list[dict]):
    """An answer function serving ``records`` as the contract says: those inside the window,
    page by page, counted right."""

    def answer(query: dict):
        start, end = parse_time(query["startDate"]), parse_time(query["endDate"])
        inside = [r for r in records if start <= parse_time(r["createdAt"]) <= end]
        number, limit = int(query["page"]), int(query["limit"])
        return page(inside[(number - 1) * limit : number * limit], len(inside))

    return answer


def status_of(db) -> dict:
    result = invoke("status", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------- the URL


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("HTTP://Api.Example.COM:80/", "http://api.example.com"),
        ("https://api.example.com:443/v1//", "https://api.example.com/v1"),
        ("https://api.example.com:8443/V1", "https://api.example.com:8443/V1"),
        ("http://user:secret@api.example.com/x?q=1#f", "http://api.example.com/x"),
        ("  http://[::1]:8000/  ", "http://[::1]:8000"),
        ("http://[::1]:80", "http://[::1]"),
    ],
)
def test_the_upstream_is_known_by_its_normalised_url(given, normal):
    assert normalise_url(given) == normal


BAD_URLS = [
    ("127.0.0.1:8000", "has no scheme"),
    ("localhost:8000", "has no scheme"),
    ("api.example.com", "has no scheme"),
    ("ftp://api.example.com", "the scheme must be http or https"),
    ("file:///etc/passwd", "the scheme must be http or https"),
    ("http://", "has no host"),
    ("http://:8000/x", "has no host"),
    ("http://api.example.com:99999", "is not a URL"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_a_bad_url_is_refused(url, why):
    with pytest.raises(BadUpstreamUrl, match=why):
        normalise_url(url)


@pytest.mark.parametrize(("url", "why"), BAD_URLS[::2])
def test_a_bad_url_is_a_usage_error_before_any_store_or_request(tmp_path, url, why):
    db = tmp_path / "s.db"
    for command in (["sync"], ["verify"], ["serve", "--follow", "--port", "0"]):
        result = invoke(*command, "--db", db, "--api-url", url, "--retry-for", "60")
        assert result.exit_code == 2, (command, result.output)
        assert why in result.stderr and "--api-url" in result.stderr, result.stderr
        assert "Traceback" not in result.output
        assert not db.exists(), command
    from_env = invoke("sync", "--db", db, env={"TXAGG_API_URL": url})
    assert from_env.exit_code == 2 and why in from_env.stderr
    assert not db.exists()


# ---------------------------------------------------------------- no default upstream


def test_without_an_upstream_nothing_is_guessed(tmp_path):
    db = tmp_path / "s.db"
    for command in (["sync"], ["serve", "--follow", "--port", "0"]):
        result = invoke(*command, "--db", db)
        assert (result.exit_code, result.stderr) == (2, NO_UPSTREAM), command
        assert not db.exists(), command
    Store.open(db).close()  # a store, but one never synced: nothing recorded either
    for command in (["sync"], ["serve", "--follow", "--port", "0"]):
        result = invoke(*command, "--db", db)
        assert (result.exit_code, result.stderr) == (2, NO_UPSTREAM), command
    # verify says first what is missing most: anything to verify at all
    never = invoke("verify", "--db", db)
    assert never.exit_code == 1 and "nothing synced yet: run txagg sync first" in never.stderr
    with Store.open(db) as store:
        store.ingest(items(), state={"position": START + 10_000, "as_of": START + 10_000})
    unbound = invoke("verify", "--db", db)
    assert (unbound.exit_code, unbound.stderr) == (2, NO_UPSTREAM)


def test_the_environment_gives_the_upstream_too(tmp_path, scripted):
    server = scripted([windowed(items())])
    db = tmp_path / "s.db"
    result = run_txagg("sync", "--db", str(db), *FAST, env={"TXAGG_API_URL": server.url})
    assert result.returncode == 0, result.stderr
    assert status_of(db)["upstream"] == server.url


# ---------------------------------------------------------------- one store, one upstream


def test_the_first_sync_binds_the_store_to_its_upstream(tmp_path, scripted, monkeypatch):
    first = scripted([windowed(items())])
    other = scripted([windowed(items(5))])
    db = tmp_path / "s.db"
    Store.open(db).close()
    assert status_of(db)["upstream"] is None
    port = first.url.rsplit(":", 1)[1]
    given = f"HTTP://LocalHost:{port}/"  # the same upstream, written another way
    result = run_txagg("sync", "--api-url", given, "--db", str(db), *FAST)
    assert result.returncode == 0, result.stderr
    bound = f"http://localhost:{port}"
    assert status_of(db)["upstream"] == bound
    with monkeypatch.context() as terminal:
        terminal.setattr("txagg.cli.common.wants_json", lambda flag: flag)
        table = invoke("status", "--db", db)
    assert table.exit_code == 0 and not table.stdout.startswith("{")
    assert "upstream" in table.stdout and bound in table.stdout
    # Later runs use it without --api-url, or given any way that normalises to it.
    first.requests.clear()
    again = run_txagg("sync", "--db", str(db), *FAST)
    assert again.returncode == 0, again.stderr
    assert first.requests and json.loads(again.stdout)["complete"] is True
    same = run_txagg("sync", "--db", str(db), "--api-url", f"http://localhost:{port}", *FAST)
    assert same.returncode == 0, same.stderr
    verify = run_txagg("verify", "--db", str(db), *BUDGET)
    assert verify.returncode == 0, verify.stderr
    # Another upstream is refused at once, by every command that reads one.
    commands = (["sync"], ["verify"], ["serve", "--follow", "--port", "0"])
    for command in commands:
        refused = run_txagg(*command, "--db", str(db), "--api-url", other.url, *BUDGET)
        assert refused.returncode == 2, (command, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith(f"Error: the store {db} belongs to the upstream {bound}")
        assert f"txagg sync --rebind --api-url {other.url}" in refused.stderr
    assert other.requests == []
    assert status_of(db)["upstream"] == bound


def test_rebind_moves_the_store_on_purpose(tmp_path, scripted):
    first = scripted([windowed(items())])
    second = scripted([windowed(items(5))])
    db = tmp_path / "s.db"
    assert invoke("sync", "--db", db, "--api-url", first.url, *FAST).exit_code == 0
    needs_url = invoke("sync", "--db", db, "--rebind")
    assert needs_url.exit_code == 2 and "--api-url" in needs_url.stderr
    # A rebind to an upstream that does not answer binds nothing: the store stays where it was.
    dead = invoke("sync", "--db", db, "--api-url", DEAD, "--rebind", "--retry-for", "0.1")
    assert dead.exit_code == 1
    assert status_of(db)["upstream"] == first.url
    moved = invoke("sync", "--db", db, "--api-url", second.url + "/", "--rebind", *FAST)
    assert moved.exit_code == 0, moved.output
    assert second.requests
    body = status_of(db)
    assert body["upstream"] == second.url and body["transactions"] == 3  # the data stays
    first.requests.clear()
    assert invoke("sync", "--db", db, *FAST).exit_code == 0
    assert first.requests == []
    back = invoke("sync", "--db", db, "--api-url", first.url, *FAST)
    assert back.exit_code == 2 and "--rebind" in back.stderr


def test_a_sync_that_reaches_nobody_binds_nothing_and_is_remembered(tmp_path):
    db = tmp_path / "s.db"
    result = invoke("sync", "--db", db, "--api-url", DEAD, "--retry-for", "0.1")
    assert result.exit_code == 1 and "unavailable" in result.stderr
    body = status_of(db)
    assert body["upstream"] is None
    assert body["lastRun"]["complete"] is False
    assert "unavailable" in body["lastRun"]["error"]


def test_serve_follow_uses_the_stores_upstream(tmp_path, scripted):
    server = scripted([windowed(items())])
    db = tmp_path / "s.db"
    assert invoke("sync", "--db", db, "--api-url", server.url, *FAST).exit_code == 0
    server.requests.clear()
    process = subprocess.Popen(
        txagg_command("serve", "--follow", "--db", str(db), "--port", "0", "--interval", "0.2",
                      *FAST, "--quiet"),  # no line per poll and check: stderr is read last
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "listening on" in line, process.stderr.read()
        url = line.rsplit(" ", 1)[1].strip()
        wait_for(lambda: server.requests)
        status = httpx.get(url + "/status", timeout=10).json()
        assert status["upstream"] == server.url and status["follow"]["enabled"] is True
    finally:
        process.terminate()
        process.communicate(timeout=30)


# ---------------------------------------------------------------- remembered settings


def test_the_budget_a_store_was_synced_with_is_remembered(tmp_path, scripted):
    server = scripted([windowed(items())])
    db = tmp_path / "s.db"
    fresh = tmp_path / "fresh.db"
    Store.open(fresh).close()
    default = status_of(fresh)["rateBudget"]
    assert (default["limit"], default["perSeconds"]) == (RATE_LIMIT, PER_SECONDS)
    budget = ("--rate-limit", "1000", "--per", "2")
    assert (
        invoke("sync", "--db", db, "--api-url", server.url, *budget, "--settle", "0").exit_code == 0
    )
    assert (status_of(db)["rateBudget"]["limit"], status_of(db)["rateBudget"]["perSeconds"]) == (
        1000,
        2,
    )
    # A later sync not told a budget keeps the store's (and so does what it records).
    assert invoke("sync", "--db", db, "--settle", "0").exit_code == 0
    assert status_of(db)["rateBudget"]["limit"] == 1000
    # On the command line, status reports the budget it is given.
    told = json.loads(invoke("status", "--db", db, "--rate-limit", "7", "--json").stdout)
    assert (told["rateBudget"]["limit"], told["rateBudget"]["perSeconds"]) == (7, 2)


def test_since_for_a_store_with_a_cursor_is_ignored_with_a_warning(tmp_path, scripted):
    server = scripted([windowed(items())])
    db = tmp_path / "s.db"
    first = invoke("sync", "--db", db, "--api-url", server.url, "--since", "2023-01-01", *FAST)
    assert first.exit_code == 0 and first.stderr == ""
    server.requests.clear()
    later = invoke("sync", "--db", db, "--since", "2024-06-01", *FAST)
    assert later.exit_code == 0, later.output
    assert later.stderr.count("\n") == 1
    assert later.stderr.startswith("Warning: --since no longer applies")
    assert "ignored" in later.stderr
    assert server.requests[0]["startDate"] != "2024-06-01 00:00:00"


# ---------------------------------------------------------------- an upstream that is down


def test_each_retry_is_said_on_stderr(tmp_path):
    result = run_txagg(
        "sync", "--db", str(tmp_path / "s.db"), "--api-url", DEAD, "--retry-for", "2.5"
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    retries = [line for line in lines if line.startswith("Warning: upstream unreachable:")]
    assert retries, result.stderr
    assert retries[0].startswith("Warning: upstream unreachable: connection refused; retry 1 in ")
    assert retries[0].endswith(" s")
    assert lines[-1].startswith("Error: the upstream at") and "unavailable" in lines[-1]
    assert len(lines) == len(retries) + 1


def test_an_upstream_answering_5xx_is_said_on_stderr_too(tmp_path, scripted):
    server = scripted([(503, {}, b"down"), (502, {}, b"down"), windowed(items())])
    db = tmp_path / "s.db"
    result = invoke("sync", "--db", db, "--api-url", server.url, *FAST, "--retry-for", "60")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Warning: upstream failing: HTTP 503; retry 1 in ")
    assert lines[1].startswith("Warning: upstream failing: HTTP 502; retry 2 in ")


# ---------------------------------------------------------------- status --check


def checked(db):
    result = invoke("status", "--db", db, "--check", "--json")
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_status_check_is_zero_only_for_a_healthy_store(tmp_path, scripted):
    server = scripted([windowed(items())])
    db = tmp_path / "s.db"
    assert invoke("sync", "--db", db, "--api-url", server.url, *FAST).exit_code == 0
    code, body, stderr = checked(db)
    assert (code, stderr) == (0, ""), stderr
    assert body["upstream"] == server.url  # the status is printed all the same

    now_ms = int(time.time() * 1000)
    stale = now_ms - (STALE_AFTER_SECONDS + 60) * 1000
    with Store.open(db) as store:
        store.put_state(as_of=stale)
    code, body, stderr = checked(db)
    assert code == 4 and body["behind"] is True
    assert stderr.startswith("Error: unhealthy: ") and "s behind" in stderr
    assert stderr.count("\n") == 1

    window = [format_instant(START), format_instant(START + 60_000)]
    found = {"window": window, "upstream": 4, "stored": 3, "why": "x", "at": window[1]}
    with Store.open(db) as store:
        store.put_state(as_of=now_ms, discrepancies=[found])
    code, _body, stderr = checked(db)
    assert code == 4 and "1 discrepancy recorded" in stderr and "behind" not in stderr

    with Store.open(db) as store:
        store.put_state(discrepancies=[], last_run={"at": window[1], "complete": False})
    code, _body, stderr = checked(db)
    assert code == 4 and "the last run ended before catching up" in stderr

    # A failed run is remembered until one gets through.
    failed = invoke("sync", "--db", db, "--rebind", "--api-url", DEAD, "--retry-for", "0.1")
    assert failed.exit_code == 1
    code, body, stderr = checked(db)
    assert code == 4 and "the last run failed: the upstream at" in stderr
    assert body["lastRun"]["error"].startswith("the upstream at")
    assert invoke("sync", "--db", db, *FAST).exit_code == 0
    assert checked(db)[0] == 0

    never = tmp_path / "never.db"
    Store.open(never).close()
    code, _body, stderr = checked(never)
    assert code == 4 and "never synced" in stderr
    assert invoke("status", "--db", never, "--json").exit_code == 0  # without --check: 0


# ---------------------------------------------------------------- verify cut short


class Switchable:
    """A scripted upstream whose answer a test may change: ``answer`` (a function of the
    query, as ``scripted`` takes)."""

    def __init__(self, scripted, answer):
        self.answer = answer
        self.server = scripted([lambda query: self.answer(query)])
        self.url = self.server.url


def synced_store(tmp_path, scripted, count: int = 3):
    upstream = Switchable(scripted, windowed(items(count)))
    db = tmp_path / "s.db"
    assert invoke("sync", "--db", db, "--api-url", upstream.url, *FAST).exit_code == 0
    upstream.server.requests.clear()
    return db, upstream


def test_verify_that_runs_out_of_requests_exits_5(tmp_path, scripted):
    db, upstream = synced_store(tmp_path, scripted)
    upstream.answer = windowed(items(5))  # two more than sync saw: a re-read is needed
    result = invoke("verify", "--db", db, "--max-requests", "1", *BUDGET)
    assert result.exit_code == 5, result.output
    assert json.loads(result.stdout)["complete"] is False  # the report, all the same
    assert result.stderr.startswith("Error: verify stopped before the end of its range")
    assert "run it again to resume" in result.stderr
    whole = invoke("verify", "--db", db, *BUDGET)
    assert whole.exit_code == 0 and json.loads(whole.stdout)["complete"] is True


def test_verify_interrupted_exits_130(tmp_path, scripted):
    db, upstream = synced_store(tmp_path, scripted)
    asked, release = threading.Event(), threading.Event()

    def failing_slowly(query: dict):
        asked.set()
        release.wait(60)
        return 503, {}, b"down"

    upstream.answer = failing_slowly
    process = subprocess.Popen(
        txagg_command("verify", "--db", str(db), *BUDGET, "--retry-for", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert asked.wait(60)
        process.send_signal(signal.SIGINT)  # Ctrl-C while a request is under way
        release.set()
        out, err = process.communicate(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert json.loads(out)["complete"] is False
    assert err.splitlines()[-1] == "Error: verify interrupted: run it again to resume"


def test_a_complete_verify_settles_the_discrepancies_it_covered(tmp_path, scripted):
    db, server = synced_store(tmp_path, scripted)
    inside = [format_instant(START), format_instant(START + 2000)]
    outside = ["2001-01-01T00:00:00Z", "2001-01-01T00:01:00Z"]
    recorded = [
        {"window": window, "upstream": 4, "stored": 3, "why": "x", "at": window[1]}
        for window in (inside, outside)
    ]
    with Store.open(db) as store:
        store.put_state(discrepancies=recorded)
    result = invoke("verify", "--db", db, "--since", format_instant(START), *BUDGET)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"] is True
    assert status_of(db)["discrepancies"] == [recorded[1]]


# ---------------------------------------------------------------- report on an empty store


def test_report_on_a_store_never_synced_says_so(tmp_path):
    db = tmp_path / "s.db"
    Store.open(db).close()
    expected = "Error: nothing synced yet: run txagg sync first\n"
    full = invoke("report", "074092", "--db", db, "--eur-per-scr", "1")
    assert (full.exit_code, full.stderr) == (1, expected)
    for args in (["--json"], ["--eur-per-scr", "1"]):  # the fast path, then the full CLI
        result = run_txagg("report", "074092", "--db", str(db), *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", expected), args
    with Store.open(db) as store:  # synced, but the upstream had nothing: the user is unknown
        store.put_state(position=START, as_of=START)
    unknown = run_txagg("report", "074092", "--db", str(db), "--json")
    assert (unknown.returncode, unknown.stderr) == (3, "Error: no such user: 074092\n")


def status_served(db, options, until):
    """Serve ``db`` following with ``options`` until its GET /status satisfies ``until``."""
    from txagg.server import ServeConfig, start_in_thread

    url, stop = start_in_thread(ServeConfig(db=db, port=0, follow=True, sync_options=options))
    try:
        return wait_for(lambda: until(body := httpx.get(url + "/status").json()) and body)
    finally:
        stop()


def test_serve_follow_binds_a_fresh_store_and_remembers_a_failing_upstream(tmp_path, scripted):
    from txagg.testing import sync_options

    server = scripted([windowed(items())])
    fresh = sync_options(server.url, interval=0.2, check_every=None)
    body = status_served(tmp_path / "fresh.db", fresh, lambda body: body["upstream"])
    assert body["upstream"] == server.url
    down = sync_options(DEAD, interval=0.2, retry_for=0.1)
    body = status_served(tmp_path / "down.db", down, lambda body: body["lastRun"])
    assert body["lastRun"]["complete"] is False and "unavailable" in body["lastRun"]["error"]
    assert body["upstream"] is None

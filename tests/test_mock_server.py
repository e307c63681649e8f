"""The mock upstream: real HTTP on loopback for the API, MockUpstream with a fake clock for time."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import defaultdict

import httpx
import pytest
from conftest import wait_for

from txagg.mock import (
    INVALID_KINDS,
    MAX_LIMIT,
    BucketState,
    MockConfig,
    MockUpstream,
    TokenBucket,
    history_instants,
    start_in_thread,
    uuid4_text,
)
from txagg.models import (
    InvalidRecord,
    format_cents,
    format_timestamp,
    loads,
    parse_time,
    parse_transaction,
)
from txagg.testing import FakeClock

START = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DATA = {"seed": 11, "users": 40, "history": 2500, "start": START, "rate_limit": 10_000, "per": 1}


@pytest.fixture(scope="module")
def mock():
    """One shared mock with plenty of budget: the tests only read."""
    url, stop = start_in_thread(MockConfig(port=0, **DATA))
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client
    stop()


@pytest.fixture(scope="module")
def broken():
    """A mock that mixes invalid records into /transactions."""
    url, stop = start_in_thread(MockConfig(port=0, **{**DATA, "invalid_ratio": 0.3}))
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client
    stop()


def all_items(client: httpx.Client, **params) -> list[dict]:
    """Every item of a window, page by page, checking meta on the way."""
    items: list[dict] = []
    page = 1
    while True:
        response = client.get("/transactions", params={**params, "page": page})
        assert response.status_code == 200, response.text
        body = loads(response.content)
        meta = body["meta"]
        assert meta["currentPage"] == page
        assert meta["itemCount"] == len(body["items"])
        items.extend(body["items"])
        if page >= meta["totalPages"]:
            assert len(items) == meta["totalItems"]
            return items
        page += 1


def split_valid(items: list[dict]):
    valid, reasons = [], []
    for item in items:
        try:
            valid.append(parse_transaction(item))
        except InvalidRecord as error:
            reasons.append(error.reason)
    return valid, reasons


def recompute(transactions) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tx in transactions:
        totals[tx.user_id][tx.type] += tx.amount
        totals[tx.user_id]["count"] += 1
        totals[tx.user_id]["last"] = max(totals[tx.user_id]["last"], tx.created_at)
    return totals


def problem_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank"
    assert body["title"] and body["detail"]
    return body


# ---------------------------------------------------------------- data


def test_records_render_exactly_like_the_shared_model():
    upstream = MockUpstream(MockConfig(**DATA))
    for text in upstream.ledger.texts:
        assert parse_transaction(loads(text)).to_json() == text
    for bits in (0, 1 << 127, (1 << 128) - 1, 0x1234_5678_9ABC_DEF0 << 40):
        assert uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))


def test_user_ids_are_unique_six_digit_strings():
    ids = MockUpstream(MockConfig(seed=3, users=500, history=0, start=START)).users.ids
    assert len(set(ids)) == 500
    assert all(len(user_id) == 6 and user_id.isdigit() for user_id in ids)


def test_history_instants_are_ordered_inside_the_span_with_bursts_and_milliseconds():
    import random

    span = 3_600_000
    instants = list(history_instants(random.Random(5), START, span, 5000))
    assert all(START - span <= at < START for at in instants)
    assert instants == sorted(instants)
    seconds = [at // 1000 for at in instants]
    assert len(seconds) - len(set(seconds)) > 500  # several in the same second
    assert sum(at % 1000 != 0 for at in instants) > 1000
    assert sum(at % 1000 == 0 for at in instants) > 100


def test_same_seed_and_start_give_identical_pages_and_another_seed_does_not(mock):
    url, stop = start_in_thread(MockConfig(port=0, **DATA))
    other_url, stop_other = start_in_thread(MockConfig(port=0, **{**DATA, "seed": 12}))
    try:
        for page in (1, 3):
            mine = mock.get("/transactions", params={"page": page}).content
            twin = httpx.get(f"{url}/transactions", params={"page": page}).content
            assert mine == twin
        other = httpx.get(f"{other_url}/transactions").content
        assert other != mock.get("/transactions").content
    finally:
        stop()
        stop_other()


def test_balances_never_go_negative_in_created_at_order(mock):
    balances: dict[str, int] = defaultdict(int)
    valid, reasons = split_valid(all_items(mock))
    assert not reasons and len(valid) == DATA["history"]
    for tx in valid:
        balances[tx.user_id] += tx.amount if tx.type == "earned" else -tx.amount
        assert balances[tx.user_id] >= 0, tx
    kinds = {tx.type for tx in valid}
    assert kinds == {"earned", "spent", "payout"}
    texts = {format_cents(tx.amount) for tx in valid}
    assert any("." not in text for text in texts)  # whole numbers
    assert any(len(text.split(".")[-1]) == 1 for text in texts if "." in text)  # 57.6


def test_ground_truth_equals_a_recomputation_from_the_pages(mock):
    valid, _ = split_valid(all_items(mock))
    expected = recompute(valid)
    users = loads(mock.get("/users").content)
    assert [report["userId"] for report in users["items"]] == sorted(expected)
    for report in users["items"]:
        totals = expected[report["userId"]]
        earned, spent, payout = totals["earned"], totals["spent"], totals["payout"]
        assert format_cents(earned - spent - payout) == str(report["balance"])
        for name, cents in (("earned", earned), ("spent", spent), ("payout", payout)):
            assert str(report[name]) == format_cents(cents)
        assert report["paidOut"] == report["payout"]
        assert report["transactions"] == totals["count"]
        assert report["lastTransactionAt"] == format_timestamp(totals["last"])
    one = users["items"][0]
    single = loads(mock.get(f"/users/{one['userId']}").content)
    assert {**single, "asOf": None} == {**one, "asOf": None}
    assert list(single) == [
        "userId", "balance", "earned", "spent", "payout", "paidOut",
        "transactions", "lastTransactionAt", "asOf",
    ]  # fmt: skip
    payouts = loads(mock.get("/payouts").content)["items"]
    assert payouts == [
        {"userId": user_id, "amount": loads(format_cents(totals["payout"])), "count": count}
        for user_id, totals in sorted(expected.items())
        if (count := sum(tx.type == "payout" and tx.user_id == user_id for tx in valid))
    ]


def test_ground_truth_serialises_money_exactly(mock):
    text = mock.get("/users").text
    assert "e-" not in text and "99999999" not in text


# ---------------------------------------------------------------- paging and windows


def test_pages_concatenate_to_the_window_without_repeats(mock):
    items = all_items(mock, limit=700)
    assert len(items) == DATA["history"] and len({item["id"] for item in items}) == len(items)
    created = [parse_time(item["createdAt"]) for item in items]
    assert created == sorted(created)
    assert items == all_items(mock)  # any page size, same sequence


def test_meta_is_true_and_limit_is_capped(mock):
    body = mock.get("/transactions", params={"limit": 5000, "page": 3}).json()
    assert body["meta"] == {
        "totalItems": 2500,
        "itemCount": 500,
        "itemsPerPage": MAX_LIMIT,
        "totalPages": 3,
        "currentPage": 3,
    }
    past_the_end = mock.get("/transactions", params={"page": 9}).json()
    assert past_the_end["items"] == [] and past_the_end["meta"]["itemCount"] == 0
    response = mock.get("/transactions", params={"limit": 1})
    assert response.headers["content-type"] == "application/json"
    assert response.content.startswith(b'{"items":[{"id":')


def test_windows_are_inclusive_to_the_millisecond_in_every_date_format(mock):
    items = all_items(mock)
    whole = next(item for item in items if item["createdAt"].endswith(":00.000Z"))
    odd = next(item for item in items if not item["createdAt"].endswith(".000Z"))
    sql = whole["createdAt"][:19].replace("T", " ")
    for start, end in ((sql, sql), (whole["createdAt"], whole["createdAt"][:19] + "Z")):
        got = all_items(mock, startDate=start, endDate=end)
        assert whole in got and {item["createdAt"] for item in got} == {whole["createdAt"]}
    got = all_items(mock, startDate=odd["createdAt"], endDate=odd["createdAt"])
    assert odd in got
    day = whole["createdAt"][:10]
    in_day = [item for item in items if item["createdAt"].startswith(day)]
    from_day = all_items(mock, startDate=day)
    assert from_day[: len(in_day)] == in_day
    # A second-precision end leaves out the rest of that second; the next window starts there.
    bound = odd["createdAt"][:19].replace("T", " ")
    before = all_items(mock, endDate=bound)
    after = all_items(mock, startDate=bound)
    assert odd not in before and odd in after and len(before) + len(after) >= len(items)


@pytest.mark.parametrize(
    "params",
    [
        {"page": "0"},
        {"page": "abc"},
        {"page": "1.5"},
        {"limit": "-1"},
        {"limit": "0"},
        {"startDate": "yesterday"},
        {"endDate": "2023-02-30 00:00:00"},
        {"startDate": "2023-03-02", "endDate": "2023-03-01"},
    ],
)
def test_bad_parameters_are_400_problems(mock, params):
    response = mock.get("/transactions", params=params)
    problem_of(response, 400)
    assert response.headers["RateLimit-Policy"]


def test_unknown_routes_methods_and_users_are_problems(mock):
    problem_of(mock.get("/nothing-here"), 404)
    problem_of(mock.post("/transactions"), 405)
    problem_of(mock.get("/users/999999x"), 404)


# ---------------------------------------------------------------- invalid records


def test_invalid_records_of_every_kind_are_served_and_never_counted(broken):
    items = all_items(broken)
    valid, reasons = split_valid(items)
    assert len(valid) == DATA["history"] and len(reasons) >= len(INVALID_KINDS)
    expected_reasons = [
        "missing field",
        "unknown type",
        "amount is not positive",
        "amount is not a number",
        "more than 2 decimal places",
        "above the maximum",
        "not a parseable date",
        "no time zone",
        "id is not a non-empty string",
        "userId is not a non-empty string",
        "id is longer than",
        "userId is longer than",
    ]
    for expected in expected_reasons:
        assert any(expected in reason for reason in reasons), expected
    users = loads(broken.get("/users").content)["items"]
    assert sum(report["transactions"] for report in users) == DATA["history"]


# ---------------------------------------------------------------- time


def test_live_transactions_appear_as_the_clock_moves():
    clock = FakeClock(START / 1000)
    config = MockConfig(users=5, history=10, start=START, tx_per_minute=60)
    upstream = MockUpstream(config, clock=clock)
    assert upstream.window(None, None, 1, 1000)[1]["totalItems"] == 10
    clock.now += 10.5
    body, meta = upstream.window(None, None, 1, 1000)
    assert meta["totalItems"] == 20
    newest = loads(body)["items"][-1]
    assert newest["createdAt"] == format_timestamp(START + 10_000)
    assert upstream.window(START + 10_000, START + 10_000, 1, 1000)[1]["totalItems"] == 1


def test_live_traffic_stops_after_live_for():
    clock = FakeClock(START / 1000)
    config = MockConfig(users=5, history=10, start=START, tx_per_minute=60, live_for=5)
    upstream = MockUpstream(config, clock=clock)
    clock.now += 100
    assert upstream.window(None, None, 1, 1000)[1]["totalItems"] == 10 + 5
    assert sum(report["transactions"] for report in upstream.all_reports()) == 15


def test_live_state_depends_on_the_clock_only_not_on_how_often_it_was_read():
    config = MockConfig(users=4, history=50, start=START, tx_per_minute=600, late_ratio=0.5,
                        late_max=20, invalid_ratio=0.1)  # fmt: skip
    stepped_clock = FakeClock(START / 1000)
    stepped = MockUpstream(config, clock=stepped_clock)
    for _ in range(60):
        stepped_clock.now += 1
        stepped.advance()
    jumped = MockUpstream(config, clock=FakeClock(START / 1000 + 60))
    jumped.advance()
    assert stepped.ledger.texts == jumped.ledger.texts
    assert stepped.all_reports() == jumped.all_reports()


def visible(upstream: MockUpstream) -> list:
    """Every transaction the upstream serves now, through window() page by page."""
    found, page = [], 1
    while True:
        body, meta = upstream.window(None, None, page, MAX_LIMIT)
        found += [parse_transaction(item) for item in loads(body)["items"]]
        if page >= meta["totalPages"]:
            return found
        page += 1


def test_late_arrivals_land_before_what_was_already_visible_and_keep_balances_positive():
    clock = FakeClock(START / 1000)
    config = MockConfig(
        users=3, history=30, start=START, tx_per_minute=120, late_ratio=0.5, late_max=30
    )
    upstream = MockUpstream(config, clock=clock)
    seen: dict[str, int] = {}
    late = []
    for _ in range(100):
        clock.now += 5
        newest_seen = max(seen.values(), default=0)
        fresh = [tx for tx in visible(upstream) if tx.id not in seen]
        late += [tx for tx in fresh if tx.created_at < newest_seen]
        seen.update((tx.id, tx.created_at) for tx in fresh)
    assert len(late) > 50 and {"spent", "payout"} <= {tx.type for tx in late}
    every = visible(upstream)
    assert [tx.created_at for tx in every] == sorted(tx.created_at for tx in every)
    balances: dict[str, int] = defaultdict(int)
    for tx in every:
        balances[tx.user_id] += tx.amount if tx.type == "earned" else -tx.amount
        assert balances[tx.user_id] >= 0, tx
    assert sum(report["transactions"] for report in upstream.all_reports()) == len(every)


def test_a_user_without_visible_transactions_is_unknown():
    upstream = MockUpstream(MockConfig(users=3, history=0, start=START), clock=lambda: START / 1000)
    assert upstream.user_report(upstream.users.ids[0]) is None
    assert upstream.all_reports() == [] and upstream.payouts() == []


# ---------------------------------------------------------------- rate limit


def test_the_token_bucket_refills_continuously():
    clock = FakeClock(0.0)
    bucket = TokenBucket(2, 60, clock=clock)
    assert [bucket.take().allowed for _ in range(3)] == [True, True, False]
    assert bucket.take() == BucketState(False, 0, 30, 60)
    clock.now = 45.0  # one and a half tokens back
    assert bucket.take() == BucketState(True, 0, 0, 45)
    clock.now = 1000.0
    assert bucket.take() == BucketState(True, 1, 0, 30)


def test_the_token_bucket_answers_429_with_retry_after_and_ratelimit_headers():
    url, stop = start_in_thread(MockConfig(port=0, users=3, history=10, rate_limit=2, per=60))
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            first = client.get("/transactions")
            second = client.get("/transactions", params={"page": "bad"})
            third = client.get("/transactions")
            users = client.get("/users")
    finally:
        stop()
    assert first.status_code == 200 and second.status_code == 400
    for response in (first, second, third):
        assert response.headers["RateLimit-Policy"] == '"default";q=2;w=60'
    assert first.headers["RateLimit"] == '"default";r=1;t=30'
    problem_of(third, 429)
    assert third.headers["RateLimit"].startswith('"default";r=0;t=')
    assert 1 <= int(third.headers["Retry-After"]) <= 30
    assert users.status_code == 200  # the ground truth is not rate limited


# ---------------------------------------------------------------- documents and processes


def test_openapi_describes_every_route_and_docs_link_it(mock):
    document = mock.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    for path in ("/transactions", "/users", "/users/{userId}", "/payouts"):
        assert "get" in document["paths"][path]
    responses = document["paths"]["/transactions"]["get"]["responses"]
    assert {"200", "400", "429"} <= set(responses)
    assert "Retry-After" in responses["429"]["headers"]
    names = [
        parameter["name"] for parameter in document["paths"]["/transactions"]["get"]["parameters"]
    ]
    assert names == ["startDate", "endDate", "page", "limit"]
    page = mock.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text and "startDate" in page.text and "/payouts" in page.text
    assert "://" not in page.text  # self-contained: nothing fetched from elsewhere


def test_serve_reports_its_url_and_stops_cleanly_on_sigint():
    script = (
        "from txagg.mock import MockConfig, serve\n"
        "config = MockConfig(port=0, users=3, history=5)\n"
        "serve(config, on_ready=lambda url: print(url, flush=True))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/users", timeout=10).status_code == 200
        process.send_signal(2)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="users"):
        MockConfig(users=0)
    json.dumps(MockConfig().__dict__)  # plain data, printable by the CLI


def test_the_root_redirects_to_the_docs(mock):
    for method in ("GET", "HEAD"):
        response = mock.request(method, "/")
        assert response.status_code == 307, method
        assert response.headers["location"] == "/docs" and response.content == b""
    followed = mock.get("/", follow_redirects=True)
    assert followed.url.path == "/docs" and followed.headers["content-type"].startswith("text/")
    operation = mock.get("/openapi.json").json()["paths"]["/"]["get"]
    assert list(operation["responses"]) == ["307"]
    problem_of(mock.post("/"), 405)


# ---------------------------------------------------------------- --time-scale


def scaled_pair(scale: float, **options) -> tuple[MockConfig, MockConfig]:
    """The same mock twice: options in mock time at ``scale``, and scaled by hand."""
    by_hand = {
        "tx_per_minute": options["tx_per_minute"] * scale,
        "per": options["per"] / scale,
        "late_max": options["late_max"] / scale,
        "live_for": options["live_for"] / scale,
    }
    common = {"users": 6, "history": 40, "start": START, "late_ratio": 0.3}
    return (
        MockConfig(**common, **options, time_scale=scale),
        MockConfig(**common, **options | by_hand),
    )


def test_time_scale_is_the_live_options_scaled_by_hand():
    scaled, by_hand = scaled_pair(8, tx_per_minute=30, per=60, late_max=40, live_for=600)
    assert scaled.real_tx_per_minute == by_hand.tx_per_minute == 240
    assert (scaled.real_per, scaled.real_late_max, scaled.real_live_for) == (7.5, 5, 75)
    upstreams = []
    for config in (scaled, by_hand):
        clock = FakeClock(START / 1000)
        upstream = MockUpstream(config, clock=clock)
        for _ in range(20):
            clock.now += 5  # 100 real seconds: past live_for, 300 live transactions
            upstream.advance()
        upstreams.append(upstream)
    fast, slow = upstreams
    assert fast.ledger.texts == slow.ledger.texts and fast.all_reports() == slow.all_reports()
    assert len(fast.ledger.texts) == 40 + 300
    assert fast.fault_report()["injected"]["late"] > 50


def test_time_scale_leaves_the_past_and_the_data_as_they_are():
    plain = MockUpstream(MockConfig(**DATA))
    scaled = MockUpstream(MockConfig(**DATA, time_scale=500))
    assert scaled.ledger.texts == plain.ledger.texts  # history, history_span, start: as given


def test_time_scale_shortens_the_fault_durations_and_conflict_delays():
    spec = "slow=0.5:20,late=0.1:90,throttle=0.1:12,conflict=1"
    assert MockConfig(faults=spec).fault_settings.throttle_seconds == 12
    settings = MockConfig(faults=spec, time_scale=10).fault_settings
    assert (settings.slow_seconds, settings.late_seconds, settings.throttle_seconds) == (2, 9, 1)
    assert MockConfig(faults=spec, time_scale=4).fault_settings.throttle_seconds == 3
    assert MockConfig(faults=spec, time_scale=10_000).fault_settings.throttle_seconds == 1
    assert MockConfig(faults=spec, time_scale=10).late_max == 90  # the option, in mock time
    clock = FakeClock(START / 1000)
    config = MockConfig(users=4, history=0, start=START, tx_per_minute=60, faults="conflict=1",
                        time_scale=50)  # fmt: skip
    upstream = MockUpstream(config, clock=clock)
    clock.now += 10
    upstream.advance()
    created: dict[str, list[int]] = defaultdict(list)
    for text in upstream.ledger.texts:
        item = loads(text)
        created[item["id"]].append(parse_time(item["createdAt"]))
    pairs = [times for times in created.values() if len(times) == 2]
    assert len(pairs) > 400  # 500 live transactions, each with a second version
    assert all(1 <= second - first <= 1 + 5000 / 50 for first, second in pairs)


def test_time_scale_speaks_real_seconds_over_http():
    config = MockConfig(port=0, users=3, history=10, rate_limit=2, per=60, time_scale=10,
                        faults="throttle=1:30")  # fmt: skip
    url, stop = start_in_thread(config)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            throttled = client.get("/transactions")
            faults = client.get("/faults").json()
            document = client.get("/openapi.json").json()
    finally:
        stop()
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    assert throttled.headers["RateLimit-Policy"] == '"default";q=2;w=6'
    assert throttled.headers["RateLimit"] == '"default";r=1;t=3'
    assert faults["spec"] == "throttle=1:3"
    description = document["paths"]["/transactions"]["get"]["description"]
    assert "2 requests per 6 seconds" in description and "--time-scale 10" in description


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf"), 10_001])
def test_a_bad_time_scale_is_refused(scale):
    with pytest.raises(ValueError, match="time_scale must be above 0 and at most 10000"):
        MockConfig(time_scale=scale)


@pytest.mark.parametrize("scale", ["0", "-2", "nan", "10001"])
def test_mock_serve_refuses_a_bad_time_scale_as_bad_usage(scale):
    from typer.testing import CliRunner

    from txagg.cli import app

    result = CliRunner().invoke(
        app, ["mock-serve", "--port", "0", f"--time-scale={scale}"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2, result.output
    assert "--time-scale" in result.output and "at most 10000" in result.output


def test_mock_serve_runs_time_faster(mock_process):
    mock = mock_process("--users", "3", "--history", "0", "--tx-per-minute", "60",
                        "--time-scale", "600", "--per", "60")  # fmt: skip
    response = httpx.get(f"{mock.url}/transactions", timeout=10)
    assert response.headers["RateLimit-Policy"] == '"default";q=5;w=1'

    def transactions() -> int:
        items = loads(httpx.get(f"{mock.url}/users", timeout=10).content)["items"]
        return sum(report["transactions"] for report in items)

    assert wait_for(lambda: transactions() > 100)  # 600 a real second


# ---------------------------------------------------------------- the README's example user


def test_the_readme_example_user_has_transactions_in_the_default_mock():
    """`txagg mock-serve` with its defaults serves the user the README's examples report on,
    with the totals the README shows (the default seed makes them the same every time)."""
    import re
    from pathlib import Path

    from txagg.testing import MockProcess

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    users = set(re.findall(r"txagg report (\S+)", readme))
    assert len(users) == 1, users
    (user_id,) = users
    shown = loads(next(line for line in readme.splitlines() if line.startswith('{"userId"')))
    assert shown["userId"] == user_id
    with MockProcess() as mock:  # every option at its default (port 0 aside)
        response = httpx.get(f"{mock.url}/users/{user_id}", timeout=10)
    assert response.status_code == 200, response.text
    truth = loads(response.content)
    assert truth["transactions"] > 0
    moments = ("lastTransactionAt", "asOf")  # these follow the clock the mock starts at
    assert {k: v for k, v in truth.items() if k not in moments} == {
        k: v for k, v in shown.items() if k not in moments
    }

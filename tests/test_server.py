"""``txagg serve``: every route through the real app over loopback HTTP, with real stores."""

from __future__ import annotations

import itertools
import random
import signal
import string
import subprocess
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import record, run_txagg, txagg_command
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from txagg.models import dumps, format_cents, format_timestamp, loads
from txagg.report import payouts_report, user_report
from txagg.server import (
    Metrics,
    ServeConfig,
    TimestampText,
    money,
    openapi_document,
    start_in_thread,
)
from txagg.store import Store
from txagg.sync import SyncOptions

PROBLEM = "application/problem+json"
BASE_MS = 1_700_000_000_000


def user_id(n: int) -> str:
    return f"{n:06d}"


def seed(db: Path, users: int, *, first_tx: int = 0, as_of_ms: int | None = None) -> None:
    """Per user: one earned, one spent and (for two users in three) one payout, odd cents."""
    rng = random.Random(first_tx)
    page, n = [], first_tx
    for number in range(users):
        kinds = ("earned", "spent", "payout") if number % 3 else ("earned", "spent")
        for kind in kinds:
            amount = Decimal(rng.randint(1, 99_999)) / 100
            page.append(record(n, user_id(number), kind, amount, at_s=number))
            n += 1
    with Store.open(db) as store:
        store.ingest(page, state={"as_of": as_of_ms if as_of_ms is not None else BASE_MS})


@pytest.fixture
def serve(db_path):
    """Start servers over a store (seeded with 30 users unless it exists); stopped at teardown."""
    stops = []

    def start(seeded: bool = True, **options) -> httpx.Client:
        if seeded and not db_path.exists():
            seed(db_path, 30)
        url, stop = start_in_thread(ServeConfig(db=db_path, port=0, **options))
        client = httpx.Client(base_url=url, timeout=30)
        stops.append((client, stop))
        return client

    yield start
    for client, stop in stops:
        client.close()
        stop()


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# ---------------------------------------------------------------- /users/{userId}


def test_a_user_is_the_report_json_byte_for_byte(serve, db_path):
    client = serve()
    for number in (0, 1, 2, 29):
        response = client.get(f"/users/{user_id(number)}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        with Store.open(db_path) as store:
            assert response.content == dumps(user_report(store, user_id(number))).encode()
    cli = run_txagg("report", "000002", "--json", "--db", str(db_path))
    assert client.get("/users/000002").text == cli.stdout.strip()
    assert client.head("/users/000002").content == b""


def test_paid_out_uses_the_configured_rate(serve, db_path):
    client = serve(eur_per_scr=Decimal("0.913"))
    with Store.open(db_path) as store:
        expected = user_report(store, "000001", Decimal("0.913"))
    assert loads(client.get("/users/000001").content) == expected
    assert expected["paidOut"] != expected["payout"]


def test_the_fast_formatting_agrees_with_the_models():
    rng = random.Random(3)
    cents = list(range(-1000, 1000)) + [rng.randrange(-(10**14), 10**14) for _ in range(20000)]
    assert [money(c) for c in cents] == [format_cents(c) for c in cents]
    stamps = TimestampText(days=2)
    instants = [0, 999, 86_399_999, 86_400_000] + [rng.randrange(0, 2**45) for _ in range(20000)]
    assert [stamps.text(ms) for ms in instants] == [format_timestamp(ms) for ms in instants]


@pytest.mark.parametrize(
    "path",
    [
        "/users/nobody",
        "/users/%00",
        "/users/%ZZ",
        "/users/%2F..%2F",
        "/users/%2E%2E",  # "/users/.." itself: httpx sends "/" for it (RFC 3986 dot segments)
        "/users/%C3%A9t%C3%A9",
        "/users/%FF%FE",
        "/users/" + "x" * 500,
        "/users/000001%20",
        "/users/'%20OR%201=1--",
    ],
)
def test_odd_user_ids_are_404_problems(serve, path):
    assert_problem(serve().get(path), 404)


# ---------------------------------------------------------------- /payouts


def all_pages(client: httpx.Client, first: str, between=lambda: None) -> list[dict]:
    items, url, pages = [], first, 0
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        body = loads(response.content)
        items.extend(body["items"])
        url = body["next"]
        pages += 1
        between()
        assert pages < 1000
    return items


def test_payouts_are_the_payouts_json_byte_for_byte(serve, db_path):
    seed(db_path, 30)
    odd = ['a"b\\c', "été", "x y", "<0>"]
    with Store.open(db_path) as store:
        store.ingest([record(500 + i, u, "payout", Decimal("0.1")) for i, u in enumerate(odd)])
        expected = payouts_report(store)
        window = payouts_report(store, since=BASE_MS + 3000, until=BASE_MS + 9000)
    client = serve()
    assert client.get("/payouts?limit=1000").content == dumps({**expected, "next": None}).encode()
    since, until = format_timestamp(BASE_MS + 3000), format_timestamp(BASE_MS + 9000)
    answer = client.get("/payouts", params={"since": since, "until": until})
    assert answer.content == dumps({**window, "next": None}).encode()
    odd_page = loads(client.get("/payouts", params={"after": "000029"}).content)
    assert sorted(item["userId"] for item in odd_page["items"]) == sorted(odd)


def test_payouts_pages_add_up_to_the_payouts_report(serve, db_path):
    client = serve()
    with Store.open(db_path) as store:
        expected = payouts_report(store)
        since, until = format_timestamp(BASE_MS + 5000), format_timestamp(BASE_MS + 20000)
        window = payouts_report(store, since=BASE_MS + 5000, until=BASE_MS + 20000)
    assert all_pages(client, "/payouts?limit=3") == expected["items"]
    assert len(expected["items"]) == 20
    first = loads(client.get("/payouts").content)
    assert first["items"] == expected["items"] and first["next"] is None
    assert first["asOf"] == expected["asOf"]
    windowed = all_pages(client, f"/payouts?limit=2&since={since}&until={until}")
    assert windowed == window["items"] and 0 < len(windowed) < 20
    last = loads(client.get("/payouts?limit=1&after=000028").content)
    assert [item["userId"] for item in last["items"]] == ["000029"] and last["next"] is None


def test_no_payout_is_lost_or_repeated_while_data_arrives(serve, db_path):
    client = serve()
    with Store.open(db_path) as store:
        before = {item["userId"] for item in payouts_report(store)["items"]}
    writer = Store.open(db_path)
    batch = iter(range(10_000, 10_000_000, 1000))

    def ingest_more() -> None:
        # New payouts for known users and brand-new users on both sides of the cursor.
        n = next(batch)
        users = ["000004", "000017", f"00000{n % 7}x", f"zz{n}", f"0000{n % 30:02d}a"]
        writer.ingest([record(n + i, u, "payout", Decimal("0.07")) for i, u in enumerate(users)])

    try:
        seen = [item["userId"] for item in all_pages(client, "/payouts?limit=4", ingest_more)]
    finally:
        writer.close()
    assert len(seen) == len(set(seen)), "a user came back on a later page"
    assert seen == sorted(seen)
    assert before <= set(seen), f"lost: {before - set(seen)}"


# ---------------------------------------------------------------- caching


def test_etag_304_and_a_new_etag_when_the_data_changes(serve, db_path):
    client = serve()
    for path in ("/users/000001", "/payouts?limit=5"):
        first = client.get(path)
        etag = first.headers["etag"]
        assert etag.startswith('W/"')
        again = client.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        assert client.get(path, headers={"If-None-Match": '"other", ' + etag}).status_code == 304
        assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    etag = client.get("/users/000001").headers["etag"]
    with Store.open(db_path) as store:
        store.ingest([record(9999, "000001", "earned", Decimal("1.01"))])
        expected = dumps(user_report(store, "000001")).encode()
    time.sleep(0.01)  # the hot path looks at the data version every 2 ms
    changed = client.get("/users/000001", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.content == expected
    assert changed.headers["etag"] != etag


@pytest.mark.parametrize(("age", "expected"), [(0, 30), (100, 20), (119, 1), (500, 0)])
def test_max_age_never_lets_a_cached_answer_pass_two_minutes(serve, db_path, age, expected):
    as_of_ms = int((time.time() - age) * 1000)
    seed(db_path, 3, as_of_ms=as_of_ms)
    client = serve(max_age=30)

    def allowed(moment: float) -> int:  # what keeps an answer given at ``moment`` fresh
        return max(0, min(30, 120 - int(moment - as_of_ms / 1000)))

    for path in ("/users/000001", "/payouts"):
        asked = time.time()
        control = client.get(path).headers["cache-control"]
        answered = time.time()
        assert control.startswith("public, max-age=")
        # The data ages while the request runs (slowly on a loaded machine): the max-age is
        # the one allowed at some instant between the question and the answer.
        assert allowed(answered) <= int(control.rsplit("=", 1)[1]) <= allowed(asked) <= expected
    assert client.get("/status").headers["cache-control"] == "no-store"


# ---------------------------------------------------------------- auth


def test_a_token_guards_every_route_but_healthz(serve):
    client = serve(token="s3cret-token")
    for path in ("/users/000001", "/payouts", "/status", "/metrics", "/openapi.json", "/docs"):
        missing = client.get(path)
        assert_problem(missing, 401)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get(path, headers={"Authorization": "Bearer s3cret-tokeN"})
        assert_problem(wrong, 401)
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert_problem(client.get(path, headers={"Authorization": "Basic s3cret-token"}), 401)
        assert client.get(path, headers={"Authorization": "Bearer s3cret-token"}).is_success
        assert client.get(path, headers={"Authorization": "bearer s3cret-token"}).is_success
    assert client.get("/healthz").status_code == 200
    assert_problem(client.get("/nope"), 401)  # routes are not revealed without the token
    good = {"Authorization": "Bearer s3cret-token"}
    user = client.get("/users/000001", headers=good)
    assert user.headers["cache-control"].startswith("private")
    document = client.get("/openapi.json", headers=good).json()
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/payouts?limit=0", {}, 400),
        ("GET", "/payouts?limit=1001", {}, 400),
        ("GET", "/payouts?limit=-1", {}, 400),
        ("GET", "/payouts?limit=abc", {}, 400),
        ("GET", "/payouts?limit=%EF%BC%91", {}, 400),  # a fullwidth digit one
        ("GET", "/payouts?limit=1&limit=2", {}, 400),
        ("GET", "/payouts?since=yesterday", {}, 400),
        ("GET", "/payouts?until=2023-02-30", {}, 400),
        ("GET", "/payouts?since=" + "9" * 41, {}, 400),
        ("GET", "/payouts?after=" + "a" * 65, {}, 400),
        ("GET", "/payouts?since=%00", {}, 400),
        ("GET", "/payouts?" + "x=1&" * 2600, {}, 414),
        ("GET", "/users/" + "a" * 3000, {}, 414),
        ("GET", "/payouts?%%%&&&==&since=%", {}, 400),
        ("GET", "/healthz?ready=perhaps", {}, 400),
        ("GET", "/nope", {}, 404),
        ("GET", "/payouts/", {}, 404),
        ("GET", "/users/", {}, 404),
        ("GET", "/users/a/b", {}, 404),
        ("GET", "/index.html", {}, 404),
        ("POST", "/", {}, 405),
        ("DELETE", "/payouts", {}, 405),
        ("POST", "/users/000001", {}, 405),
        ("PUT", "/status", {}, 405),
        ("PATCH", "/metrics", {}, 405),
        ("FROB", "/users/000001", {}, 405),
        ("GET", "/users/000001", {"X-Big": "y" * 9000}, 431),
    ],
)
def test_bad_input_is_a_4xx_problem_never_a_500(serve, method, path, headers, status):
    response = serve().request(method, path, headers=headers)
    body = assert_problem(response, status)
    if status == 405:
        assert "GET" in response.headers["allow"]
    assert "Traceback" not in body["detail"]


def test_a_request_body_is_refused(serve):
    client = serve()
    assert_problem(client.request("GET", "/users/000001", content=b"x" * 10_000), 413)
    assert_problem(client.post("/payouts", content=b"{}"), 413)


# ---------------------------------------------------------------- status, health, metrics, docs


def test_status_healthz_metrics_and_docs(serve, db_path):
    client = serve()
    client.get("/users/000001")
    client.get("/users/nobody")
    status = client.get("/status").json()
    assert status["transactions"] == 80 and status["users"] == 30
    assert status["asOf"] == "2023-11-14T22:13:20Z" and status["behind"] is True
    assert status["follow"]["enabled"] is False
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["ready"] is True  # not following
    assert client.get("/healthz?ready=true").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    user_ok = (("method", "GET"), ("route", "/users/{userId}"), ("status", "200"))
    assert samples[("txagg_http_requests_total", user_ok)] == 1
    assert samples[("txagg_http_requests_total", user_ok[:2] + (("status", "404"),))] == 1
    latency = ("txagg_http_request_duration_seconds_count", (("route", "/users/{userId}"),))
    assert samples[latency] == 2
    assert samples[("txagg_store_transactions", ())] == 80
    assert samples[("txagg_upstream_throttled_total", ())] == 0
    assert samples[("txagg_store_quarantined", ())] == 0
    assert samples[("txagg_sync_lag_seconds", ())] > 0
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    routes = {"/users/{userId}", "/payouts", "/status", "/healthz", "/metrics", "/openapi.json"}
    assert set(document["paths"]) == routes | {"/docs", "/"}
    page = client.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert all(route in page.text for route in routes) and "http://" not in page.text


def test_the_root_redirects_to_the_docs(serve):
    client = serve()
    for method in ("GET", "HEAD"):
        response = client.request(method, "/")
        assert response.status_code == 307, method
        assert response.headers["location"] == "/docs" and response.content == b""
    followed = client.get("/", follow_redirects=True)
    assert followed.status_code == 200 and followed.url.path == "/docs"
    assert followed.headers["content-type"].startswith("text/html")
    operation = client.get("/openapi.json").json()["paths"]["/"]["get"]
    assert operation["responses"]["307"]["headers"]["Location"]["schema"]["const"] == "/docs"
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    root = (("method", "GET"), ("route", "/"), ("status", "307"))
    assert samples[("txagg_http_requests_total", root)] == 2  # the redirect and the followed one
    assert samples[("txagg_http_requests_total", (("method", "HEAD"), *root[1:]))] == 1


def test_the_root_needs_the_token_like_every_route_but_healthz(serve):
    client = serve(token="tok")
    assert_problem(client.get("/"), 401)
    answer = client.get("/", headers={"Authorization": "Bearer tok"})
    assert answer.status_code == 307 and answer.headers["location"] == "/docs"


def test_garbage_requests_cannot_grow_the_metrics(serve):
    """Label values are bounded when a request is counted: made-up methods and paths, with no
    token or a wrong one, add to a fixed set of series and never create new ones."""
    client = serve(token="tok")
    good = {"Authorization": "Bearer tok"}
    rng = random.Random(5)
    methods: set[str] = set()

    def word(letters: str) -> str:
        return "".join(rng.choices(letters, k=14))

    # every kind of request once per round, so one round shows every series there can be
    kinds = list(itertools.product(range(3), range(4), range(3)))

    def garbage(rounds: int) -> None:
        for _ in range(rounds):
            for method_kind, path_kind, header_kind in kinds:
                method = word(string.ascii_uppercase)
                assert method not in methods
                methods.add(method)
                method = [method, method.lower(), "GET"][method_kind]
                token = word(string.ascii_lowercase + string.digits)
                path = [f"/{token}", f"/users/{token}", f"/payouts?x={token}", "/metrics"]
                headers = [{}, {"Authorization": f"Bearer {token}"}, good][header_kind]
                client.request(method, path[path_kind], headers=headers)

    def scrape() -> tuple[int, set[str]]:
        text = client.get("/metrics", headers=good).text
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        series = {line.rsplit(" ", 1)[0] for line in samples}
        assert len(series) == len(samples), "a series is written more than once"
        return len(text), series

    garbage(1)
    size, series = scrape()
    garbage(60)  # 2160 requests
    size_after, series_after = scrape()
    assert series_after == series
    assert size_after < size + 10 * len(series)  # only the numbers grew
    families = text_string_to_metric_families(client.get("/metrics", headers=good).text)
    families = {family.name: family for family in families}
    methods_seen = {s.labels["method"] for s in families["txagg_http_requests"].samples}
    assert methods_seen <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


def test_metric_labels_are_bounded_whatever_is_observed():
    metrics = Metrics(lambda: {}, lambda: 0)
    for n in range(1000):
        metrics.observe(f"/path{n}", f"M{n}", 200 + n, 0.001)
    metrics.observe("/payouts", "GET", 200, 0.001)
    assert set(metrics.requests) == {
        ("unmatched", "other", "200"),
        ("unmatched", "other", "2xx"),
        ("unmatched", "other", "3xx"),
        ("unmatched", "other", "304"),
        ("unmatched", "other", "307"),
        ("unmatched", "other", "4xx"),
        ("unmatched", "other", "400"),
        ("unmatched", "other", "401"),
        ("unmatched", "other", "404"),
        ("unmatched", "other", "405"),
        ("unmatched", "other", "413"),
        ("unmatched", "other", "414"),
        ("unmatched", "other", "431"),
        ("unmatched", "other", "5xx"),
        ("unmatched", "other", "500"),
        ("unmatched", "other", "503"),
        ("unmatched", "other", "other"),
        ("/payouts", "GET", "200"),
    }
    assert set(metrics.latency) == {"unmatched", "/payouts"}


def test_a_missing_store_is_refused_and_the_cli_says_so(tmp_path):
    result = run_txagg("serve", "--db", str(tmp_path / "none.db"), "--port", "0")
    assert result.returncode == 1 and "no store at" in result.stderr


def test_the_cli_serves_with_a_token_from_the_environment_and_stops_on_sigterm(db_path):
    seed(db_path, 5)
    for workers in ("1", "2"):
        process = subprocess.Popen(
            txagg_command("serve", "--db", str(db_path), "--port", "0", "--workers", workers),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, "TXAGG_TOKEN": "tok"},
        )
        try:
            line = process.stdout.readline()
            assert "listening on" in line, process.stderr.read()
            url = line.rsplit(" ", 1)[1].strip()
            assert httpx.get(url + "/users/000001").status_code == 401
            answer = httpx.get(url + "/users/000001", headers={"Authorization": "Bearer tok"})
            assert answer.status_code == 200 and answer.json()["userId"] == "000001"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0, process.stderr.read()


# ---------------------------------------------------------------- --follow


def wait_for(condition, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_follow_serves_while_syncing_and_matches_the_mock_once_caught_up(
    serve, db_path, start_mock
):
    # History, then 3 s of live traffic (1000 a minute) that the loop picks up while serving.
    mock_url = start_mock(
        users=40, history=6000, tx_per_minute=1000, live_for=3, rate_limit=1000, per=1
    )
    options = SyncOptions(api_url=mock_url, rate_limit=1000, per=1, interval=0.2, settle=0)
    someone = loads(httpx.get(mock_url + "/users", timeout=30).content)["items"][0]["userId"]
    client = serve(seeded=False, follow=True, sync_options=options)
    statuses: set[int] = set()
    seen_counts: set[int] = set()

    def caught_up():
        # Readers keep getting answers while the sync thread writes.
        statuses.add(client.get(f"/users/{someone}").status_code)
        truth = loads(httpx.get(mock_url + "/users", timeout=30).content)["items"]
        stored = client.get("/status").json()["transactions"]
        seen_counts.add(stored)
        live_over = time.monotonic() > started + 3.5
        return live_over and stored == sum(user["transactions"] for user in truth) and truth

    started = time.monotonic()
    truth = wait_for(caught_up)
    assert len(seen_counts) >= 2, "the store should have grown while being served"
    assert statuses <= {200, 404} and 200 in statuses
    for expected in truth:
        served = loads(client.get(f"/users/{expected['userId']}").content)
        assert {k: v for k, v in served.items() if k != "asOf"} == {
            k: v for k, v in expected.items() if k != "asOf"
        }
    mock_payouts = loads(httpx.get(mock_url + "/payouts", timeout=30).content)["items"]
    assert all_pages(client, "/payouts?limit=7") == mock_payouts
    assert wait_for(lambda: client.get("/healthz?ready=true").status_code == 200)
    follow = client.get("/status").json()["follow"]
    assert follow == {"enabled": True, "running": True, "errors": 0, "lastError": None}


def test_a_failing_sync_never_takes_the_api_down(serve, db_path):
    seed(db_path, 3)
    with Store.open(db_path) as store:
        store.put_state(window_start=BASE_MS, position=BASE_MS)
    dead = SyncOptions(api_url="http://127.0.0.1:9", interval=0.1, retry_for=0.2, timeout=0.5)
    client = serve(follow=True, sync_options=dead)
    wait_for(lambda: client.get("/status").json()["follow"]["errors"] >= 2)
    assert client.get("/users/000001").status_code == 200
    assert client.get("/healthz").status_code == 200  # alive
    not_ready = assert_problem(client.get("/healthz?ready=true"), 503)
    assert not_ready["ready"] is False and "behind" in not_ready["detail"]
    assert client.get("/status").json()["follow"]["running"] is True
    samples = text_string_to_metric_families(client.get("/metrics").text)
    errors = next(family for family in samples if family.name == "txagg_sync_errors")
    assert errors.samples[0].value >= 2


# ---------------------------------------------------------------- schemathesis


# The document is loaded from the function that serves it (the lazy fixture loader does not work
# on this pytest); the first test below checks the server serves exactly this document.
SCHEMA_CONFIG = ServeConfig(db=Path("unused.db"), port=0)
schema = schemathesis.openapi.from_dict(openapi_document(SCHEMA_CONFIG))
CONFORMANCE = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory):
    db = tmp_path_factory.mktemp("schema") / "store.db"
    seed(db, 30)
    url, stop = start_in_thread(ServeConfig(db=db, port=0))
    yield url
    stop()


def test_the_server_serves_the_document_the_schema_tests_use(schema_server):
    served = httpx.get(schema_server + "/openapi.json").json()
    assert served == openapi_document(SCHEMA_CONFIG)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_conforms_to_the_openapi_document(case, schema_server):
    case.call_and_validate(base_url=schema_server, checks=CONFORMANCE)


def test_concurrent_readers_are_served_while_a_writer_commits(serve, db_path):
    client = serve()
    stop = threading.Event()

    def write() -> None:
        with Store.open(db_path) as writer:
            n = 50_000
            while not stop.is_set():
                writer.ingest([record(n, "000003", "earned", Decimal("0.01"))])
                n += 1

    def transactions(answer: httpx.Response) -> int:
        assert answer.status_code == 200
        return answer.json()["transactions"]

    thread = threading.Thread(target=write)
    thread.start()
    answers: list[httpx.Response] = []
    try:
        # At least 200 reads, and on until the writer's commits show: however the threads are
        # scheduled on a loaded machine, the readers are seen served across commits.
        deadline = time.monotonic() + 60
        while len(answers) < 200 or transactions(answers[-1]) == transactions(answers[0]):
            assert time.monotonic() < deadline, "no commit of the writer was ever seen"
            answers.append(client.get("/users/000003"))
    finally:
        stop.set()
        thread.join()
    counts = [transactions(answer) for answer in answers]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_a_period_too_long_to_add_up_is_a_503_not_a_stuck_thread(serve, db_path, monkeypatch):
    import txagg.server

    seed(db_path, 3000)
    client = serve()
    monkeypatch.setattr(txagg.server, "QUERY_SECONDS", 0)
    slow = client.get("/payouts?since=2000-01-01")
    assert_problem(slow, 503)
    assert slow.headers["retry-after"] == "60"
    monkeypatch.setattr(txagg.server, "QUERY_SECONDS", 10)
    assert client.get("/payouts?since=2000-01-01").status_code == 200

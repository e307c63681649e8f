"""``txagg serve`` on a PostgreSQL store: replicas that answer from a local copy, through the
real app over loopback HTTP, against the real PostgreSQL of the test session."""

from __future__ import annotations

import re
import secrets
import time
from decimal import Decimal

import httpx
import pytest
from conftest import POSTGRES_SERVER, record, run_sql, run_txagg, wait_for

from txagg.models import dumps
from txagg.report import user_report
from txagg.server import ServeConfig, start_in_thread
from txagg.server import app as app_module
from txagg.store import Store

BASE_MS = 1_700_000_000_000


def seed(url: str, users: int, first_tx: int = 0, as_of_ms: int = BASE_MS) -> None:
    page = []
    n = first_tx
    for number in range(users):
        kinds = ("earned", "spent", "payout") if number % 3 else ("earned", "spent")
        for kind in kinds:
            page.append(record(n, f"{number:06d}", kind, Decimal(n % 997 + 1) / 100, at_s=number))
            n += 1
    with Store.open(url) as store:
        store.ingest(page, state={"as_of": as_of_ms})


@pytest.fixture
def replicas(monkeypatch):
    """Start replica servers (each its own app, copy and connections); every Replica made is
    kept in ``.made``; all stopped at teardown."""
    made = []
    stops = []
    start_replica = app_module.start_replica

    def recording(*args, **kwargs):
        replica = start_replica(*args, **kwargs)
        made.append(replica)
        return replica

    monkeypatch.setattr(app_module, "start_replica", recording)

    def start(db: str, **options) -> httpx.Client:
        url, stop = start_in_thread(ServeConfig(db=db, port=0, **options))
        client = httpx.Client(base_url=url, timeout=30)
        stops.append((client, stop))
        return client

    start.made = made
    yield start
    for client, stop in stops:
        client.close()
        stop()


def answers(client: httpx.Client, users: list[str]) -> list[tuple]:
    paths = [f"/users/{user}" for user in users] + [
        "/users/nobody",
        "/payouts?limit=4",
        "/payouts?limit=3&after=000004",
        "/payouts?since=2023-11-14T22:13:25Z",
    ]
    return [
        (response.status_code, response.headers.get("etag"), response.content)
        for response in map(client.get, paths)
    ]


def test_the_store_stamps_a_data_version_on_what_each_commit_changes(pg_url):
    seed(pg_url, 3)
    first = dict(run_sql(pg_url, "SELECT user_id, version FROM users"))
    assert set(first.values()) == {1}
    with Store.open(pg_url) as store:
        store.ingest([record(100, "000001")], state={"as_of": BASE_MS + 1000})
        store.put_state(as_of=BASE_MS + 2000)  # asOf is in every answer: a new version
        store.put_state(position=5)  # the cursor alone changes no answer
    after = dict(run_sql(pg_url, "SELECT user_id, version FROM users"))
    assert after == {"000000": 1, "000001": 2, "000002": 1}
    assert run_sql(pg_url, "SELECT value FROM data_version") == [(3,)]


def test_two_replicas_answer_alike_and_as_the_cli_and_the_direct_mode_do(replicas, pg_url):
    seed(pg_url, 40)
    users = ["000000", "000001", "000002", "000039"]
    one, two = replicas(pg_url), replicas(pg_url)
    direct = replicas(pg_url, local_copy=False)
    first = answers(one, users)
    assert first == answers(two, users) == answers(direct, users)
    assert [status for status, _, _ in first] == [200, 200, 200, 200, 404, 200, 200, 200]
    assert len({etag for status, etag, _ in first if status == 200}) == 1
    with Store.open(pg_url, create=False, read_only=True) as store:
        assert first[1][2] == dumps(user_report(store, "000001")).encode()
    cli = run_txagg("report", "000002", "--json", "--db", pg_url)
    assert first[2][2] == cli.stdout.strip().encode()
    # One ETag across replicas: a 304 from either for the tag the other gave.
    etag = first[0][1]
    assert two.get("/users/000000", headers={"If-None-Match": etag}).status_code == 304
    assert len(replicas.made) == 2 and replicas.made[0].path != replicas.made[1].path


def test_a_commit_shows_up_on_every_replica_within_two_seconds(replicas, pg_url):
    seed(pg_url, 10)
    one, two = replicas(pg_url), replicas(pg_url)
    before = one.get("/users/000004")
    with Store.open(pg_url) as store:  # as a sync's page commit
        store.ingest([record(500, "000004", "earned", Decimal(5))], state={"as_of": BASE_MS + 5000})
        store.ingest([record(501, "new-user", "spent", Decimal(1))])
    committed = time.monotonic()
    for client in (one, two):
        wait_for(lambda c=client: c.get("/users/000004").content != before.content, timeout=5)
        wait_for(lambda c=client: c.get("/users/new-user").status_code == 200, timeout=5)
    assert time.monotonic() - committed < 2.5
    now_one, now_two = one.get("/users/000004"), two.get("/users/000004")
    assert now_one.content == now_two.content
    assert now_one.headers["etag"] == now_two.headers["etag"] != before.headers["etag"]
    assert b'"asOf": "2023-11-14T22:13:25Z"' in now_one.content
    assert b'"transactions": 4' in now_one.content  # earned, spent, payout and the new one


@pytest.fixture
def own_database():
    """A database of its own (its connections can be refused without touching other tests'),
    dropped at the end."""
    import psycopg

    name = f"txagg_replica_{secrets.token_hex(4)}"
    admin = psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=10)
    admin.execute(f'CREATE DATABASE "{name}"')

    def refuse_connections(refuse: bool) -> None:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not refuse).lower()}')
        if refuse:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )

    try:
        yield f"{POSTGRES_SERVER}/{name}", refuse_connections
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_an_unreachable_database_leaves_answers_and_fails_readiness_once_stale(
    replicas, own_database
):
    url, refuse_connections = own_database
    seed(url, 10)
    client = replicas(url, stale_after=2)
    before = client.get("/users/000001")
    assert client.get("/healthz", params={"ready": "true"}).status_code == 200
    refuse_connections(True)
    time.sleep(0.5)
    answer = client.get("/users/000001")
    assert (answer.status_code, answer.content) == (200, before.content)  # honest: old asOf
    assert answer.headers["etag"] == before.headers["etag"]
    assert client.get("/payouts?limit=3").status_code == 200
    ready = wait_for(
        lambda: (r := client.get("/healthz", params={"ready": "true"})).status_code == 503 and r,
        timeout=10,
    )
    assert "last brought up to date" in ready.json()["detail"]
    assert client.get("/users/000001").content == before.content  # still answering
    assert replicas.made[0].errors >= 1
    refuse_connections(False)
    wait_for(lambda: client.get("/healthz", params={"ready": "true"}).status_code == 200)


def test_the_queries_a_replica_makes_do_not_grow_with_its_reads(replicas, pg_url):
    seed(pg_url, 50)
    client = replicas(pg_url, refresh_seconds=0.5)
    replica = replicas.made[0]

    def queries_in(seconds: float, reads: bool) -> tuple[int, int]:
        start, served = replica.queries, 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if reads:
                assert client.get(f"/users/{served % 50:06d}").status_code == 200
                served += 1
            else:
                time.sleep(0.05)
        return replica.queries - start, served

    idle, _ = queries_in(3, reads=False)
    busy, served = queries_in(3, reads=True)
    assert served > 500
    # A pull every 0.5 s either way: about 6 in 3 s, whatever the reads.
    assert 4 <= idle <= 8 and 4 <= busy <= 8, (idle, busy, served)
    assert abs(busy - idle) <= 2
    low = replica.queries
    metrics = client.get("/metrics").text
    shown = re.search(r"^txagg_replica_queries_total (\S+)$", metrics, re.M)
    assert shown and low <= float(shown[1]) <= replica.queries

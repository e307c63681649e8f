"""Shared fixtures: fresh stores in temp dirs (and in a PostgreSQL database of the session's
own), a real mock upstream, a scripted upstream."""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from txagg import testing
from txagg.models import dumps, format_timestamp, parse_time
from txagg.store import Store, StoreError, is_postgres_url
from txagg.testing import FakeClock, MockProcess, txagg_command  # noqa: F401 (for tests)

START = 1_700_000_000_000  # a fixed clock anchor (2023-11-14T22:13:20Z) for reproducible data


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db_path: Path):
    with Store.open(db_path) as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgres"])
def either_location(request, tmp_path: Path) -> Path | str:
    """Where a fresh store goes on each backend in turn: a SQLite file's path, then a
    PostgreSQL store's URL (what ``--db`` takes either way)."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def either_store(either_location: Path | str):
    """A fresh store on each backend in turn: a SQLite file, then a PostgreSQL schema. Test
    modules whose contract holds on both use it as their ``store``."""
    with Store.open(either_location) as opened:
        yield opened


@pytest.fixture
def start_mock():
    """Start real mock upstreams (HTTP on loopback, in a thread); all stopped at teardown."""
    from txagg.mock import MockConfig, start_in_thread

    stops = []

    def start(**options):
        options.setdefault("port", 0)
        url, stop = start_in_thread(MockConfig(**options))
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


def record(
    n: int, user="000001", kind="earned", amount=Decimal("1.5"), at_s=0, base: int = START
) -> dict:
    """One upstream record, as JSON-decoded data, with a fixed id per n, at base + at_s."""
    seconds = base // 1000 + at_s
    from datetime import datetime

    moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "userId": user,
        "createdAt": moment,
        "type": kind,
        "amount": amount,
    }


class ScriptedUpstream:
    """A tiny real HTTP server whose /transactions answers come from a script.

    Each script entry is (status, headers, body bytes) or a callable(query) returning one;
    the last entry repeats. Every request's query string is kept in ``requests``.
    """

    def __init__(self, script: list):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                outer.requests.append(query)
                entry = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if callable(entry):
                    entry = entry(query)
                status, headers, body = entry
                if status == "reset":
                    self.connection.close()
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def page(items: list, total: int | None = None) -> tuple[int, dict, bytes]:
    meta = {
        "totalItems": len(items) if total is None else total,
        "itemCount": len(items),
        "itemsPerPage": 1000,
        "totalPages": 1,
        "currentPage": 1,
    }
    body = dumps({"items": items, "meta": meta}).encode()
    return 200, {"Content-Type": "application/json"}, body


def _serving(server_class):
    """A fixture body: a factory of ``server_class`` servers, all closed at teardown."""
    servers = []

    def make(argument):
        server = server_class(argument)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def scripted() -> Callable[[list], ScriptedUpstream]:
    yield from _serving(ScriptedUpstream)


def run_txagg(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real command in a subprocess (stdout is a pipe, so JSON is the default)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        txagg_command(*args), capture_output=True, text=True, env=full_env, timeout=timeout
    )


def wait_for(condition: Callable[[], object], timeout: float = 60.0, every: float = 0.05):
    """Poll ``condition`` until it holds and return its value: a generous deadline for what
    must happen, never a guess at how long it takes (a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
    return result


def peek(db: str | Path, read: Callable[[Store], object]) -> object:
    """``read(store)`` on a store another process may be writing, through a read-only
    connection (None while the store is not there or not readable yet)."""
    import sqlite3

    if is_postgres_url(db):
        try:
            with Store.open(db, create=False, read_only=True) as store:
                return read(store)
        except StoreError:
            return None

    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        return read(Store(conn, Path(db)))
    except sqlite3.Error:
        return None
    finally:
        conn.close()


@pytest.fixture
def mock_process():
    processes = []

    def start(*args: str) -> MockProcess:
        process = MockProcess(*args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


class FakeUpstream:
    """Items (id, createdAt ms, visible-at s); answers /transactions like the contract allows."""

    def __init__(
        self, items, clock: FakeClock, inclusive_start: bool, inclusive_end: bool, broken=()
    ):
        self.items = items
        self.broken = frozenset(broken)  # ids served with an unusable createdAt
        self.clock = clock
        self.inclusive_start = inclusive_start
        self.inclusive_end = inclusive_end

    def handle(self, request: httpx.Request) -> httpx.Response:
        query = request.url.params
        start = parse_time(query["startDate"])
        end = parse_time(query["endDate"])
        page, limit = int(query["page"]), int(query["limit"])
        if page < 1 or not 1 <= limit <= 1000:  # as the contract refuses them
            return httpx.Response(400, json={"detail": f"page {page}, limit {limit}"})
        visible = sorted(
            (created, tx_id)
            for tx_id, created, visible_at in self.items
            if visible_at <= self.clock.now
            and (created >= start if self.inclusive_start else created > start)
            and (created <= end if self.inclusive_end else created < end)
        )
        chunk = visible[(page - 1) * limit : page * limit]
        items = [
            {
                "id": tx_id,
                "userId": f"{int(tx_id[2:]) % 7:06d}",
                "createdAt": "not a date" if tx_id in self.broken else format_timestamp(created),
                "type": "earned",
                "amount": 1,
            }
            for created, tx_id in reversed(chunk)  # any order inside a page
        ]
        meta = {"totalItems": len(visible), "itemCount": len(items), "currentPage": page}
        return httpx.Response(200, json={"items": items, "meta": meta})


def paged_answer(items: list, page_size: int = 1000, total: int | None = None):
    """An answer function serving ``items`` page by page, whatever the window."""

    def answer(query: dict):
        number = int(query.get("page", 1))
        limit = int(query.get("limit", page_size))
        chunk = items[(number - 1) * limit : number * limit]
        return page(chunk, len(items) if total is None else total)

    return answer


def sync_options(url: str, **extra):
    """SyncOptions for a scripted upstream: a fresh store starts at START, retries give up after
    10 s, no late-arrival check unless a test asks for one."""
    return testing.sync_options(
        url, **{"since": START, "retry_for": 10, "check_every": None, **extra}
    )


class RawUpstream:
    """A hostile HTTP server on loopback: ``answer(send, query)`` writes whatever bytes it
    likes (``send`` returns False once the client has gone). Each connection gets its own
    thread; every loop in an answer must end by itself or when the client goes away, and all
    of them end when the server closes."""

    def __init__(self, answer: Callable):
        import socket

        self.answer = answer
        self.requests: list[dict] = []
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        conn.settimeout(5)
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            target = head.split(b" ", 2)[1].decode()
            query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            self.requests.append(query)

            def send(data: bytes) -> bool:
                if self.closed.is_set():
                    return False
                try:
                    conn.sendall(data)
                    return True
                except OSError:
                    return False

            self.answer(send, query)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def raw_upstream() -> Callable[[Callable], RawUpstream]:
    yield from _serving(RawUpstream)


# ---------------------------------------------------------------- PostgreSQL

# The server the PostgreSQL tests use (a URL without a database); CI starts one (.ci/run).
POSTGRES_SERVER = os.environ.get("TXAGG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
_schemas = itertools.count(1)


def _no_postgres(why: str):
    """Skip where no PostgreSQL can be had; on CI (CI=true), which has one, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"the PostgreSQL tests cannot run on CI: {why}")
    pytest.skip(f"no PostgreSQL for these tests: {why}")


@pytest.fixture(scope="session")
def pg_database():
    """The URL of a database of this test session's own (txagg_test_<pid>_<random>), dropped
    at the end, its leftover connections ended first."""
    try:
        import psycopg
    except ImportError:
        _no_postgres("psycopg is not installed (pip install -e '.[test]')")
    name = f"txagg_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=10)
    except psycopg.Error as error:
        _no_postgres(f"cannot connect to {POSTGRES_SERVER}: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES_SERVER}/{name}"
        finally:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_pg_store_url(database_url: str) -> str:
    """The URL of a new, empty store: a schema of its own in ``database_url``'s database."""
    import psycopg

    schema = f"store_{next(_schemas)}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{database_url}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_database) -> str:
    """A fresh, empty PostgreSQL store's URL (each test its own schema)."""
    return new_pg_store_url(pg_database)


def run_sql(location: str | Path, statement: str, params: tuple = ()) -> list[tuple]:
    """Run one statement (``?`` placeholders) on the store at ``location`` from outside txagg,
    as another program or a person at a SQL prompt would; its rows, committed."""
    if is_postgres_url(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    import sqlite3

    conn = sqlite3.connect(location)
    try:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()

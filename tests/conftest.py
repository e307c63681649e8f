"""Shared fixtures: fresh stores in temp dirs, a real mock upstream, a scripted upstream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from txagg.models import dumps, format_timestamp, parse_time
from txagg.store import Store

START = 1_700_000_000_000  # a fixed clock anchor (2023-11-14T22:13:20Z) for reproducible data


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db_path: Path):
    with Store.open(db_path) as opened:
        yield opened


@pytest.fixture
def start_mock():
    """Start real mock upstreams (HTTP on loopback, in a thread); all stopped at teardown."""
    from txagg.mock_server import MockConfig, start_in_thread

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


@pytest.fixture
def scripted() -> Callable[[list], ScriptedUpstream]:
    servers = []

    def make(script: list) -> ScriptedUpstream:
        server = ScriptedUpstream(script)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def txagg_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "txagg", *args]


def run_txagg(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real command in a subprocess (stdout is a pipe, so JSON is the default)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        txagg_command(*args), capture_output=True, text=True, env=full_env, timeout=timeout
    )


class MockProcess:
    """``txagg mock-serve`` in a real subprocess, on a free port."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            txagg_command("mock-serve", "--port", "0", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"mock-serve did not start: {line!r} {self.process.stderr.read()}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


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


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


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

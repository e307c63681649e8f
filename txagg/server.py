"""``txagg serve``: the HTTP API over the store, optionally syncing in the same process.

Two layers, for speed where it counts and a framework where it helps:

* ``ServerApp`` is a raw ASGI callable in front of everything. It screens every request (URL and
  header sizes, request bodies, the bearer token), records metrics, and answers the hot route,
  ``GET /users/{userId}``, itself: one primary-key lookup on a connection owned by the event loop
  thread (sub-millisecond, so it is done inline) and a body formatted straight from the row.
* Everything else goes to a small Starlette app. Its routes whose cost grows with the data
  (``/payouts``, ``/status``, ``/metrics``) run in a few worker threads with their own read
  connections, so a long page never stalls the event loop.

Answers that depend only on the data carry a weak ``ETag`` made from the data version (the stored
transaction count and ``asOf``, so every worker and every restart agrees on it) and a
``Cache-Control: max-age`` that never lets a cached answer pass the 2-minute freshness promise.

With ``follow`` the sync loop runs in a daemon thread of the same process, with its own
connection: SQLite's WAL lets readers go on while it writes, and every failure of it is logged
and retried, never allowed to take the API down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import queue
import signal
import socket
import sqlite3
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from functools import partial
from http import HTTPStatus
from pathlib import Path
from time import monotonic, perf_counter
from urllib.parse import unquote_to_bytes, urlencode

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__
from .apidocs import docs_html
from .models import (
    MAX_USER_ID_LENGTH,
    PAYOUT_ITEM_SCHEMA,
    PROBLEM_SCHEMA,
    USER_REPORT_SCHEMA,
    dumps,
    format_decimal,
    format_instant,
    format_timestamp,
    parse_time,
)
from .report import STALE_AFTER_SECONDS, status_report, to_eur
from .store import DamagedStore, Store, StoreError, check_user_row, explain
from .sync import Syncer, SyncOptions

PROBLEM_TYPE = "application/problem+json"
JSON_TYPE = "application/json"

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_PATH_BYTES = 2048  # no route of ours needs more; longer is a 414
MAX_QUERY_BYTES = 2048
MAX_HEADER_BYTES = 8192  # all header names and values together; more is a 431
MAX_TIME_TEXT = 40  # models.parse_time refuses longer texts
VERSION_CHECK_SECONDS = 0.002  # how often the hot path asks SQLite whether the data changed
READER_CACHE_KIB = 64 * 1024  # the event loop's connection: holds a 1M-user table's hot pages
POOL_CACHE_KIB = 16 * 1024  # each worker thread's connection
POOL_THREADS = 4  # concurrent /payouts, /status and /metrics queries per process
FOLLOW_BACKOFF_MAX = 60.0
QUERY_SECONDS = 10  # the longest a /payouts page may take before it is a 503
USERS_ROUTE = "/users/{userId}"
STATIC_ROUTES = ("/payouts", "/status", "/healthz", "/metrics", "/openapi.json", "/docs")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The statuses this app answers with; any other is counted in its class ("4xx", "5xx", ...).
KNOWN_STATUSES = (200, 304, 400, 401, 404, 405, 413, 414, 431, 500, 503)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class ServeConfig:
    db: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_age: int = 30  # seconds; the effective max-age also shrinks as the data ages
    workers: int = 1
    follow: bool = False
    sync_options: SyncOptions | None = None
    eur_per_scr: Decimal = Decimal(1)

    def __post_init__(self) -> None:
        self.db = Path(self.db)
        checks = [
            (
                0 <= self.max_age <= STALE_AFTER_SECONDS,
                f"max_age must be between 0 and {STALE_AFTER_SECONDS} seconds",
            ),
            (self.workers >= 1, "workers must be at least 1"),
            (0 <= self.port <= 65535, "port must be between 0 and 65535"),
            (not self.follow or self.sync_options is not None, "follow needs sync_options"),
            (self.eur_per_scr > 0, "eur_per_scr must be positive"),
            (self.token is None or self.token.strip() != "", "the token must not be empty"),
        ]
        for holds, message in checks:
            if not holds:
                raise ValueError(message)


# ---------------------------------------------------------------- answers and problems


class BadRequest(ValueError):
    """A query parameter the API cannot take; the message says which and why."""


@dataclass
class Answer:
    """A response as plain data, so the thread-pool code never touches ASGI objects."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str | None = JSON_TYPE

    def response(self) -> Response:
        return Response(self.body, self.status, headers=self.headers, media_type=self.media_type)


def problem_body(status: int, detail: str, **extra: object) -> bytes:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return dumps(body).encode()


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra) -> Answer:
    merged = {"Cache-Control": "no-store", **(headers or {})}
    return Answer(status, problem_body(status, detail, **extra), merged, PROBLEM_TYPE)


def etag_matches(if_none_match: str | bytes | None, etag: str) -> bool:
    """If-None-Match against our weak ETag, by the weak comparison RFC 9110 prescribes for it."""
    if not if_none_match:
        return False
    text = if_none_match.decode("latin-1") if isinstance(if_none_match, bytes) else if_none_match
    opaque = etag.removeprefix("W/")
    for candidate in text.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == opaque:
            return True
    return False


# ---------------------------------------------------------------- the data version


def open_reader(path: Path, cache_kib: int) -> Store:
    """A read-only connection: the API must never write, whatever a bug might try."""
    store = Store.open(path, create=False, read_only=True)
    store.conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    store.conn.execute("PRAGMA query_only=1")
    return store


VERSION_SQL = (
    "SELECT (SELECT value FROM counters WHERE name = 'transactions'), "
    "(SELECT value FROM sync_state WHERE name = 'as_of')"
)


def read_version(conn) -> tuple[int, int | None]:
    """(stored transactions, asOf ms): every user and payout answer is a function of these,
    since totals only move when transactions are inserted, in the same commit as the count."""
    count, as_of = conn.execute(VERSION_SQL).fetchone()
    return count or 0, None if as_of is None else int(json.loads(as_of))


def make_etag(count: int, as_of: int | None, salt: str) -> str:
    # Weak: the hot path re-reads the version only every few ms, so a body may be a little newer
    # than its tag; it is never older, and weak tags promise equivalence, not identical bytes.
    return f'W/"{count:x}-{(as_of or 0):x}-{salt}"'


def fresh_for(max_age: int, as_of_ms: int | None, now: float) -> int:
    """The max-age that keeps an answer within the freshness promise once cached: the data
    is already ``now - asOf`` old, and a cache adds up to max-age on top."""
    if as_of_ms is None:
        return 0
    lag = int(now - as_of_ms / 1000)
    return max(0, min(max_age, STALE_AFTER_SECONDS - lag))


class Snapshot:
    """What the hot path needs besides the row, cached per data version.

    Owned by the event loop thread, with its own connection. ``PRAGMA data_version`` tells
    whether any other connection committed since; asking costs a few microseconds, so it is
    asked at most every VERSION_CHECK_SECONDS.
    """

    def __init__(self, store: Store, config: ServeConfig, salt: str):
        self.store = store
        self.max_age = config.max_age
        self.visibility = "private" if config.token else "public"
        self.salt = salt
        self.checked = -1.0
        self.data_version: int | None = None
        self.count = 0
        self.as_of_ms: int | None = None
        self.as_of_json = b"null"
        self.etag = ""
        self.headers: list[tuple[bytes, bytes]] = []  # ETag, Cache-Control, Content-Type

    def refresh(self) -> None:
        now = monotonic()
        if now - self.checked < VERSION_CHECK_SECONDS:
            return
        self.checked = now
        data_version = self.store.conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version != self.data_version:
            self.data_version = data_version
            self.count, self.as_of_ms = read_version(self.store.conn)
            self.as_of_json = (
                b"null" if self.as_of_ms is None else f'"{format_instant(self.as_of_ms)}"'.encode()
            )
            self.etag = make_etag(self.count, self.as_of_ms, self.salt)
        # Recomputed even when nothing changed: the allowed max-age shrinks as the data ages.
        control = cache_control(self.visibility, self.max_age, self.as_of_ms)
        self.headers = [
            (b"etag", self.etag.encode()),
            (b"cache-control", control.encode()),
            (b"content-type", b"application/json"),
        ]

    def lag_seconds(self) -> int | None:
        return None if self.as_of_ms is None else max(0, int(time.time() - self.as_of_ms / 1000))


def cache_control(visibility: str, max_age: int, as_of_ms: int | None) -> str:
    # With a token, answers go to "private": RFC 9111 keeps shared caches from storing responses
    # to authorized requests unless told "public", and that must be the operator's choice.
    return f"{visibility}, max-age={fresh_for(max_age, as_of_ms, time.time())}"


class StorePool:
    """Read connections for the worker threads, reused and closed together at shutdown."""

    def __init__(self, path: Path):
        self.path = path
        self.idle: queue.SimpleQueue[Store] = queue.SimpleQueue()
        self.opened: list[Store] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        try:
            store = self.idle.get_nowait()
        except queue.Empty:
            store = open_reader(self.path, POOL_CACHE_KIB)
            with self.lock:
                self.opened.append(store)
        try:
            yield store
        finally:
            self.idle.put(store)

    def close(self) -> None:
        with self.lock:
            for store in self.opened:
                store.close()
            self.opened.clear()


# ---------------------------------------------------------------- metrics


class Metrics:
    """Request counts and latencies, kept as plain numbers and exposed by prometheus_client.

    Counting is a few list operations on the event loop thread: prometheus_client's own Counter
    and Histogram take a lock per update, which costs the hot path about a tenth of its rate.
    A scrape reads these numbers (from a worker thread; the GIL keeps each read whole) and the
    store's figures, so store-wide values are right whichever process synced.
    """

    def __init__(self, read_store: Callable[[], dict], sync_errors: Callable[[], int]):
        self.read_store = read_store
        self.sync_errors = sync_errors
        # (route, method, status) label values -> [count]. Every label is bounded here, when
        # a request is counted, so no request (unauthenticated or garbage) adds a series.
        self.requests: dict[tuple[str, str, str], list[int]] = {}
        # route -> [count per bucket (the last is +Inf)..., sum of seconds]
        self.latency: dict[str, list[float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request. ``route`` must come from ``route_of`` (or be USERS_ROUTE)."""
        if route not in ROUTE_LABELS:
            route = "unmatched"
        if method not in KNOWN_METHODS:
            method = "other"
        key = (route, method, STATUS_LABELS.get(status) or status_class(status))
        counter = self.requests.get(key)
        if counter is None:
            counter = self.requests[key] = [0]
        counter[0] += 1
        histogram = self.latency.get(route)
        if histogram is None:
            histogram = self.latency[route] = [0] * (len(LATENCY_BUCKETS) + 2)
        histogram[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def collect(self) -> Iterator:
        requests = CounterMetricFamily(
            "txagg_http_requests",
            "HTTP requests answered, by route, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), counter in list(self.requests.items()):
            requests.add_metric([route, method, status], counter[0])
        yield requests
        latency = HistogramMetricFamily(
            "txagg_http_request_duration_seconds",
            "Time from the request reaching the app to the last byte handed to the server",
            labels=["route"],
        )
        for route, histogram in list(self.latency.items()):
            counts = list(histogram[:-1])
            cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
            bounds = [str(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([route], list(zip(bounds, cumulative, strict=True)), histogram[-1])
        yield latency
        yield CounterMetricFamily(
            "txagg_sync_errors",
            "Sync failures in this process's follow loop (it retries)",
            value=self.sync_errors(),
        )
        yield from store_families(self.read_store())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


STATUS_LABELS = {status: str(status) for status in KNOWN_STATUSES}


def status_class(status: int) -> str:
    """The label of a status the app does not answer with: its class, "4xx" say."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def store_families(facts: dict) -> Iterator:
    gauges = [
        ("txagg_sync_lag_seconds", "Seconds between now and asOf", facts["lag"]),
        ("txagg_sync_as_of_timestamp_seconds", "asOf, Unix time", facts["as_of"]),
        ("txagg_store_transactions", "Transactions stored", facts["transactions"]),
        ("txagg_store_users", "Users known", facts["users"]),
        ("txagg_store_quarantined", "Records quarantined", facts["quarantined"]),
        ("txagg_store_conflicts", "Conflicting versions recorded", facts["conflicts"]),
    ]
    for name, documentation, value in gauges:
        if value is not None:
            yield GaugeMetricFamily(name, documentation, value=value)
    yield CounterMetricFamily(
        "txagg_upstream_requests",
        "Requests sent upstream by every process on this store",
        value=facts["requests"],
    )
    yield CounterMetricFamily(
        "txagg_upstream_throttled",
        "429 answers drawn from the upstream by every process on this store",
        value=facts["throttled"],
    )


def store_facts(store: Store) -> dict:
    counters = store.counters()
    as_of = store.state_value("as_of")
    return {
        "lag": None if as_of is None else max(0.0, time.time() - as_of / 1000),
        "as_of": None if as_of is None else as_of / 1000,
        "transactions": counters.get("transactions", 0),
        "users": counters.get("users", 0),
        "quarantined": counters.get("quarantined", 0),
        "conflicts": counters.get("conflicts", 0),
        "requests": counters.get("requests", 0),
        "throttled": counters.get("throttled", 0),
    }


# ---------------------------------------------------------------- follow


class Follower:
    """The sync loop in a daemon thread: one process keeps the data fresh and serves it.

    Whatever goes wrong (upstream down, store locked by a cron sync, a bug) is logged to stderr
    and retried with a growing pause; the API keeps serving what the store holds, and readiness
    reports the lag honestly.
    """

    def __init__(self, db: Path, options: SyncOptions):
        self.db = db
        self.options = options
        self.stop_event = threading.Event()
        self.errors = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name="txagg-follow", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        print(f"txagg serve: sync: {message}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                self._follow_once()
                backoff = 1.0
            except Exception as error:  # the API must outlive any sync failure
                self._error(f"{type(error).__name__}: {error}")
            if self.stop_event.wait(backoff):
                return
            backoff = min(backoff * 2, FOLLOW_BACKOFF_MAX)

    def _follow_once(self) -> None:
        with Store.open(self.db) as store, store.sync_lock():
            syncer = Syncer(store, self.options, stop=self.stop_event, on_error=self._error)
            try:
                syncer.follow()
            finally:
                syncer.close()

    def describe(self) -> dict:
        return {
            "enabled": True,
            "running": self.alive(),
            "errors": self.errors,
            "lastError": self.last_error,
        }


# ---------------------------------------------------------------- query parsing


def _single(params, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} is given more than once")
    return values[0] if values and values[0] != "" else None


@dataclass
class PayoutsQuery:
    limit: int = DEFAULT_LIMIT
    after: str | None = None
    since: str | None = None  # as given, so the next link repeats it verbatim
    until: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def next_link(self, after: str) -> str:
        params = {"limit": self.limit, "after": after, "since": self.since, "until": self.until}
        return "/payouts?" + urlencode({k: v for k, v in params.items() if v is not None})


def parse_payouts_query(params) -> PayoutsQuery:
    """limit, after, since, until; BadRequest says what is wrong. Empty values count as absent."""
    query = PayoutsQuery()
    limit = _single(params, "limit")
    if limit is not None:
        if not limit.isascii() or not limit.isdigit() or len(limit) > 4:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit[:40]!r}")
        query.limit = int(limit)
        if not 1 <= query.limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be from 1 to {MAX_LIMIT}, got {query.limit}")
    query.after = _single(params, "after")
    if query.after is not None and len(query.after) > MAX_USER_ID_LENGTH:
        raise BadRequest(f"after must be a userId (at most {MAX_USER_ID_LENGTH} characters)")
    query.since, query.since_ms = _time_param(params, "since")
    query.until, query.until_ms = _time_param(params, "until")
    return query


def _time_param(params, name: str) -> tuple[str | None, int | None]:
    text = _single(params, name)
    if text is None:
        return None, None
    try:
        return text, parse_time(text)
    except (ValueError, OverflowError) as error:
        raise BadRequest(f"{name}: {str(error)[:200]}") from None


def parse_ready(params) -> bool:
    text = _single(params, "ready")
    if text is None:
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise BadRequest(f"ready must be true or false, got {text[:40]!r}")


# ---------------------------------------------------------------- reading the store


class Reader:
    """The answers that run in worker threads, each on a pooled read connection."""

    def __init__(self, pool: StorePool, config: ServeConfig, salt: str, follow_state):
        self.pool = pool
        self.config = config
        self.salt = salt
        self.visibility = "private" if config.token else "public"
        self.follow_state = follow_state

    def payouts(self, query: PayoutsQuery, if_none_match: str | None) -> Answer:
        with self.pool.store() as store:
            conn = store.conn
            # A page with since/until aggregates the whole period (the store keeps no per-user
            # index by time): a deadline keeps one huge period from holding a thread forever.
            deadline = monotonic() + QUERY_SECONDS
            conn.set_progress_handler(lambda: monotonic() > deadline, 10_000)
            # One read transaction: the version, asOf and the page all come from one snapshot,
            # so the ETag names exactly this body.
            conn.execute("BEGIN")
            try:
                return self._payouts_page(store, query, if_none_match)
            except sqlite3.OperationalError as error:
                if "interrupted" not in str(error):
                    raise
                detail = f"the period took more than {QUERY_SECONDS} s to add up: narrow it"
                return problem(503, detail, {"Retry-After": "60"})
            finally:
                conn.set_progress_handler(None, 0)
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _payouts_page(self, store: Store, query: PayoutsQuery, if_none_match) -> Answer:
        count, as_of = read_version(store.conn)
        etag = make_etag(count, as_of, self.salt)
        headers = {
            "ETag": etag,
            "Cache-Control": cache_control(self.visibility, self.config.max_age, as_of),
        }
        if etag_matches(if_none_match, etag):
            return Answer(304, headers=headers, media_type=None)
        rows = store.payouts(
            since=query.since_ms,
            until=query.until_ms,
            after=query.after,
            limit=query.limit + 1,  # one more tells whether a next page exists
        )
        next_link = None
        if len(rows) > query.limit:
            del rows[query.limit :]
            next_link = query.next_link(rows[-1][0])
        return Answer(200, payouts_body(rows, as_of, next_link), headers)

    def status(self) -> Answer:
        options = self.config.sync_options
        rate, per = (options.rate_limit, options.per) if options else (5, 60.0)
        with self.pool.store() as store:
            body = status_report(store, rate=rate, per=per)
        body["follow"] = self.follow_state()
        return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"})

    def facts(self) -> dict:
        with self.pool.store() as store:
            return store_facts(store)


def payouts_body(rows: list[tuple[str, int, int]], as_of: int | None, next_link) -> bytes:
    """report.payouts_report's body as models.dumps writes it, plus ``next``, without building
    Decimals and dicts per row (a test checks the bytes are the same)."""
    items = ", ".join(
        f'{{"userId": {json_string(user)}, "amount": {money(amount)}, "count": {count}}}'
        for user, amount, count in rows
    )
    as_of_text = "null" if as_of is None else f'"{format_instant(as_of)}"'
    return f'{{"items": [{items}], "asOf": {as_of_text}, "next": {json.dumps(next_link)}}}'.encode()


def json_string(text: str) -> str:
    # json.dumps costs a microsecond; plain ids (the usual case) need no escaping.
    return f'"{text}"' if text.isascii() and text.isalnum() else json.dumps(text)


# ---------------------------------------------------------------- the app


# Fractions of a unit as format_cents writes them: 0 -> "", 60 -> ".6", 5 -> ".05".
_FRACTIONS = ["" if f == 0 else f".{f // 10}" if f % 10 == 0 else f".{f:02d}" for f in range(100)]


def money(cents: int) -> str:
    """models.format_cents without its branches (a test checks they agree)."""
    if cents < 0:
        return "-" + money(-cents)
    whole, fraction = divmod(cents, 100)
    return f"{whole}{_FRACTIONS[fraction]}"


class TimestampText:
    """models.format_timestamp with the date part cached per day (strftime is the slow part)."""

    def __init__(self, days: int = 4096):
        self.days = days
        self.prefixes: dict[int, str] = {}

    def text(self, ms: int) -> str:
        if ms < 0:
            return format_timestamp(ms)
        seconds, millis = divmod(ms, 1000)
        day, second = divmod(seconds, 86400)
        prefix = self.prefixes.get(day)
        if prefix is None:
            if len(self.prefixes) >= self.days:
                self.prefixes.clear()  # a bound, not an LRU: refilling is cheap
            prefix = self.prefixes[day] = format_timestamp(day * 86_400_000)[:11]
        hours, rest = divmod(second, 3600)
        minutes, secs = divmod(rest, 60)
        return f"{prefix}{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}Z"


ROUTE_LABELS = frozenset({*STATIC_ROUTES, USERS_ROUTE, "unmatched"})


def route_of(path: str) -> str:
    """The metrics label for a path: the route template, never the raw path (bounded series)."""
    if path in STATIC_ROUTES:
        return path
    if path.startswith("/users/") and path.count("/") == 2 and len(path) > 7:
        return USERS_ROUTE
    return "unmatched"


class ServerApp:
    """The ASGI app: screening, metrics and the hot route here; the rest in Starlette."""

    def __init__(self, config: ServeConfig, follower: Follower | None = None):
        self.config = config
        self.follower = follower
        self.salt = hashlib.blake2s(
            f"{__version__}|{config.eur_per_scr}".encode(), digest_size=3
        ).hexdigest()
        self.token = None if config.token is None else config.token.encode()
        self.snapshot = Snapshot(open_reader(config.db, READER_CACHE_KIB), config, self.salt)
        self.pool = StorePool(config.db)
        self.reader = Reader(self.pool, config, self.salt, self.follow_state)
        self.metrics = Metrics(self.reader.facts, lambda: follower.errors if follower else 0)
        self.rate = config.eur_per_scr
        self.unit_rate = config.eur_per_scr == 1
        self.timestamps = TimestampText()
        self.document = openapi_document(config)
        self.document_bytes = json.dumps(self.document, indent=2).encode()
        self.docs_bytes = docs_html(self.document).encode()
        self.limiter: anyio.CapacityLimiter | None = None
        self.router = self._starlette()

    def close(self) -> None:
        self.snapshot.store.close()
        self.pool.close()

    def follow_state(self) -> dict:
        if self.follower is not None:
            return self.follower.describe()
        # With --workers the loop runs in the supervisor process: enabled, but not visible here.
        return {"enabled": self.config.follow, "running": None, "errors": None, "lastError": None}

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)  # lifespan: Starlette knows the protocol
            return
        started = perf_counter()
        method = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode()
        authorization, if_none_match, refusal = self._screen(scope, raw_path)
        if refusal is None and self.token is not None and scope["path"] != "/healthz":
            refusal = self._check_token(authorization)
        user_id = user_id_of(raw_path)
        if refusal is not None:
            status = await send_answer(send, refusal, method == "HEAD")
        elif user_id is not None:
            status = await self._user(method, user_id, if_none_match, send)
        else:
            status = await self._route(scope, receive, send)
        route = USERS_ROUTE if user_id is not None else route_of(scope["path"])
        self.metrics.observe(route, method, status, perf_counter() - started)

    def _screen(self, scope, raw_path: bytes) -> tuple[bytes | None, bytes | None, Answer | None]:
        """Bounded sizes and no bodies; returns (Authorization, If-None-Match, refusal)."""
        authorization = if_none_match = None
        size = 0
        body = False
        for name, value in scope["headers"]:
            size += len(name) + len(value)
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
            elif name == b"content-length":
                body = body or value.strip() != b"0"
            elif name == b"transfer-encoding":
                body = True
        refusal = None
        if len(raw_path) > MAX_PATH_BYTES or len(scope["query_string"]) > MAX_QUERY_BYTES:
            refusal = problem(
                414, f"the URL is too long (path and query at most {MAX_PATH_BYTES} bytes each)"
            )
        elif size > MAX_HEADER_BYTES:
            refusal = problem(431, f"the headers are larger than {MAX_HEADER_BYTES} bytes")
        elif body:
            refusal = problem(413, "this API takes no request body")
        return authorization, if_none_match, refusal

    def _check_token(self, authorization: bytes | None) -> Answer | None:
        if authorization is None:
            return problem(401, "this API needs Authorization: Bearer <token>", UNAUTHORIZED)
        scheme, _, credentials = authorization.partition(b" ")
        # compare_digest takes the same time wherever the first difference is.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return None
        return problem(401, "the bearer token is not valid", INVALID_TOKEN)

    async def _route(self, scope, receive, send) -> int:
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.router(scope, receive, send_and_note)
        except Exception as error:  # Starlette has answered 500; keep serving
            print(f"txagg serve: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return status[0]

    # ------------------------------------------------------------ GET /users/{userId}

    async def _user(self, method: str, user_id: bytes, if_none_match, send) -> int:
        """The hot path: no framework, one lookup, the body formatted straight from the row."""
        head = method == "HEAD"
        if not head and method != "GET":
            answer = problem(405, f"{method[:20]} is not allowed here", {"Allow": "GET, HEAD"})
            return await send_answer(send, answer, False)
        snapshot = self.snapshot
        try:
            snapshot.refresh()
        except sqlite3.Error as error:
            return await send_answer(send, self._store_failed(error), head)
        if if_none_match is not None and etag_matches(if_none_match, snapshot.etag):
            await send(
                {"type": "http.response.start", "status": 304, "headers": snapshot.headers[:2]}
            )
            await send({"type": "http.response.body", "body": b""})
            return 304
        text = user_id.decode("utf-8", "replace")
        row = None
        try:
            if len(text) <= MAX_USER_ID_LENGTH:  # longer ids cannot exist: skip the lookup
                row = snapshot.store.conn.execute(USER_SQL, (text,)).fetchone()
            body = None if row is None else self.user_body(row)
        except (StoreError, sqlite3.Error) as error:
            return await send_answer(send, self._store_failed(error), head)
        if body is None:
            body = problem_body(404, f"no such user: {text[:80]}")
            headers = {"Cache-Control": snapshot.headers[1][1].decode()}
            return await send_answer(send, Answer(404, body, headers, PROBLEM_TYPE), head)
        headers = [*snapshot.headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return 200

    def user_body(self, row: tuple) -> bytes:
        """The exact bytes of ``report --json`` (without its newline), built from the row;
        DamagedStore when the row holds what ingest never writes."""
        check_user_row(self.config.db, row)
        user_id, earned, spent, payout, count, last = row
        paid = money(payout) if self.unit_rate else format_decimal(to_eur(payout, self.rate))
        head = (
            f'{{"userId": {json_string(user_id)}, "balance": {money(earned - spent - payout)}, '
            f'"earned": {money(earned)}, "spent": {money(spent)}, "payout": {money(payout)}, '
            f'"paidOut": {paid}, "transactions": {count}, '
            f'"lastTransactionAt": "{self.timestamps.text(last)}", "asOf": '
        )
        return head.encode() + self.snapshot.as_of_json + b"}"

    # ------------------------------------------------------------ the Starlette routes

    def _starlette(self) -> Starlette:
        routes = [
            Route("/payouts", self._payouts, methods=["GET"]),
            Route("/status", self._status, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
            Route("/docs", self._docs, methods=["GET"]),
        ]
        handlers = {
            BadRequest: self._bad_request,
            HTTPException: self._http_error,
            Exception: self._server_error,
        }
        app = Starlette(routes=routes, exception_handlers=handlers)
        app.router.redirect_slashes = False  # a redirect is no answer: /payouts/ is a 404
        return app

    async def _in_thread(self, function: Callable[[], Answer]) -> Answer:
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(POOL_THREADS)
        return await anyio.to_thread.run_sync(function, limiter=self.limiter)

    async def _payouts(self, request: Request) -> Response:
        query = parse_payouts_query(request.query_params)
        if_none_match = request.headers.get("if-none-match")
        answer = await self._in_thread(partial(self.reader.payouts, query, if_none_match))
        return answer.response()

    async def _status(self, request: Request) -> Response:
        return (await self._in_thread(self.reader.status)).response()

    async def _healthz(self, request: Request) -> Response:
        want_ready = parse_ready(request.query_params)
        self.snapshot.refresh()
        lag = self.snapshot.lag_seconds()
        body = {
            "status": "ok",
            "ready": True,
            "following": self.config.follow,
            "lagSeconds": lag,
            "asOf": self.snapshot.as_of_json.decode().strip('"') if lag is not None else None,
        }
        why = self._not_ready(lag)
        if why is None:
            return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"}).response()
        body["ready"] = False
        if want_ready:
            extra = {k: body[k] for k in ("ready", "following", "lagSeconds", "asOf")}
            return problem(503, why, **extra).response()
        body["detail"] = why
        return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"}).response()

    def _not_ready(self, lag: int | None) -> str | None:
        """Readiness fails only while following: a server of a store synced elsewhere (cron)
        cannot fix the lag, and its asOf tells readers how fresh the answers are."""
        if not self.config.follow:
            return None
        if self.follower is not None and not self.follower.alive():
            return "the sync loop is not running"
        if lag is None:
            return "not synced yet"
        if lag > STALE_AFTER_SECONDS:
            return f"the data is {lag} s behind (more than {STALE_AFTER_SECONDS} s)"
        return None

    async def _metrics(self, request: Request) -> Response:
        body = await self._in_thread(self.metrics.exposition)
        return Response(
            body, headers={"Cache-Control": "no-store"}, media_type=CONTENT_TYPE_PLAIN_0_0_4
        )

    async def _openapi(self, request: Request) -> Response:
        return Response(self.document_bytes, media_type=JSON_TYPE)

    async def _docs(self, request: Request) -> Response:
        return Response(self.docs_bytes, media_type="text/html; charset=utf-8")

    async def _bad_request(self, request: Request, error: Exception) -> Response:
        return problem(400, str(error)).response()

    async def _http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        status = error.status_code
        if status == 404:
            detail = f"no route {request.url.path[:200]}"
        elif status == 405:
            detail = f"{request.method[:20]} is not allowed here"
        else:
            detail = str(error.detail)
        return problem(status, detail, error.headers).response()

    async def _server_error(self, request: Request, error: Exception) -> Response:
        if isinstance(error, (StoreError, sqlite3.Error)):
            return store_problem(error).response()  # _route logs it
        return problem(500, f"{type(error).__name__}: the server failed").response()

    def _store_failed(self, error: StoreError | sqlite3.Error) -> Answer:
        message = str(error) if isinstance(error, StoreError) else explain(error, self.config.db)
        print(f"txagg serve: {message}", file=sys.stderr, flush=True)
        return store_problem(error)


def store_problem(error: StoreError | sqlite3.Error) -> Answer:
    """A store that cannot answer (a damaged row or file): never bad input, so a 500, but in
    problem+json and saying what is wrong; the log has the store's path and what to do."""
    if isinstance(error, DamagedStore):
        return problem(500, error.detail)
    return problem(500, "the store cannot be read: the server's log says why")


USER_SQL = (
    "SELECT user_id, earned, spent, payout, tx_count, last_tx_at FROM users WHERE user_id = ?"
)
UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="txagg"'}
INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="txagg", error="invalid_token"'}


def user_id_of(raw_path: bytes) -> bytes | None:
    """The decoded id of ``/users/{userId}`` (from the raw path, so ``%2F`` stays in the id)."""
    if not raw_path.startswith(b"/users/"):
        return None
    rest = raw_path[7:]
    if not rest or b"/" in rest:
        return None
    return unquote_to_bytes(rest) if b"%" in rest else rest


async def send_answer(send, answer: Answer, head: bool) -> int:
    headers = [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
    if answer.media_type is not None:
        headers.append((b"content-type", answer.media_type.encode()))
    if answer.status != 304:
        headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else answer.body})
    return answer.status


def create_app(config: ServeConfig, follower: Follower | None = None) -> ServerApp:
    """The ASGI app over ``config.db`` (which must exist). ``follower``: the in-process sync
    loop, if any, for /status and readiness."""
    return ServerApp(config, follower)


# ---------------------------------------------------------------- OpenAPI and /docs


def _problem_response(description: str, **headers: str) -> dict:
    response = {
        "description": description,
        "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def _json_response(description: str, schema: str, cached: bool) -> dict:
    response: dict = {
        "description": description,
        "content": {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if cached:
        response["headers"] = {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Cache-Control": {"$ref": "#/components/headers/Cache-Control"},
        }
    return response


def _parameter(name: str, where: str, schema: dict, description: str, required=False) -> dict:
    return {
        "name": name,
        "in": where,
        "required": required,
        "schema": schema,
        "description": description,
    }


IF_NONE_MATCH = _parameter(
    "If-None-Match",
    "header",
    {"type": "string"},
    "An ETag from an earlier answer: 304 Not Modified while the data has not changed.",
)
TIME_HELP = (
    "UTC unless it says otherwise: 'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD' or ISO 8601 "
    "('2023-03-01T00:00:00Z'). At most 40 characters."
)


def _common_errors(config: ServeConfig, *, public: bool = False) -> dict:
    errors = {
        "413": _problem_response("The request has a body: this API takes none"),
        "414": _problem_response(f"Path or query longer than {MAX_PATH_BYTES} bytes"),
        "431": _problem_response(f"Headers larger than {MAX_HEADER_BYTES} bytes"),
    }
    if config.token is not None and not public:
        errors["401"] = _problem_response(
            "No or a wrong bearer token", **{"WWW-Authenticate": "Bearer"}
        )
    return errors


def _not_modified() -> dict:
    return {
        "description": "Not Modified: the If-None-Match ETag is still current",
        "headers": {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Cache-Control": {"$ref": "#/components/headers/Cache-Control"},
        },
    }


def _users_operation(config: ServeConfig) -> dict:
    return {
        "get": {
            "summary": "One user's balance, earned, spent, payout and paidOut",
            "description": "The body of `txagg report USER --json`, byte for byte.",
            "operationId": "getUser",
            "parameters": [IF_NONE_MATCH],
            "responses": {
                "200": _json_response("The user's aggregates", "UserReport", cached=True),
                "304": _not_modified(),
                "404": {
                    **_problem_response("No transaction of this user is stored"),
                    "headers": {"Cache-Control": {"$ref": "#/components/headers/Cache-Control"}},
                },
                **_common_errors(config),
            },
        },
        "parameters": [
            _parameter("userId", "path", {"type": "string", "minLength": 1}, "", required=True)
        ],
    }


def _payouts_operation(config: ServeConfig) -> dict:
    return {
        "get": {
            "summary": "Requested payouts, one row per user, in userId order",
            "description": (
                "The body of `txagg payouts --json` plus `next`, a page at a time (keyset "
                "pagination on userId: no row is lost or repeated while the data changes)."
            ),
            "operationId": "listPayouts",
            "parameters": [
                _parameter(
                    "limit",
                    "query",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_LIMIT,
                        "default": DEFAULT_LIMIT,
                    },
                    "Rows per page.",
                ),
                _parameter(
                    "after",
                    "query",
                    {"type": "string", "maxLength": MAX_USER_ID_LENGTH},
                    "Only users whose userId sorts after this one (the `next` link sets it).",
                ),
                _parameter(
                    "since",
                    "query",
                    {"type": "string", "maxLength": MAX_TIME_TEXT},
                    "Only payouts requested at or after this time. " + TIME_HELP,
                ),
                _parameter(
                    "until",
                    "query",
                    {"type": "string", "maxLength": MAX_TIME_TEXT},
                    "Only payouts requested before this time. " + TIME_HELP,
                ),
                IF_NONE_MATCH,
            ],
            "responses": {
                "200": _json_response("One page of payouts", "PayoutPage", cached=True),
                "304": _not_modified(),
                "400": _problem_response("A parameter is malformed or out of range"),
                "503": _problem_response(
                    f"The since/until period took more than {QUERY_SECONDS} s to add up"
                ),
                **_common_errors(config),
            },
        }
    }


def _simple_operation(config: ServeConfig, summary: str, operation_id: str, ok: dict) -> dict:
    return {
        "get": {
            "summary": summary,
            "operationId": operation_id,
            "responses": {"200": ok, **_common_errors(config)},
        }
    }


def _healthz_operation(config: ServeConfig) -> dict:
    return {
        "get": {
            "summary": "Liveness, and with ready=true readiness",
            "description": (
                "Always answers 200 while the process serves (liveness); the body says whether "
                "it is ready. With `ready=true` it answers 503 when it is not: only while "
                f"following, when the data is more than {STALE_AFTER_SECONDS} s behind or the "
                "sync loop has stopped. Needs no token."
            ),
            "operationId": "health",
            "parameters": [
                _parameter("ready", "query", {"type": "boolean"}, "Answer 503 when not ready.")
            ],
            "responses": {
                "200": _json_response("Alive", "Health", cached=False),
                "400": _problem_response("ready is not a boolean"),
                "503": _problem_response("Not ready (only with ready=true)"),
                **_common_errors(config, public=True),
            },
        }
    }


def _components(config: ServeConfig) -> dict:
    payout = PAYOUT_ITEM_SCHEMA
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    components: dict = {
        "schemas": {
            "UserReport": deepcopy(USER_REPORT_SCHEMA),
            "Payout": payout,
            "PayoutPage": {
                "type": "object",
                "required": ["items", "asOf", "next"],
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Payout"}},
                    "asOf": nullable_time,
                    "next": {
                        "type": ["string", "null"],
                        "description": "The next page's URL (relative), null on the last page",
                    },
                },
            },
            "Status": _status_schema(nullable_time),
            "Health": {
                "type": "object",
                "required": ["status", "ready", "following", "lagSeconds", "asOf"],
                "properties": {
                    "status": {"const": "ok"},
                    "ready": {"type": "boolean"},
                    "following": {"type": "boolean"},
                    "lagSeconds": {"type": ["integer", "null"], "minimum": 0},
                    "asOf": nullable_time,
                    "detail": {"type": "string", "description": "why it is not ready"},
                },
            },
            "Problem": deepcopy(PROBLEM_SCHEMA),
        },
        "headers": {
            "ETag": {
                "description": "Weak validator from the data version (transactions and asOf)",
                "schema": {"type": "string"},
            },
            "Cache-Control": {
                "description": (
                    f"max-age at most {config.max_age} s and never past the "
                    f"{STALE_AFTER_SECONDS} s freshness promise"
                ),
                "schema": {"type": "string"},
            },
        },
    }
    if config.token is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return components


def _status_schema(nullable_time: dict) -> dict:
    count = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "required": [
            "store",
            "position",
            "asOf",
            "lagSeconds",
            "behind",
            "transactions",
            "users",
            "quarantined",
            "conflicts",
            "rateBudget",
            "follow",
        ],
        "properties": {
            "store": {"type": "string"},
            "position": nullable_time,
            "asOf": nullable_time,
            "lagSeconds": {"type": ["integer", "null"], "minimum": 0},
            "behind": {"type": "boolean"},
            "window": {"type": "object"},
            "transactions": count,
            "users": count,
            "quarantined": count,
            "conflicts": count,
            "verifiedUntil": nullable_time,
            "load": {"type": "object"},
            "discrepancies": {"type": "array"},
            "lastCheck": {"type": ["object", "null"]},
            "lastRun": {"type": "object"},
            "rateBudget": {"type": "object"},
            "follow": {
                "type": "object",
                "required": ["enabled"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "running": {"type": ["boolean", "null"]},
                    "errors": {"type": ["integer", "null"]},
                    "lastError": {"type": ["string", "null"]},
                },
            },
        },
    }


def openapi_document(config: ServeConfig) -> dict:
    """The OpenAPI 3.1 description of every route this server answers, as configured."""
    auth = "every route but /healthz needs a bearer token. " if config.token else ""
    document: dict = {
        "openapi": "3.1.0",
        "info": {
            "title": "txagg HTTP API",
            "version": __version__,
            "description": (
                "Per-user aggregates and requested payouts from the local txagg store. "
                + auth
                + "Errors are application/problem+json: 404 for unknown routes, 405 for methods "
                "other than GET and HEAD."
            ),
        },
        "paths": {
            "/users/{userId}": _users_operation(config),
            "/payouts": _payouts_operation(config),
            "/status": _simple_operation(
                config,
                "Where sync stands: position, lag, counts, quarantine, rate budget",
                "status",
                _json_response("The status", "Status", cached=False),
            ),
            "/healthz": _healthz_operation(config),
            "/metrics": _simple_operation(
                config,
                "Prometheus metrics (text format 0.0.4)",
                "metrics",
                {"description": "Metrics", "content": {"text/plain": {}}},
            ),
            "/openapi.json": _simple_operation(
                config,
                "This document",
                "openapi",
                {"description": "OpenAPI 3.1 JSON", "content": {JSON_TYPE: {}}},
            ),
            "/docs": _simple_operation(
                config,
                "Human-readable list of the routes",
                "docs",
                {"description": "HTML", "content": {"text/html": {}}},
            ),
        },
        "components": _components(config),
    }
    if config.token is not None:
        document["security"] = [{"bearer": []}]
        document["paths"]["/healthz"]["get"]["security"] = []
    return document


# ---------------------------------------------------------------- running it
#
# The server is granian: its HTTP layer is Rust, so a request costs the Python side only the app.
# On this project's 2-core benchmark machine uvicorn (httptools, uvloop) answered about 17,500
# lookups a second with this app, granian about 25,000 (docs/benchmarks.md). One worker runs
# granian embedded in this process, so the follow thread and the API share one process; more
# workers are granian's worker processes, fed the config through the environment.


def _resolve(host: str, port: int) -> tuple[str, int]:
    """The numeric address and the port to serve on (granian takes IP addresses only).

    Binding here first gives a clear OSError now rather than inside granian, and resolves port
    0 to a free port. Granian binds by address, so another process could take a port chosen
    here in between: port 0 is for tests and tools."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return address[0], probe.getsockname()[1]


def _base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _wait_listening(host: str, port: int, timeout: float = 30.0) -> bool:
    """Until a TCP connection succeeds: granian reports no 'listening' moment of its own."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = monotonic() + timeout
    while monotonic() < deadline:
        try:
            socket.create_connection((target, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def _announce(host: str, port: int, url: str, on_ready: Callable[[str], None] | None) -> None:
    def wait_then_call() -> None:
        if _wait_listening(host, port) and on_ready is not None:
            on_ready(url)

    threading.Thread(target=wait_then_call, name="txagg-ready", daemon=True).start()


def _granian_options(host: str, port: int) -> dict:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    return {
        "address": host,
        "port": port,
        "interface": Interfaces.ASGINL,  # no lifespan: the app needs no startup step
        "http": HTTPModes.http1,
        "websockets": False,
        "backlog": 2048,
        # Bounded request heads: granian refuses a request line and headers beyond this.
        "http1_settings": HTTP1Settings(max_buffer_size=64 * 1024),
        "log_level": LogLevels.error,  # the embedded mode warns on every start otherwise
    }


def _event_loop_runner() -> Callable:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


class _EmbeddedServer:
    """granian embedded: the server is a task on this thread's event loop."""

    def __init__(self, app: ServerApp, host: str, port: int):
        from granian.server.embed import Server

        self.server = Server(app, **_granian_options(host, port))
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, handle_signals: bool) -> None:
        self.loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, self.server.stop)
        await self.server.serve()

    def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just ended: nothing to stop
                self.loop.call_soon_threadsafe(self.server.stop)


def prepare_store(config: ServeConfig) -> None:
    """Following may start from an empty store: create it before any reader opens it."""
    if config.follow:
        Store.open(config.db).close()
        return
    # Without follow, serving is reading: never create, migrate or change the store.
    with Store.open(config.db, create=False, read_only=True) as store:  # NoStore says what to do
        if store.immutable:
            print(
                f"txagg serve: {config.db} is in a read-only folder: serving it as it is now; "
                "restart to see later changes",
                file=sys.stderr,
                flush=True,
            )


def start_follower(config: ServeConfig) -> Follower | None:
    if not config.follow:
        return None
    assert config.sync_options is not None
    return Follower(config.db, config.sync_options).start()


def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; on_ready(base_url) once the port accepts connections."""
    prepare_store(config)
    host, port = _resolve(config.host, config.port)
    url = _base_url(host, port)
    if config.workers > 1:
        _serve_workers(config, host, port, url, on_ready)
        return
    follower = start_follower(config)
    app = create_app(config, follower)
    try:
        server = _EmbeddedServer(app, host, port)
        _announce(host, port, url, on_ready)
        _event_loop_runner()(server.serve(handle_signals=True))
    finally:
        if follower is not None:
            follower.stop()
        app.close()


WORKER_CONFIG_ENV = "TXAGG_SERVE_WORKER_CONFIG"


def _serve_workers(config: ServeConfig, host: str, port: int, url: str, on_ready) -> None:
    """granian's worker processes; the sync loop, if any, runs once, in this supervising
    process, so the workers only read. Per-process figures in /metrics: see docs/http.md."""
    import multiprocessing

    from granian import Granian

    worker = asdict(config) | {"db": str(config.db), "eur_per_scr": str(config.eur_per_scr)}
    worker.update(workers=1, host=host, port=port)
    # The workers are spawned afresh (never forked from a process running the sync thread) and
    # build their app from this, token included; the environment is private to this user.
    os.environ[WORKER_CONFIG_ENV] = json.dumps(worker)
    multiprocessing.set_start_method("spawn", force=True)
    server = Granian(
        "txagg.server:worker_app",
        factory=True,
        workers=config.workers,
        **_granian_options(host, port),
    )
    follower = start_follower(config)
    try:
        _announce(host, port, url, on_ready)
        server.serve()
    finally:
        if follower is not None:
            follower.stop()


def worker_app() -> ServerApp:
    """The app of one --workers process, from the config its supervisor left in the env.

    It keeps ``follow`` (for /status and readiness) but gets no follower: the supervisor runs
    the one sync loop."""
    values = json.loads(os.environ[WORKER_CONFIG_ENV])
    values["eur_per_scr"] = Decimal(values["eur_per_scr"])
    if values["sync_options"] is not None:
        values["sync_options"] = SyncOptions(**values["sync_options"])
    return create_app(ServeConfig(**values))


def start_in_thread(config: ServeConfig) -> tuple[str, Callable[[], None]]:
    """Serve in a daemon thread of this process (for tests); returns the base URL and a stop()."""
    prepare_store(config)
    host, port = _resolve(config.host, config.port)
    follower = start_follower(config)
    app = create_app(config, follower)
    server = _EmbeddedServer(app, host, port)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(handle_signals=False)),
        name="txagg-serve",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        server.stop()
        thread.join(timeout=10)
        if follower is not None:
            follower.stop()
        app.close()

    if not _wait_listening(host, port, timeout=10):
        stop()
        raise RuntimeError(f"txagg serve on port {port} did not start")
    return _base_url(host, port), stop

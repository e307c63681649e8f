"""``/metrics``: request counts and latencies by route, and the store's figures, for Prometheus."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..store import Store

USERS_ROUTE = "/users/{userId}"
STATIC_ROUTES = ("/payouts", "/status", "/healthz", "/metrics", "/openapi.json", "/docs", "/")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The statuses this app answers with; any other is counted in its class ("4xx", "5xx", ...).
KNOWN_STATUSES = (200, 304, 307, 400, 401, 404, 405, 413, 414, 431, 500, 503)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTE_LABELS = frozenset({*STATIC_ROUTES, USERS_ROUTE, "unmatched"})


def route_of(path: str) -> str:
    """The metrics label for a path: the route template, never the raw path (bounded series)."""
    if path in STATIC_ROUTES:
        return path
    if path.startswith("/users/") and path.count("/") == 2 and len(path) > 7:
        return USERS_ROUTE
    return "unmatched"


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
        # A replica's local copy (``replica.Replica``), whose pulls are shown; None elsewhere.
        self.replica = None
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
        if self.replica is not None:
            yield from replica_families(self.replica)

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


def replica_families(replica) -> Iterator:
    """A replica's pulls: what it asks PostgreSQL (a pull a second, whatever the reads) and how
    old its copy is."""
    yield CounterMetricFamily(
        "txagg_replica_queries",
        "Statements this process sent to PostgreSQL to keep its local copy up to date",
        value=replica.queries,
    )
    yield CounterMetricFamily(
        "txagg_replica_errors",
        "Pulls of this process that failed (it retries)",
        value=replica.errors,
    )
    age = replica.age_seconds()
    if age is not None:
        yield GaugeMetricFamily(
            "txagg_replica_age_seconds",
            "Seconds since this process's copy was last brought up to date",
            value=age,
        )

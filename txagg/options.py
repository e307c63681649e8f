"""What a sync is told (``SyncOptions``: shared by sync, verify and ``serve --follow``, and the
defaults of their command-line options) and what it reports (``SyncSummary``; ``SyncProgress``
while it runs, for a progress display)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .settings import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    CHECK_EVERY,
    INTERVAL_SECONDS,
    LEASE_SECONDS,
    MAX_REPAIR_REQUESTS,
    MAX_RESPONSE_BYTES,
    OVERLAP_SECONDS,
    PAGE_SIZE,
    PER_SECONDS,
    RATE_LIMIT,
    RETRY_FOR_SECONDS,
    SETTLE_SECONDS,
    TIMEOUT_SECONDS,
)
from .store import IngestCounts


@dataclass
class SyncOptions:
    api_url: str
    since: int = 0  # ms: where a fresh store starts
    rate_limit: int = RATE_LIMIT
    per: float = PER_SECONDS
    overlap: float = OVERLAP_SECONDS
    settle: float = SETTLE_SECONDS
    max_requests: int | None = None
    date_format: str = "sql"
    page_size: int = PAGE_SIZE
    timeout: float = TIMEOUT_SECONDS  # seconds for a whole request: connect, headers and body
    max_response_bytes: int = MAX_RESPONSE_BYTES
    retry_for: float = RETRY_FOR_SECONDS  # give up on a failing upstream after this long
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    interval: float = INTERVAL_SECONDS  # --follow: seconds between polls
    check_every: float | None = CHECK_EVERY  # seconds between late-arrival checks; None: never
    max_repair_requests: int = MAX_REPAIR_REQUESTS  # per check: what a lying meta may cost
    lease: float = LEASE_SECONDS  # sync --follow on PostgreSQL: the failover budget (seconds)


# What SyncSummary.add_term adds up (IngestCounts' own fields by add_ingest).
SUMMED = (
    "requests",
    "pages",
    "throttled",
    "retries",
    "checks",
    "check_requests",
    "repairs",
    "discrepancies",
)


@dataclass
class SyncSummary(IngestCounts):
    """What a run did; ``as_dict`` is the JSON summary of ``sync --json`` (camelCase keys)."""

    requests: int = 0
    pages: int = 0
    throttled: int = 0
    retries: int = 0
    checks: int = 0
    check_requests: int = 0  # requests spent on late-arrival checks and their repairs
    repairs: int = 0
    discrepancies: int = 0
    complete: bool = False
    position: str | None = None
    as_of: str | None = None
    lag_seconds: int | None = None
    errors: list[str] = field(default_factory=list)

    JSON_KEYS = {  # the summary's JSON keys, in their documented order
        "requests": "requests",
        "pages": "pages",
        "new": "new",
        "duplicates": "duplicates",
        "quarantined": "quarantined",
        "conflicts": "conflicts",
        "throttled": "throttled",
        "retries": "retries",
        "checks": "checks",
        "check_requests": "checkRequests",
        "repairs": "repairs",
        "discrepancies": "discrepancies",
        "complete": "complete",
        "position": "position",
        "as_of": "asOf",
        "lag_seconds": "lagSeconds",
        "errors": "errors",
    }

    def as_dict(self) -> dict:
        values = asdict(self)
        return {key: values[name] for name, key in self.JSON_KEYS.items()}

    def add_term(self, term: SyncSummary) -> None:
        """Another term led by the same process (``sync --follow`` that stood by meanwhile):
        its counts added; where it left the cursor, if it said, and its errors as the latest."""
        self.add_ingest(term)
        for name in SUMMED:
            setattr(self, name, getattr(self, name) + getattr(term, name))
        self.complete = term.complete
        for name in ("position", "as_of", "lag_seconds"):  # a term cut short leaves them None
            if getattr(term, name) is not None:
                setattr(self, name, getattr(term, name))
        self.errors = (self.errors + term.errors)[-5:]


@dataclass
class SyncProgress:
    """Where a run stands, for a progress display (``Syncer(on_progress=...)``): the window
    being read, how far into it, what the upstream says it holds, and any wait for the budget.

    ``total`` is the upstream's ``meta.totalItems`` for the window (None when it gave none: the
    contract does not promise it right, so a display treats it as an estimate). ``read`` counts
    the window's records up to the end of the last page read, this run's or an earlier one's.
    ``waiting`` is how many seconds the next request waits for the shared budget (0: none),
    ``blocked`` whether a 429's Retry-After is why."""

    window_start: int = 0  # ms
    window_end: int = 0  # ms
    page: int = 0  # the last page read of the window (0: none yet)
    page_size: int = 0
    read: int = 0
    total: int | None = None
    waiting: float = 0.0
    blocked: bool = False

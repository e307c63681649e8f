"""Every default and limit of txagg, in one place: sync, verify, report, the store and the
command line all read them here (the CLI's option defaults come from ``SyncOptions``, whose
defaults come from here). The transaction schema's own limits (field lengths, the largest
amount, nesting) live with the schema in ``models``.
"""

from __future__ import annotations

from decimal import Decimal

# ---------------------------------------------------------------- the contract

PAGE_SIZE = 1000  # the upstream's ceiling per request
RATE_LIMIT = 5  # requests ...
PER_SECONDS = 60.0  # ... per this many seconds: the upstream's budget
STALE_AFTER_SECONDS = 120  # the freshness promise: never more than 2 minutes behind
DEFAULT_EUR_PER_SCR = Decimal(1)

# ---------------------------------------------------------------- sync

OVERLAP_SECONDS = 300.0  # how far behind its position late arrivals are still caught
SETTLE_SECONDS = 5.0  # a run reads up to now minus this
INTERVAL_SECONDS = 30.0  # --follow: the longest pause between polls
# sync --follow on PostgreSQL: a standby takes over within this many seconds of the leader's
# death, hang or loss of its connection (its lease runs half of it; see store.postgres_lease).
LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 3.0
CHECK_EVERY = 120.0  # seconds between late-arrival checks (sooner while the budget is idle)
MIN_CHECK_SECONDS = 1.0  # ... but following, never sooner than this, however large the budget
TIMEOUT_SECONDS = 30.0  # a whole request: connect, headers and body
RETRY_FOR_SECONDS = 300.0  # give up on a failing upstream after this long
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
MAX_REPAIR_REQUESTS = 20  # per check: bounds what a lying upstream can cost
MAX_DISCREPANCIES = 20  # the newest ones kept for status
MAX_UNRELIABLE_BACKOFF = 3600.0  # seconds: the longest pause in chasing counts that lie
LATE_AGES_KEPT = 32  # how far behind the newest read the last late arrivals were found ...
LATE_AGES_NEEDED = 3  # ... and how many before a check's first look goes by them
REREAD_WAIT_TOKENS = 2  # a repair's re-read may wait for this many tokens beyond spare ones
# Following, a search for late arrivals may go this many tokens below the one the next poll
# needs (-1: it takes that token and waits for the next), while the store is under a minute
# behind and reading takes at most this share of the budget (above it, only spare tokens).
REPAIR_SPARE_TOKENS = -1.0
BORROW_UP_TO_LOAD = 0.65
# Early checks (before check_every) only while the budget is about full: this close to it.
IDLE_BUDGET_SHORT = 0.5
# At such a load a poll waits for the page the cursor stands on to fill, and this share of a
# page more (arrivals run a little slower than their rate about half the time).
POLL_FILL_MARGIN = 0.1
PAGE_STARTS_KEPT = 64  # pages of the open window remembered (their first records' dates)

# ---------------------------------------------------------------- what an answer may be

# A 1000-item page is 120-300 KB; a body larger than this once decompressed is refused.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# The longest a 429's Retry-After may block the shared budget, whatever it asked for.
MAX_BLOCK_SECONDS = 300.0

# ---------------------------------------------------------------- the shared budget

# We take a token when a request leaves; the upstream counts it when it arrives, a little later
# and by a different amount each time. Asking only once a tenth of a token more has refilled
# absorbs that jitter, so a bucket that mirrors the upstream's never draws a 429.
TOKEN_MARGIN = 0.1

# ---------------------------------------------------------------- totals

# Every per-user total stays within these, so nothing derived from them can overflow a signed
# 64-bit integer (SQLite's, and PostgreSQL's bigint: 2**63 - 1, about 9.2e18).
MAX_TOTAL_CENTS = 10**18  # each of earned, spent and payout: 10^16 SCR
MAX_USER_TRANSACTIONS = 10**18  # transactions of one user (and so payout requests)
MAX_EUR_PER_SCR = Decimal(10**6)  # the largest --eur-per-scr
MAX_RATE_DIGITS = 20  # significant digits of --eur-per-scr

# ---------------------------------------------------------------- status

LOAD_WINDOW_MS = 10 * 60 * 1000  # status measures the upstream's load over this

# ---------------------------------------------------------------- the HTTP APIs

# Here rather than in their packages so that ``shapes`` (the OpenAPI documents' source) reads
# them without importing either server.
PAYOUTS_PAGE_DEFAULT = 100  # txagg serve: GET /payouts rows per page unless limit says
PAYOUTS_PAGE_MAX = 1000
# The mock's --faults kinds, in the order the spec, GET /faults and the docs list them; the
# timed ones take P:SECONDS.
FAULT_KINDS = (
    "error",
    "reset",
    "truncate",
    "nonjson",
    "slow",
    "late",
    "drift",
    "duplicate",
    "outside",
    "meta",
    "invalid",
    "conflict",
    "throttle",
)
TIMED_FAULTS = ("slow", "late", "throttle")
LATE_LOG_SIZE = 100_000  # late arrivals listed at the mock's GET /faults, the newest
MAX_TIME_SCALE = 10_000.0  # mock-serve --time-scale: at most a week of traffic a minute

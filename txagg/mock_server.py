"""A faithful, deterministic, stateful, rate-limited fake of the upstream Transaction API.

``MockUpstream`` is the in-memory core: seeded users and transactions, a history that is already
in the past at start, live transactions that become visible as the clock moves (some of them
late), optional broken records, and the ground truth per user. ``create_app`` puts HTTP in front
of it (Starlette), ``serve`` and ``start_in_thread`` run that on uvicorn.

The state is a pure function of the seed, the options and the clock: the k-th live transaction
becomes visible at ``start + k * 60 / tx_per_minute`` seconds, whenever it is asked for.

``MockConfig.faults`` (``txagg mock-serve --faults``) injects the upstream's bad days into
``/transactions``: errors, broken connections, cut bodies, HTML, slowness, late arrivals, pages that
shift, duplicates, items outside the window, lying ``meta``, broken records, conflicting versions
and extra 429s (``Faults`` has the syntax, docs/mock.md the details). Every fault decision comes
from random generators of their own, seeded from ``seed``, so the same seed and the same requests
give the same faults, and switching faults on changes none of the data except the transactions
the faults themselves add. ``GET /faults`` counts what was injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import json
import logging
import math
import random
import re
import signal
import socket
import threading
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus

import uvicorn
from faker import Faker
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import __version__
from .apidocs import docs_html
from .models import (
    FIELDS,
    PAYOUT_ITEM_SCHEMA,
    PROBLEM_SCHEMA,
    TRANSACTION_SCHEMA,
    USER_REPORT_SCHEMA,
    InvalidRecord,
    cents_to_decimal,
    dumps,
    format_cents,
    format_instant,
    format_timestamp,
    loads,
    parse_time,
    parse_transaction,
)

MAX_LIMIT = 1000
MAX_USERS = 500_000  # 6-digit ids: beyond half of them, drawing unique ones gets slow
EARNED_SHARE = 0.50
SPENT_SHARE = 0.35  # the remaining 15% are payouts
BURST_SHARE = 0.25  # history items that follow the previous one within a second
WHOLE_SECOND_SHARE = 0.30  # history items with createdAt on a whole second (.000)
PROBLEM_TYPE = "application/problem+json"


# ---------------------------------------------------------------- faults: the spec

# Every fault kind, in the order the spec, /faults and the docs list them.
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
LATE_LOG_SIZE = 100_000  # late arrivals listed at /faults, the newest
TIMED_FAULTS = ("slow", "late", "throttle")  # these take P:SECONDS
MAX_FAULT_SECONDS = 3600.0  # an hour of sleep or Retry-After is a typo, not a test


@dataclass(frozen=True)
class Faults:
    """The parsed ``--faults`` spec: a probability (0..1) per kind, a duration for three of them.

    Syntax: comma-separated ``name=P`` or, for slow, late and throttle, ``name=P:SECONDS``, e.g.
    ``error=0.1,truncate=0.05,slow=0.02:3,late=0.2:90,meta=0.1,throttle=0.05:2``. Each kind at
    most once; the empty spec means no faults. docs/mock.md says what each kind does.
    """

    error: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    nonjson: float = 0.0
    slow: float = 0.0
    late: float = 0.0
    drift: float = 0.0
    duplicate: float = 0.0
    outside: float = 0.0
    meta: float = 0.0
    invalid: float = 0.0
    conflict: float = 0.0
    throttle: float = 0.0
    slow_seconds: float = 0.0
    late_seconds: float = 0.0
    throttle_seconds: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """ValueError, saying which entry is wrong and how to write it, on a bad spec."""
        values: dict[str, float] = {}
        for entry in (part.strip() for part in spec.split(",")):
            if not entry:
                continue
            name, probability, seconds = _parse_fault(entry)
            if name in values:
                raise ValueError(f"--faults: {name} is given twice")
            values[name] = probability
            if seconds is not None:
                values[f"{name}_seconds"] = seconds
        return cls(**values)

    def spec(self) -> str:
        """The canonical spec text: the kinds that are on, in FAULT_KINDS order."""
        return ",".join(
            f"{kind}={_number_text(setting['probability'])}"
            + (f":{_number_text(setting['seconds'])}" if "seconds" in setting else "")
            for kind, setting in self.settings().items()
            if setting["probability"]
        )

    def settings(self) -> dict[str, dict[str, float]]:
        """Every kind with its probability, and its seconds for the timed ones (for /faults)."""
        return {
            kind: {"probability": getattr(self, kind)}
            | ({"seconds": getattr(self, f"{kind}_seconds")} if kind in TIMED_FAULTS else {})
            for kind in FAULT_KINDS
        }


def _number_text(value: float) -> str:
    return f"{value:g}"


def _fault_usage(name: str) -> str:
    return f"{name}=P:SECONDS (e.g. {name}=0.05:2)" if name in TIMED_FAULTS else f"{name}=P"


def _parse_fault(entry: str) -> tuple[str, float, float | None]:
    """One ``name=P[:SECONDS]`` entry as (name, probability, seconds or None)."""
    name, equals, value = (part.strip() for part in entry.partition("="))
    if name not in FAULT_KINDS:
        raise ValueError(f"--faults: unknown fault {name!r}; known: {', '.join(FAULT_KINDS)}")
    probability_text, colon, seconds_text = value.partition(":")
    if not equals or not probability_text:
        raise ValueError(f"--faults: {name} needs a probability: {_fault_usage(name)}")
    if (name in TIMED_FAULTS) != bool(colon):
        needs = "needs a duration" if name in TIMED_FAULTS else "takes no duration"
        raise ValueError(f"--faults: {name} {needs}: {_fault_usage(name)}")
    probability = _fault_number(name, probability_text)
    if not 0 <= probability <= 1:
        raise ValueError(f"--faults: {name}={value}: P must be between 0 and 1")
    if not colon:
        return name, probability, None
    seconds = _fault_number(name, seconds_text)
    if not 0 <= seconds <= MAX_FAULT_SECONDS:
        raise ValueError(f"--faults: {name}={value}: SECONDS must be between 0 and 3600")
    if name == "throttle" and (seconds < 1 or not seconds.is_integer()):
        # Retry-After carries whole seconds (delta-seconds or an HTTP-date).
        raise ValueError(f"--faults: {name}={value}: SECONDS must be a whole number, at least 1")
    return name, probability, seconds


def _fault_number(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"--faults: {name}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"--faults: {name}: {text!r} is not a finite number")
    return number


@functools.lru_cache(maxsize=64)
def parse_faults(spec: str) -> Faults:
    """Faults.parse, cached: MockConfig keeps only the text, so it stays plain, printable data."""
    return Faults.parse(spec)


@dataclass
class MockConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port
    seed: int = 1
    users: int = 100
    history: int = 1000  # transactions already in the past at start
    history_span: float = 86400.0  # seconds of past that the history covers, ending at start
    tx_per_minute: float = 0.0  # new transactions arriving while it runs
    rate_limit: int = 5  # token bucket: rate_limit requests ...
    per: float = 60.0  # ... per `per` seconds (capacity = rate_limit)
    late_ratio: float = 0.0  # share of live transactions that become visible late
    late_max: float = 0.0  # how late at most (seconds): createdAt = visible_at - U(0, late_max)
    invalid_ratio: float = 0.0  # share of extra invalid records mixed into /transactions
    start: int | None = None  # the clock anchor in ms since epoch; None = now
    faults: str = ""  # the --faults spec (see Faults); late= and invalid= set the options above
    live_for: float | None = None  # seconds after start when live traffic (and drift) stops

    def __post_init__(self) -> None:
        self._apply_fault_aliases(parse_faults(self.faults))
        checks = [
            (1 <= self.users <= MAX_USERS, f"users must be between 1 and {MAX_USERS}"),
            (self.history >= 0, "history must not be negative"),
            (self.history_span > 0, "history_span must be positive"),
            (self.tx_per_minute >= 0, "tx_per_minute must not be negative"),
            (self.rate_limit >= 1, "rate_limit must be at least 1"),
            (self.per > 0, "per must be positive"),
            (0 <= self.late_ratio <= 1, "late_ratio must be between 0 and 1"),
            (self.late_max >= 0, "late_max must not be negative"),
            (0 <= self.invalid_ratio <= 1, "invalid_ratio must be between 0 and 1"),
            (self.live_for is None or self.live_for >= 0, "live_for must not be negative"),
        ]
        for holds, message in checks:
            if not holds:
                raise ValueError(message)

    @property
    def fault_settings(self) -> Faults:
        return parse_faults(self.faults)

    def _apply_fault_aliases(self, faults: Faults) -> None:
        """late=P:S and invalid=P are late_ratio/late_max and invalid_ratio under another name."""
        aliases = (
            ("late", ("late_ratio", "late_max"), (faults.late, faults.late_seconds)),
            ("invalid", ("invalid_ratio",), (faults.invalid,)),
        )
        for kind, names, values in aliases:
            if not values[0]:
                continue
            current = tuple(getattr(self, name) for name in names)
            # Equal values are fine: dataclasses.replace() runs this again on the result.
            if any(current) and current != values:
                raise ValueError(f"faults {kind}= contradicts {'/'.join(names)}: give it once")
            for name, value in zip(names, values, strict=True):
                setattr(self, name, value)


# ---------------------------------------------------------------- rendering records

_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_UUID_SET = (0x8000 << 48) | (4 << 76)


def uuid4_text(bits: int) -> str:
    """``str(uuid.UUID(int=bits, version=4))``, three times faster: history needs millions."""
    digits = ((bits & _UUID_CLEAR) | _UUID_SET).to_bytes(16).hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def render_transaction(tx_id: str, user_id: str, created_at: str, kind: str, cents: int) -> str:
    """The same text as ``Transaction.to_json()`` for our plain ASCII ids, without its overhead."""
    return (
        f'{{"id":"{tx_id}","userId":"{user_id}","createdAt":"{created_at}",'
        f'"type":"{kind}","amount":{format_cents(cents)}}}'
    )


def render_fields(fields: Mapping[str, str]) -> str:
    """A JSON object from values that are already JSON text (so broken numbers stay verbatim)."""
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in fields.items()) + "}"


class TimestampCache:
    """format_timestamp with the seconds part reused: history has many items per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def text(self, ms: int) -> str:
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._prefix = format_timestamp(second * 1000)[:-5]
        return f"{self._prefix}.{millis:03d}Z"


# ---------------------------------------------------------------- broken records


def _missing_field(fields: dict, rng) -> None:
    del fields[rng.choice(FIELDS)]


def _set(name: str, value: Callable[[dict], str]) -> Callable[[dict, object], None]:
    def breaks(fields: dict, rng) -> None:
        fields[name] = value(fields)

    return breaks


# Every way the spec says a record can break; served round-robin so any run shows them all.
INVALID_KINDS: tuple[tuple[str, Callable[[dict, object], None]], ...] = (
    ("missing field", _missing_field),
    ("unknown type", _set("type", lambda f: '"refund"')),
    ("amount zero", _set("amount", lambda f: "0")),
    ("amount negative", _set("amount", lambda f: "-" + f["amount"])),
    ("amount string", _set("amount", lambda f: json.dumps(f["amount"]))),
    ("amount with 3 decimals", _set("amount", lambda f: f["amount"] + "5")),
    ("amount absurdly large", _set("amount", lambda f: "1e15")),
    ("createdAt unparseable", _set("createdAt", lambda f: '"2023-02-30T25:61:00.000Z"')),
    ("createdAt without time zone", _set("createdAt", lambda f: f["createdAt"][:-2] + '"')),
    ("id not a string", _set("id", lambda f: str(int(f["id"][1:9], 16)))),
    ("userId not a string", _set("userId", lambda f: str(int(f["userId"][1:-1])))),
    ("id 10,000 characters", _set("id", lambda f: '"' + "f" * 10_000 + '"')),
    ("userId 10,000 characters", _set("userId", lambda f: '"' + "7" * 10_000 + '"')),
)


# ---------------------------------------------------------------- faults: per request

# Drawn once per /transactions request, in this order, whatever the settings: the n-th request
# gets the same decisions for the same seed however big the pages before it were.
REQUEST_FAULTS = (
    "throttle", "error", "reset", "nonjson", "truncate", "slow", "drift", "outside", "meta",
)  # fmt: skip
# These replace the answer; when several fire, the first in this order wins.
ANSWER_FAULTS = ("throttle", "error", "reset", "nonjson", "truncate")
CARRY_MEMORY = 1024  # windows whose next page still owes a duplicate
CONFLICT_DELAY_MS = 5000  # a conflicting version comes up to this much after its original
BAD_GATEWAY_HTML = "<html>bad gateway</html>"


@dataclass(frozen=True)
class RequestFaults:
    """What one /transactions request gets. ``rng`` draws everything else for this request."""

    answer: str | None  # one of ANSWER_FAULTS, or None for a page
    slow: bool
    drift: bool
    outside: bool
    meta: bool
    window: tuple  # (startDate, endDate as asked, limit): which pages belong together
    page: int
    rng: random.Random


class FaultInjector:
    """Decides the faults of each /transactions request and counts every fault injected.

    Its generator is seeded from the seed alone and is not the data's, so faults never change
    the data. Thread-safe.
    """

    def __init__(self, faults: Faults, seed: int):
        self.faults = faults
        self._rng = random.Random(f"txagg-mock-faults:{seed}")
        self._lock = threading.Lock()
        self._per_request = faults.duplicate > 0 or any(
            getattr(faults, kind) for kind in REQUEST_FAULTS
        )
        self.requests = 0
        self.injected = dict.fromkeys(FAULT_KINDS, 0)
        self._carried: OrderedDict[tuple, str] = OrderedDict()

    def decide(self, window: tuple, page: int) -> RequestFaults | None:
        """This request's faults; None (the fast path) when no per-request fault is on."""
        with self._lock:
            self.requests += 1
            if not self._per_request:
                return None
            rolls = {
                kind: self._rng.random() < getattr(self.faults, kind) for kind in REQUEST_FAULTS
            }
            request_rng = random.Random(self._rng.getrandbits(64))
        answer = next((kind for kind in ANSWER_FAULTS if rolls[kind]), None)
        return RequestFaults(
            answer, rolls["slow"], rolls["drift"], rolls["outside"], rolls["meta"],
            window, page, request_rng,
        )  # fmt: skip

    def count(self, kind: str, times: int = 1) -> int:
        """Record an injected fault; returns how many of that kind so far."""
        with self._lock:
            self.injected[kind] += times
            return self.injected[kind]

    def report(self, data_counts: Mapping[str, int], late_arrivals: list[dict]) -> dict:
        """The body of GET /faults."""
        with self._lock:
            injected = {**self.injected, **data_counts}
            requests = self.requests
        return {
            "spec": self.faults.spec(),
            "settings": self.faults.settings(),
            "requests": requests,
            "injected": {kind: injected[kind] for kind in FAULT_KINDS},
            "lateArrivals": late_arrivals,
        }

    # ------------------------------------------------------------ shaping a page

    def shape_page(
        self, items: list[str], outside: list[str], meta: dict, plan: RequestFaults
    ) -> bytes:
        """The page with this request's duplicates, outside items and lies, as the body."""
        carried = self._take_carried(plan)
        shaped = carried + self._duplicate(items, plan)
        for text in outside:
            shaped.insert(plan.rng.randint(0, len(shaped)), text)
        meta = {**meta, "itemCount": len(shaped)}
        if plan.meta:
            meta = lying_meta(meta, plan.rng)
            self.count("meta")
        return render_page(shaped, meta)

    def _duplicate(self, items: list[str], plan: RequestFaults) -> list[str]:
        """Each item again with probability P: later in this page, or first on the next page."""
        probability = self.faults.duplicate
        if not probability:
            return items
        rng = plan.rng
        copies: list[tuple[int, str]] = []  # (position in items to insert before, text)
        carry: str | None = None
        for position, text in enumerate(items):
            if rng.random() >= probability:
                continue
            if carry is None and rng.random() < 0.5:
                carry = text  # one per page is enough to show the next page a repeat
            else:
                copies.append((rng.randint(position + 1, len(items)), text))
        shaped = list(items)
        # From the back, so the positions still to do keep meaning what they meant.
        for position, text in sorted(copies, key=lambda copy: copy[0], reverse=True):
            shaped.insert(position, text)
        if copies:
            self.count("duplicate", len(copies))
        if carry is not None:
            self._remember_carry((*plan.window, plan.page + 1), carry)
        return shaped

    def _remember_carry(self, key: tuple, text: str) -> None:
        with self._lock:
            self._carried[key] = text
            self._carried.move_to_end(key)
            while len(self._carried) > CARRY_MEMORY:
                self._carried.popitem(last=False)

    def _take_carried(self, plan: RequestFaults) -> list[str]:
        with self._lock:
            text = self._carried.pop((*plan.window, plan.page), None)
        if text is None:
            return []
        self.count("duplicate")
        return [text]


def lying_meta(meta: dict, rng: random.Random) -> dict:
    """meta with one to three of totalItems, totalPages, itemCount wrong (still counts >= 0)."""
    names = [name for name in ("totalItems", "totalPages", "itemCount") if rng.random() < 0.5]
    lied = dict(meta)
    for name in names or ["totalItems"]:
        true = meta[name]
        wrong = rng.randint(0, 2 * true + 10)
        lied[name] = wrong if wrong != true else true + 1
    return lied


def page_meta(total: int, count: int, limit: int, page: int) -> dict:
    return {
        "totalItems": total,
        "itemCount": count,
        "itemsPerPage": limit,
        "totalPages": math.ceil(total / limit),
        "currentPage": page,
    }


def render_page(items: list[str], meta: dict) -> bytes:
    body = '{"items":[' + ",".join(items) + '],"meta":' + json.dumps(meta, separators=(",", ":"))
    return (body + "}").encode()


# ---------------------------------------------------------------- the in-memory upstream


class Ledger:
    """Every served record sorted by createdAt (stable), as pre-rendered JSON text."""

    def __init__(self) -> None:
        self.keys: list[int] = []  # createdAt in ms, parallel to texts
        self.texts: list[str] = []

    def add(self, key: int, text: str) -> None:
        if not self.keys or key >= self.keys[-1]:
            self.keys.append(key)
            self.texts.append(text)
            return
        # A late arrival: after everything with the same millisecond, so order stays stable.
        index = bisect_right(self.keys, key)
        self.keys.insert(index, key)
        self.texts.insert(index, text)

    def insert(self, index: int, key: int, text: str) -> None:
        """Put a record at an exact position (the caller keeps keys sorted): drift needs it."""
        self.keys.insert(index, key)
        self.texts.insert(index, text)

    def bounds(self, start_ms: int | None, end_ms: int | None) -> tuple[int, int]:
        low = 0 if start_ms is None else bisect_left(self.keys, start_ms)
        high = len(self.keys) if end_ms is None else bisect_right(self.keys, end_ms)
        return low, max(low, high)


class UserBook:
    """Per-user totals in cents for the ground truth, kept as each transaction is made."""

    def __init__(self, user_ids: list[str]) -> None:
        count = len(user_ids)
        self.ids = user_ids
        self.count = count
        self.index = {user_id: position for position, user_id in enumerate(user_ids)}
        self.in_id_order = sorted(range(count), key=user_ids.__getitem__)
        self.balance = [0] * count
        self.totals = {kind: [0] * count for kind in ("earned", "spent", "payout")}
        self.payout_requests = [0] * count
        self.transactions = [0] * count
        self.last_ms = [-1] * count

    def add(self, user: int, kind: str, cents: int, created_ms: int) -> None:
        self.totals[kind][user] += cents
        self.balance[user] += cents if kind == "earned" else -cents
        self.transactions[user] += 1
        if kind == "payout":
            self.payout_requests[user] += 1
        if created_ms > self.last_ms[user]:
            self.last_ms[user] = created_ms

    def report(self, user: int, as_of: str) -> dict:
        payout = self.totals["payout"][user]
        return {
            "userId": self.ids[user],
            "balance": cents_to_decimal(self.balance[user]),
            "earned": cents_to_decimal(self.totals["earned"][user]),
            "spent": cents_to_decimal(self.totals["spent"][user]),
            "payout": cents_to_decimal(payout),
            "paidOut": cents_to_decimal(payout),  # 1 SCR = 1 EUR
            "transactions": self.transactions[user],
            "lastTransactionAt": format_timestamp(self.last_ms[user]),
            "asOf": as_of,
        }


def history_instants(rng, start_ms: int, span_ms: int, count: int) -> Iterator[int]:
    """count createdAt values in [start_ms - span_ms, start_ms), non-decreasing.

    Item i falls in its own slice of the span, so order comes for free; some items instead follow
    the previous one within a second (several per second, equal milliseconds included), and some
    sit on a whole second, as a client's second-precision window bounds would.
    """
    base = start_ms - span_ms
    step = span_ms / max(count, 1)
    last_allowed = start_ms - 1
    random = rng.random
    previous = base
    for position in range(count):
        if position and random() < BURST_SHARE:
            # Stay at or below the lowest createdAt item i + 1 can get.
            ceiling = min(base + int((position + 1) * step), last_allowed)
            created = min(previous + int(random() * 1000), ceiling)
        else:
            created = base + int((position + random()) * step)
            if random() < WHOLE_SECOND_SHARE:
                created = max(previous, created - created % 1000)
            created = min(created, last_allowed)
        yield created
        previous = created


def earned_cents(rng) -> int:
    """Roughly 0.01..500 SCR: mostly two decimals, some whole, some with one decimal."""
    # random() rather than randint(): this runs for every other transaction of a big history.
    style = rng.random()
    if style < 0.15:
        return (int(rng.random() * 500) + 1) * 100
    if style < 0.30:
        return (int(rng.random() * 5000) + 1) * 10
    return int(rng.random() * 50_000) + 1


def share_of(rng, spendable: int) -> int:
    """A random part of what the user can spend, between 1 cent and all of it."""
    cents = max(1, int(spendable * rng.random()))
    style = rng.random()
    if style < 0.15 and cents >= 100:
        cents -= cents % 100
    elif style < 0.30 and cents >= 10:
        cents -= cents % 10
    return cents


def choose_kind_and_amount(rng, spendable: int) -> tuple[str, int]:
    roll = rng.random()
    if spendable <= 0 or roll < EARNED_SHARE:
        return "earned", earned_cents(rng)
    kind = "spent" if roll < EARNED_SHARE + SPENT_SHARE else "payout"
    return kind, share_of(rng, spendable)


class MockUpstream:
    """The pure, in-memory core of the fake upstream; no HTTP here. Thread-safe."""

    def __init__(self, config: MockConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.start_ms = config.start if config.start is not None else self._now_ms()
        self._lock = threading.RLock()
        self._faker = Faker()
        self._faker.seed_instance(config.seed)
        self._rng = self._faker.random
        self.users = UserBook([self._faker.unique.numerify("######") for _ in range(config.users)])
        self.ledger = Ledger()
        self._timestamps = TimestampCache()
        self._invalid_served = 0
        self._invalid_ratio = config.invalid_ratio
        # Broken records draw from their own generator: with them on (invalid_ratio, or
        # --faults invalid=P) the valid data stays exactly what it is without them.
        self._invalid_rng = random.Random(f"txagg-mock-invalid:{config.seed}")
        self._live_made = 0
        self._visible_now_ms = self.start_ms
        self._late_max_ms = int(config.late_max * 1000)
        # Recent earnings per user, so a late spend never drives an earlier balance negative.
        late_mode = config.late_ratio > 0 and self._late_max_ms > 0
        self._recent_earned: list[deque] | None = (
            [deque() for _ in range(config.users)] if late_mode else None
        )
        self.injector = FaultInjector(config.fault_settings, config.seed)
        self._late_made = 0
        self._late_log: deque[tuple[str, int, int]] = deque(maxlen=LATE_LOG_SIZE)
        # What drift added per user: left out of what the data generator may spend, so the
        # data's own draws (and so every id, amount and user) are the same with faults or not.
        self._fault_earned = [0] * config.users
        # Conflicts draw from their own generator, once per live transaction: like the data,
        # they depend on the clock only, never on how often the mock was read.
        self._conflict_rng = random.Random(f"txagg-mock-conflicts:{config.seed}")
        self._pending_conflicts: list[tuple[int, int, str]] = []  # heap of (createdAt, seq, text)
        self._conflict_texts: set[str] = set()
        self._conflicts_shown = 0
        self._build_history()

    # ------------------------------------------------------------ generation

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _build_history(self) -> None:
        span_ms = max(1, int(self.config.history_span * 1000))
        for created_ms in history_instants(self._rng, self.start_ms, span_ms, self.config.history):
            self._make_transaction(created_ms)

    def _make_transaction(self, created_ms: int, late: bool = False) -> tuple[str, str, str, int]:
        """Make, count and list one transaction; returns (id, userId, type, cents)."""
        rng, book = self._rng, self.users
        user = int(rng.random() * book.count)
        spendable = book.balance[user] - self._fault_earned[user]
        if late:
            spendable -= self._earned_since(user, created_ms)
        kind, cents = choose_kind_and_amount(rng, spendable)
        book.add(user, kind, cents, created_ms)
        if self._recent_earned is not None and kind == "earned":
            self._remember_earning(user, created_ms, cents)
        tx_id = uuid4_text(rng.getrandbits(128))
        created_text = self._timestamps.text(created_ms)
        user_id = book.ids[user]
        self.ledger.add(created_ms, render_transaction(tx_id, user_id, created_text, kind, cents))
        if self._invalid_ratio and self._invalid_rng.random() < self._invalid_ratio:
            self._make_invalid(created_ms, user_id, created_text)
        return tx_id, user_id, kind, cents

    def _remember_earning(self, user: int, created_ms: int, cents: int) -> None:
        if created_ms >= self.start_ms - self._late_max_ms:
            self._recent_earned[user].append((created_ms, cents))

    def _earned_since(self, user: int, created_ms: int) -> int:
        """What the user earned at or after created_ms: a late spend there may not use it."""
        recent = self._recent_earned[user]
        # No later late arrival can land before this: forget what is older (roughly, in
        # arrival order, which only ever keeps too much).
        horizon = self._visible_now_ms - self._late_max_ms
        while recent and recent[0][0] < horizon:
            recent.popleft()
        return sum(cents for at_ms, cents in recent if at_ms >= created_ms)

    def _make_invalid(self, created_ms: int, user_id: str, created_text: str) -> None:
        rng = self._invalid_rng
        cents = earned_cents(rng)
        fields = {
            "id": f'"{uuid4_text(rng.getrandbits(128))}"',
            "userId": f'"{user_id}"',
            "createdAt": f'"{created_text}"',
            "type": '"earned"',
            "amount": f"{cents // 100}.{cents % 100:02d}",
        }
        _, breaks = INVALID_KINDS[self._invalid_served % len(INVALID_KINDS)]
        breaks(fields, rng)
        self._invalid_served += 1
        self.ledger.add(created_ms, render_fields(fields))

    def _visible_ms(self, k: int) -> int:
        return self.start_ms + int(k * 60_000 / self.config.tx_per_minute)

    def _live_until_ms(self) -> int | None:
        if self.config.live_for is None:
            return None
        return self.start_ms + int(self.config.live_for * 1000)

    def _is_live(self, now_ms: int) -> bool:
        until = self._live_until_ms()
        return until is None or now_ms <= until

    def _live_due(self, now_ms: int) -> int:
        """How many live transactions are visible at now_ms (none after live_for)."""
        until = self._live_until_ms()
        if until is not None:
            now_ms = min(now_ms, until)
        if self.config.tx_per_minute <= 0 or now_ms < self.start_ms:
            return 0
        due = int((now_ms - self.start_ms) * self.config.tx_per_minute / 60_000)
        while self._visible_ms(due + 1) <= now_ms:
            due += 1
        while due > 0 and self._visible_ms(due) > now_ms:
            due -= 1
        return due

    def advance(self) -> None:
        """Materialise every live transaction (and conflicting version) due up to clock()."""
        with self._lock:
            now_ms = self._now_ms()
            due = self._live_due(now_ms)
            while self._live_made < due:
                self._live_made += 1
                visible_ms = self._visible_ms(self._live_made)
                self._show_conflicts(visible_ms)
                self._make_live(visible_ms)
            self._show_conflicts(now_ms)

    def _make_live(self, visible_ms: int) -> None:
        rng = self._rng
        self._visible_now_ms = visible_ms
        late = self.config.late_ratio > 0 and rng.random() < self.config.late_ratio
        if late and self._late_max_ms > 0:
            created = visible_ms - int(rng.random() * self._late_max_ms)
            tx_id = self._make_transaction(created, late=True)[0]
            self._late_made += 1
            self._late_log.append((tx_id, created, visible_ms))
            return
        made = self._make_transaction(visible_ms)
        # Only originals that are on time: a late original could surface after its conflicting
        # version, and then a reader would rightly keep the wrong one as the first.
        conflict = self.injector.faults.conflict
        if conflict and self._conflict_rng.random() < conflict:
            self._plan_conflict(visible_ms, *made)

    def _plan_conflict(self, created_ms: int, tx_id: str, user_id: str, kind: str, cents: int):
        """A second version of a transaction (another amount), shown a little later."""
        rng = self._conflict_rng
        at_ms = created_ms + 1 + int(rng.random() * CONFLICT_DELAY_MS)
        other = cents + 1 + int(rng.random() * cents)
        text = render_transaction(tx_id, user_id, format_timestamp(at_ms), kind, other)
        heapq.heappush(self._pending_conflicts, (at_ms, self._live_made, text))

    def _show_conflicts(self, up_to_ms: int) -> None:
        """List the conflicting versions whose createdAt has come (never counted by the truth)."""
        pending = self._pending_conflicts
        while pending and pending[0][0] <= up_to_ms:
            at_ms, _, text = heapq.heappop(pending)
            self.ledger.add(at_ms, text)
            self._conflict_texts.add(text)
            self._conflicts_shown += 1

    def _drift(self, start_ms: int | None, end_ms: int | None, page: int, limit: int, rng) -> None:
        """A new, real transaction lands inside the window, on the page before this one.

        Everything from there on shifts by one: the reader sees the last item of the previous
        page again, and never sees the new one while paging. It is an earned one, so no balance
        can go negative, and it is counted by the truth like any other.
        """
        low, high = self.ledger.bounds(start_ms, end_ms)
        first = min(high, low + (page - 1) * limit)
        if first <= low:
            return  # nothing read before this page: nothing to land in front of
        keys = self.ledger.keys
        index = rng.randint(max(low, first - limit), first - 1)
        created_ms = rng.randint(keys[index - 1] if index > low else keys[index], keys[index])
        user = rng.randrange(self.users.count)
        cents = earned_cents(rng)
        self.users.add(user, "earned", cents, created_ms)
        self._fault_earned[user] += cents
        text = render_transaction(
            uuid4_text(rng.getrandbits(128)),
            self.users.ids[user],
            format_timestamp(created_ms),
            "earned",
            cents,
        )
        self.ledger.insert(index, created_ms, text)
        self.injector.count("drift")

    def _outside(self, low: int, high: int, rng) -> list[str]:
        """One to three real transactions from outside [low, high): visible, valid, first versions.

        Broken records and conflicting versions are left out: served out of their place they
        could reach a reader before what they break or contradict.
        """
        texts = self.ledger.texts
        outside = low + len(texts) - high
        wanted = rng.randint(1, 3)
        found: list[str] = []
        for _ in range(5 * wanted):
            if len(found) == wanted or not outside:
                break
            pick = rng.randrange(outside)
            text = texts[pick if pick < low else high + pick - low]
            if text not in found and self._is_first_version(text):
                found.append(text)
        if found:
            self.injector.count("outside", len(found))
        return found

    def _is_first_version(self, text: str) -> bool:
        if text in self._conflict_texts:
            return False
        try:
            parse_transaction(loads(text))
        except InvalidRecord:
            return False
        return True

    # ------------------------------------------------------------ queries

    def window(
        self, start_ms: int | None, end_ms: int | None, page: int, limit: int
    ) -> tuple[bytes, dict]:
        """One page of the records with start_ms <= createdAt <= end_ms (None = open end)."""
        if page < 1 or limit < 1:
            raise ValueError("page and limit must be at least 1")
        limit = min(limit, MAX_LIMIT)
        with self._lock:
            self.advance()
            items, low, high = self._page(start_ms, end_ms, page, limit)
        meta = page_meta(high - low, len(items), limit, page)
        return render_page(items, meta), meta

    def faulted_window(
        self, start_ms: int | None, end_ms: int | None, page: int, limit: int, plan: RequestFaults
    ) -> bytes:
        """window() with the faults of one request: drift first, then the page as shaped."""
        if page < 1 or limit < 1:
            raise ValueError("page and limit must be at least 1")
        limit = min(limit, MAX_LIMIT)
        with self._lock:
            self.advance()
            if plan.drift and page > 1 and self._is_live(self._now_ms()):
                self._drift(start_ms, end_ms, page, limit, plan.rng)
            items, low, high = self._page(start_ms, end_ms, page, limit)
            outside = self._outside(low, high, plan.rng) if plan.outside else []
        meta = page_meta(high - low, len(items), limit, page)
        return self.injector.shape_page(items, outside, meta, plan)

    def _page(
        self, start_ms: int | None, end_ms: int | None, page: int, limit: int
    ) -> tuple[list[str], int, int]:
        """The page's records, and the window's bounds in the ledger. Call under the lock."""
        low, high = self.ledger.bounds(start_ms, end_ms)
        first = min(high, low + (page - 1) * limit)
        return self.ledger.texts[first : min(high, first + limit)], low, high

    def user_report(self, user_id: str) -> dict | None:
        """The user's true aggregates over the valid transactions visible so far."""
        with self._lock:
            self.advance()
            user = self.users.index.get(user_id)
            if user is None or self.users.transactions[user] == 0:
                return None
            return self.users.report(user, self.as_of())

    def all_reports(self) -> list[dict]:
        with self._lock:
            self.advance()
            as_of = self.as_of()
            book = self.users
            return [book.report(u, as_of) for u in book.in_id_order if book.transactions[u]]

    def payouts(self) -> list[dict]:
        with self._lock:
            self.advance()
            book = self.users
            return [
                {
                    "userId": book.ids[user],
                    "amount": cents_to_decimal(book.totals["payout"][user]),
                    "count": book.payout_requests[user],
                }
                for user in book.in_id_order
                if book.payout_requests[user]
            ]

    def as_of(self) -> str:
        return format_instant(self._now_ms())

    def fault_report(self) -> dict:
        """GET /faults: the settings and how many of each fault were injected so far."""
        with self._lock:
            self.advance()
            data_counts = {
                "late": self._late_made,
                "invalid": self._invalid_served,
                "conflict": self._conflicts_shown,
            }
            late = [
                {
                    "id": tx_id,
                    "createdAt": format_timestamp(created),
                    "visibleAt": format_timestamp(visible),
                }
                for tx_id, created, visible in self._late_log
            ]
        return self.injector.report(data_counts, late)


# ---------------------------------------------------------------- rate limit


@dataclass(frozen=True)
class BucketState:
    allowed: bool
    remaining: int  # whole tokens left after this request
    retry_after: int  # whole seconds until one token is back (0 when allowed)
    reset: int  # whole seconds until the bucket is full again


class TokenBucket:
    """``capacity`` requests per ``per`` seconds, refilled continuously. Thread-safe."""

    def __init__(self, capacity: int, per: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.per = per
        self.rate = capacity / per  # tokens a second
        self.clock = clock
        self._tokens = float(capacity)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> BucketState:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            allowed = self._tokens >= 1
            if allowed:
                self._tokens -= 1
            retry_after = 0 if allowed else max(1, self._seconds_to_refill(1 - self._tokens))
            reset = self._seconds_to_refill(self.capacity - self._tokens)
            return BucketState(allowed, math.floor(self._tokens), retry_after, reset)

    def _seconds_to_refill(self, tokens: float) -> int:
        # Rounded up, but float noise (30.000000000000004) is no reason for an extra second.
        return math.ceil(round(tokens * self.per / self.capacity, 6))

    def headers(self, state: BucketState) -> dict[str, str]:
        """The IETF httpapi RateLimit headers (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Policy": f'"default";q={self.capacity};w={math.ceil(self.per)}',
            "RateLimit": f'"default";r={state.remaining};t={state.reset}',
        }


# ---------------------------------------------------------------- HTTP


class BadRequest(ValueError):
    pass


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    return Response(json.dumps(body), status, headers=dict(headers or {}), media_type=PROBLEM_TYPE)


_POSITIVE_INTEGER = re.compile(r"[0-9]{1,18}")


def _positive_int(params: Mapping[str, str], name: str, default: int) -> int:
    text = params.get(name) or ""
    if not text:
        return default
    if not _POSITIVE_INTEGER.fullmatch(text) or int(text) < 1:
        raise BadRequest(f"{name} must be a positive integer, got {text[:40]!r}")
    return int(text)


def _instant(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name) or ""
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as error:
        raise BadRequest(f"{name}: {error}") from None


def parse_window_query(params: Mapping[str, str]) -> tuple[int | None, int | None, int, int]:
    """startDate, endDate, page, limit from a query; BadRequest says what is wrong.

    An empty value counts as absent; unknown parameters are ignored.
    """
    start_ms = _instant(params, "startDate")
    end_ms = _instant(params, "endDate")
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise BadRequest("startDate is after endDate")
    page = _positive_int(params, "page", 1)
    limit = min(_positive_int(params, "limit", MAX_LIMIT), MAX_LIMIT)
    return start_ms, end_ms, page, limit


def json_response(text: str | bytes, headers: Mapping[str, str] | None = None) -> Response:
    return Response(text, headers=dict(headers or {}), media_type="application/json")


# ---------------------------------------------------------------- faulted answers

# Set while a response is broken on purpose, so uvicorn's complaint about it is not logged.
_BREAKING_ON_PURPOSE = contextvars.ContextVar("txagg_mock_breaking_on_purpose", default=False)


class _QuietPurposefulBreaks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            _BREAKING_ON_PURPOSE.get() and "without completing response" in record.getMessage()
        )


_QUIET_FILTER = _QuietPurposefulBreaks()


class BrokenResponse(Response):
    """Headers promising the whole body (Content-Length), then ``sent`` bytes of it, then EOF.

    Returning from the ASGI app with the response incomplete makes uvicorn close the
    connection: the client reads a short body and raises (httpx: RemoteProtocolError).
    """

    def __init__(self, body: bytes, sent: int, headers: Mapping[str, str]):
        super().__init__(body, headers=dict(headers), media_type="application/json")
        self.sent = sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _BREAKING_ON_PURPOSE.set(True)  # this task's context: uvicorn logs from the same task
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if self.sent:
            await send(
                {"type": "http.response.body", "body": self.body[: self.sent], "more_body": True}
            )


def throttle_response(seconds: int, nth: int, now: float, headers: Mapping[str, str]) -> Response:
    """An injected 429; Retry-After alternates: delta-seconds first, an HTTP-date the next time."""
    if nth % 2:
        retry_after = str(seconds)
    else:
        # Rounded up to the next whole second: an HTTP-date cannot say less, and must not say
        # less than the wait.
        at = datetime.fromtimestamp(math.ceil(now) + seconds, UTC)
        retry_after = format_datetime(at, usegmt=True)
    detail = "injected fault: too many requests (--faults throttle)"
    return problem(429, detail, {**headers, "Retry-After": retry_after})


async def faulted_response(
    upstream: MockUpstream, plan: RequestFaults, query: tuple, headers: Mapping[str, str]
) -> Response:
    """The answer to a /transactions request that drew faults (see RequestFaults)."""
    injector = upstream.injector
    if plan.slow:
        injector.count("slow")
        await asyncio.sleep(injector.faults.slow_seconds)
    nth = injector.count(plan.answer) if plan.answer else 0
    if plan.answer == "throttle":
        seconds = int(injector.faults.throttle_seconds)
        return throttle_response(seconds, nth, upstream.clock(), headers)
    if plan.answer == "error":
        status = plan.rng.choice((500, 502, 503))
        return problem(status, "injected fault: the upstream failed (--faults error)", headers)
    if plan.answer == "nonjson":
        return HTMLResponse(BAD_GATEWAY_HTML, headers=dict(headers))
    body = upstream.faulted_window(*query, plan)
    if plan.answer == "reset":
        return BrokenResponse(body, 0, headers)
    if plan.answer == "truncate":
        return BrokenResponse(body, len(body) // 2, headers)
    return json_response(body, headers)


def create_app(upstream: MockUpstream, config: MockConfig) -> Starlette:
    bucket = TokenBucket(config.rate_limit, config.per)
    document = openapi_document(config)
    document_text = json.dumps(document, indent=2)
    docs_page = docs_html(document)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _QUIET_FILTER not in uvicorn_log.filters:
        uvicorn_log.addFilter(_QUIET_FILTER)

    async def transactions(request: Request) -> Response:
        state = bucket.take()
        headers = bucket.headers(state)
        if not state.allowed:
            headers["Retry-After"] = str(state.retry_after)
            detail = f"rate limit of {config.rate_limit} requests per {config.per:g} s exceeded"
            return problem(429, detail, headers)
        try:
            start_ms, end_ms, page, limit = parse_window_query(request.query_params)
        except BadRequest as error:
            return problem(400, str(error), headers)
        # Keyed by endDate as asked: "up to now" pages belong together although now moves.
        plan = upstream.injector.decide((start_ms, end_ms, limit), page)
        if end_ms is None:
            end_ms = int(upstream.clock() * 1000)
        if plan is not None:
            return await faulted_response(upstream, plan, (start_ms, end_ms, page, limit), headers)
        body, _ = upstream.window(start_ms, end_ms, page, limit)
        return json_response(body, headers)

    async def faults(request: Request) -> Response:
        return json_response(json.dumps(upstream.fault_report()))

    async def users(request: Request) -> Response:
        return json_response(dumps({"items": upstream.all_reports(), "asOf": upstream.as_of()}))

    async def user(request: Request) -> Response:
        user_id = request.path_params["userId"]
        report = upstream.user_report(user_id)
        if report is None:
            return problem(404, f"no transactions for user {user_id[:80]!r}")
        return json_response(dumps(report))

    async def payouts(request: Request) -> Response:
        return json_response(dumps({"items": upstream.payouts(), "asOf": upstream.as_of()}))

    async def openapi(request: Request) -> Response:
        return json_response(document_text)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        detail = {404: f"no route {request.url.path[:200]}"}.get(error.status_code, error.detail)
        return problem(error.status_code, str(detail), error.headers)

    async def server_error(request: Request, error: Exception) -> Response:
        return problem(500, f"{type(error).__name__}: the mock failed")

    routes = [
        Route("/transactions", transactions, methods=["GET"]),
        Route("/users", users, methods=["GET"]),
        Route("/users/{userId}", user, methods=["GET"]),
        Route("/payouts", payouts, methods=["GET"]),
        Route("/faults", faults, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


# ---------------------------------------------------------------- OpenAPI and /docs


def _problem_response(description: str, extra_headers: tuple[str, ...] = ()) -> dict:
    response = {
        "description": description,
        "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if extra_headers:
        response["headers"] = {
            name: {"$ref": f"#/components/headers/{name}"} for name in extra_headers
        }
    return response


RATE_HEADERS = ("RateLimit-Policy", "RateLimit")


def _query_parameter(name: str, schema: dict, description: str) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _transactions_operation(config: MockConfig) -> dict:
    date_help = (
        "UTC instant: 'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD' or ISO 8601 "
        "('2023-02-01T00:00:00Z', '2023-02-01T00:00:00.000Z'). Inclusive, to the millisecond."
    )
    rate_headers = {name: {"$ref": f"#/components/headers/{name}"} for name in RATE_HEADERS}
    faults = config.fault_settings
    page_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}}
    if faults.nonjson:
        page_content["text/html"] = {"schema": {"type": "string"}}
    return {
        "summary": "Transactions with startDate <= createdAt <= endDate, in createdAt order",
        "description": (
            f"Rate limited: {config.rate_limit} requests per {config.per:g} seconds (token "
            "bucket). Broken records may be mixed in; meta counts every record on the pages. "
            f"Injected faults (--faults): {faults.spec() or 'none'}; counted at GET /faults."
        ),
        "operationId": "listTransactions",
        "parameters": [
            _query_parameter("startDate", {"type": "string"}, date_help + " Default: no bound."),
            _query_parameter("endDate", {"type": "string"}, date_help + " Default: now."),
            _query_parameter(
                "page", {"type": "integer", "minimum": 1, "default": 1}, "Page number, from 1."
            ),
            _query_parameter(
                "limit",
                {"type": "integer", "minimum": 1, "default": MAX_LIMIT},
                f"Items per page; values above {MAX_LIMIT} are capped at {MAX_LIMIT}.",
            ),
        ],
        "responses": {
            "200": {
                "description": "One page of the window",
                "headers": rate_headers,
                "content": page_content,
            },
            "400": _problem_response("A parameter is malformed", RATE_HEADERS),
            "429": _problem_response(
                "Over the rate limit: wait Retry-After", (*RATE_HEADERS, "Retry-After")
            ),
            **_fault_responses(faults),
        },
    }


def _fault_responses(faults: Faults) -> dict:
    """The 5xx answers that --faults error=P adds (only then: without faults there are none)."""
    if not faults.error:
        return {}
    return {
        str(status): _problem_response(f"Injected fault (--faults error): {status}", RATE_HEADERS)
        for status in (500, 502, 503)
    }


def _get(summary: str, operation_id: str, schema_ref: str, **extra) -> dict:
    return {
        "get": {
            "summary": summary,
            "operationId": operation_id,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{schema_ref}"}
                        }
                    },
                },
                **extra,
            },
        }
    }


def _components() -> dict:
    page_meta = {
        "type": "object",
        "required": ["totalItems", "itemCount", "itemsPerPage", "totalPages", "currentPage"],
        "properties": {
            name: {"type": "integer", "minimum": 0}
            for name in ("totalItems", "itemCount", "itemsPerPage", "totalPages", "currentPage")
        },
    }
    payout = PAYOUT_ITEM_SCHEMA

    def listing(item: str) -> dict:
        return {
            "type": "object",
            "required": ["items", "asOf"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
                "asOf": {"type": "string", "format": "date-time"},
            },
        }

    return {
        "schemas": {
            "Transaction": deepcopy(TRANSACTION_SCHEMA),
            "PageMeta": page_meta,
            "Page": {
                "type": "object",
                "required": ["items", "meta"],
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Transaction"},
                    },
                    "meta": {"$ref": "#/components/schemas/PageMeta"},
                },
            },
            "UserReport": deepcopy(USER_REPORT_SCHEMA),
            "UserList": listing("UserReport"),
            "Payout": payout,
            "PayoutList": listing("Payout"),
            "Problem": deepcopy(PROBLEM_SCHEMA),
            "FaultReport": _fault_report_schema(),
        },
        "headers": {
            "RateLimit-Policy": {
                "description": 'The quota: "default";q=<requests>;w=<window seconds>',
                "schema": {"type": "string"},
            },
            "RateLimit": {
                "description": 'The budget left: "default";r=<requests>;t=<seconds until full>',
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": (
                    "When a request is allowed again: whole seconds, or an HTTP-date "
                    "(--faults throttle alternates the two)"
                ),
                "schema": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]},
            },
        },
    }


def _fault_report_schema() -> dict:
    setting = {
        "type": "object",
        "required": ["probability"],
        "properties": {
            "probability": {"type": "number", "minimum": 0, "maximum": 1},
            "seconds": {"type": "number", "minimum": 0},
        },
    }
    return {
        "type": "object",
        "required": ["spec", "settings", "requests", "injected"],
        "properties": {
            "spec": {"type": "string", "description": "--faults, normalised"},
            "settings": {
                "type": "object",
                "properties": {kind: setting for kind in FAULT_KINDS},
                "required": list(FAULT_KINDS),
            },
            "requests": {
                "type": "integer",
                "minimum": 0,
                "description": "/transactions requests past the rate limit and validation",
            },
            "injected": {
                "type": "object",
                "properties": {kind: {"type": "integer", "minimum": 0} for kind in FAULT_KINDS},
                "required": list(FAULT_KINDS),
            },
            "lateArrivals": {
                "type": "array",
                "description": f"the last {LATE_LOG_SIZE} late arrivals: id and when it showed",
                "items": {
                    "type": "object",
                    "required": ["id", "createdAt", "visibleAt"],
                    "properties": {
                        "id": {"type": "string"},
                        "createdAt": {"type": "string", "format": "date-time"},
                        "visibleAt": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    }


def openapi_document(config: MockConfig) -> dict:
    """The OpenAPI 3.1 description of every route this mock serves."""
    not_found = _problem_response("No transaction of this user is visible yet")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "txagg mock Transaction API",
            "version": __version__,
            "description": (
                "A deterministic fake of the upstream Transaction API, with its own ground truth. "
                "Errors are application/problem+json: 404 for unknown routes, 405 for other "
                "methods than GET. Started with --faults (txagg mock-serve --faults "
                "error=0.1,truncate=0.05,slow=0.02:3,...; see docs/mock.md) it injects upstream "
                "faults into /transactions, deterministically under --seed; GET /faults shows "
                f"the settings and counts what was injected. Active: "
                f"{config.fault_settings.spec() or 'none'}."
            ),
        },
        "paths": {
            "/transactions": {"get": _transactions_operation(config)},
            "/users": _get("Every user's true aggregates, by userId", "listUsers", "UserList"),
            "/users/{userId}": {
                **_get("One user's true aggregates", "getUser", "UserReport", **{"404": not_found}),
                "parameters": [
                    {"name": "userId", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/payouts": _get(
                "Requested payouts per user (users with none left out)", "listPayouts", "PayoutList"
            ),
            "/faults": _get(
                "The --faults settings and how many of each fault were injected so far",
                "getFaults",
                "FaultReport",
            ),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {"200": {"description": "OpenAPI 3.1 JSON"}},
                }
            },
            "/docs": {
                "get": {
                    "summary": "Human-readable list of the routes",
                    "operationId": "docs",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
        },
        "components": _components(),
    }


# ---------------------------------------------------------------- running it


class _Server(uvicorn.Server):
    """uvicorn that reports when it listens and exits quietly on SIGINT/SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after shutting down; a mock that was asked to stop has
        # done its job, so it returns normally instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A bound socket (so port 0 is resolved here) and the base URL it serves."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return sock, f"http://{shown}:{bound_port}"


def _uvicorn_config(app: Starlette) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3
    )


def serve(config: MockConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the mock until SIGINT/SIGTERM; on_ready(base_url) once it listens."""
    sock, url = _bind(config.host, config.port)
    with sock:
        app = create_app(MockUpstream(config), config)
        server = _Server(_uvicorn_config(app), lambda: on_ready and on_ready(url))
        server.run(sockets=[sock])


def start_in_thread(
    config: MockConfig, upstream: MockUpstream | None = None
) -> tuple[str, Callable[[], None]]:
    """Run the mock in a daemon thread; returns its base URL and a stop() that shuts it down.

    ``upstream`` serves an upstream the caller made (say, on a fake clock) instead of a new one.
    """
    sock, url = _bind(config.host, config.port)
    try:
        app = create_app(upstream or MockUpstream(config), config)
    except BaseException:
        sock.close()
        raise
    ready = threading.Event()
    server = _Server(_uvicorn_config(app), ready.set)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="txagg-mock", daemon=True
    )
    thread.start()
    while not ready.wait(0.05):
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the mock upstream on {url} did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return url, stop

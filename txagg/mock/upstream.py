"""The in-memory upstream: seeded users and transactions, live ones as the clock moves, truth.

No HTTP here. The state is a pure function of the seed, the options and the clock: the k-th live
transaction becomes visible at ``start + k * 60 / tx_per_minute`` seconds, whenever it is asked
for. Everything here runs on the wall clock: the options' ``real_*`` values (``--time-scale``).
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator

from faker import Faker

from ..models import (
    InvalidRecord,
    cents_to_decimal,
    format_instant,
    format_timestamp,
    loads,
    parse_transaction,
)
from ..settings import LATE_LOG_SIZE, PAGE_SIZE
from .config import MockConfig
from .faults import CONFLICT_DELAY_MS, FaultInjector, RequestFaults
from .records import (
    INVALID_KINDS,
    TimestampCache,
    page_meta,
    render_fields,
    render_page,
    render_transaction,
    uuid4_text,
)

MAX_LIMIT = PAGE_SIZE  # the upstream's ceiling per request, as the contract says
EARNED_SHARE = 0.50
SPENT_SHARE = 0.35  # the remaining 15% are payouts
BURST_SHARE = 0.25  # history items that follow the previous one within a second
WHOLE_SECOND_SHARE = 0.30  # history items with createdAt on a whole second (.000)


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
        self._late_max_ms = int(config.real_late_max * 1000)
        self._tx_per_minute = config.real_tx_per_minute
        live_for = config.real_live_for
        self._live_until_ms = None if live_for is None else self.start_ms + int(live_for * 1000)
        self._conflict_delay_ms = CONFLICT_DELAY_MS / config.time_scale
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
        return self.start_ms + int(k * 60_000 / self._tx_per_minute)

    def _is_live(self, now_ms: int) -> bool:
        until = self._live_until_ms
        return until is None or now_ms <= until

    def _live_due(self, now_ms: int) -> int:
        """How many live transactions are visible at now_ms (none after live_for)."""
        until = self._live_until_ms
        if until is not None:
            now_ms = min(now_ms, until)
        if self._tx_per_minute <= 0 or now_ms < self.start_ms:
            return 0
        due = int((now_ms - self.start_ms) * self._tx_per_minute / 60_000)
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
        at_ms = created_ms + 1 + int(rng.random() * self._conflict_delay_ms)
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

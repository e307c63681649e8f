"""What ingest makes of a page of upstream records: parsed transactions, per-user deltas checked
against the limits, and the SQL steps that write them (known transactions, new rows, user totals,
quarantine, conflicts, counters, sync state).

The steps take ``conn``: anything with DB-API ``execute`` (returning its cursor) and
``executemany``, such as an ``sqlite3`` connection or the PostgreSQL backend's cursor adapter,
inside the caller's write transaction. Their SQL is the portable subset (``INSERT ... ON
CONFLICT ... DO UPDATE``, ``CASE`` instead of ``max()``, no ``REPLACE``, no SQLite-only
functions), so every backend shares it. Its placeholders are written ``?`` (``PARAM``, DB-API
qmark, what ``sqlite3`` takes); a backend whose driver takes another paramstyle gives the steps
a ``conn`` that rewrites each statement with ``in_paramstyle`` (the one place that knows how),
once per distinct statement. The rows of each ``executemany`` hold distinct keys (one per id,
user, counter or state name), so such a ``conn`` may send a batch as one statement; and one that
offers ``select_in(template, values)`` looks up a page's ids in one statement too (``_rows_in``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DamagedStore
from ..models import (
    MAX_INSTANT_MS,
    MIN_INSTANT_MS,
    InvalidRecord,
    Transaction,
    format_cents,
    parse_created_at,
    parse_transaction,
    raw_text,
)
from ..settings import MAX_TOTAL_CENTS, MAX_USER_TRANSACTIONS

TYPE_CHECKING = False
if TYPE_CHECKING:  # the type of ``conn``; any connection or cursor with the same calls will do
    from sqlite3 import Connection

# ---------------------------------------------------------------- the paramstyle

PARAM = "?"  # DB-API qmark: the placeholder every statement below is written with


def in_paramstyle(text: str, marker: str) -> str:
    """``text``, written with ``?`` placeholders, for a driver whose placeholder is ``marker``
    (``%s`` for psycopg, where a literal ``%`` is then written ``%%``). The statements hold no
    ``?`` or ``%`` other than placeholders (no string literals with them)."""
    if marker == PARAM:
        return text
    if marker.startswith("%"):
        text = text.replace("%", "%%")
    return text.replace(PARAM, marker)


def _marks(count: int) -> str:
    """``count`` placeholders for an ``IN (...)`` list."""
    return ",".join([PARAM] * count)


def _rows_in(conn: Connection, template: str, values: list) -> Iterable[tuple]:
    """The rows of ``template`` (a statement with ``IN ({})``) for ``values``: in chunks of
    500 placeholders, or in one statement where ``conn`` offers ``select_in`` (a backend with
    arrays: ``= ANY(...)``)."""
    select_in = getattr(conn, "select_in", None)
    if select_in is not None:
        return select_in(template, values) if values else ()
    rows: list[tuple] = []
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        rows.extend(conn.execute(template.format(_marks(len(chunk))), chunk))
    return rows


_KNOWN = "SELECT id, user_id, created_at, type, amount FROM transactions WHERE id IN ({})"
_TOTALS = (
    "SELECT user_id, earned, spent, payout, tx_count, last_tx_at FROM users WHERE user_id IN ({})"
)
_INSERT_TRANSACTIONS = (
    "INSERT INTO transactions (id, user_id, created_at, type, amount) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_ADD_TO_USERS = (
    "INSERT INTO users "
    "(user_id, earned, spent, payout, tx_count, payout_count, last_tx_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
    "earned = users.earned + excluded.earned, "
    "spent = users.spent + excluded.spent, "
    "payout = users.payout + excluded.payout, "
    "tx_count = users.tx_count + excluded.tx_count, "
    "payout_count = users.payout_count + excluded.payout_count, "
    "last_tx_at = CASE WHEN excluded.last_tx_at > users.last_tx_at "
    "THEN excluded.last_tx_at ELSE users.last_tx_at END"
)
_QUARANTINE = (
    "INSERT INTO quarantine (key, raw, reason, created_at, first_seen, times_seen) "
    "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (key) DO UPDATE SET "
    "times_seen = quarantine.times_seen + 1 RETURNING times_seen"
)
_PLACE_QUARANTINED = "UPDATE quarantine SET created_at = ? WHERE key = ? AND created_at IS NULL"
_CONFLICT = (
    "INSERT INTO conflicts (key, tx_id, raw, created_at, first_seen) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING"
)
_BUMP = (
    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
    "DO UPDATE SET value = counters.value + excluded.value"
)
_PUT_STATE = (
    "INSERT INTO sync_state (name, value) VALUES (?, ?) ON CONFLICT (name) "
    "DO UPDATE SET value = excluded.value"
)

# ---------------------------------------------------------------- results


@dataclass
class IngestCounts:
    """What ingest made of the records it was given: one page's, or a whole run's."""

    new: int = 0
    duplicates: int = 0
    quarantined: int = 0
    conflicts: int = 0

    def add_ingest(self, other: IngestCounts) -> None:
        self.new += other.new
        self.duplicates += other.duplicates
        self.quarantined += other.quarantined
        self.conflicts += other.conflicts


@dataclass
class IngestResult(IngestCounts):
    """One page's ingest: the counts, the users it added, its latest createdAt and the
    createdAt of each transaction it added."""

    new_users: int = 0
    max_created_at: int | None = None
    new_created_at: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- totals and their limits

# With earned, spent and payout each at most MAX_TOTAL_CENTS (1e18 cents), balance = earned -
# spent - payout lies between -2e18 and 1e18, and any SQL sum over one user's rows is at most one
# of its totals: nothing leaves 64 bits. A transaction that would push a total past its maximum
# is quarantined instead (ingest_page).
_KIND_SLOT = {"earned": 0, "spent": 1, "payout": 2}


def check_user_row(path: Path, row: tuple) -> None:
    """Raise DamagedStore unless ``row`` (user_id, earned, spent, payout, tx_count, last_tx_at)
    holds what ingest writes: integers within their documented ranges. About a microsecond."""
    user_id, earned, spent, payout, count, last = row
    if (
        type(earned) is int
        and type(spent) is int
        and type(payout) is int
        and type(count) is int
        and type(last) is int
        and 0 <= earned <= MAX_TOTAL_CENTS
        and 0 <= spent <= MAX_TOTAL_CENTS
        and 0 <= payout <= MAX_TOTAL_CENTS
        and 0 <= count <= MAX_USER_TRANSACTIONS
        and MIN_INSTANT_MS <= last <= MAX_INSTANT_MS
    ):
        return
    limits = (
        ("earned total", MAX_TOTAL_CENTS),
        ("spent total", MAX_TOTAL_CENTS),
        ("payout total", MAX_TOTAL_CENTS),
        ("transaction count", MAX_USER_TRANSACTIONS),
    )
    for (name, top), value in zip(limits, row[1:5], strict=True):
        if type(value) is not int or not 0 <= value <= top:
            raise DamagedStore(path, user_id, name, value)
    raise DamagedStore(path, user_id, "last transaction time", last)


def _record_key(*parts: str) -> str:
    from hashlib import sha256  # here: loading it costs `report USER --json` 2 ms it never needs

    return sha256("\x1f".join(parts).encode()).hexdigest()


def _raw_text(record: object) -> str:
    return raw_text(record)


def _deltas(txs: list[Transaction]) -> dict[str, list[int]]:
    """Per user: [earned, spent, payout, tx_count, payout_count, last_tx_at] of ``txs``."""
    deltas: dict[str, list[int]] = {}
    for tx in txs:
        d = deltas.get(tx.user_id)
        if d is None:
            d = deltas[tx.user_id] = [0, 0, 0, 0, 0, tx.created_at]
        if tx.type == "earned":
            d[0] += tx.amount
        elif tx.type == "spent":
            d[1] += tx.amount
        else:
            d[2] += tx.amount
            d[4] += 1
        d[3] += 1
        if tx.created_at > d[5]:
            d[5] = tx.created_at
    return deltas


def _within_limits(
    new: list[Transaction], totals: dict[str, tuple[int, int, int, int]]
) -> tuple[list[Transaction], list[tuple[Transaction, str]]]:
    """``new`` split into what keeps every total within its maximum and what would not, with
    why. Taken in (createdAt, id) order, so the same page decides the same in any item order."""
    running = {user_id: list(t) for user_id, t in totals.items()}
    accepted: list[Transaction] = []
    refused: list[tuple[Transaction, str]] = []
    for tx in sorted(new, key=lambda tx: (tx.created_at, tx.id)):
        t = running.setdefault(tx.user_id, [0, 0, 0, 0])
        slot = _KIND_SLOT[tx.type]
        if t[slot] + tx.amount > MAX_TOTAL_CENTS:
            refused.append((tx, f"would push the user's {tx.type} total past {_MAX_TOTAL_TEXT}"))
        elif t[3] + 1 > MAX_USER_TRANSACTIONS:
            refused.append((tx, f"would push the user's transaction count past {_MAX_COUNT_TEXT}"))
        else:
            t[slot] += tx.amount
            t[3] += 1
            accepted.append(tx)
    return accepted, refused


_NO_TOTALS = (0, 0, 0, 0)
_MAX_TOTAL_TEXT = f"the maximum of {format_cents(MAX_TOTAL_CENTS)} SCR"
_MAX_COUNT_TEXT = f"the maximum of {MAX_USER_TRANSACTIONS}"

# ---------------------------------------------------------------- one page


def ingest_page(
    transaction: Callable[[], AbstractContextManager[Connection]],
    path: Path,
    records: Iterable[object],
    *,
    state: dict[str, object] | Callable[[IngestResult], dict[str, object]] | None = None,
    now_ms: int | None = None,
) -> IngestResult:
    """Store one page of upstream records and, in the same ``transaction()``, the sync state
    (see ``Store.ingest``). ``path`` names the store in a DamagedStore."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    valid: dict[str, Transaction] = {}
    repeated: list[tuple[Transaction, object]] = []
    invalid: list[tuple[object, str]] = []
    raw_by_id: dict[str, object] = {}
    for record in records:
        try:
            tx = parse_transaction(record)
        except InvalidRecord as error:
            invalid.append((record, error.reason))
            continue
        if tx.id in valid:
            repeated.append((tx, record))
        else:
            valid[tx.id] = tx
            raw_by_id[tx.id] = record
    result = IngestResult()
    if valid:
        result.max_created_at = max(tx.created_at for tx in valid.values())
    with transaction() as conn:
        known = known_transactions(conn, list(valid))
        new = [tx for tx in valid.values() if tx.id not in known]
        result.duplicates = len(valid) - len(new)
        for tx in valid.values():
            if tx.id in known and known[tx.id] != tx:
                result.conflicts += record_conflict(conn, tx, raw_by_id[tx.id], now_ms)
        for tx, record in repeated:
            first = known.get(tx.id) or valid[tx.id]
            if first == tx:
                result.duplicates += 1
            else:
                result.conflicts += record_conflict(conn, tx, record, now_ms)
        if new:
            result.new_users, refused = insert_new(conn, path, new)
            result.new = len(new) - len(refused)
            kept = {tx.id for tx in new} - {tx.id for tx, _reason in refused}
            result.new_created_at = [tx.created_at for tx in new if tx.id in kept]
            invalid.extend((raw_by_id[tx.id], reason) for tx, reason in refused)
        for record, reason in invalid:
            result.quarantined += quarantine(conn, record, reason, now_ms)
        bump(
            conn,
            transactions=result.new,
            users=result.new_users,
            quarantined=result.quarantined,
            conflicts=result.conflicts,
        )
        if callable(state):
            state = state(result)
        if state:
            put_state(conn, state)
    return result


# ---------------------------------------------------------------- the SQL steps


def known_transactions(conn: Connection, ids: list[str]) -> dict[str, Transaction]:
    return {row[0]: Transaction(*row) for row in _rows_in(conn, _KNOWN, ids)}


def insert_new(
    conn: Connection, path: Path, new: list[Transaction]
) -> tuple[int, list[tuple[Transaction, str]]]:
    """Insert ``new`` and add it to the users' totals: (how many users are new, the
    transactions refused, each with why, because they would push a total past its maximum).
    """
    deltas = _deltas(new)
    totals = user_totals_of(conn, path, list(deltas))
    refused: list[tuple[Transaction, str]] = []
    for user_id, d in deltas.items():
        t = totals.get(user_id, _NO_TOTALS)
        if (
            t[0] + d[0] > MAX_TOTAL_CENTS
            or t[1] + d[1] > MAX_TOTAL_CENTS
            or t[2] + d[2] > MAX_TOTAL_CENTS
            or t[3] + d[3] > MAX_USER_TRANSACTIONS
        ):
            new, refused = _within_limits(new, totals)
            deltas = _deltas(new)
            break
    if new:
        conn.executemany(
            _INSERT_TRANSACTIONS,
            [(tx.id, tx.user_id, tx.created_at, tx.type, tx.amount) for tx in new],
        )
        conn.executemany(_ADD_TO_USERS, [(user_id, *d) for user_id, d in deltas.items()])
    return sum(1 for user_id in deltas if user_id not in totals), refused


def user_totals_of(
    conn: Connection, path: Path, user_ids: list[str]
) -> dict[str, tuple[int, int, int, int]]:
    """(earned, spent, payout, tx_count) of those of ``user_ids`` the store knows,
    checked: a damaged row fails the ingest rather than be added to."""
    totals: dict[str, tuple[int, int, int, int]] = {}
    for row in _rows_in(conn, _TOTALS, user_ids):
        check_user_row(path, row)
        totals[row[0]] = row[1:5]
    return totals


def quarantine(conn: Connection, record: object, reason: str, now_ms: int) -> int:
    """Keep ``record`` with why it was refused: 1 the first time it is seen, 0 again."""
    raw = _raw_text(record)
    created_at = None
    if isinstance(record, dict):
        try:
            created_at = parse_created_at(record.get("createdAt"))
        except InvalidRecord:
            pass
    cursor = conn.execute(_QUARANTINE, (_record_key(raw), raw, reason, created_at, now_ms))
    return 1 if cursor.fetchone()[0] == 1 else 0


def place_quarantined(conn: Connection, raws: list[str], at_ms: int) -> int:
    """Give the quarantined records ``raws`` whose createdAt is unusable the place ``at_ms``."""
    return sum(conn.execute(_PLACE_QUARANTINED, (at_ms, _record_key(raw))).rowcount for raw in raws)


def record_conflict(conn: Connection, tx: Transaction, record: object, now_ms: int) -> int:
    """Keep another version of a known id: 1 the first time it is seen, 0 again."""
    raw = _raw_text(record)
    cursor = conn.execute(_CONFLICT, (_record_key(tx.id, raw), tx.id, raw, tx.created_at, now_ms))
    return cursor.rowcount


def bump(conn: Connection, **amounts: int) -> None:
    """Add ``amounts`` to the named counters (those that are not zero)."""
    rows = [(name, value) for name, value in amounts.items() if value]
    if rows:
        conn.executemany(_BUMP, rows)


def put_state(conn: Connection, state: dict[str, object]) -> None:
    """Set the named sync state values (stored as JSON)."""
    conn.executemany(_PUT_STATE, [(name, json.dumps(value)) for name, value in state.items()])

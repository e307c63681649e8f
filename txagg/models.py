"""The transaction schema, money and time: shared by the mock, the client and the servers.

Money is integer cents everywhere inside txagg. Amounts arrive as JSON numbers in SCR and
leave as JSON numbers in SCR, always the exact decimal value (``57.6``, never float noise).
Instants are integer milliseconds since the Unix epoch, UTC. The JSON shapes (a transaction
record, a report...) are declared in ``shapes``, which this module never imports (pydantic).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from .errors import InvalidRecord  # noqa: F401 (re-exported)

TYPES = ("earned", "spent", "payout")
FIELDS = ("id", "userId", "createdAt", "type", "amount")

MAX_ID_LENGTH = 128
MAX_USER_ID_LENGTH = 64
MAX_AMOUNT_CENTS = 10**13  # 100 billion SCR: anything larger is a broken record, not a payment
MAX_AMOUNT = Decimal(MAX_AMOUNT_CENTS) / 100
MAX_RECORD_DEPTH = 16  # a record is flat; nesting past this is a broken record
MAX_RAW_CHARS = 16 * 1024  # what the quarantine keeps of one record's text
MAX_INT_DIGITS = 18  # longer integer literals stay exact Decimals (no giant ints, no int() limit)
MIN_INSTANT_MS = 0  # 1970-01-01
MAX_INSTANT_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
MAX_TIME_TEXT = 40  # characters of a date/time text: longer ones are refused unread


@dataclass(frozen=True, slots=True)
class Transaction:
    id: str
    user_id: str
    created_at: int  # ms since epoch, UTC
    type: str
    amount: int  # cents, > 0

    def to_json(self) -> str:
        """The record as compact JSON text, as the upstream sends it."""
        return (
            f'{{"id":{json.dumps(self.id)},"userId":{json.dumps(self.user_id)},'
            f'"createdAt":"{format_timestamp(self.created_at)}","type":"{self.type}",'
            f'"amount":{format_cents(self.amount)}}}'
        )


# ---------------------------------------------------------------- money


def format_cents(cents: int) -> str:
    """Integer cents as the shortest exact decimal: 5760 -> '57.6', 1200 -> '12'."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    if frac == 0:
        return f"{sign}{whole}"
    if frac % 10 == 0:
        return f"{sign}{whole}.{frac // 10}"
    return f"{sign}{whole}.{frac:02d}"


def cents_to_decimal(cents: int) -> Decimal:
    return Decimal(format_cents(cents))


def decimal_to_cents(value: Decimal) -> int:
    """An exact finite amount with at most two decimals as cents; ValueError otherwise.

    Works on the digits, never through a decimal context: no rounding, no Overflow, whatever
    the exponent (``1e-999999999``, ``10.0100000000000000000000000001``).
    """
    if not value.is_finite():
        raise ValueError("not a finite number")
    _sign, digits, exponent = value.as_tuple()
    if exponent >= -2:
        if len(digits) + exponent > 20:  # past any amount we accept: no giant int is built
            raise ValueError("out of range")
        return int("".join(map(str, digits)) or "0") * 10 ** (exponent + 2) * (-1 if _sign else 1)
    extra = -2 - exponent  # digits past the cent
    if any(digits[-extra:]):
        raise ValueError("more than 2 decimal places")
    kept = digits[:-extra]
    return int("".join(map(str, kept)) or "0") * (-1 if _sign else 1)


def parse_amount(value: object) -> int:
    """A positive JSON amount (int or Decimal, as ``loads`` gives it) as exact cents.

    More than 2 decimals, zero, negative, non-finite or above MAX_AMOUNT: InvalidRecord.
    """
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, float)):
        raise InvalidRecord("amount is not a number")
    if isinstance(value, float):
        # Library callers may hand us floats; their shortest repr is the number they meant.
        value = Decimal(repr(value))
    if isinstance(value, Decimal) and not value.is_finite():
        raise InvalidRecord("amount is not a finite number")
    if value <= 0:  # exact comparisons: no context involved
        raise InvalidRecord("amount is not positive")
    if value > MAX_AMOUNT:
        raise InvalidRecord(f"amount is above the maximum of {format_cents(MAX_AMOUNT_CENTS)}")
    if isinstance(value, int):
        return value * 100
    try:
        return decimal_to_cents(value)
    except ValueError:
        raise InvalidRecord("amount has more than 2 decimal places") from None


def format_decimal(value: Decimal) -> str:
    """A Decimal as a plain JSON number without exponent or trailing zeros."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# ---------------------------------------------------------------- time


def format_timestamp(ms: int) -> str:
    """Milliseconds since the epoch as the upstream writes createdAt: 2023-03-16T12:33:11.000Z."""
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def format_instant(ms: int) -> str:
    """An instant to the second, as asOf is written: 2023-03-16T12:35:00Z."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_query_time(ms: int, date_format: str = "sql") -> str:
    """A window bound as the client sends it: 'sql' (YYYY-MM-DD HH:MM:SS) or 'iso'."""
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    if date_format == "iso":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def parse_time(text: str) -> int:
    """An instant given as 'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD' or ISO 8601; UTC unless it says.

    Raises ValueError with a readable message.
    """
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TIME_TEXT:
        raise ValueError(f"not a date/time: {text!r}")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a date/time: {text!r} (use 'YYYY-MM-DD HH:MM:SS' or ISO 8601)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _to_ms(moment)


def _to_ms(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_created_at(value: object) -> int:
    if not isinstance(value, str) or len(value) > MAX_TIME_TEXT:
        raise InvalidRecord("createdAt is not a date string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRecord("createdAt is not a parseable date") from None
    if moment.tzinfo is None:
        raise InvalidRecord("createdAt has no time zone")
    ms = _to_ms(moment)
    if not MIN_INSTANT_MS <= ms <= MAX_INSTANT_MS:
        raise InvalidRecord("createdAt is out of range")
    return ms


# ---------------------------------------------------------------- records


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _text_field(record: dict, name: str, max_length: int) -> str:
    value = record[name]
    if not isinstance(value, str) or not value:
        raise InvalidRecord(f"{name} is not a non-empty string")
    if len(value) > max_length:
        raise InvalidRecord(f"{name} is longer than {max_length} characters")
    if _CONTROL.search(value):
        raise InvalidRecord(f"{name} holds control characters or unpaired surrogates")
    return value


def _depth(value: object, limit: int) -> int:
    """How deeply ``value`` nests (a scalar is 0), counting no further than ``limit + 1``;
    iterative, so no input can exhaust the stack."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def describe(value: object, width: int = 40) -> str:
    """A short, safe rendering of any decoded JSON value for a message."""
    if isinstance(value, str):
        return repr(value[:width])
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, Decimal):
        text = str(value)
    else:
        text = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "a big int"
    return text[:width]


def parse_transaction(record: object) -> Transaction:
    """Validate one upstream record; raise InvalidRecord saying how it breaks the schema."""
    if not isinstance(record, dict):
        raise InvalidRecord("record is not a JSON object")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise InvalidRecord("missing field: " + ", ".join(missing))
    if len(record) > len(FIELDS) and _depth(record, MAX_RECORD_DEPTH) > MAX_RECORD_DEPTH:
        raise InvalidRecord(f"record nests deeper than {MAX_RECORD_DEPTH} levels")
    kind = record["type"]
    if not isinstance(kind, str) or kind not in TYPES:
        raise InvalidRecord(f"unknown type: {describe(kind)}")
    return Transaction(
        id=_text_field(record, "id", MAX_ID_LENGTH),
        user_id=_text_field(record, "userId", MAX_USER_ID_LENGTH),
        created_at=parse_created_at(record["createdAt"]),
        type=kind,
        amount=parse_amount(record["amount"]),
    )


def _parse_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= MAX_INT_DIGITS else Decimal(text)


def loads(text: str | bytes) -> object:
    """Parse JSON keeping every number exact: non-integers (and NaN, Infinity) as Decimal,
    integers as int, or as Decimal when longer than MAX_INT_DIGITS digits.

    Raises ValueError for text that is not JSON and RecursionError for absurd nesting.
    """
    return json.loads(text, parse_float=Decimal, parse_int=_parse_int, parse_constant=Decimal)


def raw_text(record: object) -> str:
    """A received record as JSON text for the quarantine: safe for any decoded value.

    Decimals keep their exact text (``1E+999999999`` is never expanded); what nests deeper than
    MAX_RECORD_DEPTH becomes ``"..."``; the text stops at MAX_RAW_CHARS characters.
    """
    text = _raw(record, MAX_RECORD_DEPTH)
    if len(text) > MAX_RAW_CHARS:
        text = text[:MAX_RAW_CHARS] + "...(truncated)"
    return text


def _raw(value: object, depth: int) -> str:
    if isinstance(value, (dict, list)) and depth <= 0:
        return '"..."'
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(
                f"{json.dumps(str(key))}: {_raw(item, depth - 1)}" for key, item in value.items()
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_raw(item, depth - 1) for item in value) + "]"
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return hex(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def dumps(value: object) -> str:
    """JSON text with Decimals written as exact numbers (57.6, never 57.599999999999994)."""
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(key))}: {dumps(item)}" for key, item in value.items())
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(item) for item in value) + "]"
    if isinstance(value, Decimal):
        return format_decimal(value)
    if isinstance(value, float):
        raise TypeError("binary floats are not allowed in txagg output; use Decimal")
    return json.dumps(value)


def dates_inside(items: list, start: int, end: int) -> list[int]:
    """The createdAt (ms) of each record of a page dated inside [start, end] (records with an
    unusable date, or none, and those from outside the window are left out)."""
    dates = []
    for item in items:
        try:
            moment = parse_created_at(item.get("createdAt") if isinstance(item, dict) else None)
        except InvalidRecord:
            continue
        if moment is not None and start <= moment <= end:
            dates.append(moment)
    return dates

"""Records and pages as JSON text: valid transactions, broken records of every kind, pages.

Rendered by hand rather than through ``json``: a big history has millions of records, and broken
records must keep their broken values verbatim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

from ..models import FIELDS, format_cents, format_timestamp

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


# ---------------------------------------------------------------- pages


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

"""How the command line prints an answer: JSON, NDJSON, CSV or a table, as plain text.

Plain functions from the data the core returns (``report``, ``payouts``, ``status``, the
summaries of ``sync`` and ``verify``) to text; no typer, no rich. The formats, and which one
applies when none is asked for, are defined here once (``Format``, ``default_format``); the
command line adds them to every command that prints an answer (``cli.output_options``).

- ``json``: the document, on one line: byte for byte what ``--json`` always printed.
- ``ndjson``: one JSON object per line: one per payout for ``payouts`` (its items only: the
  ``asOf`` is in the other formats), the whole answer on its one line for the others.
- ``csv``: a header row, then one row per payout (``payouts``) or one row for the answer, its
  nested objects flattened into dotted columns (``rateBudget.limit``); lists as JSON text;
  money as exact decimal strings with two places (``-40.80``), no thousands separators.
- ``table``: for people. Money with two places and thousands separators, right-aligned;
  instants in UTC with how long ago ("2023-03-16 12:35:00 UTC (2 min ago)").
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from .models import dumps, format_decimal
from .settings import STALE_AFTER_SECONDS


class Format(StrEnum):
    """The output formats, in the order ``--help`` lists them."""

    table = "table"
    json = "json"
    ndjson = "ndjson"
    csv = "csv"


FORMAT_HELP = (
    "Output format: table, json, ndjson (one JSON object per line; payouts: one per user) "
    "or csv. Default: table on a terminal, json otherwise."
)


def default_format(terminal: bool) -> Format:
    """The format when none is asked for: a table for a person at a terminal, JSON for a
    script (what it always was: scripts rely on it)."""
    return Format.table if terminal else Format.json


# Keys whose Decimal values are money (SCR, or EUR for paidOut): two places in tables and CSV.
MONEY_KEYS = frozenset({"balance", "earned", "spent", "payout", "paidOut", "amount"})

_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_NONE = "-"


# ---------------------------------------------------------------- what a command prints


@dataclass(frozen=True)
class View:
    """How one command's answer is printed: its table, and for a list, the key of its items
    (one NDJSON line and one CSV row each) and their CSV columns."""

    table: Callable[..., str]
    items: str | None = None
    columns: tuple[str, ...] = ()


def render(
    view: View, body: dict, fmt: Format, *, now: float | None = None, **table_options
) -> Iterator[str]:
    """The text of ``body`` in ``fmt``, in pieces (a long list is written as it goes)."""
    if fmt is Format.json:
        yield dumps(body) + "\n"
    elif fmt is Format.ndjson:
        for item in body[view.items] if view.items else [body]:
            yield dumps(item) + "\n"
    elif fmt is Format.csv:
        if view.items:
            yield from csv_lines(view.columns, body[view.items])
        else:
            row = flatten(body)
            # a null object whose fields have columns (status's leader on SQLite, lastCheck
            # before the first check) is those columns left empty, not a column of its own
            extra = [
                key
                for key in row
                if key not in view.columns
                and not (row[key] is None and any(c.startswith(f"{key}.") for c in view.columns))
            ]
            yield from csv_lines((*view.columns, *extra), [row])
    else:
        yield view.table(body, now=time.time() if now is None else now, **table_options)


# ---------------------------------------------------------------- cells


def money(value: Decimal, separators: bool = True) -> str:
    """Money with two places (``1,234.50``); exact: an amount never has more than two."""
    if value.as_tuple().exponent < -2:  # not money as txagg writes it: every digit, unrounded
        return format_decimal(value)
    return f"{value:,.2f}" if separators else f"{value:.2f}"


def instant_seconds(text: str) -> float:
    """An instant as txagg writes it (``2023-03-16T12:35:00Z``, ``...:11.371Z``) as seconds
    since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def ago(seconds: float) -> str:
    """How far an instant is from now, roughly: ``2 min ago``, ``in 30 s``, ``just now``."""
    size = abs(seconds)
    if size < 1:
        return "just now"
    for unit, length, below in (("s", 1, 60), ("min", 60, 3600), ("h", 3600, 172_800)):
        if size < below:
            amount = f"{int(size // length)} {unit}"
            break
    else:
        amount = f"{int(size // 86_400):,} d"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def _utc(text: str) -> str:
    return text.replace("T", " ").removesuffix("Z").removesuffix(".000")


def when(text: str | None, now: float) -> str:
    """An instant for people: UTC, to the second (the millisecond when it has one), and how
    long ago: ``2023-03-16 12:35:00 UTC (2 min ago)``."""
    if text is None:
        return _NONE
    if not _INSTANT.fullmatch(text):
        return text
    return f"{_utc(text)} UTC ({ago(instant_seconds(text) - now)})"


def span(window: list | tuple | None, now: float) -> str:
    """A window [start, end]: ``2023-03-16 12:30:00 .. 12:35:00 UTC (2 min ago)``, the date
    once when both ends share it; how long ago its end is."""
    if not window:
        return _NONE
    start, end = (str(bound) for bound in window)
    if not (_INSTANT.fullmatch(start) and _INSTANT.fullmatch(end)):
        return f"{start} .. {end}"
    first, last = _utc(start), _utc(end)
    if first[:10] == last[:10]:
        last = last[11:]
    return f"{first} .. {last} UTC ({ago(instant_seconds(end) - now)})"


def cell(key: str, value: object, now: float) -> tuple[str, bool]:
    """A value as a table shows it, and whether it is right-aligned (numbers are)."""
    if value is None:
        return _NONE, False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, Decimal):
        text = money(value) if key in MONEY_KEYS else format_decimal(value)
        return text + (" s" if key.endswith("Seconds") else ""), True
    if isinstance(value, int):
        return f"{value:,}" + (" s" if key.endswith("Seconds") else ""), True
    if isinstance(value, str):
        return when(value, now), False
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, str) and _INSTANT.fullmatch(v) for v in value):
            return span(value, now), False
        if not value:
            return "none", False
        if all(isinstance(item, str) for item in value):
            return "; ".join(value), False
        return f"{len(value)} (see below)", False
    if isinstance(value, dict):
        return ", ".join(f"{label(k)} {cell(k, v, now)[0]}" for k, v in value.items()), False
    return str(value), False


def label(key: str) -> str:
    """A JSON key for people: ``windowsChecked`` -> ``windows checked``, ``lagSeconds`` ->
    ``lag`` (its value says ``s``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", key.removesuffix("Seconds")).lower()


# ---------------------------------------------------------------- layout

Row = tuple[str, tuple[str, bool]]  # (label, (text, right-aligned))


def sections(parts: list[tuple[str, list[Row]]]) -> str:
    """Titled blocks of label / value rows. The labels line up across every block, and so do
    the right edges of the numbers; other values start where the numbers do."""
    rows = [row for _, block in parts for row in block]
    width = max((len(name) for name, _ in rows), default=0)
    numbers = max((len(text) for _, (text, right) in rows if right), default=0)
    lines = []
    for title, block in parts:
        if lines:
            lines.append("")
        lines.append(title)
        for name, (text, right) in block:
            if not name:  # a block's only line: "none yet"
                lines.append(f"  {text}")
                continue
            value = text.rjust(numbers) if right else text
            lines.append(f"  {name.ljust(width)}  {value}".rstrip())
    return "\n".join(lines) + "\n"


def grid(columns: list[tuple[str, bool]], rows: list[list[str]], footer: list[str]) -> str:
    """Columns (name, right-aligned) over rows, a rule under the header and above a footer."""
    widths = [
        max(len(name), *(len(row[i]) for row in [*rows, footer]))
        for i, (name, _) in enumerate(columns)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            text.rjust(w) if right else text.ljust(w)
            for text, w, (_, right) in zip(cells, widths, columns, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return (
        "\n".join([line([name for name, _ in columns]), rule, *map(line, rows), rule, line(footer)])
        + "\n"
    )


def _rows(body: dict, now: float, skip: Iterable[str] = ()) -> list[Row]:
    return [(label(key), cell(key, value, now)) for key, value in body.items() if key not in skip]


def _discrepancies(found: list[dict], now: float) -> list[Row]:
    rows: list[Row] = []
    for number, item in enumerate(found, 1):
        upstream = item.get("upstream")
        counts = f"upstream {'no count' if upstream is None else f'{upstream:,}'}"
        counts += f", stored {item['stored']:,}" if isinstance(item.get("stored"), int) else ""
        text = f"{span(item.get('window'), now)}: {counts}"
        if item.get("why"):
            text += f": {item['why']}"
        if item.get("at"):
            text += f" (found {ago(instant_seconds(item['at']) - now)})"
        rows.append((f"{number}.", (text, False)))
    return rows or [("", ("none", False))]


# ---------------------------------------------------------------- tables, per command


def report_table(body: dict, *, now: float) -> str:
    """``txagg report USER``: the user's money, count and instants."""
    names = {"paidOut": "paid out (EUR)", "lastTransactionAt": "last transaction"}
    rows = [
        (names.get(key, label(key)), cell(key, value, now))
        for key, value in body.items()
        if key != "userId"
    ]
    return sections([(f"User {body['userId']}", rows)])


PAYOUT_COLUMNS = ("userId", "amount", "count")


def payouts_table(body: dict, *, now: float, limit: int | None = None) -> str:
    """``txagg payouts``: one row per user, and their total."""
    items = body["items"]
    head = f"Payouts as of {when(body['asOf'], now)}" if body["asOf"] else "Payouts (never synced)"
    if not items:
        return f"{head}\n\nno payouts requested\n"
    rows = [[item["userId"], money(item["amount"]), f"{item['count']:,}"] for item in items]
    total = sum((item["amount"] for item in items), Decimal(0))
    users = f"{len(items):,} user{'' if len(items) == 1 else 's'}"
    footer = [f"total ({users})", money(total), f"{sum(item['count'] for item in items):,}"]
    text = f"{head}\n\n" + grid([("user", False), ("amount", True), ("count", True)], rows, footer)
    if limit is not None and len(items) >= limit:
        text += f"(--limit {limit}: more users may follow)\n"
    return text


def status_table(body: dict, *, now: float) -> str:
    """``txagg status``, in sections: Store, Freshness, Upstream, Budget, Last run, Last check,
    Discrepancies."""
    lag = body["lagSeconds"]
    if lag is None:
        state = "never synced"
    elif body["behind"]:
        state = f"behind: more than the {STALE_AFTER_SECONDS} s promised"
    else:
        state = f"fresh: within the {STALE_AFTER_SECONDS} s promised"
    window, load, counts, budget = (
        body["window"],
        body["load"],
        body["upstreamCounts"],
        body["rateBudget"],
    )
    parts: list[tuple[str, list[Row]]] = [
        (
            "Store",
            [
                ("path", (body["store"], False)),
                ("transactions", cell("", body["transactions"], now)),
                ("users", cell("", body["users"], now)),
                ("quarantined", cell("", body["quarantined"], now)),
                ("conflicts", cell("", body["conflicts"], now)),
            ],
        ),
        (
            "Freshness",
            [
                ("as of", (when(body["asOf"], now), False)),
                ("lag", cell("lagSeconds", lag, now)),
                ("state", (state, False)),
                ("position", (when(body["position"], now), False)),
                ("reading window", (when(window["start"], now), False)),
                ("next page", cell("", window["nextPage"], now)),
                ("verified until", (when(body["verifiedUntil"], now), False)),
            ],
        ),
        (
            "Upstream",
            [
                ("url", (body["upstream"] or "none yet (the first sync records it)", False)),
                ("counts reliable", cell("", counts["reliable"], now)),
                *(
                    (name, (when(counts[key], now) if key != "why" else counts[key], False))
                    for key, name in (
                        ("since", "unreliable since"),
                        ("why", "why"),
                        ("nextRepair", "next repair"),
                    )
                    if key in counts
                ),
                ("arriving a minute", cell("", load["recentPerMinute"], now)),
                ("readable a minute", cell("", load["ceilingPerMinute"], now)),
                ("sustainable a minute", cell("", load["sustainablePerMinute"], now)),
                ("falls behind", cell("", load["fallsBehind"], now)),
            ],
        ),
        (
            "Budget",
            [
                (
                    "rate",
                    (f"{budget['limit']:,} per {format_decimal(budget['perSeconds'])} s", False),
                ),
                ("tokens available", cell("", budget["tokensAvailable"], now)),
                ("blocked for", cell("blockedForSeconds", budget["blockedForSeconds"], now)),
                ("requests", cell("", budget["requests"], now)),
                ("throttled (429)", cell("", budget["throttled"], now)),
            ],
        ),
        ("Last run", _rows(body["lastRun"], now) or [("", ("none yet", False))]),
        ("Last check", _last_check(body["lastCheck"], now)),
        ("Discrepancies", _discrepancies(body["discrepancies"], now)),
    ]
    if body.get("leader") is not None:
        parts.insert(1, ("Leader", _leader(body["leader"], now)))
    return sections(parts)


def _leader(leader: dict, now: float) -> list[Row]:
    """A PostgreSQL store's sync leader (status), and the standbys last seen."""
    if leader["owner"] is None:
        return [("", ("none yet (no sync --follow has led)", False))]
    rows: list[Row] = [
        ("leader", (leader["owner"], False)),
        ("epoch", cell("", leader["epoch"], now)),
        ("lease until", (when(leader["leaseUntil"], now), False)),
        ("active", cell("", leader["active"], now)),
    ]
    for standby in leader["standbys"]:
        rows.append(
            ("standby", (f"{standby['owner']}, seen {when(standby['lastSeen'], now)}", False))
        )
    if not leader["standbys"]:
        rows.append(("standbys", ("none seen", False)))
    return rows


def _last_check(found: dict | None, now: float) -> list[Row]:
    if not found:
        return [("", ("none yet", False))]
    names = {"upstream": "upstream count", "stored": "stored count", "notChased": "not chased"}
    return [(names.get(key, label(key)), cell(key, value, now)) for key, value in found.items()]


def verify_table(body: dict, *, now: float) -> str:
    """``txagg verify``'s summary, and the discrepancies it could not explain."""
    parts = [("Verify", _rows(body, now, skip={"discrepancies"}))]
    parts.append(("Discrepancies", _discrepancies(body.get("discrepancies", []), now)))
    return sections(parts)


def sync_table(body: dict, *, now: float) -> str:
    """``txagg sync``'s summary, and the errors it met."""
    parts = [("Sync", _rows(body, now, skip={"errors"}))]
    if body.get("errors"):
        parts.append(("Errors", [(f"{n}.", (e, False)) for n, e in enumerate(body["errors"], 1)]))
    return sections(parts)


REPORT = View(report_table)
PAYOUTS = View(payouts_table, items="items", columns=PAYOUT_COLUMNS)
STATUS_COLUMNS = (
    "store",
    "upstream",
    "position",
    "asOf",
    "lagSeconds",
    "behind",
    "window.start",
    "window.nextPage",
    "transactions",
    "users",
    "quarantined",
    "conflicts",
    "verifiedUntil",
    "load.recentPerMinute",
    "load.ceilingPerMinute",
    "load.sustainablePerMinute",
    "load.fallsBehind",
    "discrepancies",
    "upstreamCounts.reliable",
    "upstreamCounts.since",
    "upstreamCounts.why",
    "upstreamCounts.nextRepair",
    "lastCheck.at",
    "lastCheck.window",
    "lastCheck.upstream",
    "lastCheck.stored",
    "lastCheck.resumed",
    "lastCheck.notChased",
    "lastCheck.repairedTo",
    "lastRun.at",
    "lastRun.requests",
    "lastRun.newTransactions",
    "lastRun.complete",
    "lastRun.behind",
    "lastRun.error",
    "rateBudget.limit",
    "rateBudget.perSeconds",
    "rateBudget.tokensAvailable",
    "rateBudget.blockedForSeconds",
    "rateBudget.requests",
    "rateBudget.throttled",
    "leader.owner",
    "leader.host",
    "leader.pid",
    "leader.epoch",
    "leader.leaseUntil",
    "leader.active",
    "leader.standbys",
)
# status's CSV columns are fixed (what a run has not recorded yet is an empty cell), so rows
# appended run after run line up; a key recorded that is not listed comes last.
STATUS = View(status_table, columns=STATUS_COLUMNS)
VERIFY = View(verify_table)
SYNC = View(sync_table)


# ---------------------------------------------------------------- CSV


def flatten(body: dict, prefix: str = "") -> dict[str, object]:
    """Nested objects as dotted keys (``rateBudget.limit``); lists stay whole."""
    flat: dict[str, object] = {}
    for key, value in body.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def csv_value(key: str, value: object) -> str:
    """A CSV cell: money with two places, other numbers exact, booleans as JSON writes them,
    null empty, lists as JSON text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return money(value, separators=False) if key in MONEY_KEYS else format_decimal(value)
    if isinstance(value, (list, tuple, dict)):
        return dumps(value)
    return str(value)


def csv_lines(columns: Iterable[str], rows: Iterable[dict]) -> Iterator[str]:
    """A header row, then one line per row (``\\n`` line ends), cells quoted where needed."""
    columns = list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(
            [csv_value(column.rpartition(".")[2], row.get(column)) for column in columns]
        )
        yield buffer.getvalue()

"""The shared ingest steps (``ingest``) on a psycopg cursor: ``?`` statements in psycopg's
paramstyle, a batch as one ``unnest`` statement, and the users' totals stamped with the data
version of the transaction that adds to them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import psycopg

from . import ingest as steps
from .ingest import in_paramstyle

if TYPE_CHECKING:
    from .postgres import PostgresStore

# The shared ingest step that adds a page to the users' totals, also stamping the users it
# touches with the page's data version (a PostgreSQL-only step: SQLite runs the shared one).
_ADD_TO_USERS_VERSIONED = (
    steps._ADD_TO_USERS.replace(
        "last_tx_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        "last_tx_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    + ", version = excluded.version"
)
assert "version) VALUES" in _ADD_TO_USERS_VERSIONED


@lru_cache(maxsize=512)
def _pg(statement: str) -> str:
    """A portable ``?`` statement of the ingest steps in psycopg's paramstyle."""
    return in_paramstyle(statement, "%s")


_VALUES_INSERT = re.compile(
    r"INSERT INTO (?P<table>\w+) \((?P<columns>[^)]*)\) VALUES \(\?(?:, \?)*\) (?P<tail>.*)\Z",
    re.S,
)


@lru_cache(maxsize=64)
def _any(template: str) -> str:
    """A ``WHERE key IN ({})`` statement of the ingest steps with one array instead."""
    return _pg(template).replace("IN ({})", "= ANY(%b)")


class _Steps:
    """A psycopg cursor as the ingest steps call a connection: ``?`` statements, rewritten
    for psycopg once each; ``execute`` returns the cursor (rows, ``fetchone``, ``rowcount``).

    A batch (``executemany``) of an ``INSERT ... VALUES (?, ...) ON CONFLICT ...`` goes as one
    statement, ``INSERT ... SELECT * FROM unnest(%b::type[], ...) ON CONFLICT ...`` (the same
    conflict clause, one array per column), and ``select_in`` looks a page's ids up with
    ``= ANY(%b)``: a page is a handful of statements, not a thousand. The arrays go in binary
    (``%b``): psycopg quotes text arrays in Python, binary ones it does not."""

    __slots__ = ("cursor", "store", "version")

    def __init__(self, cursor: psycopg.Cursor, store: PostgresStore, version: int | None = None):
        self.cursor = cursor
        self.store = store
        self.version = version  # the data version this transaction stamps on the users

    def execute(self, statement: str, params=None) -> psycopg.Cursor:
        return self.cursor.execute(_pg(statement), params)

    def executemany(self, statement: str, rows: list) -> None:
        if self.version is not None and statement is steps._ADD_TO_USERS:
            statement = _ADD_TO_USERS_VERSIONED
            rows = [(*row, self.version) for row in rows]
        self._executemany(statement, rows)

    def _executemany(self, statement: str, rows: list) -> None:
        if len(rows) > 1 and (bulk := _bulk_statement(self.store._bulk, self.cursor, statement)):
            self.cursor.execute(bulk, [list(column) for column in zip(*rows, strict=True)])
        else:
            self.cursor.executemany(_pg(statement), rows)

    def select_in(self, template: str, values: list) -> psycopg.Cursor:
        return self.cursor.execute(_any(template), (values,))


def _bulk_statement(
    cache: dict[str, str | None], cursor: psycopg.Cursor, statement: str
) -> str | None:
    """The one-statement form of a batch of ``statement`` (see _Steps), None for a
    statement of another shape; the column types are read from the catalog once (for
    each ``cache``: a store's)."""
    bulk = cache.get(statement, "")
    if bulk != "":
        return bulk
    match = _VALUES_INSERT.match(statement)
    if match is not None:
        columns = [name.strip() for name in match["columns"].split(",")]
        types = dict(
            cursor.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (match["table"],),
            ).fetchall()
        )
        arrays = ", ".join(f"%b::{types[name]}[]" for name in columns)
        bulk = (
            f"INSERT INTO {match['table']} ({match['columns']}) "
            f"SELECT * FROM unnest({arrays}) {_pg(match['tail'])}"
        )
    cache[statement] = bulk
    return bulk

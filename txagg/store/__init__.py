"""The store: transactions, per-user totals, sync state and the shared rate budget, in one
database that every txagg process on it shares.

``Store.open(path)`` is the entry point (``Store.open("postgresql://...")`` for a store in
PostgreSQL). The modules, each one responsibility:

- ``base``: the interface every backend implements (``StoreBackend``), what the rest of txagg
  calls on a store, and ``UserTotals``;
- ``schema``: the numbered migrations and ``SCHEMA_VERSION``;
- ``ingest``: a page of records into rows and totals, within the limits, as portable SQL steps;
- ``budget``: the shared rate budget's arithmetic (a token bucket, a 429's block), for every
  backend;
- ``sqlite``: the SQLite store (one file in WAL mode): opening, transactions, locks, state,
  the shared rate budget, queries;
- ``postgres``: the PostgreSQL store (``--db postgresql://...``, the ``postgres`` extra): the
  same tables and steps in a database every machine shares, imported only when a URL asks;
  with ``postgres_schema`` (its tables and migrations), ``postgres_lease`` (the lease behind
  its locks, the session settings it sets), ``postgres_connect`` (connections, what psycopg's
  errors mean) and ``postgres_ingest`` (the ingest steps on a psycopg cursor).

Everything the rest of txagg uses is importable from here, so no caller names a backend.
"""

from __future__ import annotations

from ..errors import (
    DamagedStore,
    NoStore,
    NotAStore,
    QueryTimeout,
    StoreError,
    StoreTooNew,
    StoreUnreachable,
    SyncLocked,
)
from ..settings import (
    MAX_BLOCK_SECONDS,
    MAX_TOTAL_CENTS,
    MAX_USER_TRANSACTIONS,
    TOKEN_MARGIN,
)
from .base import (
    POSTGRES_EXTRA,
    StoreBackend,
    UserTotals,
    is_postgres_url,
    postgres_backend,
    store_exists,
)
from .ingest import IngestCounts, IngestResult, check_user_row
from .schema import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION
from .sqlite import CACHE_KIB, Store, default_db_path, explain

__all__ = [
    "CACHE_KIB",
    "MAX_BLOCK_SECONDS",
    "MAX_TOTAL_CENTS",
    "MAX_USER_TRANSACTIONS",
    "MIGRATIONS",
    "MIGRATIONS_TABLE",
    "SCHEMA_VERSION",
    "TOKEN_MARGIN",
    "DamagedStore",
    "IngestCounts",
    "IngestResult",
    "NoStore",
    "NotAStore",
    "POSTGRES_EXTRA",
    "QueryTimeout",
    "Store",
    "StoreBackend",
    "StoreError",
    "StoreTooNew",
    "StoreUnreachable",
    "SyncLocked",
    "UserTotals",
    "check_user_row",
    "default_db_path",
    "explain",
    "is_postgres_url",
    "postgres_backend",
    "store_exists",
]

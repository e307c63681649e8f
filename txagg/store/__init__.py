"""The store: transactions, per-user totals, sync state and the shared rate budget, in one
database that every txagg process on it shares.

``Store.open(path)`` is the entry point. The modules, each one responsibility:

- ``base``: the interface every backend implements (``StoreBackend``), what the rest of txagg
  calls on a store, and ``UserTotals``;
- ``schema``: the numbered migrations and ``SCHEMA_VERSION``;
- ``ingest``: a page of records into rows and totals, within the limits, as portable SQL steps;
- ``sqlite``: the SQLite store (one file in WAL mode): opening, transactions, locks, state,
  the shared rate budget, queries.

Everything the rest of txagg uses is importable from here, so no caller names a backend.
"""

from __future__ import annotations

from ..errors import (
    DamagedStore,
    NoStore,
    NotAStore,
    StoreError,
    StoreTooNew,
    SyncLocked,
)
from ..settings import (
    MAX_BLOCK_SECONDS,
    MAX_TOTAL_CENTS,
    MAX_USER_TRANSACTIONS,
    TOKEN_MARGIN,
)
from .base import StoreBackend, UserTotals
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
    "Store",
    "StoreBackend",
    "StoreError",
    "StoreTooNew",
    "SyncLocked",
    "UserTotals",
    "check_user_row",
    "default_db_path",
    "explain",
]

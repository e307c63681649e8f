"""The store's schema: numbered migrations, each applied once and recorded in
``txagg_migrations`` (the version, its name, when it was applied).

Each migration is (version, name, statements). Never edit a released one: add the next. The
statements are plain SQL; where SQLite needs its own words (``WITHOUT ROWID``) a PostgreSQL
backend keeps the version and name and spells the same tables its way (64-bit integers for
amounts, totals and instants).
"""

from __future__ import annotations

MIGRATIONS_TABLE = "txagg_migrations"

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "initial schema",
        [
            """CREATE TABLE transactions (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                type TEXT NOT NULL,
                amount INTEGER NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX transactions_created_at ON transactions (created_at)",
            """CREATE TABLE users (
                user_id TEXT PRIMARY KEY,
                earned INTEGER NOT NULL,
                spent INTEGER NOT NULL,
                payout INTEGER NOT NULL,
                tx_count INTEGER NOT NULL,
                payout_count INTEGER NOT NULL,
                last_tx_at INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TABLE quarantine (
                key TEXT PRIMARY KEY,
                raw TEXT NOT NULL,
                reason TEXT NOT NULL,
                created_at INTEGER,
                first_seen INTEGER NOT NULL,
                times_seen INTEGER NOT NULL
            )""",
            """CREATE TABLE conflicts (
                key TEXT PRIMARY KEY,
                tx_id TEXT NOT NULL,
                raw TEXT NOT NULL,
                created_at INTEGER,
                first_seen INTEGER NOT NULL
            )""",
            "CREATE TABLE sync_state (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            """CREATE TABLE rate_budget (
                name TEXT PRIMARY KEY,
                tokens REAL NOT NULL,
                updated_at REAL NOT NULL,
                blocked_until REAL NOT NULL
            )""",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

"""The PostgreSQL store's tables: its migrations (the shared ones spelled for PostgreSQL, and
those only a PostgreSQL store has) and the list of its tables.

Money and instants are BIGINT (64 bits, as SQLite's integers); ids and names TEXT in the "C"
collation, so ordering and keyset pagination (``payouts``) compare bytes, as SQLite does, and
the answers are the same byte for byte.
"""

from __future__ import annotations

from .schema import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION

LOCKS_TABLE = "store_locks"

# The same tables as ``schema.MIGRATIONS``, version for version, spelled for PostgreSQL, plus
# the lease table (SQLite's locks are files beside the store).
_TEXT_KEY = 'TEXT COLLATE "C"'
PG_MIGRATIONS: dict[int, list[str]] = {
    1: [
        f"""CREATE TABLE transactions (
            id {_TEXT_KEY} PRIMARY KEY,
            user_id {_TEXT_KEY} NOT NULL,
            created_at BIGINT NOT NULL,
            type TEXT NOT NULL,
            amount BIGINT NOT NULL
        )""",
        "CREATE INDEX transactions_created_at ON transactions (created_at)",
        f"""CREATE TABLE users (
            user_id {_TEXT_KEY} PRIMARY KEY,
            earned BIGINT NOT NULL,
            spent BIGINT NOT NULL,
            payout BIGINT NOT NULL,
            tx_count BIGINT NOT NULL,
            payout_count BIGINT NOT NULL,
            last_tx_at BIGINT NOT NULL
        )""",
        f"""CREATE TABLE quarantine (
            key {_TEXT_KEY} PRIMARY KEY,
            raw TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_at BIGINT,
            first_seen BIGINT NOT NULL,
            times_seen BIGINT NOT NULL
        )""",
        f"""CREATE TABLE conflicts (
            key {_TEXT_KEY} PRIMARY KEY,
            tx_id {_TEXT_KEY} NOT NULL,
            raw TEXT NOT NULL,
            created_at BIGINT,
            first_seen BIGINT NOT NULL
        )""",
        f"CREATE TABLE sync_state (name {_TEXT_KEY} PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE counters (name {_TEXT_KEY} PRIMARY KEY, value BIGINT NOT NULL)",
        f"""CREATE TABLE rate_budget (
            name {_TEXT_KEY} PRIMARY KEY,
            tokens DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            blocked_until DOUBLE PRECISION NOT NULL
        )""",
        f"""CREATE TABLE {LOCKS_TABLE} (
            name {_TEXT_KEY} PRIMARY KEY,
            owner TEXT NOT NULL,
            epoch BIGINT NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL,
            holder_pid INTEGER
        )""",
    ],
}
# Migrations only a PostgreSQL store has, after the shared ones: what replicas that copy the store
# need (SQLite stores are served from their own file and keep their schema version). A shared
# migration added later takes the next free number after these (SQLite skips the gap).
DATA_VERSION_TABLE = "data_version"
PG_ONLY_MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        2,
        "change versions",
        [
            # Which commit last changed each user: replicas pull the rows newer than theirs.
            "ALTER TABLE users ADD COLUMN version BIGINT NOT NULL DEFAULT 0",
            "CREATE INDEX users_version ON users (version)",
            # The store-wide counter, bumped by every commit that changes an answer.
            f"""CREATE TABLE {DATA_VERSION_TABLE} (
                name {_TEXT_KEY} PRIMARY KEY,
                value BIGINT NOT NULL
            )""",
            f"INSERT INTO {DATA_VERSION_TABLE} (name, value) VALUES ('data', 0)",
        ],
    ),
]
PG_SCHEMA_VERSION = max(SCHEMA_VERSION, PG_ONLY_MIGRATIONS[-1][0])

TABLES = (
    "transactions",
    "users",
    "quarantine",
    "conflicts",
    "sync_state",
    "counters",
    "rate_budget",
    LOCKS_TABLE,
    DATA_VERSION_TABLE,
    MIGRATIONS_TABLE,
)


def _pg_migrations() -> list[tuple[int, str, list[str]]]:
    """Every migration of a PostgreSQL store in order: (version, name, statements)."""
    shared = [(version, name, PG_MIGRATIONS[version]) for version, name, _ in MIGRATIONS]
    return sorted(shared + PG_ONLY_MIGRATIONS)

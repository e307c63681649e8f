"""The PostgreSQL store: the same tables, migrations and ingest steps as the SQLite store, in a
PostgreSQL database that every txagg process on every machine shares (``--db postgresql://...``,
with the ``postgres`` extra installed).

- Connections: one psycopg connection per open store, in autocommit mode, so each read is its
  own statement and each write an explicit transaction; a lock held (``lock``) adds one more,
  which keeps the lease alive. A connection the server dropped is opened again on next use.
- Writes: one database transaction each, which first takes the store's write lock (a
  transaction-level advisory lock, released by the commit or the rollback), exactly as SQLite's
  ``BEGIN IMMEDIATE`` does: writers take turns, readers never wait. Ingest is
  ``ingest.ingest_page`` through ``_Steps``, which rewrites the portable ``?`` statements for
  psycopg (``%s``) once each; psycopg sends the ``executemany`` batches in pipeline mode.
- Locks (``sync``, ``verify``): a lease row in ``store_locks`` (owner, epoch, expiry timed by
  the database's clock), renewed every LOCK_RENEW_SECONDS (or a sixth of ``lock(lease=)``) by a
  thread on the lock's own connection. It is free when it has expired, or at once when the
  backend of its holder's connection is gone (the holder died: PostgreSQL closes a dead
  client's session). Every write transaction of the holder checks, under the row's lock, that
  the lease is still its own (owner and epoch): a holder paused past its lease, whose lock
  another process took over, cannot write when it wakes (SyncLocked). Standbys (``sync
  --follow``) wait for the lease and record when they were last seen in the same table
  (``standby:NAME:OWNER`` rows, see ``standby_seen``); ``leadership`` reads both for status.
- Sessions: ``lock_timeout`` below the lease on every connection, and on the writers'
  ``idle_in_transaction_session_timeout``, so a holder stopped inside a transaction (SIGSTOP, a
  partition) is ended by the server and its locks freed before anyone waited a lease on it.
- Read commands open the store with ``default_transaction_read_only``: nothing they run can
  write, create or migrate.
- Every psycopg error leaves as a StoreError saying what happened and what to do; messages name
  the store by its URL without the password.

Money and instants are BIGINT (64 bits, as SQLite's integers); ids and names TEXT in the "C"
collation, so ordering and keyset pagination (``payouts``) compare bytes, as SQLite does, and
the answers are the same byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

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
from ..settings import MAX_BLOCK_SECONDS, MAX_TOTAL_CENTS, MAX_USER_TRANSACTIONS
from . import budget
from . import ingest as steps
from .base import StoreBackend, UserTotals
from .ingest import IngestResult, check_user_row, in_paramstyle, ingest_page
from .schema import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION

LOCK_TTL_SECONDS = 15.0  # a lease not renewed for this long is free (a hung or cut-off holder)
LOCK_RENEW_SECONDS = 5.0  # how often the holder renews it
# lock_timeout: the longest a statement waits for another session's lock; below the lease, so
# nobody waits on a stopped holder longer than it takes the server to end that holder's session.
LOCK_WAIT_SECONDS = 15.0
# idle_in_transaction_session_timeout of the writers: a session that stopped answering inside a
# transaction (its process stopped, paused or cut off) is ended, and its locks freed, after this.
IDLE_IN_TRANSACTION_SECONDS = 5.0
TCP_KEEPALIVE = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5"}
STANDBY_PREFIX = "standby:"  # store_locks rows of the standbys: standby:NAME:OWNER
STANDBYS_SHOWN_SECONDS = 600  # status lists the standbys seen within this
STANDBYS_KEPT = "1 day"  # older standby rows are deleted
CONNECT_TIMEOUT_SECONDS = 10
LOCKS_TABLE = "store_locks"
_WRITE_LOCK_CLASS = 0x74786167  # "txag": the first key of the write lock, the schema the second

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
# State whose change alters answers (asOf is in every user and payout answer): writing it bumps
# the data version, as every ingest does.
ANSWER_STATE = frozenset({"as_of"})
_BUMP_VERSION = (
    f"UPDATE {DATA_VERSION_TABLE} SET value = value + 1 WHERE name = 'data' RETURNING value"
)
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
# What a replica pulls, in one statement (so from one snapshot): the data version, the counters,
# asOf, then every user changed since the replica's version.
PULL_SQL = f"""
    SELECT 'v'::text, NULL::text, value, NULL::bigint, NULL::bigint, NULL::bigint,
        NULL::bigint, NULL::bigint, NULL::text
    FROM {DATA_VERSION_TABLE} WHERE name = 'data'
    UNION ALL SELECT 'c', name, value, NULL, NULL, NULL, NULL, NULL, NULL FROM counters
    UNION ALL SELECT 's', name, NULL, NULL, NULL, NULL, NULL, NULL, value FROM sync_state
        WHERE name = 'as_of'
    UNION ALL SELECT 'u', user_id, earned, spent, payout, tx_count, payout_count, last_tx_at,
        NULL FROM users WHERE version > %s"""

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

USER_ROW_SQL = (
    "SELECT user_id, earned, spent, payout, tx_count, last_tx_at FROM users WHERE user_id = %s"
)
VERSION_SQL = (
    "SELECT (SELECT value FROM counters WHERE name = 'transactions'), "
    "(SELECT value FROM sync_state WHERE name = 'as_of')"
)
_BUDGET_SQL = "SELECT tokens, updated_at, blocked_until FROM rate_budget WHERE name = 'upstream'"

# The lease: taken when free (expired, or its holder's connection gone), renewed by its holder,
# and checked (and renewed) inside each write transaction of the holder.
_ACQUIRE = f"""
    INSERT INTO {LOCKS_TABLE} AS held (name, owner, epoch, expires_at, holder_pid)
    VALUES (%(name)s, %(owner)s, 1, now() + make_interval(secs => %(ttl)s), pg_backend_pid())
    ON CONFLICT (name) DO UPDATE SET
        owner = excluded.owner,
        epoch = held.epoch + 1,
        expires_at = excluded.expires_at,
        holder_pid = excluded.holder_pid
    WHERE held.expires_at <= now()
        OR held.holder_pid IS NULL
        OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = held.holder_pid)
    RETURNING epoch"""
_RENEW = f"""
    UPDATE {LOCKS_TABLE} SET expires_at = now() + make_interval(secs => %s),
        holder_pid = pg_backend_pid()
    WHERE name = %s AND owner = %s AND epoch = %s"""
_FENCE = f"""
    UPDATE {LOCKS_TABLE} SET expires_at = greatest(expires_at, now() + make_interval(secs => %s))
    WHERE name = %s AND owner = %s AND epoch = %s"""
_RELEASE = f"""
    UPDATE {LOCKS_TABLE} SET expires_at = '-infinity', holder_pid = NULL
    WHERE name = %s AND owner = %s AND epoch = %s"""


class LeaseTimings:
    """What a failover budget of ``lease`` seconds means: the lease runs ``ttl`` (half of it)
    and is renewed every ``renew`` (a third of that); a standby asks every ``retry`` (a tenth of
    it), so a standby holds the lease at most ttl + retry (0.6 of the budget) after the leader's
    last renewal, and the rest is left for its first page. A session stopped in a transaction is
    ended after ``idle`` (a third of the ttl, at most IDLE_IN_TRANSACTION_SECONDS), and nobody
    waits for a lock longer than ``lock_wait`` (the ttl, at most LOCK_WAIT_SECONDS)."""

    __slots__ = ("lease", "ttl", "renew", "retry", "idle", "lock_wait")

    def __init__(self, lease: float | None = None):
        if lease is None:  # the module's defaults (as the tests set them)
            self.ttl, self.renew = LOCK_TTL_SECONDS, LOCK_RENEW_SECONDS
            self.lease = self.ttl * 2
        else:
            self.lease = float(lease)
            self.ttl, self.renew = self.lease / 2, self.lease / 6
        self.retry = max(0.2, self.lease / 10)
        self.idle = max(1.0, min(IDLE_IN_TRANSACTION_SECONDS, self.ttl / 3))
        self.lock_wait = max(1.0, min(LOCK_WAIT_SECONDS, self.ttl))


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def _session(timings: LeaseTimings, *, read_only: bool) -> dict[str, str]:
    """The session settings of a store's connection (see LeaseTimings)."""
    settings = {"lock_timeout": _ms(timings.lock_wait)}
    if read_only:
        settings["default_transaction_read_only"] = "on"
    else:
        settings["idle_in_transaction_session_timeout"] = _ms(timings.idle)
    return settings


def display_url(url: str) -> str:
    """``url`` without its password (in the user part or the query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    user_part, at, host_part = netloc.rpartition("@")
    if at:
        netloc = f"{user_part.split(':', 1)[0]}@{host_part}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def _where(params: dict) -> str:
    """host:port of a connection's parameters, libpq's defaults filled in."""
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


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
        if len(rows) > 1 and (bulk := self.store._bulk_statement(self.cursor, statement)):
            self.cursor.execute(bulk, [list(column) for column in zip(*rows, strict=True)])
        else:
            self.cursor.executemany(_pg(statement), rows)

    def select_in(self, template: str, values: list) -> psycopg.Cursor:
        return self.cursor.execute(_any(template), (values,))


def _connect(
    url: str, *, read_only: bool = False, session: dict[str, str] | None = None
) -> psycopg.Connection:
    """A new autocommit connection with ``session``'s settings (default: ``_session``'s for the
    module's lease); psycopg's errors as they come (see _connect_error)."""
    params = conninfo_to_dict(url)
    extra: dict[str, object] = {}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if "application_name" not in params:
        extra["application_name"] = "txagg"
    for name, value in TCP_KEEPALIVE.items():  # a cut-off server is noticed in seconds
        if name not in params:
            extra[name] = value
    if session is None:
        session = _session(LeaseTimings(), read_only=read_only)
    conn = psycopg.connect(url, autocommit=True, **extra)
    try:
        for name, value in session.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_error(error: Exception, url: str) -> StoreError:
    """Why a connection could not be made, and what to do."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return StoreError(f"{display_url(url)} is not a PostgreSQL URL txagg can use: {error}")
    if isinstance(error, psycopg.ProgrammingError):
        return StoreError(f"{display_url(url)} is not a PostgreSQL URL txagg can use: {error}")
    where, text = _where(params), _one_line(error)
    dbname = params.get("dbname") or params.get("user") or "?"
    if "does not exist" in text and f'database "{dbname}"' in text:
        return StoreError(
            f"the PostgreSQL database {dbname} does not exist at {where}: create it "
            f"(createdb {dbname}) or name another in the URL"
        )
    if (
        "authentication failed" in text
        or "pg_hba.conf" in text
        or ("role" in text and "does not exist" in text)
    ):
        return StoreError(f"PostgreSQL at {where} refused the login: {text}")
    return StoreUnreachable(f"cannot reach PostgreSQL at {where}: {text}")


class _Lease:
    """One held lock: its row's owner and epoch, and the thread (with its own connection)
    that renews it."""

    def __init__(self, store: PostgresStore, name: str, timings: LeaseTimings):
        self.store = store
        self.name = name
        self.timings = timings
        self.ttl = timings.ttl
        self.owner = owner_id()
        self.epoch: int | None = None
        self.conn: psycopg.Connection | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def _connect(self) -> psycopg.Connection:
        """The lease's own connection: its statements are tiny, so none may wait (for a lock
        or at all) longer than a third of the ttl."""
        short = _ms(max(0.5, self.ttl / 3))
        session = {
            **_session(self.timings, read_only=False),
            "lock_timeout": short,
            "statement_timeout": short,
        }
        return _connect(self.store.url, session=session)

    def acquire(self) -> None:
        try:
            self.conn = self._connect()
        except psycopg.Error as error:
            raise _connect_error(error, self.store.url) from None
        try:
            params = {"name": self.name, "owner": self.owner, "ttl": self.ttl}
            try:
                row = self.conn.execute(_ACQUIRE, params).fetchone()
            except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled):
                # the row is locked by its holder's transaction (a stopped holder's until the
                # server ends its session): held, for now
                raise SyncLocked(
                    f"another {self.name} is working on {self.store.path}; try again later"
                ) from None
            if row is None:
                holder = self.conn.execute(
                    f"SELECT owner FROM {LOCKS_TABLE} WHERE name = %s", (self.name,)
                ).fetchone()
                by = f" (held by {holder[0].rsplit(':', 1)[0]})" if holder else ""
                raise SyncLocked(
                    f"another {self.name} is working on {self.store.path}{by}; try again later"
                )
        except psycopg.Error as error:
            self.conn.close()
            raise self.store._error(error) from None
        except BaseException:
            self.conn.close()
            raise
        self.epoch = row[0]
        self.thread = threading.Thread(
            target=self._renew, name=f"txagg-{self.name}-lease", daemon=True
        )
        self.thread.start()

    def _renew(self) -> None:
        """Renew every ``renew`` seconds until released or lost; a dropped connection is
        opened again (meanwhile the lease may lapse: the holder's next write finds out)."""
        while not self.stopping.wait(self.timings.renew):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self._connect()
                cursor = self.conn.execute(_RENEW, (self.ttl, self.name, self.owner, self.epoch))
                if cursor.rowcount != 1:
                    return  # taken over: the holder's next write raises SyncLocked
            except psycopg.Error:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None

    def release(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            self.conn.execute(_RELEASE, (self.name, self.owner, self.epoch))
        except psycopg.Error:
            pass  # the lease runs out by itself
        finally:
            if self.conn is not None:
                self.conn.close()


class PostgresStore(StoreBackend):
    """A txagg store in a PostgreSQL database (the PostgreSQL ``StoreBackend``). Open with
    ``Store.open("postgresql://...")`` (or ``PostgresStore.open``)."""

    def __init__(self, conn: psycopg.Connection, url: str, *, read_only: bool = False):
        self.conn = conn
        self.url = url
        self.path = display_url(url)
        self.where = _where(conn_params(url))
        self.read_only = read_only
        self.immutable = False
        self._leases: dict[str, _Lease] = {}
        self._session = _session(LeaseTimings(), read_only=read_only)
        self._write_key = (_WRITE_LOCK_CLASS, 0)
        self._bulk: dict[str, str | None] = {}  # executemany statement -> its unnest form

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> PostgresStore:
        """The store in the database at ``url``. ``create``: make the tables in an empty
        database (or schema). ``read_only``: for the read commands, which never create, migrate
        or write. The database itself must exist."""
        try:
            conn = _connect(url, read_only=read_only)
        except psycopg.Error as error:
            raise _connect_error(error, url) from None
        store = cls(conn, url, read_only=read_only)
        try:
            store._prepare(create and not read_only)
        except psycopg.Error as error:
            conn.close()
            raise store._error(error) from None
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def exists(cls, url: str) -> bool:
        """Whether the database at ``url`` holds a txagg store (StoreError when it cannot be
        reached)."""
        try:
            with _connect(url, read_only=True) as conn:
                return _has_table(conn, MIGRATIONS_TABLE)
        except psycopg.Error as error:
            raise _connect_error(error, url) from None

    def _prepare(self, create: bool) -> None:
        encoding = self.conn.info.parameter_status("server_encoding")
        if encoding != "UTF8":
            raise StoreError(
                f"the database of {self.path} is encoded {encoding}; txagg needs UTF8: "
                "create it with ENCODING 'UTF8'"
            )
        schema = self.conn.execute("SELECT current_schema()").fetchone()[0] or ""
        self._write_key = (_WRITE_LOCK_CLASS, zlib.crc32(schema.encode()) - 2**31)
        version = self._schema_version()
        if version > PG_SCHEMA_VERSION:
            raise StoreTooNew(
                f"the store {self.path} has schema version {version}, written by a newer txagg; "
                f"this txagg knows up to version {PG_SCHEMA_VERSION}: upgrade txagg"
            )
        if version == 0 and not create:
            raise NoStore(f"no store in {self.path}: run 'txagg sync' first (or pass --db)")
        if version < PG_SCHEMA_VERSION:
            if self.read_only:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, older than this "
                    f"txagg's {PG_SCHEMA_VERSION}, and read commands never change a store: "
                    "run 'txagg sync' once to upgrade it"
                )
            self._migrate()

    def _schema_version(self) -> int:
        if not _has_table(self.conn, MIGRATIONS_TABLE):
            tables = self.conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()"
            ).fetchone()[0]
            if tables:
                raise NotAStore(
                    f"{self.path} holds tables but is not a txagg store: give txagg a database "
                    "of its own (or a schema: ?options=-csearch_path%3DNAME)"
                )
            return 0
        return self.conn.execute(f"SELECT max(version) FROM {MIGRATIONS_TABLE}").fetchone()[0] or 0

    def _migrate(self) -> None:
        with self._write() as cursor:
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            # Re-read under the write lock: another process may have migrated meanwhile.
            current = cursor.execute(
                f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
            ).fetchone()[0]
            for version, name, statements in _pg_migrations():
                if version <= current:
                    continue
                for statement in statements:
                    cursor.execute(statement)
                cursor.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) "
                    "VALUES (%s, %s, %s)",
                    (version, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    # ------------------------------------------------------------ connection and errors

    def _live(self) -> psycopg.Connection:
        """The connection, opened again if the server dropped it."""
        conn = self.conn
        if conn.closed:
            try:
                conn = self.conn = _connect(self.url, session=self._session)
            except psycopg.Error as error:
                raise _connect_error(error, self.url) from None
        return conn

    def _query(self, statement: str, params=None) -> psycopg.Cursor:
        """Run one read statement (its own transaction); its rows are all fetched."""
        try:
            return self._live().execute(statement, params)
        except psycopg.Error as error:
            raise self._error(error) from None

    def _error(self, error: psycopg.Error) -> StoreError:
        """What a psycopg error means for the store, and what to do."""
        text = _one_line(error)
        if isinstance(error, pg_errors.QueryCanceled):
            return QueryTimeout(f"a read of {self.path} took too long: {text}")
        if isinstance(error, pg_errors.ReadOnlySqlTransaction):
            return StoreError(f"the store {self.path} is opened read-only: nothing was written")
        if isinstance(error, (pg_errors.LockNotAvailable, pg_errors.DeadlockDetected)):
            return StoreError(
                f"the store {self.path} stayed locked by another process: try again later"
            )
        if isinstance(error, pg_errors.NumericValueOutOfRange):
            return StoreError(
                f"the store {self.path} is damaged: it holds amounts too large to add up "
                f"({text}), which txagg never writes; restore a copy or sync into a new --db"
            )
        if isinstance(error, (pg_errors.DiskFull, pg_errors.OutOfMemory)):
            return StoreError(
                f"PostgreSQL at {self.where} ran out of room ({text}): nothing of the "
                "interrupted write was kept; free some space and run again"
            )
        if isinstance(error, pg_errors.InsufficientPrivilege):
            return StoreError(
                f"PostgreSQL refused what txagg asked of {self.path}: {text}; use a role that "
                "owns the store's tables"
            )
        if isinstance(error, (pg_errors.UndefinedTable, pg_errors.UndefinedColumn)):
            return StoreError(
                f"the store {self.path} is damaged ({text}): restore a copy or sync into a new --db"
            )
        if isinstance(error, psycopg.OperationalError) and self.conn.closed:
            return StoreUnreachable(
                f"lost the connection to PostgreSQL at {self.where}: {text}; nothing of an "
                "interrupted write was kept: run again"
            )
        return StoreError(f"the store {self.path} failed: {text}")

    def _bulk_statement(self, cursor: psycopg.Cursor, statement: str) -> str | None:
        """The one-statement form of a batch of ``statement`` (see _Steps), None for a
        statement of another shape; the column types are read from the catalog once."""
        bulk = self._bulk.get(statement, "")
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
        self._bulk[statement] = bulk
        return bulk

    # ------------------------------------------------------------ transactions and locks

    @contextmanager
    def _write(self) -> Iterator[psycopg.Cursor]:
        """One write transaction holding the store's write lock from its start, and checking
        the leases this store holds; psycopg's errors leave as StoreError."""
        conn = self._live()
        try:
            with conn.transaction():
                cursor = conn.cursor()
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", self._write_key)
                for lease in self._leases.values():
                    cursor.execute(_FENCE, (lease.ttl, lease.name, lease.owner, lease.epoch))
                    if cursor.rowcount != 1:
                        raise SyncLocked(
                            f"this process lost the {lease.name} lock on {self.path} to "
                            f"another (it was cut off or paused for longer than "
                            f"{lease.ttl:g} s); nothing more was written"
                        )
                yield cursor
        except psycopg.Error as error:
            raise self._error(error) from None

    @contextmanager
    def transaction(self) -> Iterator[_Steps]:
        """One write transaction (see _write), yielding what the ``ingest`` steps call."""
        with self._write() as cursor:
            yield _Steps(cursor, self)

    @contextmanager
    def lock(self, name: str, *, lease: float | None = None) -> Iterator[None]:
        """Hold the store's ``name`` lock; raise SyncLocked at once if another process holds it.

        A lease row renewed by this process; free once it expires (LOCK_TTL_SECONDS, or half of
        ``lease`` seconds: see LeaseTimings) or at once when the holder's connection is gone, so
        a killed holder releases it. With ``lease``, this store's own sessions get its timeouts.
        """
        if name in self._leases:
            raise SyncLocked(f"another {name} is working on {self.path}; try again later")
        timings = LeaseTimings(lease)
        if lease is not None:
            self._tune(timings)
        held = _Lease(self, name, timings)
        held.acquire()
        self._leases[name] = held
        try:
            yield
        finally:
            del self._leases[name]
            held.release()

    def _tune(self, timings: LeaseTimings) -> None:
        """This store's session settings for ``timings``, now and on every reconnection."""
        self._session = _session(timings, read_only=self.read_only)
        conn = self._live()
        try:
            for name, value in self._session.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        except psycopg.Error as error:
            raise self._error(error) from None

    # ------------------------------------------------------------ leader and standbys

    shares_leadership = True  # sync --follow may stand by for the lease (see sync.sync)

    def lease_timings(self, lease: float | None = None) -> LeaseTimings:
        return LeaseTimings(lease)

    def standby_seen(self, owner: str, name: str = "sync") -> None:
        """Record that the standby ``owner`` waits for the ``name`` lock (now, by the database's
        clock: its row's ``expires_at`` is when it was last seen); forget standbys gone for
        longer than STANDBYS_KEPT."""
        key = f"{STANDBY_PREFIX}{name}:{owner}"
        try:
            conn = self._live()
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {LOCKS_TABLE} (name, owner, epoch, expires_at, holder_pid) "
                    "VALUES (%s, %s, 0, now(), pg_backend_pid()) ON CONFLICT (name) DO UPDATE "
                    "SET expires_at = now(), holder_pid = excluded.holder_pid",
                    (key, owner),
                )
                conn.execute(
                    f"DELETE FROM {LOCKS_TABLE} WHERE left(name, %s) = %s "
                    f"AND expires_at < now() - interval '{STANDBYS_KEPT}'",
                    (len(STANDBY_PREFIX), STANDBY_PREFIX),
                )
        except psycopg.Error as error:
            raise self._error(error) from None

    def standby_gone(self, owner: str, name: str = "sync") -> None:
        """The standby ``owner`` no longer waits (it leads, or it stopped)."""
        try:
            self._live().execute(
                f"DELETE FROM {LOCKS_TABLE} WHERE name = %s", (f"{STANDBY_PREFIX}{name}:{owner}",)
            )
        except psycopg.Error as error:
            raise self._error(error) from None

    def leadership(self, name: str = "sync") -> dict:
        """Who holds the ``name`` lock and who waits for it: {"owner", "epoch", "leaseUntilMs",
        "active", "standbys": [{"owner", "lastSeenMs"}]}; owner None when it was never taken.
        ``active``: the lease has not run out and its holder's session is there."""
        row = self._query(
            "SELECT owner, epoch, CASE WHEN isfinite(expires_at) "
            "THEN (extract(epoch FROM expires_at) * 1000)::bigint END, "
            "expires_at > now() AND holder_pid IS NOT NULL "
            "AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = holder_pid) "
            f"FROM {LOCKS_TABLE} WHERE name = %s",
            (name,),
        ).fetchone()
        prefix = f"{STANDBY_PREFIX}{name}:"
        standbys = self._query(
            "SELECT owner, (extract(epoch FROM expires_at) * 1000)::bigint "
            f"FROM {LOCKS_TABLE} WHERE left(name, %s) = %s "
            f"AND expires_at > now() - interval '{STANDBYS_SHOWN_SECONDS} seconds' "
            "ORDER BY expires_at DESC, owner",
            (len(prefix), prefix),
        ).fetchall()
        owner, epoch, until, active = row if row else (None, 0, None, False)
        return {
            "owner": owner,
            "epoch": epoch,
            "leaseUntilMs": until,
            "active": bool(active),
            "standbys": [{"owner": who, "lastSeenMs": seen} for who, seen in standbys],
        }

    # ------------------------------------------------------------ ingest

    def ingest(
        self,
        records: Iterable[object],
        *,
        state: dict[str, object] | Callable[[IngestResult], dict[str, object]] | None = None,
        now_ms: int | None = None,
    ) -> IngestResult:
        """Store one page of upstream records and, in the same transaction, the sync state
        (see ``sqlite.Store.ingest``: the same steps, the same rules)."""
        return ingest_page(
            self._versioned_transaction, self.path, records, state=state, now_ms=now_ms
        )

    @contextmanager
    def _versioned_transaction(self) -> Iterator[_Steps]:
        """An ingest's write transaction: it bumps the data version (a page always moves the
        cursor, often asOf and totals) and stamps it on every user it adds to."""
        with self._write() as cursor:
            yield _Steps(cursor, self, bump_data_version(cursor))

    def place_quarantined(self, raws: list[str], at_ms: int) -> int:
        with self.transaction() as conn:
            return steps.place_quarantined(conn, raws, at_ms)

    # ------------------------------------------------------------ sync state

    def put_state(self, **state: object) -> None:
        with self.transaction() as conn:
            steps.put_state(conn, state)
            if ANSWER_STATE.intersection(state):
                bump_data_version(conn.cursor)

    def state(self) -> dict[str, object]:
        rows = self._query("SELECT name, value FROM sync_state").fetchall()
        return {name: json.loads(value) for name, value in rows}

    def state_value(self, name: str, default: object = None) -> object:
        row = self._query("SELECT value FROM sync_state WHERE name = %s", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def edit_state(self, name: str, change: Callable[[object], object], default=None) -> None:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT value FROM sync_state WHERE name = ? FOR UPDATE", (name,)
            ).fetchone()
            steps.put_state(conn, {name: change(default if row is None else json.loads(row[0]))})

    def counters(self) -> dict[str, int]:
        return dict(self._query("SELECT name, value FROM counters").fetchall())

    # ------------------------------------------------------------ the shared rate budget

    def take_token(self, rate: int, per: float, now: float | None = None) -> tuple[float, bool]:
        """Take one request token from the budget every process on this store shares (see
        ``sqlite.Store.take_token``); the row is read FOR UPDATE and written back in one
        transaction."""
        now = time.time() if now is None else now
        with self._write() as cursor:
            row = cursor.execute(_BUDGET_SQL + " FOR UPDATE").fetchone()
            written, wait, blocked = budget.take(row, rate, per, now)
            cursor.execute(
                "INSERT INTO rate_budget (name, tokens, updated_at, blocked_until) "
                "VALUES ('upstream', %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "tokens = excluded.tokens, updated_at = excluded.updated_at, "
                "blocked_until = excluded.blocked_until",
                written,
            )
            if wait == 0.0:
                steps.bump(_Steps(cursor, self), requests=1)
        return wait, blocked

    def block_until(self, until: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as cursor:
            cursor.execute(
                "INSERT INTO rate_budget (name, tokens, updated_at, blocked_until) "
                "VALUES ('upstream', 0, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "tokens = 0, blocked_until = CASE WHEN excluded.blocked_until > "
                "rate_budget.blocked_until THEN excluded.blocked_until "
                "ELSE rate_budget.blocked_until END",
                (now, min(until, now + MAX_BLOCK_SECONDS)),
            )
            steps.bump(_Steps(cursor, self), throttled=1)

    def budget(self, rate: int, per: float, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        row = self._query(_BUDGET_SQL).fetchone()
        return budget.standing(row, rate, per, now)

    # ------------------------------------------------------------ queries

    def user_totals(self, user_id: str) -> UserTotals | None:
        row = self._query(
            "SELECT user_id, earned, spent, payout, tx_count, payout_count, last_tx_at "
            "FROM users WHERE user_id = %s",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        check_user_row(self.path, (*row[:5], row[6]))
        if type(row[5]) is not int or not 0 <= row[5] <= MAX_USER_TRANSACTIONS:
            raise DamagedStore(self.path, user_id, "payout count", row[5])
        return UserTotals(*row)

    def user_row(self, user_id: str) -> tuple | None:
        return self._query(USER_ROW_SQL, (user_id,)).fetchone()

    def oldest_created_at(self) -> int | None:
        return self._query("SELECT min(created_at) FROM transactions").fetchone()[0]

    def read_version(self) -> tuple[int, int | None]:
        count, as_of = self._query(VERSION_SQL).fetchone()
        return count or 0, None if as_of is None else int(json.loads(as_of))

    @contextmanager
    def read_snapshot(self, seconds: float) -> Iterator[None]:
        """One REPEATABLE READ, READ ONLY transaction (one snapshot for every query in it)
        whose statements are cancelled after ``seconds`` (QueryTimeout)."""
        conn = self._live()
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (f"{max(1, int(seconds * 1000))}ms",),
            )
        except psycopg.Error as error:
            raise self._error(error) from None
        try:
            yield
        finally:
            try:
                conn.execute("ROLLBACK")  # it wrote nothing: ending it either way is the same
            except psycopg.Error:
                pass

    def payouts(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, int, int]]:
        """(user_id, amount in cents, count) per user with payouts, ordered by user id (bytes,
        as SQLite orders them). DamagedStore when a figure is one ingest never writes."""
        params: list[object] = []
        if since is None and until is None:
            sql = "SELECT user_id, payout, payout_count FROM users WHERE payout > 0"
            if after is not None:
                sql += " AND user_id > %s"
                params.append(after)
        else:
            sql = (
                "SELECT user_id, sum(amount)::bigint, count(*) FROM transactions "
                "WHERE type = 'payout'"
            )
            if since is not None:
                sql += " AND created_at >= %s"
                params.append(since)
            if until is not None:
                sql += " AND created_at < %s"
                params.append(until)
            if after is not None:
                sql += " AND user_id > %s"
                params.append(after)
            sql += " GROUP BY user_id"
        sql += " ORDER BY user_id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        rows = self._query(sql, params).fetchall()
        for user_id, amount, count in rows:
            if not (
                type(amount) is int
                and type(count) is int
                and 0 <= amount <= MAX_TOTAL_CENTS
                and 0 <= count <= MAX_USER_TRANSACTIONS
            ):
                if type(amount) is int and 0 <= amount <= MAX_TOTAL_CENTS:
                    raise DamagedStore(self.path, user_id, "payout count", count)
                raise DamagedStore(self.path, user_id, "payout total", amount)
        return rows

    def count_window(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """How many records the upstream showed us in [start, end]: (open bounds, closed
        bounds); see ``sqlite.Store.count_window``."""
        closed = open_ = 0
        for table in ("transactions", "quarantine", "conflicts"):
            row = self._query(
                f"SELECT count(*), "
                f"sum(CASE WHEN created_at = %s OR created_at = %s THEN 1 ELSE 0 END) "
                f"FROM {table} WHERE created_at >= %s AND created_at <= %s",
                (start_ms, end_ms, start_ms, end_ms),
            ).fetchone()
            closed += row[0]
            open_ += row[0] - (row[1] or 0)
        return open_, closed

    def clear_second(self, ms: int, floor: int | None = None, ceiling: int | None = None) -> int:
        """The whole second nearest ``ms`` on which no stored record sits exactly; see
        ``sqlite.Store.clear_second``."""
        base = ms // 1000 * 1000
        moves = range(60) if ceiling is None else (k // 2 * (-1) ** k for k in range(1, 121))
        for step in moves:
            moment = base - step * 1000
            if floor is not None and moment <= floor:
                if ceiling is None:
                    break
                continue
            if ceiling is not None and moment >= ceiling:
                continue
            taken = self._query(
                "SELECT 1 FROM transactions WHERE created_at = %s UNION ALL "
                "SELECT 1 FROM quarantine WHERE created_at = %s UNION ALL "
                "SELECT 1 FROM conflicts WHERE created_at = %s LIMIT 1",
                (moment, moment, moment),
            ).fetchone()
            if taken is None:
                return moment
        return base

    # ------------------------------------------------------------ size

    def size_bytes(self) -> int:
        """What the store's tables and their indexes take on disk."""
        row = self._query(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname = ANY(%s)",
            (list(TABLES),),
        ).fetchone()
        return row[0]


def _pg_migrations() -> list[tuple[int, str, list[str]]]:
    """Every migration of a PostgreSQL store in order: (version, name, statements)."""
    shared = [(version, name, PG_MIGRATIONS[version]) for version, name, _ in MIGRATIONS]
    return sorted(shared + PG_ONLY_MIGRATIONS)


def bump_data_version(cursor: psycopg.Cursor) -> int:
    """Bump the store's data version inside the caller's write transaction: the new version,
    which the users this transaction changes are stamped with. Writers take turns (the write
    lock), so versions commit in order and a replica that has seen version N has seen every
    change up to N."""
    return cursor.execute(_BUMP_VERSION).fetchone()[0]


def owner_id() -> str:
    """Who a lease or a standby row is: HOST:PID:RANDOM (RANDOM tells two terms apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def conn_params(url: str) -> dict:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        return {}


def _has_table(conn: psycopg.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
            "AND tablename = %s",
            (name,),
        ).fetchone()
        is not None
    )

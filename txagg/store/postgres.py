"""The PostgreSQL store: the same tables, migrations and ingest steps as the SQLite store, in a
PostgreSQL database that every txagg process on every machine shares (``--db postgresql://...``,
with the ``postgres`` extra installed). Its tables are in ``postgres_schema``, the lease behind
its locks in ``postgres_lease``, its connections and error messages in ``postgres_connect``, the
ingest steps on a psycopg cursor in ``postgres_ingest``.

- Connections: one psycopg connection per open store, in autocommit mode, so each read is its
  own statement and each write an explicit transaction; a lock held (``lock``) adds one more,
  which keeps the lease alive. A connection the server dropped is opened again on next use.
- Writes: one database transaction each, which first takes the store's write lock (a
  transaction-level advisory lock, released by the commit or the rollback), exactly as SQLite's
  ``BEGIN IMMEDIATE`` does: writers take turns, readers never wait. Ingest is
  ``ingest.ingest_page`` through ``_Steps``, which rewrites the portable ``?`` statements for
  psycopg (``%s``) once each; psycopg sends the ``executemany`` batches in pipeline mode.
- Locks (``sync``, ``verify``): a lease row in ``store_locks``, checked by every write
  transaction of its holder (see ``postgres_lease``). Standbys (``sync --follow``) wait for the
  lease and record when they were last seen in the same table (``standby:NAME:OWNER`` rows, see
  ``standby_seen``); ``leadership`` reads both for status.
- Read commands open the store with ``default_transaction_read_only``: nothing they run can
  write, create or migrate.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import psycopg

from ..errors import DamagedStore, NoStore, NotAStore, StoreError, StoreTooNew, SyncLocked
from ..settings import MAX_BLOCK_SECONDS, MAX_TOTAL_CENTS, MAX_USER_TRANSACTIONS
from . import budget
from . import ingest as steps
from .base import StoreBackend, UserTotals
from .ingest import IngestResult, check_user_row, ingest_page
from .postgres_connect import (
    _connect,
    _connect_error,
    _has_table,
    _store_error,
    _where,
    conn_params,
    display_url,
)
from .postgres_ingest import _Steps
from .postgres_lease import _FENCE, LeaseTimings, _Lease, _session
from .postgres_schema import (
    DATA_VERSION_TABLE,
    LOCKS_TABLE,
    PG_SCHEMA_VERSION,
    TABLES,
    _pg_migrations,
)
from .schema import MIGRATIONS_TABLE

STANDBY_PREFIX = "standby:"  # store_locks rows of the standbys: standby:NAME:OWNER
STANDBYS_SHOWN_SECONDS = 600  # status lists the standbys seen within this
STANDBYS_KEPT = "1 day"  # older standby rows are deleted
_WRITE_LOCK_CLASS = 0x74786167  # "txag": the first key of the write lock, the schema the second

# State whose change alters answers (asOf is in every user and payout answer): writing it bumps
# the data version, as every ingest does.
ANSWER_STATE = frozenset({"as_of"})
_BUMP_VERSION = (
    f"UPDATE {DATA_VERSION_TABLE} SET value = value + 1 WHERE name = 'data' RETURNING value"
)
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

USER_ROW_SQL = (
    "SELECT user_id, earned, spent, payout, tx_count, last_tx_at FROM users WHERE user_id = %s"
)
VERSION_SQL = (
    "SELECT (SELECT value FROM counters WHERE name = 'transactions'), "
    "(SELECT value FROM sync_state WHERE name = 'as_of')"
)
_BUDGET_SQL = "SELECT tokens, updated_at, blocked_until FROM rate_budget WHERE name = 'upstream'"


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
            conn = _connect(url, session=_session(LeaseTimings(), read_only=read_only))
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
            with _connect(url, session=_session(LeaseTimings(), read_only=True)) as conn:
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
        return _store_error(error, self.path, self.where, self.conn)

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


def bump_data_version(cursor: psycopg.Cursor) -> int:
    """Bump the store's data version inside the caller's write transaction: the new version,
    which the users this transaction changes are stamped with. Writers take turns (the write
    lock), so versions commit in order and a replica that has seen version N has seen every
    change up to N."""
    return cursor.execute(_BUMP_VERSION).fetchone()[0]

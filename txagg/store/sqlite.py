"""The SQLite store: one file in WAL mode (readers never wait for the writer) holding
transactions, per-user totals, sync state and the shared rate budget.

Every change that belongs together (new rows, the totals they move, the sync cursor) is written
in one database transaction, so a process killed at any instant leaves either all or nothing.
Opening applies the missing migrations (``schema``); the read commands open the file read-only
and never create, migrate or write it. Ingest runs the portable steps of ``ingest``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import (
    DamagedStore,
    NoStore,
    NotAStore,
    QueryTimeout,
    StoreError,
    StoreTooNew,
    SyncLocked,
)
from ..settings import MAX_BLOCK_SECONDS, MAX_TOTAL_CENTS, MAX_USER_TRANSACTIONS
from . import budget
from . import ingest as steps
from .base import (
    StoreBackend,
    UserTotals,
    is_postgres_url,
    looks_like_mangled_url,
    postgres_backend,
)
from .ingest import IngestResult, check_user_row, ingest_page
from .schema import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION

CACHE_KIB = 128 * 1024
USER_ROW_SQL = (
    "SELECT user_id, earned, spent, payout, tx_count, last_tx_at FROM users WHERE user_id = ?"
)
VERSION_SQL = (
    "SELECT (SELECT value FROM counters WHERE name = 'transactions'), "
    "(SELECT value FROM sync_state WHERE name = 'as_of')"
)


def explain(error: sqlite3.Error, path: Path) -> str:
    """SQLite's error as what happened to the store and what to do about it."""
    text = str(error)
    if "disk is full" in text:
        return (
            f"the disk holding {path} is full: nothing of the interrupted write was kept; "
            "free some space and run again"
        )
    if "readonly" in text or "read-only" in text:
        return f"the store {path} is read-only: nothing was written; check its permissions"
    if "malformed" in text or "not a database" in text:
        return f"the store {path} is damaged ({text}): restore a copy or sync into a new --db"
    if "locked" in text or "busy" in text:
        return f"the store {path} stayed locked by another process: try again later"
    if "integer overflow" in text:
        return (
            f"the store {path} is damaged: it holds amounts too large to add up ({text}), "
            "which txagg never writes; restore a copy or sync into a new --db"
        )
    return f"the store {path} failed: {text}"


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "txagg" / "txagg.db"


def _open_error(error: sqlite3.Error, path: Path) -> StoreError:
    if "not a database" in str(error) or "malformed" in str(error):
        return NotAStore(f"{path} is not a txagg store (not a SQLite database)")
    return StoreError(f"cannot open the store {path}: {error}")


def _uri(path: Path, query: str) -> str:
    """An SQLite URI for ``path`` with ``query`` (mode=ro, ...), whatever its characters."""
    text = os.path.abspath(path)
    for char, escaped in (("%", "%25"), ("?", "%3f"), ("#", "%23")):
        text = text.replace(char, escaped)
    return f"file://{text}?{query}"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _cannot_make_wal_index(error: sqlite3.Error, path: Path) -> bool:
    """Whether a read-only opening failed for want of a -shm the store's folder cannot hold."""
    name = getattr(error, "sqlite_errorname", "")
    return (name == "SQLITE_CANTOPEN" or name.startswith("SQLITE_READONLY")) and not os.access(
        path.parent, os.W_OK
    )


def _remove_wal_files(path: Path) -> None:
    """Have SQLite remove the -wal and -shm files a read-only connection created and, unable to
    write, left behind. SQLite removes them when the last connection that may write closes, so
    one opens, reads and closes; if another process still has the store open, they stay (it
    needs them), and nothing of the store file changes."""
    if not (os.path.exists(f"{path}-wal") or os.path.exists(f"{path}-shm")):
        return
    try:
        conn = sqlite3.connect(_uri(path, "mode=rw"), uri=True, isolation_level=None, timeout=1)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # a read-only file, say: the files stay, as SQLite always left them there


class Store(StoreBackend):
    """A txagg store in one SQLite file (the SQLite ``StoreBackend``). Open with
    ``Store.open(path)``, which hands a ``postgresql://`` URL to the PostgreSQL backend."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self.read_only = False
        self.immutable = False  # read as a snapshot that cannot change (see _open_read_only)
        self._tidy = False  # have SQLite remove the -wal and -shm this opening created

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, create: bool = True, read_only: bool = False
    ) -> StoreBackend:
        """The store at ``path``. ``create``: make it (and its folder) when missing or an empty
        file. ``read_only``: for the read commands, which never create, migrate or write.

        A ``postgresql://`` (or ``postgres://``) URL opens the PostgreSQL store there instead
        (the ``postgres`` extra); such a URL is never taken for a file name."""
        if is_postgres_url(path):
            return postgres_backend().open(path, create=create, read_only=read_only)
        if looks_like_mangled_url(path):
            raise StoreError(
                f"{os.fspath(path)} is neither a store file nor a PostgreSQL URL: "
                "write a PostgreSQL store as postgresql://USER@HOST:PORT/DATABASE"
            )
        path = Path(path)
        if not create and not path.exists():
            raise NoStore(f"no store at {path}: run 'txagg sync' first (or pass --db)")
        if read_only:
            return cls._open_read_only(path)
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(
                    f"cannot create the store's folder {path.parent}: {error}"
                ) from None
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the store {path}: {error}") from None
        store = cls(conn, path)
        try:
            store._prepare(create)
        except sqlite3.Error as error:
            conn.close()
            raise _open_error(error, path) from None
        except StoreError:
            conn.close()
            raise
        return store

    @classmethod
    def _open_read_only(cls, path: Path) -> Store:
        """A connection that cannot write (SQLite's ``mode=ro``), so a read works on a store
        in a read-only file or folder and never changes one.

        SQLite reads a WAL store through its -shm index, which it creates next to the store
        when missing. A read-only folder without one (no writer left it there) can still be read
        as ``immutable`` (straight from the store file), but only when the -wal holds nothing:
        changes in it could not be seen. -wal and -shm files this opening created are removed
        again at close when SQLite finds no other connection (see _remove_wal_files)."""
        if not path.is_file():
            raise NotAStore(f"{path} is not a file, so not a txagg store")
        wal = Path(f"{path}-wal")
        had_wal_files = wal.exists() or os.path.exists(f"{path}-shm")
        try:
            store = cls._connect_read_only(path, "mode=ro")
        except sqlite3.Error as error:
            if not _cannot_make_wal_index(error, path):
                raise _open_error(error, path) from None
            if _size(wal) > 0:
                raise StoreError(
                    f"the store {path} cannot be read in its read-only folder: {wal} holds "
                    f"changes not yet in the store file, and reading them needs a {path}-shm "
                    "index that cannot be created there; let one 'txagg sync' run with the "
                    "folder writable (it folds them in), or copy the store with its -wal to a "
                    "writable folder"
                ) from None
            try:
                store = cls._connect_read_only(path, "immutable=1")
            except sqlite3.Error as error:
                raise _open_error(error, path) from None
            store.immutable = True
        store._tidy = not had_wal_files and not store.immutable
        return store

    @classmethod
    def _connect_read_only(cls, path: Path, mode: str) -> Store:
        conn = sqlite3.connect(
            _uri(path, mode), uri=True, isolation_level=None, timeout=30, check_same_thread=False
        )
        store = cls(conn, path)
        store.read_only = True
        try:
            store._prepare(create=False, read_only=True)
        except BaseException:
            conn.close()
            raise
        return store

    def _prepare(self, create: bool, read_only: bool = False) -> None:
        if read_only:
            self.conn.execute("PRAGMA query_only=1")  # refuse writes before SQLite tries any
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                f"the store {self.path} has schema version {version}, written by a newer txagg; "
                f"this txagg knows up to version {SCHEMA_VERSION}: upgrade txagg"
            )
        if version == 0 and not create:
            empty = "an empty file" if _size(self.path) == 0 else "an empty SQLite database"
            raise NotAStore(
                f"{self.path} is {empty}, not a txagg store: "
                "run 'txagg sync' to make one there (or pass --db)"
            )
        if version < SCHEMA_VERSION:
            if read_only:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, older than this "
                    f"txagg's {SCHEMA_VERSION}, and read commands never change a store: "
                    "run 'txagg sync' once to upgrade it"
                )
            self.conn.execute("PRAGMA journal_mode=WAL")
            self._migrate(version)
        if not read_only:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        # Random ids scatter inserts over the whole primary key: keep its pages in memory.
        self.conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")

    def _schema_version(self) -> int:
        try:
            row = self.conn.execute(f"SELECT max(version) FROM {MIGRATIONS_TABLE}").fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            tables = self.conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            if tables:
                raise NotAStore(f"{self.path} is a SQLite database but not a txagg store") from None
            return 0
        return row[0] or 0

    def _migrate(self, current: int) -> None:
        with self.transaction():
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            # Re-read inside the write lock: another process may have migrated meanwhile.
            current = self.conn.execute(
                f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
            ).fetchone()[0]
            for version, name, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    self.conn.execute(statement)
                self.conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )

    def close(self) -> None:
        self.conn.close()
        if self._tidy:
            self._tidy = False
            _remove_wal_files(self.path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front.

        Whatever fails inside rolls everything back; SQLite's errors leave as StoreError.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise StoreError(explain(error, self.path)) from None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the store's ``name`` lock; raise SyncLocked at once if another process holds it.

        An OS file lock: the kernel releases it when the holder dies, even by kill -9.
        """
        lock_path = self.path.with_name(f"{self.path.name}.{name}-lock")
        handle = open(lock_path, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SyncLocked(
                    f"another {name} is working on {self.path}; try again later"
                ) from None
            yield
        finally:
            handle.close()

    # ------------------------------------------------------------ ingest

    def ingest(
        self,
        records: Iterable[object],
        *,
        state: dict[str, object] | Callable[[IngestResult], dict[str, object]] | None = None,
        now_ms: int | None = None,
    ) -> IngestResult:
        """Store one page of upstream records and, in the same transaction, the sync state.

        ``state`` may be a function of the result, for a cursor that depends on what was read.

        Valid new transactions are inserted and added to their users' totals; known ids are
        duplicates (or conflicts when the content differs); invalid records go to quarantine,
        and so does a transaction that would push a total of its user past its maximum
        (MAX_TOTAL_CENTS, MAX_USER_TRANSACTIONS). Totals never go down, so such a transaction
        is refused again however often it comes back, and never counted later.
        """
        return ingest_page(self.transaction, self.path, records, state=state, now_ms=now_ms)

    def place_quarantined(self, raws: list[str], at_ms: int) -> int:
        """Give quarantined records whose createdAt is unusable a place: ``at_ms``, the start
        of the small window the upstream served them in, so window counts include them."""
        with self.transaction() as conn:
            return steps.place_quarantined(conn, raws, at_ms)

    # ------------------------------------------------------------ sync state

    def put_state(self, **state: object) -> None:
        with self.transaction() as conn:
            steps.put_state(conn, state)

    def state(self) -> dict[str, object]:
        return {
            name: json.loads(value)
            for name, value in self.conn.execute("SELECT name, value FROM sync_state")
        }

    def state_value(self, name: str, default: object = None) -> object:
        row = self.conn.execute("SELECT value FROM sync_state WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def edit_state(self, name: str, change: Callable[[object], object], default=None) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM sync_state WHERE name = ?", (name,)).fetchone()
            steps.put_state(conn, {name: change(default if row is None else json.loads(row[0]))})

    def counters(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT name, value FROM counters"))

    # ------------------------------------------------------------ the shared rate budget

    def take_token(self, rate: int, per: float, now: float | None = None) -> tuple[float, bool]:
        """Take one request token from the budget every process on this store shares.

        Returns (0.0, False) when a token was taken, else how many seconds to wait before
        asking again and whether a 429's block is the reason. The bucket holds at most ``rate``
        tokens and refills at rate/per a second; once drained, a token is handed out only when
        1 + TOKEN_MARGIN have refilled. A block never reaches further than MAX_BLOCK_SECONDS.
        """
        now = time.time() if now is None else now
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT tokens, updated_at, blocked_until FROM rate_budget WHERE name = 'upstream'"
            ).fetchone()
            written, wait, blocked = budget.take(row, rate, per, now)
            conn.execute(
                "INSERT INTO rate_budget (name, tokens, updated_at, blocked_until) "
                "VALUES ('upstream', ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "tokens = excluded.tokens, updated_at = excluded.updated_at, "
                "blocked_until = excluded.blocked_until",
                written,
            )
            if wait == 0.0:
                steps.bump(conn, requests=1)
        return wait, blocked

    def block_until(self, until: float, now: float | None = None) -> None:
        """The upstream said 429: nobody on this store asks again before ``until`` (at most
        MAX_BLOCK_SECONDS after ``now``)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO rate_budget (name, tokens, updated_at, blocked_until) "
                "VALUES ('upstream', 0, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "tokens = 0, blocked_until = CASE WHEN excluded.blocked_until > "
                "rate_budget.blocked_until THEN excluded.blocked_until "
                "ELSE rate_budget.blocked_until END",
                (now, min(until, now + MAX_BLOCK_SECONDS)),
            )
            steps.bump(conn, throttled=1)

    def budget(self, rate: int, per: float, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        row = self.conn.execute(
            "SELECT tokens, updated_at, blocked_until FROM rate_budget WHERE name = 'upstream'"
        ).fetchone()
        return budget.standing(row, rate, per, now)

    # ------------------------------------------------------------ queries

    def user_totals(self, user_id: str) -> UserTotals | None:
        """The user's totals; DamagedStore when the row holds what ingest never writes."""
        row = self.conn.execute(
            "SELECT user_id, earned, spent, payout, tx_count, payout_count, last_tx_at "
            "FROM users WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        check_user_row(self.path, (*row[:5], row[6]))
        if type(row[5]) is not int or not 0 <= row[5] <= MAX_USER_TRANSACTIONS:
            raise DamagedStore(self.path, user_id, "payout count", row[5])
        return UserTotals(*row)

    def payouts(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, int, int]]:
        """(user_id, amount in cents, count) per user with payouts, ordered by user id.

        DamagedStore when a figure is one ingest never writes (each is at most a user's total).
        """
        params: list[object] = []
        if since is None and until is None:
            sql = "SELECT user_id, payout, payout_count FROM users WHERE payout > 0"
            if after is not None:
                sql += " AND user_id > ?"
                params.append(after)
        else:
            sql = "SELECT user_id, sum(amount), count(*) FROM transactions WHERE type = 'payout'"
            if since is not None:
                sql += " AND created_at >= ?"
                params.append(since)
            if until is not None:
                sql += " AND created_at < ?"
                params.append(until)
            if after is not None:
                sql += " AND user_id > ?"
                params.append(after)
            sql += " GROUP BY user_id"
        sql += " ORDER BY user_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self.conn.execute(sql, params).fetchall()
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

    def user_row(self, user_id: str) -> tuple | None:
        return self.conn.execute(USER_ROW_SQL, (user_id,)).fetchone()

    def oldest_created_at(self) -> int | None:
        return self.conn.execute("SELECT min(created_at) FROM transactions").fetchone()[0]

    def read_version(self) -> tuple[int, int | None]:
        count, as_of = self.conn.execute(VERSION_SQL).fetchone()
        return count or 0, None if as_of is None else int(json.loads(as_of))

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: a few microseconds, changed by every commit of
        another connection."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def prepare_reader(self, cache_kib: int) -> None:
        self.conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        self.conn.execute("PRAGMA query_only=1")

    @contextmanager
    def read_snapshot(self, seconds: float) -> Iterator[None]:
        """One read transaction (BEGIN: WAL readers see one snapshot) cut short by a progress
        handler once ``seconds`` have passed."""
        conn = self.conn
        deadline = time.monotonic() + seconds
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        conn.execute("BEGIN")
        try:
            yield
        except sqlite3.OperationalError as error:
            if "interrupted" not in str(error):
                raise
            raise QueryTimeout(f"a read of {self.path} took more than {seconds} s") from None
        finally:
            conn.set_progress_handler(None, 0)
            if conn.in_transaction:
                conn.execute("COMMIT")

    def count_window(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """How many records the upstream showed us in [start, end]: (open bounds, closed bounds).

        Quarantined records and conflicting versions count too, since they sit on the
        upstream's pages as well; the two figures bracket an upstream with either boundary rule.
        """
        closed = open_ = 0
        for table in ("transactions", "quarantine", "conflicts"):
            row = self.conn.execute(
                f"SELECT count(*), "
                f"sum(CASE WHEN created_at = ? OR created_at = ? THEN 1 ELSE 0 END) "
                f"FROM {table} WHERE created_at >= ? AND created_at <= ?",
                (start_ms, end_ms, start_ms, end_ms),
            ).fetchone()
            closed += row[0]
            open_ += row[0] - (row[1] or 0)
        return open_, closed

    def clear_second(self, ms: int, floor: int | None = None, ceiling: int | None = None) -> int:
        """The whole second nearest ``ms`` on which no stored record sits exactly: at or before
        ``ms`` (above ``floor``), or, given a ``ceiling``, on either side (below it).

        Window bounds go there: a record on a bound is counted or not depending on whether the
        upstream's bounds are inclusive, and that uncertainty could hide a missing record. Where
        every second nearby is taken (very dense data), ``ms``'s own second is returned.
        """
        base = ms // 1000 * 1000
        steps = range(60) if ceiling is None else (k // 2 * (-1) ** k for k in range(1, 121))
        for step in steps:
            moment = base - step * 1000
            if floor is not None and moment <= floor:
                if ceiling is None:
                    break
                continue
            if ceiling is not None and moment >= ceiling:
                continue
            taken = self.conn.execute(
                "SELECT 1 FROM transactions WHERE created_at = ? UNION ALL "
                "SELECT 1 FROM quarantine WHERE created_at = ? UNION ALL "
                "SELECT 1 FROM conflicts WHERE created_at = ? LIMIT 1",
                (moment, moment, moment),
            ).fetchone()
            if taken is None:
                return moment
        return base

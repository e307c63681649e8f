"""A serve replica's local copy of a PostgreSQL store: reads never cost a database round trip.

``Replica`` keeps, in a SQLite file of its own (in a temporary folder, removed at close), what
the hot routes answer from: every user's totals, the counters and asOf. It is filled when the
replica starts and then, every ``refresh_seconds``, brought up to date by one statement
(``postgres.PULL_SQL``): the store's data version, its counters, asOf and the users whose
version is newer than the copy's. So a replica asks the database one query a second, however
many requests it answers, and its answers are at most about a second behind the store.

The copy is a txagg SQLite store (the same schema), so the server reads it exactly as it reads
a SQLite store: the same hot path, the same bodies byte for byte, and ETags made from the
copied data version (transactions and asOf), equal on every replica that has pulled the same
data. When PostgreSQL cannot be reached the copy stays as it is: answers go on, with the asOf
of the last pull, and ``age_seconds`` (the time since the last pull that got through) grows
until readiness fails.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..store import Store

log = logging.getLogger("txagg.serve")

REFRESH_SECONDS = 1.0
FOLDER_PREFIX = "txagg-replica-"  # then the pid of the process whose copy it is
FILL_BATCH = 20_000  # users read and written per step of the first fill
_UPSERT_USERS = (
    "INSERT INTO users (user_id, earned, spent, payout, tx_count, payout_count, last_tx_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
    "earned = excluded.earned, spent = excluded.spent, payout = excluded.payout, "
    "tx_count = excluded.tx_count, payout_count = excluded.payout_count, "
    "last_tx_at = excluded.last_tx_at"
)
_PUT_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_PUT_STATE = (
    "INSERT INTO sync_state (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


class Replica:
    """The local copy of the PostgreSQL store at ``url`` (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        refresh_seconds: float = REFRESH_SECONDS,
        directory: str | Path | None = None,
    ):
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=directory))
        _sweep(self.folder.parent)
        self.path = self.folder / "copy.db"
        self.version = -1  # the store's data version the copy holds (-1: nothing yet)
        self.head: tuple | None = None  # (counters, asOf text) as last copied
        self.pulled_at: float | None = None  # time.time() of the last pull that got through
        self.queries = 0  # statements sent to PostgreSQL (the pulls)
        self.pulls = 0
        self.errors = 0
        self.last_error: str | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.source = None  # the PostgreSQL store the pulls run on
        self.copy: Store | None = None

    # ------------------------------------------------------------ life

    def start(self) -> Replica:
        """Fill the copy (StoreError when PostgreSQL cannot be read: nothing to serve yet) and
        start the thread that keeps it up to date."""
        try:
            self.copy = Store.open(self.path)
            # A copy is rebuilt from PostgreSQL at every start: it needs no durability.
            self.copy.conn.execute("PRAGMA synchronous=OFF")
            self.pull()
        except BaseException:
            self.close()
            raise
        self.thread = threading.Thread(target=self._run, name="txagg-replica", daemon=True)
        self.thread.start()
        atexit.register(self.close)  # a --workers process ends without closing its app
        return self

    def close(self) -> None:
        atexit.unregister(self.close)
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)
        for store in (self.source, self.copy):
            if store is not None:
                store.close()
        self.source = self.copy = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self) -> None:
        failing = 0  # pulls failed in a row: logged at the first and then every minute or so
        while not self.stopping.wait(self.refresh_seconds):
            try:
                self.pull()
            except Exception as error:  # keep answering from the copy; readiness tells
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                if failing % 60 == 0:
                    log.warning(
                        "replica: cannot bring the local copy up to date (%s); answering from "
                        "the copy of %s s ago",
                        self.last_error,
                        int(self.age_seconds() or 0),
                        extra={"event": "replica-error"},
                    )
                failing += 1
                self._drop_source()
                continue
            if failing:
                log.warning("replica: the local copy is up to date again")
                failing = 0

    def _drop_source(self) -> None:
        if self.source is not None:
            try:
                self.source.close()
            except Exception:  # a connection already gone
                pass
            self.source = None

    # ------------------------------------------------------------ pulling

    def _source(self):
        if self.source is None:
            from ..store.postgres import PostgresStore

            self.source = PostgresStore.open(self.url, create=False, read_only=True)
        return self.source

    def pull(self) -> int:
        """Bring the copy up to the store's data version with one statement: how many users
        changed. StoreError when PostgreSQL cannot be read."""
        import psycopg

        from ..store.postgres import PULL_SQL

        source = self._source()
        try:
            conn = source.conn
            self.queries += 1
            if self.version < 0:
                # The first fill is every user: read in batches through a server-side cursor
                # (one statement, one snapshot), each batch written as it comes.
                with conn.transaction(), conn.cursor(name="txagg_fill") as cursor:
                    cursor.itersize = FILL_BATCH
                    cursor.execute(PULL_SQL, (self.version,))
                    users = self._apply(iter(lambda: cursor.fetchmany(FILL_BATCH), []))
            else:
                rows = conn.execute(PULL_SQL, (self.version,)).fetchall()
                users = self._apply(iter([rows]))
        except psycopg.Error as error:
            raise source._error(error) from None
        self.pulled_at = time.time()
        self.pulls += 1
        return users

    def _apply(self, batches) -> int:
        """Write the pulled rows (``batches``: lists of rows) to the copy in one transaction,
        opened only if something changed: how many users changed."""
        version = self.version
        counters: dict[str, int] = {}
        as_of: str | None = None
        users = 0
        assert self.copy is not None
        with contextlib.ExitStack() as stack:
            local = None
            for rows in batches:
                batch = []
                for kind, name, a, b, c, d, e, f, text in rows:
                    if kind == "u":
                        batch.append((name, a, b, c, d, e, f))
                    elif kind == "v":
                        version = a
                    elif kind == "c":
                        counters[name] = a
                    else:
                        as_of = text
                if batch:
                    if local is None:
                        local = stack.enter_context(self.copy.transaction())
                    local.executemany(_UPSERT_USERS, batch)
                    users += len(batch)
            head = (counters, as_of)
            if head != self.head:
                if local is None:
                    local = stack.enter_context(self.copy.transaction())
                local.execute("DELETE FROM counters")
                local.executemany(_PUT_COUNTER, list(counters.items()))
                local.execute("DELETE FROM sync_state")
                if as_of is not None:
                    local.execute(_PUT_STATE, ("as_of", as_of))
        # Committed: the copy now holds the store as of ``version``.
        self.head = head
        self.version = version
        return users

    # ------------------------------------------------------------ state

    def age_seconds(self) -> float | None:
        """Seconds since the last pull that got through (None before the first)."""
        return None if self.pulled_at is None else max(0.0, time.time() - self.pulled_at)

    def describe(self) -> dict:
        age = self.age_seconds()
        return {
            "version": self.version,
            "ageSeconds": None if age is None else round(age, 3),
            "pulls": self.pulls,
            "queries": self.queries,
            "errors": self.errors,
            "lastError": self.last_error,
        }


def _sweep(folder: Path) -> None:
    """Remove the copies that processes now gone left in ``folder`` (killed, they could not)."""
    for path in folder.glob(f"{FOLDER_PREFIX}*"):
        pid = path.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def start_replica(url: str, refresh_seconds: float, directory=None) -> Replica:
    """A filled replica of the store at ``url``, refreshing itself; StoreError if it cannot."""
    return Replica(url, refresh_seconds, directory).start()

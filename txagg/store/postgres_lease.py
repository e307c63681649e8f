"""The lease behind a PostgreSQL store's locks (``sync``, ``verify``), and the session
settings its timings set.

- The lease: a row in ``store_locks`` (owner, epoch, expiry timed by the database's clock),
  renewed every LOCK_RENEW_SECONDS (or a sixth of ``lock(lease=)``) by a thread on the lock's
  own connection. It is free when it has expired, or at once when the backend of its holder's
  connection is gone (the holder died: PostgreSQL closes a dead client's session). Every write
  transaction of the holder checks, under the row's lock, that the lease is still its own
  (owner and epoch, ``_FENCE``): a holder paused past its lease, whose lock another process took
  over, cannot write when it wakes (SyncLocked).
- Sessions: ``lock_timeout`` below the lease on every connection, and on the writers'
  ``idle_in_transaction_session_timeout``, so a holder stopped inside a transaction (SIGSTOP, a
  partition) is ended by the server and its locks freed before anyone waited a lease on it.
- A holder stopped in the middle of a statement's messages is not idle to the server, which
  ends it only when TCP says its peer is gone (hours, by default): its transaction keeps the
  lease row and the write lock. A process that finds the lease run out but its row locked ends
  the sessions holding the store's write lock (``_END_STALLED``), as the holder's own timeouts
  would have, and takes the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING

import psycopg
from psycopg import errors as pg_errors

from ..errors import SyncLocked
from .postgres_connect import _connect, _connect_error
from .postgres_schema import LOCKS_TABLE

if TYPE_CHECKING:
    from .postgres import PostgresStore

log = logging.getLogger("txagg.store")

LOCK_TTL_SECONDS = 15.0  # a lease not renewed for this long is free (a hung or cut-off holder)
LOCK_RENEW_SECONDS = 5.0  # how often the holder renews it
# lock_timeout: the longest a statement waits for another session's lock; below the lease, so
# nobody waits on a stopped holder longer than it takes the server to end that holder's session.
LOCK_WAIT_SECONDS = 15.0
# idle_in_transaction_session_timeout of the writers: a session that stopped answering inside a
# transaction (its process stopped, paused or cut off) is ended, and its locks freed, after this.
IDLE_IN_TRANSACTION_SECONDS = 5.0

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
# The sessions holding the store's write lock (an advisory lock: the two keys of
# PostgresStore._write_key, as oids), ended once the lease they wrote under has run out: a writer
# takes the write lock before it checks the lease, so whoever holds the lease row locked holds
# the write lock too.
_END_STALLED = f"""
    SELECT pid, pg_terminate_backend(pid) FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND pid <> pg_backend_pid()
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND classid = %(high)s::oid AND objid = %(low)s::oid
        AND EXISTS (SELECT 1 FROM {LOCKS_TABLE} WHERE name = %(name)s AND expires_at <= now())"""
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


def owner_id() -> str:
    """Who a lease or a standby row is: HOST:PID:RANDOM (RANDOM tells two terms apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


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
            row = self._ask(params, end_stalled=True)
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

    def _ask(self, params: dict, end_stalled: bool) -> tuple | None:
        """The lease's row after asking for it: its epoch if taken, None if held by another.
        A row locked by its holder's transaction is held, for now, unless the lease ran out:
        then that holder is stalled and ended (``_end_stalled``), and the lease asked again
        (its lock is freed as the session ends: the ask waits for it)."""
        try:
            return self.conn.execute(_ACQUIRE, params).fetchone()
        except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled):
            if end_stalled and self._end_stalled():
                return self._ask(params, end_stalled=False)
            raise SyncLocked(
                f"another {self.name} is working on {self.store.path}; try again later"
            ) from None

    def _end_stalled(self) -> bool:
        """End the sessions that hold the store's write lock under a lease that ran out;
        whether there were any (their locks are freed as they end)."""
        high, low = self.store._write_key
        try:
            ended = self.conn.execute(
                _END_STALLED, {"name": self.name, "high": high, "low": low & 0xFFFFFFFF}
            ).fetchall()
        except psycopg.Error as error:  # e.g. not allowed to: another role's session
            log.warning(
                "cannot end the stalled session holding the %s lease's write lock: %s",
                self.name,
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                extra={"event": "endStalledFailed"},
            )
            return False
        for pid, _signalled in ended:
            log.warning(
                "ended the session %s of the %s lease's last holder: it held the store's "
                "write lock after its lease ran out (stalled inside a statement)",
                pid,
                self.name,
                extra={"event": "endedStalled", "pid": pid},
            )
        return bool(ended)

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

"""The store interface: what the rest of txagg calls on a store, whatever database holds it.

``StoreBackend`` lists what sync, verify, report, the CLI and the HTTP server call on a store;
each backend (``sqlite``, ``postgres``) implements it with the same tables (``schema``) and
the same portable ingest SQL (``ingest``). Every write is one database transaction; a database error
leaves as a ``StoreError`` that says what happened and what to do.

Which backend a store is in follows from where it is: a ``postgresql://`` (or ``postgres://``)
URL is a PostgreSQL database, anything else a SQLite file (``is_postgres_url``).

An ABC rather than a ``typing.Protocol``: ``report USER --json`` imports the store on its fast
path, and ``abc`` is loaded at startup while ``typing`` is not.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from .ingest import IngestResult

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_EXTRA = (
    "PostgreSQL stores need the postgres extra: pipx install 'txagg[postgres]' "
    "(or pip install 'txagg[postgres]')"
)


def is_postgres_url(location: object) -> bool:
    """Whether ``location`` (a --db value) names a PostgreSQL database rather than a file."""
    return isinstance(location, str) and location.lower().startswith(POSTGRES_SCHEMES)


def postgres_backend() -> type[StoreBackend]:
    """The PostgreSQL backend's class; psycopg is imported only now, and its absence is a
    StoreError naming the extra that brings it."""
    try:
        from .postgres import PostgresStore
    except ImportError as error:
        from ..errors import StoreError

        raise StoreError(f"{POSTGRES_EXTRA} ({error})") from None
    return PostgresStore


def store_exists(location: str | os.PathLike) -> bool:
    """Whether a store is at ``location`` (a file, or a database holding txagg's tables);
    StoreError when a PostgreSQL server cannot be asked."""
    if is_postgres_url(location):
        return postgres_backend().exists(location)
    return Path(location).exists()


def looks_like_mangled_url(location: object) -> bool:
    """A PostgreSQL URL that went through ``Path()`` (``postgresql:/host/db``, one slash lost):
    refused rather than taken for a file, so no folder called ``postgresql:`` is ever made."""
    text = os.fspath(location) if isinstance(location, (str, os.PathLike)) else ""
    return isinstance(text, str) and text.lower().startswith(("postgresql:", "postgres:"))


@dataclass
class UserTotals:
    user_id: str
    earned: int
    spent: int
    payout: int
    tx_count: int
    payout_count: int
    last_tx_at: int


class StoreBackend(ABC):
    """One txagg store. Money is integer cents, instants integer ms since the epoch (UTC).

    Attributes: ``path`` (what the store is called in messages: the file, or the URL without
    its password), ``read_only`` (opened for the read commands: never creates, migrates or
    writes), ``immutable`` (read as a snapshot that cannot change). ``conn`` is the backend's
    own connection, not part of the interface: code that uses it is tied to that backend.

    A backend also offers ``open(path, *, create=True, read_only=False)`` (a classmethod) that
    applies the missing migrations unless ``read_only``, and refuses what is not a txagg store
    (NoStore, NotAStore, StoreTooNew).
    """

    path: Path | str
    read_only: bool
    immutable: bool

    # ------------------------------------------------------------ life

    @abstractmethod
    def close(self) -> None:
        """Release the connection (and whatever the opening left behind)."""

    def __enter__(self) -> StoreBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def transaction(self) -> AbstractContextManager:
        """One write transaction, holding the write lock from its start, yielding a connection
        for the ``ingest`` steps. Whatever fails inside rolls everything back; database errors
        leave as StoreError."""

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager[None]:
        """Hold the store's ``name`` lock ("sync", "verify") for the block; raise SyncLocked at
        once if another process holds it. Released when the holder dies, however it dies."""

    def sync_lock(self) -> AbstractContextManager[None]:
        return self.lock("sync")

    # Whether ``sync --follow`` may stand by for the sync lock on this backend, with
    # ``lock(name, lease=SECONDS)``, ``lease_timings``, ``standby_seen``, ``standby_gone`` and
    # ``leadership`` (PostgreSQL: a store shared by machines). SQLite's lock is a file lock on
    # one machine: a second syncer there exits 75 instead.
    shares_leadership = False

    def leadership(self, name: str = "sync") -> dict | None:
        """Who holds the ``name`` lock and who stands by for it (see the PostgreSQL store);
        None where the backend has no leader to show."""
        return None

    # ------------------------------------------------------------ writes

    @abstractmethod
    def ingest(
        self,
        records: Iterable[object],
        *,
        state: dict[str, object] | Callable[[IngestResult], dict[str, object]] | None = None,
        now_ms: int | None = None,
    ) -> IngestResult:
        """Store one page of upstream records and, in the same transaction, the sync state
        (``state``, or a function of the result giving it)."""

    @abstractmethod
    def place_quarantined(self, raws: list[str], at_ms: int) -> int:
        """Give quarantined records whose createdAt is unusable the place ``at_ms``: how many
        were placed."""

    # ------------------------------------------------------------ sync state and counters

    @abstractmethod
    def put_state(self, **state: object) -> None:
        """Set sync state values (anything JSON can hold), in one transaction."""

    @abstractmethod
    def state(self) -> dict[str, object]:
        """All sync state values."""

    @abstractmethod
    def state_value(self, name: str, default: object = None) -> object:
        """One sync state value, ``default`` when unset."""

    @abstractmethod
    def edit_state(self, name: str, change: Callable[[object], object], default=None) -> None:
        """Set the state value ``name`` to ``change(its value or default)``, read and written
        in one write transaction (no other writer comes in between)."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """transactions, users, quarantined, conflicts, requests, throttled: those not zero."""

    # ------------------------------------------------------------ the shared rate budget

    @abstractmethod
    def take_token(self, rate: int, per: float, now: float | None = None) -> tuple[float, bool]:
        """Take one request token from the budget every process on this store shares:
        (0.0, False) when taken, else (seconds to wait, whether a 429's block is why)."""

    @abstractmethod
    def block_until(self, until: float, now: float | None = None) -> None:
        """The upstream said 429: nobody on this store asks again before ``until`` (at most
        MAX_BLOCK_SECONDS after ``now``)."""

    @abstractmethod
    def budget(self, rate: int, per: float, now: float | None = None) -> dict[str, float]:
        """The budget as it stands: {"tokens", "blockedFor"} (seconds), without taking any."""

    # ------------------------------------------------------------ queries

    @abstractmethod
    def user_totals(self, user_id: str) -> UserTotals | None:
        """The user's totals, None for a user without transactions; DamagedStore when the row
        holds what ingest never writes."""

    @abstractmethod
    def payouts(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, int, int]]:
        """(user_id, amount in cents, count) per user with payouts in [since, until), users
        after ``after``, ordered by user id, at most ``limit``."""

    @abstractmethod
    def user_row(self, user_id: str) -> tuple | None:
        """The raw row (user_id, earned, spent, payout, tx_count, last_tx_at), unchecked, for
        the HTTP hot path (which checks it with ``check_user_row``); None for an unknown user."""

    @abstractmethod
    def oldest_created_at(self) -> int | None:
        """The createdAt of the oldest stored transaction (None for none)."""

    @abstractmethod
    def read_version(self) -> tuple[int, int | None]:
        """(stored transactions, asOf ms): every user and payout answer is a function of
        these, since totals only move when transactions are inserted, in the same commit as
        the count."""

    def data_version(self) -> object:
        """A value that changes whenever another connection may have changed the data (cheap
        to ask where the backend can tell; by default the version itself)."""
        return self.read_version()

    def prepare_reader(self, cache_kib: int) -> None:
        """Tune a read-only store for a long-lived server reader (cache size, say); by
        default nothing to tune."""
        return None

    @abstractmethod
    def read_snapshot(self, seconds: float) -> AbstractContextManager[None]:
        """One read transaction for the block, so every query in it sees the same data, cut
        short after ``seconds``: QueryTimeout leaves the block when the time is up."""

    @abstractmethod
    def count_window(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """How many records (transactions, quarantined, conflicting versions) lie in
        [start, end]: (open bounds, closed bounds)."""

    @abstractmethod
    def clear_second(self, ms: int, floor: int | None = None, ceiling: int | None = None) -> int:
        """The whole second nearest ``ms`` on which no stored record sits exactly."""

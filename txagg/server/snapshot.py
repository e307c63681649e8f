"""The data version: read connections, the hot path's ``Snapshot``, ETags and Cache-Control.

Answers that depend only on the data carry a weak ``ETag`` made from the data version (the stored
transaction count and ``asOf``, so every worker and every restart agrees on it) and a
``Cache-Control: max-age`` that never lets a cached answer pass the 2-minute freshness promise.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from time import monotonic

from ..models import format_instant
from ..report import STALE_AFTER_SECONDS
from ..store import Store
from .config import ServeConfig

VERSION_CHECK_SECONDS = 0.002  # how often the hot path asks the store whether the data changed
READER_CACHE_KIB = 64 * 1024  # the event loop's connection: holds a 1M-user table's hot pages
POOL_CACHE_KIB = 16 * 1024  # each worker thread's connection


def etag_matches(if_none_match: str | bytes | None, etag: str) -> bool:
    """If-None-Match against our weak ETag, by the weak comparison RFC 9110 prescribes for it."""
    if not if_none_match:
        return False
    text = if_none_match.decode("latin-1") if isinstance(if_none_match, bytes) else if_none_match
    opaque = etag.removeprefix("W/")
    for candidate in text.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == opaque:
            return True
    return False


def open_reader(path: Path | str, cache_kib: int) -> Store:
    """A read-only store: the API must never write, whatever a bug might try."""
    store = Store.open(path, create=False, read_only=True)
    try:
        store.prepare_reader(cache_kib)
    except BaseException:
        store.close()
        raise
    return store


def make_etag(count: int, as_of: int | None, salt: str) -> str:
    # Weak: the hot path re-reads the version only every few ms, so a body may be a little newer
    # than its tag; it is never older, and weak tags promise equivalence, not identical bytes.
    return f'W/"{count:x}-{(as_of or 0):x}-{salt}"'


def fresh_for(max_age: int, as_of_ms: int | None, now: float) -> int:
    """The max-age that keeps an answer within the freshness promise once cached: the data
    is already ``now - asOf`` old, and a cache adds up to max-age on top."""
    if as_of_ms is None:
        return 0
    lag = int(now - as_of_ms / 1000)
    return max(0, min(max_age, STALE_AFTER_SECONDS - lag))


class Snapshot:
    """What the hot path needs besides the row, cached per data version.

    Owned by the event loop thread, with its own store. ``data_version`` tells whether any
    other connection committed since (SQLite's ``PRAGMA data_version``: a few microseconds); it is
    asked at most every VERSION_CHECK_SECONDS.
    """

    def __init__(self, store: Store, config: ServeConfig, salt: str):
        self.store = store
        self.max_age = config.max_age
        self.visibility = "private" if config.token else "public"
        self.salt = salt
        self.checked = -1.0
        self.data_version: object = None
        self.count = 0
        self.as_of_ms: int | None = None
        self.as_of_json = b"null"
        self.etag = ""
        self.headers: list[tuple[bytes, bytes]] = []  # ETag, Cache-Control, Content-Type

    def refresh(self) -> None:
        now = monotonic()
        if now - self.checked < VERSION_CHECK_SECONDS:
            return
        self.checked = now
        data_version = self.store.data_version()
        if data_version != self.data_version:
            self.data_version = data_version
            self.count, self.as_of_ms = self.store.read_version()
            self.as_of_json = (
                b"null" if self.as_of_ms is None else f'"{format_instant(self.as_of_ms)}"'.encode()
            )
            self.etag = make_etag(self.count, self.as_of_ms, self.salt)
        # Recomputed even when nothing changed: the allowed max-age shrinks as the data ages.
        control = cache_control(self.visibility, self.max_age, self.as_of_ms)
        self.headers = [
            (b"etag", self.etag.encode()),
            (b"cache-control", control.encode()),
            (b"content-type", b"application/json"),
        ]

    def lag_seconds(self) -> int | None:
        return None if self.as_of_ms is None else max(0, int(time.time() - self.as_of_ms / 1000))


def cache_control(visibility: str, max_age: int, as_of_ms: int | None) -> str:
    # With a token, answers go to "private": RFC 9111 keeps shared caches from storing responses
    # to authorized requests unless told "public", and that must be the operator's choice.
    return f"{visibility}, max-age={fresh_for(max_age, as_of_ms, time.time())}"


class StorePool:
    """Read connections for the worker threads, reused and closed together at shutdown."""

    def __init__(self, path: Path | str):
        self.path = path
        self.idle: queue.SimpleQueue[Store] = queue.SimpleQueue()
        self.opened: list[Store] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        try:
            store = self.idle.get_nowait()
        except queue.Empty:
            store = open_reader(self.path, POOL_CACHE_KIB)
            with self.lock:
                self.opened.append(store)
        try:
            yield store
        finally:
            self.idle.put(store)

    def close(self) -> None:
        with self.lock:
            for store in self.opened:
                store.close()
            self.opened.clear()

"""``serve --follow``: the sync loop in a daemon thread of the serving process."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..binding import record_failure, recorder
from ..store import Store
from ..sync import Syncer, SyncOptions

FOLLOW_BACKOFF_MAX = 60.0
log = logging.getLogger("txagg.serve")


class Follower:
    """The sync loop in a daemon thread: one process keeps the data fresh and serves it.

    Whatever goes wrong (upstream down, store locked by a cron sync, a bug) is logged to stderr
    and retried with a growing pause; the API keeps serving what the store holds, and readiness
    reports the lag honestly.
    """

    def __init__(self, db: Path | str, options: SyncOptions):
        self.db = db
        self.options = options
        self.stop_event = threading.Event()
        self.errors = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name="txagg-follow", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.warning("sync: %s", message, extra={"event": "sync-error"})

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                self._follow_once()
                backoff = 1.0
            except Exception as error:  # the API must outlive any sync failure
                self._error(f"{type(error).__name__}: {error}")
            if self.stop_event.wait(backoff):
                return
            backoff = min(backoff * 2, FOLLOW_BACKOFF_MAX)

    def _follow_once(self) -> None:
        with Store.open(self.db) as store, store.sync_lock():

            def on_error(message: str) -> None:
                self._error(message)
                record_failure(store, message)  # for status --check, until a poll gets through

            syncer = Syncer(
                store,
                self.options,
                stop=self.stop_event,
                on_error=on_error,
                on_page=recorder(store, self.options),  # the store belongs to this upstream
            )
            try:
                syncer.follow()
            finally:
                syncer.close()

    def describe(self) -> dict:
        return {
            "enabled": True,
            "running": self.alive(),
            "errors": self.errors,
            "lastError": self.last_error,
        }

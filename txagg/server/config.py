"""``ServeConfig``, what ``txagg serve`` is told, and the limits every part of it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ..report import STALE_AFTER_SECONDS
from ..settings import PAYOUTS_PAGE_DEFAULT, PAYOUTS_PAGE_MAX
from ..store import is_postgres_url
from ..sync import SyncOptions

DEFAULT_LIMIT = PAYOUTS_PAGE_DEFAULT  # /payouts rows per page
MAX_LIMIT = PAYOUTS_PAGE_MAX
MAX_PATH_BYTES = 2048  # no route of ours needs more; longer is a 414
MAX_QUERY_BYTES = 2048
MAX_HEADER_BYTES = 8192  # all header names and values together; more is a 431
# Read at call time through the package (``txagg.server.QUERY_SECONDS``), so it can be changed
# while a server runs.
QUERY_SECONDS = 10  # the longest a /payouts page may take before it is a 503


@dataclass
class ServeConfig:
    db: Path | str  # a store file, or a postgresql:// URL (kept as given)
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_age: int = 30  # seconds; the effective max-age also shrinks as the data ages
    workers: int = 1
    follow: bool = False
    sync_options: SyncOptions | None = None
    eur_per_scr: Decimal = Decimal(1)
    access_log: bool = False  # one log line per request (txagg.access)
    # A PostgreSQL store: answer from a local copy in each process (see ``replica``), pulled
    # every ``refresh_seconds``; readiness fails once the copy is older than ``stale_after``.
    # Without the copy every lookup is a query (the direct mode, a benchmark baseline).
    local_copy: bool = True
    refresh_seconds: float = 1.0
    stale_after: int = STALE_AFTER_SECONDS
    replica_dir: str | None = None  # where the copies go (default: the temporary folder)

    def __post_init__(self) -> None:
        if not is_postgres_url(self.db):
            self.db = Path(self.db)
        checks = [
            (
                0 <= self.max_age <= STALE_AFTER_SECONDS,
                f"max_age must be between 0 and {STALE_AFTER_SECONDS} seconds",
            ),
            (self.workers >= 1, "workers must be at least 1"),
            (0 < self.refresh_seconds <= 60, "refresh_seconds must be from 0 to 60 seconds"),
            (self.stale_after > 0, "stale_after must be positive"),
            (0 <= self.port <= 65535, "port must be between 0 and 65535"),
            (not self.follow or self.sync_options is not None, "follow needs sync_options"),
            (self.eur_per_scr > 0, "eur_per_scr must be positive"),
            (self.token is None or self.token.strip() != "", "the token must not be empty"),
        ]
        for holds, message in checks:
            if not holds:
                raise ValueError(message)

"""txagg: an exact, fresh, local copy of a rate-limited Transaction API, aggregated per user.

The public API, for code that syncs a store and reads its answers (docs/python.md)::

    import txagg

    with txagg.Store.open("txagg.db") as store:
        txagg.sync_store(store, txagg.SyncOptions(api_url="https://api.example.com"))
        print(txagg.dumps(txagg.user_report(store, "291417")))

``import txagg`` stays cheap: it loads this module and the exceptions (standard library only).
Everything else is imported the first time it is used (PEP 562), so the ``report`` fast path
and scripts that only read never pay for httpx, typer, pydantic or the HTTP servers.

``sync_store`` and ``verify_store`` are ``txagg.sync.sync`` and ``txagg.verify.verify``: named
apart from their modules, so that ``txagg.sync`` is always the module, as Python imports expect.
"""

from __future__ import annotations

from importlib import import_module

from .errors import (
    DamagedStore,
    NoStore,
    NotAStore,
    NothingSynced,
    ReversedRange,
    StoreError,
    StoreTooNew,
    SyncLocked,
    TxaggError,
    UnknownUser,
    UpstreamError,
)

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from .models import dumps, parse_time
    from .options import SyncOptions, SyncSummary
    from .report import payouts_report, status_report, user_report
    from .store import Store, default_db_path
    from .sync import sync as sync_store
    from .verify import VerifyReport
    from .verify import verify as verify_store

__all__ = [
    "__version__",
    # the store
    "Store",
    "default_db_path",
    # syncing and reconciling
    "SyncOptions",
    "SyncSummary",
    "sync_store",
    "verify_store",
    "VerifyReport",
    # the answers
    "user_report",
    "payouts_report",
    "status_report",
    "parse_time",
    "dumps",
    # the exceptions
    "TxaggError",
    "StoreError",
    "NoStore",
    "NotAStore",
    "StoreTooNew",
    "DamagedStore",
    "SyncLocked",
    "UpstreamError",
    "UnknownUser",
    "NothingSynced",
    "ReversedRange",
]

# Each lazy name and the module that defines it, imported when the name is first used.
_LAZY: dict[str, str | tuple[str, str]] = {
    "Store": "txagg.store",
    "default_db_path": "txagg.store",
    "SyncOptions": "txagg.options",
    "SyncSummary": "txagg.options",
    "VerifyReport": "txagg.verify",
    "sync_store": ("txagg.sync", "sync"),
    "verify_store": ("txagg.verify", "verify"),
    "user_report": "txagg.report",
    "payouts_report": "txagg.report",
    "status_report": "txagg.report",
    "parse_time": "txagg.models",
    "dumps": "txagg.models",
}


def __getattr__(name: str) -> object:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'txagg' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # later uses are a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

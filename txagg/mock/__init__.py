"""A faithful, deterministic, stateful, rate-limited fake of the upstream Transaction API.

``MockUpstream`` (upstream.py) is the in-memory core: seeded users and transactions, a history
that is already in the past at start, live transactions that become visible as the clock moves
(some of them late), optional broken records, and the ground truth per user. ``create_app``
(app.py) puts HTTP in front of it (Starlette), ``serve`` and ``start_in_thread`` (runner.py) run
that on uvicorn. ``MockConfig`` (config.py) holds the options.

The state is a pure function of the seed, the options and the clock: the k-th live transaction
becomes visible at ``start + k * 60 / tx_per_minute`` seconds, whenever it is asked for.

``MockConfig.faults`` (``txagg mock-serve --faults``) injects the upstream's bad days into
``/transactions``: errors, broken connections, cut bodies, HTML, slowness, late arrivals, pages that
shift, duplicates, items outside the window, lying ``meta``, broken records, conflicting versions
and extra 429s (``Faults`` in faults.py has the syntax, docs/mock.md the details). Every fault
decision comes from random generators of their own, seeded from ``seed``, so the same seed and the
same requests give the same faults, and switching faults on changes none of the data except the
transactions the faults themselves add. ``GET /faults`` counts what was injected.

The rest of the package: records.py renders records and pages, ratelimit.py is the token bucket,
responses.py the problems and faulted answers, openapi.py the document behind ``/openapi.json``.
"""

from __future__ import annotations

from .app import create_app, parse_window_query
from .config import MAX_USERS, MockConfig
from .faults import FAULT_KINDS, FaultInjector, Faults, RequestFaults, parse_faults
from .openapi import openapi_document
from .ratelimit import BucketState, TokenBucket
from .records import INVALID_KINDS, render_page, render_transaction, uuid4_text
from .runner import serve, start_in_thread
from .upstream import MAX_LIMIT, Ledger, MockUpstream, UserBook, history_instants

__all__ = [
    "FAULT_KINDS",
    "INVALID_KINDS",
    "MAX_LIMIT",
    "MAX_USERS",
    "BucketState",
    "FaultInjector",
    "Faults",
    "Ledger",
    "MockConfig",
    "MockUpstream",
    "RequestFaults",
    "TokenBucket",
    "UserBook",
    "create_app",
    "history_instants",
    "openapi_document",
    "parse_faults",
    "parse_window_query",
    "render_page",
    "render_transaction",
    "serve",
    "start_in_thread",
    "uuid4_text",
]

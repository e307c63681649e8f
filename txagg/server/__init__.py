"""``txagg serve``: the HTTP API over the store, optionally syncing in the same process.

Two layers, for speed where it counts and a framework where it helps:

* ``ServerApp`` (``app``) is a raw ASGI callable in front of everything. It screens every request
  (URL and header sizes, request bodies, the bearer token), records metrics (``metrics``), and
  answers the hot route, ``GET /users/{userId}``, itself: one primary-key lookup on a connection
  owned by the event loop thread (sub-millisecond, so it is done inline) and a body formatted
  straight from the row (``formatting``).
* Everything else goes to a small Starlette app (``views``). Its routes whose cost grows with the
  data (``/payouts``, ``/status``, ``/metrics``) run in a few worker threads with their own read
  connections, so a long page never stalls the event loop.

Answers that depend only on the data carry a weak ``ETag`` made from the data version (the stored
transaction count and ``asOf``, so every worker and every restart agrees on it) and a
``Cache-Control: max-age`` that never lets a cached answer pass the 2-minute freshness promise
(``snapshot``).

With ``follow`` the sync loop runs in a daemon thread of the same process, with its own
connection (``follower``): SQLite's WAL lets readers go on while it writes, and every failure of
it is logged and retried, never allowed to take the API down. ``runner`` runs it all on granian;
``openapi`` describes it; ``config`` holds ``ServeConfig`` and the limits.

On a PostgreSQL store each process answers from a local copy (``replica``): a SQLite file filled
at start and brought up to date every second by one query for what changed, so reads cost the
database nothing and the queries a process makes do not grow with its traffic.

``QUERY_SECONDS`` (the longest a ``/payouts`` page may take before it is a 503) is read from this
package at call time, so setting ``txagg.server.QUERY_SECONDS`` takes effect at once.
"""

from .app import ServerApp, create_app, send_answer, user_id_of
from .config import QUERY_SECONDS, ServeConfig
from .follower import Follower
from .formatting import TimestampText, json_string, money, payouts_body
from .metrics import Metrics
from .openapi import openapi_document
from .runner import prepare_store, serve, start_in_thread, worker_app

__all__ = [
    "QUERY_SECONDS",
    "Follower",
    "Metrics",
    "ServeConfig",
    "ServerApp",
    "TimestampText",
    "create_app",
    "json_string",
    "money",
    "openapi_document",
    "payouts_body",
    "prepare_store",
    "send_answer",
    "serve",
    "start_in_thread",
    "user_id_of",
    "worker_app",
]

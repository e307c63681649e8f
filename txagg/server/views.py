"""The routes served by Starlette: ``/payouts``, ``/status``, ``/healthz``, ``/metrics``,
``/openapi.json``, ``/docs`` and ``/`` (a redirect to ``/docs``), with their query parsing and
error answers.

``Views`` is a mixin of ``app.ServerApp``: its handlers use the app's ``config``, ``follower``,
``replica``,
``snapshot``, ``reader``, ``metrics``, ``document_bytes``, ``docs_bytes`` and ``limiter``. Routes
whose cost grows with the data run in a few worker threads (``Reader``), each with its own read
connection, so a long page never stalls the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlencode

import anyio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import server as package  # QUERY_SECONDS is read from there at call time
from ..httpserve import JSON_TYPE, Answer, BadRequest, docs_redirect, problem
from ..models import MAX_USER_ID_LENGTH, dumps, parse_time
from ..report import STALE_AFTER_SECONDS, status_report
from ..store import DamagedStore, QueryTimeout, Store, StoreError
from .config import DEFAULT_LIMIT, MAX_LIMIT, ServeConfig
from .formatting import payouts_body
from .metrics import store_facts
from .snapshot import StorePool, cache_control, etag_matches, make_etag

POOL_THREADS = 4  # concurrent /payouts, /status and /metrics queries per process


# ---------------------------------------------------------------- query parsing


def _single(params, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} is given more than once")
    return values[0] if values and values[0] != "" else None


@dataclass
class PayoutsQuery:
    limit: int = DEFAULT_LIMIT
    after: str | None = None
    since: str | None = None  # as given, so the next link repeats it verbatim
    until: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def next_link(self, after: str) -> str:
        params = {"limit": self.limit, "after": after, "since": self.since, "until": self.until}
        return "/payouts?" + urlencode({k: v for k, v in params.items() if v is not None})


def parse_payouts_query(params) -> PayoutsQuery:
    """limit, after, since, until; BadRequest says what is wrong. Empty values count as absent."""
    query = PayoutsQuery()
    limit = _single(params, "limit")
    if limit is not None:
        if not limit.isascii() or not limit.isdigit() or len(limit) > 4:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit[:40]!r}")
        query.limit = int(limit)
        if not 1 <= query.limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be from 1 to {MAX_LIMIT}, got {query.limit}")
    query.after = _single(params, "after")
    if query.after is not None and len(query.after) > MAX_USER_ID_LENGTH:
        raise BadRequest(f"after must be a userId (at most {MAX_USER_ID_LENGTH} characters)")
    query.since, query.since_ms = _time_param(params, "since")
    query.until, query.until_ms = _time_param(params, "until")
    return query


def _time_param(params, name: str) -> tuple[str | None, int | None]:
    text = _single(params, name)
    if text is None:
        return None, None
    try:
        return text, parse_time(text)
    except (ValueError, OverflowError) as error:
        raise BadRequest(f"{name}: {str(error)[:200]}") from None


def parse_ready(params) -> bool:
    text = _single(params, "ready")
    if text is None:
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise BadRequest(f"ready must be true or false, got {text[:40]!r}")


# ---------------------------------------------------------------- reading the store


class Reader:
    """The answers that run in worker threads, each on a pooled read connection."""

    def __init__(
        self,
        pool: StorePool,
        config: ServeConfig,
        salt: str,
        follow_state,
        direct_pool: StorePool | None = None,
    ):
        self.pool = pool
        # A replica's pool of PostgreSQL connections, for what its local copy cannot answer
        # (/status, /payouts over a period); None where ``pool`` reads the store itself.
        self.direct_pool = direct_pool or pool
        self.config = config
        self.salt = salt
        self.visibility = "private" if config.token else "public"
        self.follow_state = follow_state

    def payouts(self, query: PayoutsQuery, if_none_match: str | None) -> Answer:
        seconds = package.QUERY_SECONDS
        period = query.since_ms is not None or query.until_ms is not None
        with (self.direct_pool if period else self.pool).store() as store:
            # A page with since/until aggregates the whole period (the store keeps no per-user
            # index by time): a deadline keeps one huge period from holding a thread forever.
            # One read transaction: the version, asOf and the page all come from one snapshot,
            # so the ETag names exactly this body.
            try:
                with store.read_snapshot(seconds):
                    return self._payouts_page(store, query, if_none_match)
            except QueryTimeout:
                detail = f"the period took more than {seconds} s to add up: narrow it"
                return problem(503, detail, {"Retry-After": "60"})

    def _payouts_page(self, store: Store, query: PayoutsQuery, if_none_match) -> Answer:
        count, as_of = store.read_version()
        etag = make_etag(count, as_of, self.salt)
        headers = {
            "ETag": etag,
            "Cache-Control": cache_control(self.visibility, self.config.max_age, as_of),
        }
        if etag_matches(if_none_match, etag):
            return Answer(304, headers=headers, media_type=None)
        rows = store.payouts(
            since=query.since_ms,
            until=query.until_ms,
            after=query.after,
            limit=query.limit + 1,  # one more tells whether a next page exists
        )
        next_link = None
        if len(rows) > query.limit:
            del rows[query.limit :]
            next_link = query.next_link(rows[-1][0])
        return Answer(200, payouts_body(rows, as_of, next_link), headers)

    def status(self) -> Answer:
        options = self.config.sync_options
        rate, per = (options.rate_limit, options.per) if options else (None, None)
        with self.direct_pool.store() as store:
            body = status_report(store, rate=rate, per=per)
        body["follow"] = self.follow_state()
        return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"})

    def facts(self) -> dict:
        with self.pool.store() as store:
            return store_facts(store)


# ---------------------------------------------------------------- the Starlette app


class Views:
    """The Starlette half of ``ServerApp`` (a mixin: see the module's docstring)."""

    def _starlette(self) -> Starlette:
        routes = [
            Route("/payouts", self._payouts, methods=["GET"]),
            Route("/status", self._status, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
            Route("/docs", self._docs, methods=["GET"]),
            Route("/", self._root, methods=["GET"]),
        ]
        handlers = {
            BadRequest: self._bad_request,
            HTTPException: self._http_error,
            Exception: self._server_error,
        }
        app = Starlette(routes=routes, exception_handlers=handlers)
        app.router.redirect_slashes = False  # a redirect is no answer: /payouts/ is a 404
        return app

    async def _in_thread(self, function: Callable[[], Answer]) -> Answer:
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(POOL_THREADS)
        return await anyio.to_thread.run_sync(function, limiter=self.limiter)

    async def _payouts(self, request: Request) -> Response:
        query = parse_payouts_query(request.query_params)
        if_none_match = request.headers.get("if-none-match")
        answer = await self._in_thread(partial(self.reader.payouts, query, if_none_match))
        return answer.response()

    async def _status(self, request: Request) -> Response:
        return (await self._in_thread(self.reader.status)).response()

    async def _healthz(self, request: Request) -> Response:
        want_ready = parse_ready(request.query_params)
        self.snapshot.refresh()
        lag = self.snapshot.lag_seconds()
        body = {
            "status": "ok",
            "ready": True,
            "following": self.config.follow,
            "lagSeconds": lag,
            "asOf": self.snapshot.as_of_json.decode().strip('"') if lag is not None else None,
        }
        why = self._not_ready(lag)
        if why is None:
            return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"}).response()
        body["ready"] = False
        if want_ready:
            extra = {k: body[k] for k in ("ready", "following", "lagSeconds", "asOf")}
            return problem(503, why, **extra).response()
        body["detail"] = why
        return Answer(200, dumps(body).encode(), {"Cache-Control": "no-store"}).response()

    def _not_ready(self, lag: int | None) -> str | None:
        """Readiness fails only while following: a server of a store synced elsewhere (cron)
        cannot fix the lag, and its asOf tells readers how fresh the answers are."""
        replica = self.replica
        if replica is not None:
            age = replica.age_seconds()
            limit = self.config.stale_after
            if age is None or age > limit:
                why = f": {replica.last_error}" if replica.last_error else ""
                return (
                    f"the local copy of the store was last brought up to date "
                    f"{int(age or 0)} s ago (more than {limit} s){why}"
                )
        if not self.config.follow:
            return None
        if self.follower is not None and not self.follower.alive():
            return "the sync loop is not running"
        if lag is None:
            return "not synced yet"
        if lag > STALE_AFTER_SECONDS:
            return f"the data is {lag} s behind (more than {STALE_AFTER_SECONDS} s)"
        return None

    async def _metrics(self, request: Request) -> Response:
        body = await self._in_thread(self.metrics.exposition)
        return Response(
            body, headers={"Cache-Control": "no-store"}, media_type=CONTENT_TYPE_PLAIN_0_0_4
        )

    async def _openapi(self, request: Request) -> Response:
        return Response(self.document_bytes, media_type=JSON_TYPE)

    async def _docs(self, request: Request) -> Response:
        return Response(self.docs_bytes, media_type="text/html; charset=utf-8")

    async def _root(self, request: Request) -> Response:
        return docs_redirect()

    async def _bad_request(self, request: Request, error: Exception) -> Response:
        return problem(400, str(error)).response()

    async def _http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        status = error.status_code
        if status == 404:
            detail = f"no route {request.url.path[:200]}"
        elif status == 405:
            detail = f"{request.method[:20]} is not allowed here"
        else:
            detail = str(error.detail)
        return problem(status, detail, error.headers).response()

    async def _server_error(self, request: Request, error: Exception) -> Response:
        if isinstance(error, (StoreError, sqlite3.Error)):
            return store_problem(error).response()  # _route logs it
        return problem(500, f"{type(error).__name__}: the server failed").response()


def store_problem(error: StoreError | sqlite3.Error) -> Answer:
    """A store that cannot answer (a damaged row or file): never bad input, so a 500, but in
    problem+json and saying what is wrong; the log has the store's path and what to do."""
    if isinstance(error, DamagedStore):
        return problem(500, error.detail)
    return problem(500, "the store cannot be read: the server's log says why")

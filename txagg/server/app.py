"""The raw ASGI app in front of everything, and the hot route ``GET /users/{userId}``.

``ServerApp`` screens every request (URL and header sizes, request bodies, the bearer token),
records metrics, and answers the hot route itself: one primary-key lookup on a connection owned
by the event loop thread (sub-millisecond, so it is done inline) and a body formatted straight
from the row. Everything else goes to the Starlette routes of ``views.Views``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
from time import perf_counter
from urllib.parse import unquote_to_bytes

import anyio

from .. import __version__
from ..apidocs import docs_html
from ..httpserve import PROBLEM_TYPE, Answer, problem, problem_body
from ..models import MAX_USER_ID_LENGTH, format_decimal
from ..report import to_eur
from ..store import StoreError, check_user_row, explain, is_postgres_url
from .config import MAX_HEADER_BYTES, MAX_PATH_BYTES, MAX_QUERY_BYTES, ServeConfig
from .follower import Follower
from .formatting import TimestampText, json_string, money
from .metrics import USERS_ROUTE, Metrics, route_of
from .openapi import openapi_document
from .replica import Replica, start_replica
from .snapshot import READER_CACHE_KIB, Snapshot, StorePool, etag_matches, open_reader
from .views import Reader, Views, store_problem

UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="txagg"'}
INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="txagg", error="invalid_token"'}
log = logging.getLogger("txagg.serve")


class ServerApp(Views):
    """The ASGI app: screening, metrics and the hot route here; the rest in Starlette."""

    def __init__(self, config: ServeConfig, follower: Follower | None = None):
        self.config = config
        self.follower = follower
        self.salt = hashlib.blake2s(
            f"{__version__}|{config.eur_per_scr}".encode(), digest_size=3
        ).hexdigest()
        self.token = None if config.token is None else config.token.encode()
        # A PostgreSQL store is served from a local copy of this process (``replica``): the
        # hot path, /payouts and the metrics read the copy exactly as they read a SQLite store;
        # /status and /payouts over a period (which needs every transaction) ask PostgreSQL.
        self.replica: Replica | None = None
        source = config.db
        if is_postgres_url(config.db) and config.local_copy:
            self.replica = start_replica(config.db, config.refresh_seconds, config.replica_dir)
            source = self.replica.path
        try:
            self.snapshot = Snapshot(open_reader(source, READER_CACHE_KIB), config, self.salt)
        except BaseException:
            if self.replica is not None:
                self.replica.close()
            raise
        self.pool = StorePool(source)
        self.direct_pool = StorePool(config.db) if self.replica is not None else None
        self.reader = Reader(self.pool, config, self.salt, self.follow_state, self.direct_pool)
        self.metrics = Metrics(self.reader.facts, lambda: follower.errors if follower else 0)
        self.metrics.replica = self.replica
        self.rate = config.eur_per_scr
        self.unit_rate = config.eur_per_scr == 1
        self.timestamps = TimestampText()
        self.document = openapi_document(config)
        self.document_bytes = json.dumps(self.document, indent=2).encode()
        self.docs_bytes = docs_html(self.document).encode()
        self.limiter: anyio.CapacityLimiter | None = None
        self.router = self._starlette()

    def close(self) -> None:
        self.snapshot.store.close()
        self.pool.close()
        if self.direct_pool is not None:
            self.direct_pool.close()
        if self.replica is not None:
            self.replica.close()

    def follow_state(self) -> dict:
        if self.follower is not None:
            return self.follower.describe()
        # With --workers the loop runs in the supervisor process: enabled, but not visible here.
        return {"enabled": self.config.follow, "running": None, "errors": None, "lastError": None}

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)  # lifespan: Starlette knows the protocol
            return
        started = perf_counter()
        method = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode()
        authorization, if_none_match, refusal = self._screen(scope, raw_path)
        if refusal is None and self.token is not None and scope["path"] != "/healthz":
            refusal = self._check_token(authorization)
        user_id = user_id_of(raw_path)
        if refusal is not None:
            status = await send_answer(send, refusal, method == "HEAD")
        elif user_id is not None:
            status = await self._user(method, user_id, if_none_match, send)
        else:
            status = await self._route(scope, receive, send)
        route = USERS_ROUTE if user_id is not None else route_of(scope["path"])
        self.metrics.observe(route, method, status, perf_counter() - started)

    def _screen(self, scope, raw_path: bytes) -> tuple[bytes | None, bytes | None, Answer | None]:
        """Bounded sizes and no bodies; returns (Authorization, If-None-Match, refusal)."""
        authorization = if_none_match = None
        size = 0
        body = False
        for name, value in scope["headers"]:
            size += len(name) + len(value)
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
            elif name == b"content-length":
                body = body or value.strip() != b"0"
            elif name == b"transfer-encoding":
                body = True
        refusal = None
        if len(raw_path) > MAX_PATH_BYTES or len(scope["query_string"]) > MAX_QUERY_BYTES:
            refusal = problem(
                414, f"the URL is too long (path and query at most {MAX_PATH_BYTES} bytes each)"
            )
        elif size > MAX_HEADER_BYTES:
            refusal = problem(431, f"the headers are larger than {MAX_HEADER_BYTES} bytes")
        elif body:
            refusal = problem(413, "this API takes no request body")
        return authorization, if_none_match, refusal

    def _check_token(self, authorization: bytes | None) -> Answer | None:
        if authorization is None:
            return problem(401, "this API needs Authorization: Bearer <token>", UNAUTHORIZED)
        scheme, _, credentials = authorization.partition(b" ")
        # compare_digest takes the same time wherever the first difference is.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return None
        return problem(401, "the bearer token is not valid", INVALID_TOKEN)

    async def _route(self, scope, receive, send) -> int:
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.router(scope, receive, send_and_note)
        except Exception as error:  # Starlette has answered 500; keep serving
            log.error("%s: %s", type(error).__name__, error)
        return status[0]

    # ------------------------------------------------------------ GET /users/{userId}

    async def _user(self, method: str, user_id: bytes, if_none_match, send) -> int:
        """The hot path: no framework, one lookup, the body formatted straight from the row."""
        head = method == "HEAD"
        if not head and method != "GET":
            answer = problem(405, f"{method[:20]} is not allowed here", {"Allow": "GET, HEAD"})
            return await send_answer(send, answer, False)
        snapshot = self.snapshot
        try:
            snapshot.refresh()
        except (StoreError, sqlite3.Error) as error:
            return await send_answer(send, self._store_failed(error), head)
        if if_none_match is not None and etag_matches(if_none_match, snapshot.etag):
            await send(
                {"type": "http.response.start", "status": 304, "headers": snapshot.headers[:2]}
            )
            await send({"type": "http.response.body", "body": b""})
            return 304
        text = user_id.decode("utf-8", "replace")
        row = None
        try:
            if len(text) <= MAX_USER_ID_LENGTH:  # longer ids cannot exist: skip the lookup
                row = snapshot.store.user_row(text)
            body = None if row is None else self.user_body(row)
        except (StoreError, sqlite3.Error) as error:
            return await send_answer(send, self._store_failed(error), head)
        if body is None:
            body = problem_body(404, f"no such user: {text[:80]}")
            headers = {"Cache-Control": snapshot.headers[1][1].decode()}
            return await send_answer(send, Answer(404, body, headers, PROBLEM_TYPE), head)
        headers = [*snapshot.headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return 200

    def user_body(self, row: tuple) -> bytes:
        """The exact bytes of ``report --json`` (without its newline), built from the row;
        DamagedStore when the row holds what ingest never writes."""
        check_user_row(self.snapshot.store.path, row)
        user_id, earned, spent, payout, count, last = row
        paid = money(payout) if self.unit_rate else format_decimal(to_eur(payout, self.rate))
        head = (
            f'{{"userId": {json_string(user_id)}, "balance": {money(earned - spent - payout)}, '
            f'"earned": {money(earned)}, "spent": {money(spent)}, "payout": {money(payout)}, '
            f'"paidOut": {paid}, "transactions": {count}, '
            f'"lastTransactionAt": "{self.timestamps.text(last)}", "asOf": '
        )
        return head.encode() + self.snapshot.as_of_json + b"}"

    def _store_failed(self, error: StoreError | sqlite3.Error) -> Answer:
        if isinstance(error, StoreError):
            message = str(error)
        else:
            message = explain(error, self.snapshot.store.path)
        log.error("%s", message)
        return store_problem(error)


def user_id_of(raw_path: bytes) -> bytes | None:
    """The decoded id of ``/users/{userId}`` (from the raw path, so ``%2F`` stays in the id)."""
    if not raw_path.startswith(b"/users/"):
        return None
    rest = raw_path[7:]
    if not rest or b"/" in rest:
        return None
    return unquote_to_bytes(rest) if b"%" in rest else rest


async def send_answer(send, answer: Answer, head: bool) -> int:
    headers = [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
    if answer.media_type is not None:
        headers.append((b"content-type", answer.media_type.encode()))
    if answer.status != 304:
        headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else answer.body})
    return answer.status


def create_app(config: ServeConfig, follower: Follower | None = None) -> ServerApp:
    """The ASGI app over ``config.db`` (which must exist). ``follower``: the in-process sync
    loop, if any, for /status and readiness."""
    return ServerApp(config, follower)

"""``create_app``: the mock's HTTP API (Starlette) in front of a ``MockUpstream``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..apidocs import docs_html
from ..httpserve import BadRequest, docs_redirect
from ..models import dumps, parse_time
from .config import MockConfig
from .openapi import openapi_document
from .ratelimit import TokenBucket
from .responses import _QUIET_FILTER, faulted_response, json_response, problem
from .upstream import MAX_LIMIT, MockUpstream

# ---------------------------------------------------------------- query parameters

_POSITIVE_INTEGER = re.compile(r"[0-9]{1,18}")


def _positive_int(params: Mapping[str, str], name: str, default: int) -> int:
    text = params.get(name) or ""
    if not text:
        return default
    if not _POSITIVE_INTEGER.fullmatch(text) or int(text) < 1:
        raise BadRequest(f"{name} must be a positive integer, got {text[:40]!r}")
    return int(text)


def _instant(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name) or ""
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as error:
        raise BadRequest(f"{name}: {error}") from None


def parse_window_query(params: Mapping[str, str]) -> tuple[int | None, int | None, int, int]:
    """startDate, endDate, page, limit from a query; BadRequest says what is wrong.

    An empty value counts as absent; unknown parameters are ignored.
    """
    start_ms = _instant(params, "startDate")
    end_ms = _instant(params, "endDate")
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise BadRequest("startDate is after endDate")
    page = _positive_int(params, "page", 1)
    limit = min(_positive_int(params, "limit", MAX_LIMIT), MAX_LIMIT)
    return start_ms, end_ms, page, limit


# ---------------------------------------------------------------- routes


def create_app(upstream: MockUpstream, config: MockConfig) -> Starlette:
    bucket = TokenBucket(config.rate_limit, config.real_per)
    document = openapi_document(config)
    document_text = json.dumps(document, indent=2)
    docs_page = docs_html(document)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _QUIET_FILTER not in uvicorn_log.filters:
        uvicorn_log.addFilter(_QUIET_FILTER)

    async def transactions(request: Request) -> Response:
        state = bucket.take()
        headers = bucket.headers(state)
        if not state.allowed:
            headers["Retry-After"] = str(state.retry_after)
            detail = f"rate limit of {config.rate_limit} requests per {bucket.per:g} s exceeded"
            return problem(429, detail, headers)
        try:
            start_ms, end_ms, page, limit = parse_window_query(request.query_params)
        except BadRequest as error:
            return problem(400, str(error), headers)
        # Keyed by endDate as asked: "up to now" pages belong together although now moves.
        plan = upstream.injector.decide((start_ms, end_ms, limit), page)
        if end_ms is None:
            end_ms = int(upstream.clock() * 1000)
        if plan is not None:
            return await faulted_response(upstream, plan, (start_ms, end_ms, page, limit), headers)
        body, _ = upstream.window(start_ms, end_ms, page, limit)
        return json_response(body, headers)

    async def faults(request: Request) -> Response:
        return json_response(json.dumps(upstream.fault_report()))

    async def users(request: Request) -> Response:
        return json_response(dumps({"items": upstream.all_reports(), "asOf": upstream.as_of()}))

    async def user(request: Request) -> Response:
        user_id = request.path_params["userId"]
        report = upstream.user_report(user_id)
        if report is None:
            return problem(404, f"no transactions for user {user_id[:80]!r}")
        return json_response(dumps(report))

    async def payouts(request: Request) -> Response:
        return json_response(dumps({"items": upstream.payouts(), "asOf": upstream.as_of()}))

    async def openapi(request: Request) -> Response:
        return json_response(document_text)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page)

    async def root(request: Request) -> Response:
        return docs_redirect()

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        detail = {404: f"no route {request.url.path[:200]}"}.get(error.status_code, error.detail)
        return problem(error.status_code, str(detail), error.headers)

    async def server_error(request: Request, error: Exception) -> Response:
        return problem(500, f"{type(error).__name__}: the mock failed")

    routes = [
        Route("/transactions", transactions, methods=["GET"]),
        Route("/users", users, methods=["GET"]),
        Route("/users/{userId}", user, methods=["GET"]),
        Route("/payouts", payouts, methods=["GET"]),
        Route("/faults", faults, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/", root, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers)

"""What the mock answers besides pages: problems (RFC 9457), and the faulted answers.

A faulted answer replaces or breaks the page as the request's ``RequestFaults`` say: an extra
429, a 5xx problem, an HTML page, a connection closed before or halfway through the body, or
the page late.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime

from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from ..httpserve import JSON_TYPE, PROBLEM_TYPE, problem_body
from .faults import BAD_GATEWAY_HTML, RequestFaults
from .upstream import MockUpstream


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    # Not httpserve.problem: it adds Cache-Control: no-store, which the mock never sends.
    body = problem_body(status, detail)
    return Response(body, status, headers=dict(headers or {}), media_type=PROBLEM_TYPE)


def json_response(text: str | bytes, headers: Mapping[str, str] | None = None) -> Response:
    return Response(text, headers=dict(headers or {}), media_type=JSON_TYPE)


# ---------------------------------------------------------------- faulted answers

# Set while a response is broken on purpose, so uvicorn's complaint about it is not logged.
_BREAKING_ON_PURPOSE = contextvars.ContextVar("txagg_mock_breaking_on_purpose", default=False)


class _QuietPurposefulBreaks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            _BREAKING_ON_PURPOSE.get() and "without completing response" in record.getMessage()
        )


_QUIET_FILTER = _QuietPurposefulBreaks()


class BrokenResponse(Response):
    """Headers promising the whole body (Content-Length), then ``sent`` bytes of it, then EOF.

    Returning from the ASGI app with the response incomplete makes uvicorn close the
    connection: the client reads a short body and raises (httpx: RemoteProtocolError).
    """

    def __init__(self, body: bytes, sent: int, headers: Mapping[str, str]):
        super().__init__(body, headers=dict(headers), media_type=JSON_TYPE)
        self.sent = sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _BREAKING_ON_PURPOSE.set(True)  # this task's context: uvicorn logs from the same task
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if self.sent:
            await send(
                {"type": "http.response.body", "body": self.body[: self.sent], "more_body": True}
            )


def throttle_response(seconds: int, nth: int, now: float, headers: Mapping[str, str]) -> Response:
    """An injected 429; Retry-After alternates: delta-seconds first, an HTTP-date the next time."""
    if nth % 2:
        retry_after = str(seconds)
    else:
        # Rounded up to the next whole second: an HTTP-date cannot say less, and must not say
        # less than the wait.
        at = datetime.fromtimestamp(math.ceil(now) + seconds, UTC)
        retry_after = format_datetime(at, usegmt=True)
    detail = "injected fault: too many requests (--faults throttle)"
    return problem(429, detail, {**headers, "Retry-After": retry_after})


async def faulted_response(
    upstream: MockUpstream, plan: RequestFaults, query: tuple, headers: Mapping[str, str]
) -> Response:
    """The answer to a /transactions request that drew faults (see RequestFaults)."""
    injector = upstream.injector
    if plan.slow:
        injector.count("slow")
        await asyncio.sleep(injector.faults.slow_seconds)
    nth = injector.count(plan.answer) if plan.answer else 0
    if plan.answer == "throttle":
        seconds = int(injector.faults.throttle_seconds)
        return throttle_response(seconds, nth, upstream.clock(), headers)
    if plan.answer == "error":
        status = plan.rng.choice((500, 502, 503))
        return problem(status, "injected fault: the upstream failed (--faults error)", headers)
    if plan.answer == "nonjson":
        return HTMLResponse(BAD_GATEWAY_HTML, headers=dict(headers))
    body = upstream.faulted_window(*query, plan)
    if plan.answer == "reset":
        return BrokenResponse(body, 0, headers)
    if plan.answer == "truncate":
        return BrokenResponse(body, len(body) // 2, headers)
    return json_response(body, headers)

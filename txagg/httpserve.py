"""What txagg's two HTTP servers (``txagg serve`` and ``txagg mock-serve``) share.

Problem details (RFC 9457), answered as ``application/problem+json``:

* ``PROBLEM_TYPE``, ``JSON_TYPE``: the media types.
* ``BadRequest``: a ValueError whose message says which request parameter is wrong and why;
  route code raises it and the app's exception handler turns it into a 400 problem.
* ``problem_body(status, detail, **extra) -> bytes``: the problem document,
  ``{"type": "about:blank", "title": <reason phrase>, "status": ..., "detail": ..., **extra}``,
  written by ``models.dumps`` (the same bytes as ``json.dumps`` for str, int, bool and None).
* ``Answer``: a response as plain data (status, body, headers, media type), so code running in
  worker threads never touches ASGI objects; ``Answer.response()`` makes the Starlette response.
* ``problem(status, detail, headers=None, **extra) -> Answer``: a problem answer, with
  ``Cache-Control: no-store`` unless ``headers`` says otherwise.
* ``problem_response_doc(description, **headers) -> dict``: the OpenAPI response object of a
  problem answer (its schema is ``#/components/schemas/Problem``; each keyword is a response
  header's name and description).

The front door:

* ``docs_redirect() -> Response``: the answer to ``GET /`` (and ``HEAD /``) on both servers, a
  ``307`` to the ``/docs`` page with an empty body;
* ``docs_redirect_doc() -> dict``: its OpenAPI response object, keyed by status.

Binding and announcing:

* ``resolve_address(host, port) -> (ip, port)``: the numeric address and a port known to be
  bindable now (port 0 becomes a free port); an OSError says why it is not.
* ``base_url(host, port) -> str``: ``http://host:port``, with IPv6 addresses in brackets.
* ``wait_listening(host, port, timeout=30.0) -> bool``: wait until a TCP connection succeeds.
* ``announce_when_listening(host, port, url, on_ready)``: call ``on_ready(url)`` from a daemon
  thread once the port accepts connections (for servers with no "listening" callback).

The access log (``--access-log``):

* ``AccessLog(app)``: an ASGI app that passes everything to ``app`` and logs one INFO line per
  HTTP request to the ``txagg.access`` logger (client, method, path and query, status, bytes
  sent, milliseconds; the same as structured fields for ``--log-format json``). Both servers
  wrap their app in it only when asked: without it a request costs nothing more.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from time import monotonic, perf_counter

from starlette.responses import Response

from .errors import BadRequest
from .models import dumps

__all__ = [
    "JSON_TYPE",
    "PROBLEM_TYPE",
    "AccessLog",
    "Answer",
    "BadRequest",
    "announce_when_listening",
    "base_url",
    "docs_redirect",
    "docs_redirect_doc",
    "problem",
    "problem_body",
    "problem_response_doc",
    "resolve_address",
    "wait_listening",
]

PROBLEM_TYPE = "application/problem+json"
JSON_TYPE = "application/json"


# ---------------------------------------------------------------- answers and problems


@dataclass
class Answer:
    """A response as plain data, so the thread-pool code never touches ASGI objects."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str | None = JSON_TYPE

    def response(self) -> Response:
        return Response(self.body, self.status, headers=self.headers, media_type=self.media_type)


def problem_body(status: int, detail: str, **extra: object) -> bytes:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return dumps(body).encode()


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra) -> Answer:
    merged = {"Cache-Control": "no-store", **(headers or {})}
    return Answer(status, problem_body(status, detail, **extra), merged, PROBLEM_TYPE)


def problem_response_doc(description: str, **headers: str) -> dict:
    response = {
        "description": description,
        "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


# ---------------------------------------------------------------- the front door

DOCS_PATH = "/docs"
REDIRECT_STATUS = 307  # temporary: / may one day answer something of its own


def docs_redirect() -> Response:
    """``GET /``: where a browser pointed at the server finds out what it serves."""
    return Response(status_code=REDIRECT_STATUS, headers={"Location": DOCS_PATH})


def docs_redirect_doc() -> dict:
    return {
        str(REDIRECT_STATUS): {
            "description": f"Temporary Redirect to {DOCS_PATH}",
            "headers": {
                "Location": {
                    "description": f"{DOCS_PATH}, the page that lists the routes",
                    "schema": {"type": "string", "const": DOCS_PATH},
                }
            },
        }
    }


# ---------------------------------------------------------------- binding and announcing


def resolve_address(host: str, port: int) -> tuple[str, int]:
    """The numeric address and the port to serve on (granian takes IP addresses only).

    Binding here first gives a clear OSError now rather than inside the server, and resolves
    port 0 to a free port. The server binds again by address, so another process could take a
    port chosen here in between: port 0 is for tests and tools."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return address[0], probe.getsockname()[1]


def base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def wait_listening(host: str, port: int, timeout: float = 30.0) -> bool:
    """Until a TCP connection succeeds: granian reports no 'listening' moment of its own."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = monotonic() + timeout
    while monotonic() < deadline:
        try:
            socket.create_connection((target, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def announce_when_listening(
    host: str, port: int, url: str, on_ready: Callable[[str], None] | None
) -> None:
    def wait_then_call() -> None:
        if wait_listening(host, port) and on_ready is not None:
            on_ready(url)

    threading.Thread(target=wait_then_call, name="txagg-ready", daemon=True).start()


# ---------------------------------------------------------------- the access log

access_log = logging.getLogger("txagg.access")
MAX_LOGGED_TARGET = 2048  # characters of a request's path and query written to the log


class AccessLog:
    """One ``txagg.access`` INFO line per HTTP request, written once the answer is sent:
    ``127.0.0.1 "GET /users/074092 HTTP/1.1" 200 231 0.4 ms``. The path is logged as the
    client sent it (still percent-encoded, so it never holds a line break), cut short at
    MAX_LOGGED_TARGET characters."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name: str):
        return getattr(self.app, name)  # close() and the like: the wrapped app's

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        sent = {"status": 500, "bytes": 0}

        async def noting(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            _log_request(scope, sent["status"], sent["bytes"], perf_counter() - started)


def _log_request(scope, status: int, size: int, seconds: float) -> None:
    client = scope.get("client")
    address = client[0] if client else "-"
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "backslashreplace")
    target = raw.decode("ascii", "backslashreplace")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("ascii", "backslashreplace")
    target = "".join(ch if ch.isprintable() else "?" for ch in target[:MAX_LOGGED_TARGET])
    method = str(scope.get("method", "-"))[:20]
    protocol = f"HTTP/{scope.get('http_version', '1.1')}"
    millis = round(seconds * 1000, 1)
    access_log.info(
        '%s "%s %s %s" %d %d %.1f ms',
        address,
        method,
        target,
        protocol,
        status,
        size,
        millis,
        extra={
            "event": "access",
            "client": address,
            "method": method,
            "path": target,
            "protocol": protocol,
            "status": status,
            "bytes": size,
            "durationMs": millis,
        },
    )

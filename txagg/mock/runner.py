"""The mock on uvicorn: ``serve`` in the foreground, ``start_in_thread`` in the background."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from .. import logs
from ..httpserve import AccessLog, base_url
from .app import create_app
from .config import MockConfig
from .upstream import MockUpstream


class _Server(uvicorn.Server):
    """uvicorn that reports when it listens and exits quietly on SIGINT/SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after shutting down; a mock that was asked to stop has
        # done its job, so it returns normally instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A bound socket (so port 0 is resolved here) and the base URL it serves."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    return sock, base_url(bound_host, bound_port)


def _uvicorn_config(app: Starlette, config: MockConfig) -> uvicorn.Config:
    if config.access_log:  # txagg's own line per request, in txagg's log format
        logs.enable_access_log()
        app = AccessLog(app)
    return uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3
    )


def serve(config: MockConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the mock until SIGINT/SIGTERM; on_ready(base_url) once it listens."""
    sock, url = _bind(config.host, config.port)
    with sock:
        app = create_app(MockUpstream(config), config)
        server = _Server(_uvicorn_config(app, config), lambda: on_ready and on_ready(url))
        server.run(sockets=[sock])


def start_in_thread(
    config: MockConfig, upstream: MockUpstream | None = None
) -> tuple[str, Callable[[], None]]:
    """Run the mock in a daemon thread; returns its base URL and a stop() that shuts it down.

    ``upstream`` serves an upstream the caller made (say, on a fake clock) instead of a new one.
    """
    sock, url = _bind(config.host, config.port)
    try:
        app = create_app(upstream or MockUpstream(config), config)
    except BaseException:
        sock.close()
        raise
    ready = threading.Event()
    server = _Server(_uvicorn_config(app, config), ready.set)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="txagg-mock", daemon=True
    )
    thread.start()
    while not ready.wait(0.05):
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the mock upstream on {url} did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return url, stop

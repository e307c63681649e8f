"""Running the app: granian embedded in this process, or granian's worker processes.

The server is granian: its HTTP layer is Rust, so a request costs the Python side only the app.
On this project's 2-core benchmark machine uvicorn (httptools, uvloop) answered about 17,500
lookups a second with this app, granian about 25,000 (docs/benchmarks.md). One worker runs
granian embedded in this process, so the follow thread and the API share one process; more
workers are granian's worker processes, fed the config through the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from decimal import Decimal

from .. import logs
from ..httpserve import (
    AccessLog,
    announce_when_listening,
    base_url,
    resolve_address,
    wait_listening,
)
from ..store import Store
from ..sync import SyncOptions
from .app import ServerApp, create_app
from .config import ServeConfig
from .follower import Follower

log = logging.getLogger("txagg.serve")


def _granian_options(host: str, port: int) -> dict:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    return {
        "address": host,
        "port": port,
        "interface": Interfaces.ASGINL,  # no lifespan: the app needs no startup step
        "http": HTTPModes.http1,
        "websockets": False,
        "backlog": 2048,
        # Bounded request heads: granian refuses a request line and headers beyond this.
        "http1_settings": HTTP1Settings(max_buffer_size=64 * 1024),
        "log_level": LogLevels.error,  # the embedded mode warns on every start otherwise
    }


def _event_loop_runner() -> Callable:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


class _EmbeddedServer:
    """granian embedded: the server is a task on this thread's event loop."""

    def __init__(self, app: ServerApp | AccessLog, host: str, port: int):
        from granian.server.embed import Server

        self.server = Server(app, **_granian_options(host, port))
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, handle_signals: bool) -> None:
        self.loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, self.server.stop)
        await self.server.serve()

    def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just ended: nothing to stop
                self.loop.call_soon_threadsafe(self.server.stop)


def prepare_store(config: ServeConfig) -> None:
    """Following may start from an empty store: create it before any reader opens it."""
    if config.follow:
        Store.open(config.db).close()
        return
    # Without follow, serving is reading: never create, migrate or change the store.
    with Store.open(config.db, create=False, read_only=True) as store:  # NoStore says what to do
        if store.immutable:
            log.warning(
                "%s is in a read-only folder: serving it as it is now; restart to see later "
                "changes",
                config.db,
            )


def start_follower(config: ServeConfig) -> Follower | None:
    if not config.follow:
        return None
    assert config.sync_options is not None
    return Follower(config.db, config.sync_options).start()


def logged(app: ServerApp, config: ServeConfig) -> ServerApp | AccessLog:
    """The app, behind the access log when ``config.access_log`` asks for one."""
    if not config.access_log:
        return app
    logs.enable_access_log()
    return AccessLog(app)


def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; on_ready(base_url) once the port accepts connections."""
    prepare_store(config)
    host, port = resolve_address(config.host, config.port)
    url = base_url(host, port)
    if config.workers > 1:
        _serve_workers(config, host, port, url, on_ready)
        return
    follower = start_follower(config)
    app = create_app(config, follower)
    try:
        server = _EmbeddedServer(logged(app, config), host, port)
        announce_when_listening(host, port, url, on_ready)
        _event_loop_runner()(server.serve(handle_signals=True))
    finally:
        if follower is not None:
            follower.stop()
        app.close()


WORKER_CONFIG_ENV = "TXAGG_SERVE_WORKER_CONFIG"
WORKER_LOG_KEY = "_log"  # in the worker config: the supervisor's (level, format) of logs


def _serve_workers(config: ServeConfig, host: str, port: int, url: str, on_ready) -> None:
    """granian's worker processes; the sync loop, if any, runs once, in this supervising
    process, so the workers only read. Per-process figures in /metrics: see docs/http.md."""
    import multiprocessing

    from granian import Granian

    worker = asdict(config) | {"db": str(config.db), "eur_per_scr": str(config.eur_per_scr)}
    worker.update(workers=1, host=host, port=port)
    worker[WORKER_LOG_KEY] = logs.settings()
    # The workers are spawned afresh (never forked from a process running the sync thread) and
    # build their app from this, token included; the environment is private to this user.
    os.environ[WORKER_CONFIG_ENV] = json.dumps(worker)
    multiprocessing.set_start_method("spawn", force=True)
    server = Granian(
        "txagg.server:worker_app",
        factory=True,
        workers=config.workers,
        **_granian_options(host, port),
    )
    follower = start_follower(config)
    try:
        announce_when_listening(host, port, url, on_ready)
        server.serve()
    finally:
        if follower is not None:
            follower.stop()


def worker_app() -> ServerApp | AccessLog:
    """The app of one --workers process, from the config its supervisor left in the env.

    It keeps ``follow`` (for /status and readiness) but gets no follower: the supervisor runs
    the one sync loop. It logs as its supervisor does (level and format)."""
    values = json.loads(os.environ[WORKER_CONFIG_ENV])
    log_settings = values.pop(WORKER_LOG_KEY, None)
    if log_settings is not None:
        logs.configure(*log_settings)
    values["eur_per_scr"] = Decimal(values["eur_per_scr"])
    if values["sync_options"] is not None:
        values["sync_options"] = SyncOptions(**values["sync_options"])
    config = ServeConfig(**values)
    return logged(create_app(config), config)


def start_in_thread(config: ServeConfig) -> tuple[str, Callable[[], None]]:
    """Serve in a daemon thread of this process (for tests); returns the base URL and a stop()."""
    prepare_store(config)
    host, port = resolve_address(config.host, config.port)
    follower = start_follower(config)
    app = create_app(config, follower)
    server = _EmbeddedServer(logged(app, config), host, port)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(handle_signals=False)),
        name="txagg-serve",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        server.stop()
        thread.join(timeout=10)
        if follower is not None:
            follower.stop()
        app.close()

    if not wait_listening(host, port, timeout=10):
        stop()
        raise RuntimeError(f"txagg serve on port {port} did not start")
    return base_url(host, port), stop

"""Helpers for testing txagg and code built on it, used by txagg's own tests, its benchmark
scripts and ``txagg demo``:

* ``FakeClock``: a clock and a sleep that only move when told (``clock=`` / ``sleep=``);
* ``txagg_command`` and ``MockProcess``: the real command, and ``txagg mock-serve`` as a
  process on a free port;
* ``sync_options``: SyncOptions for a test upstream (no budget to speak of, quick retries);
* ``ground_truth`` and ``differing_users``: the comparison of a store with the mock's own
  aggregates, exact to the cent.
"""

from __future__ import annotations

import subprocess
import sys

from .errors import NothingSynced, UnknownUser
from .models import loads
from .report import user_report
from .store import Store
from .sync import SyncOptions


class FakeClock:
    """``clock()`` returns ``now``; ``sleep(s)`` moves it on by ``s`` at once."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def txagg_command(*args: str) -> list[str]:
    """The ``txagg`` command line, run by this Python (``python -m txagg``)."""
    return [sys.executable, "-m", "txagg", *args]


class MockProcess:
    """``txagg mock-serve ARGS`` in a real subprocess on a free port; ``url`` once it listens.
    A context manager, or call ``stop()``."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            txagg_command("mock-serve", "--port", "0", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"mock-serve did not start: {line!r} {self.process.stderr.read()}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()

    def __enter__(self) -> MockProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


TEST_SYNC_DEFAULTS = dict(
    settle=0,
    rate_limit=100_000,
    per=1,
    backoff_initial=0.01,
    backoff_max=0.05,
)


def sync_options(url: str, **overrides) -> SyncOptions:
    """SyncOptions for a test upstream at ``url``: reads up to now, no budget to speak of,
    retries after hundredths of a second; anything else as given."""
    return SyncOptions(**{"api_url": url, **TEST_SYNC_DEFAULTS, **overrides})


def ground_truth(url: str) -> list[dict]:
    """The mock's own report of every user (``GET /users``), numbers exact."""
    import httpx

    return loads(httpx.get(url.rstrip("/") + "/users", timeout=60).content)["items"]


def differing_users(store: Store, truth: list[dict]) -> list[str]:
    """The users whose stored report differs from ``truth`` (report-shaped dicts, as the mock's
    ``/users`` gives them), ``asOf`` aside; a user the store does not know differs too."""
    wrong = []
    for expected in truth:
        try:
            got = user_report(store, expected["userId"])
        except (UnknownUser, NothingSynced):
            wrong.append(expected["userId"])
            continue
        if {**got, "asOf": None} != {**expected, "asOf": None}:
            wrong.append(expected["userId"])
    return wrong

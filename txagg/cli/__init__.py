"""The ``txagg`` command line: thin commands that parse options, call the core, format results.

Core errors are exceptions; this edge turns them into a message on stderr and an exit code:
0 success, 1 failure, 2 bad usage, 3 no such user, 4 ``status --check`` found the store
unhealthy, 5 ``verify`` stopped before the end of its range, 75 another sync holds the store,
130 interrupted (the codes are defined in ``errors``).

The modules: ``app`` (the typer application), ``common`` (option types and groups, output
options, logging, helpers), and the commands: ``read`` (report, payouts, status), ``syncing``
(sync, verify), ``serving`` (serve, mock-serve, demo).
"""

from __future__ import annotations

from .app import app

# Importing a command module registers its commands, in this order in the help.
# isort: off
from . import read  # noqa: E402, F401
from . import syncing  # noqa: E402, F401
from . import serving  # noqa: E402, F401
# isort: on

__all__ = ["app"]

"""Entry point of the ``txagg`` command and ``python -m txagg``.

``report USER_ID --json`` is the command scripts run in loops, so it has a fast path that
answers with the standard library alone; everything else (and every variant of ``report`` the
fast path does not recognise) goes to the typer app in ``cli``.
"""

from __future__ import annotations

import os
import sys

from .errors import EXIT_FAILURE, EXIT_NO_SUCH_USER

# Variables that change report's answer or how it is written: the full CLI handles them.
_CHANGE_THE_ANSWER = ("TXAGG_EUR_PER_SCR", "TXAGG_FORMAT", "TXAGG_JSON", "TXAGG_LOG_FORMAT")


def _fast_report(argv: list[str]) -> int | None:
    """Answer ``report USER_ID [--json | --format json] [--db PATH]`` from a SQLite store as
    JSON, or None to fall through."""
    if len(argv) < 2 or argv[0] != "report":
        return None
    user_id, db, want_json = None, os.environ.get("TXAGG_DB"), False
    args = iter(argv[1:])
    for arg in args:
        if arg == "--json":
            want_json = True
        elif arg == "--format" or arg.startswith("--format="):
            if (next(args, None) if arg == "--format" else arg[len("--format=") :]) != "json":
                return None
            want_json = True
        elif arg == "--db":
            db = next(args, None)
            if db is None:
                return None
        elif arg.startswith("--db="):
            db = arg[len("--db=") :]
        elif arg.startswith("-") or user_id is not None:
            return None
        else:
            user_id = arg
    if user_id is None or not (want_json or not sys.stdout.isatty()):
        return None
    if any(name in os.environ for name in _CHANGE_THE_ANSWER):
        return None
    if db is not None and os.path.isdir(db):  # bad usage: the full CLI names the option
        return None
    if db and db[:11].lower().startswith(("postgresql:", "postgres:")):
        return None  # a PostgreSQL store: the full CLI opens it (or says what is missing)

    import sqlite3

    from .models import dumps
    from .report import NothingSynced, UnknownUser, user_report
    from .store import Store, StoreError, default_db_path, explain

    path = db or default_db_path()
    try:
        with Store.open(path, create=False, read_only=True) as store:
            body = user_report(store, user_id)
    except UnknownUser as error:
        print(f"Error: {error}", file=sys.stderr)
        return EXIT_NO_SUCH_USER
    except (StoreError, NothingSynced) as error:
        print(f"Error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except sqlite3.Error as error:
        print(f"Error: {explain(error, path)}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(dumps(body) + "\n")
    return 0


def main() -> None:
    code = _fast_report(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .cli import app

    try:
        app(prog_name="txagg")
    except Exception as error:  # a bug: say so in one line, the traceback only on request
        import logging

        if os.environ.get("TXAGG_DEBUG") or logging.getLogger("txagg").isEnabledFor(logging.DEBUG):
            raise  # TXAGG_DEBUG=1, or -vv

        print(
            f"Error: internal error: {error!r} (run it again with -vv, or TXAGG_DEBUG=1, "
            "for details)",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()

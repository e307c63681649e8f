"""Entry point of the ``txagg`` command and ``python -m txagg``.

``report USER_ID --json`` is the command scripts run in loops, so it has a fast path that
answers with the standard library alone; everything else (and every variant of ``report`` the
fast path does not recognise) goes to the typer app in ``cli``.
"""

from __future__ import annotations

import os
import sys

from .errors import EXIT_FAILURE, EXIT_NO_SUCH_USER


def _fast_report(argv: list[str]) -> int | None:
    """Answer ``report USER_ID [--json] [--db PATH]`` as JSON, or None to fall through."""
    if len(argv) < 2 or argv[0] != "report":
        return None
    user_id, db, want_json = None, os.environ.get("TXAGG_DB"), False
    args = iter(argv[1:])
    for arg in args:
        if arg == "--json":
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
    if "TXAGG_EUR_PER_SCR" in os.environ:
        return None

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
        if os.environ.get("TXAGG_DEBUG"):
            raise

        print(f"Error: internal error: {error!r} (set TXAGG_DEBUG=1 for details)", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()

"""Connections to PostgreSQL, and what its errors mean: every psycopg error leaves a
PostgreSQL store as a StoreError saying what happened and what to do; messages name the store
by its URL without the password.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from ..errors import QueryTimeout, StoreError, StoreUnreachable

TCP_KEEPALIVE = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5"}
CONNECT_TIMEOUT_SECONDS = 10


def display_url(url: str) -> str:
    """``url`` without its password (in the user part or the query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    user_part, at, host_part = netloc.rpartition("@")
    if at:
        netloc = f"{user_part.split(':', 1)[0]}@{host_part}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def _where(params: dict) -> str:
    """host:port of a connection's parameters, libpq's defaults filled in."""
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _connect(url: str, *, session: dict[str, str]) -> psycopg.Connection:
    """A new autocommit connection with ``session``'s settings (see ``postgres_lease._session``);
    psycopg's errors as they come (see _connect_error)."""
    params = conninfo_to_dict(url)
    extra: dict[str, object] = {}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if "application_name" not in params:
        extra["application_name"] = "txagg"
    for name, value in TCP_KEEPALIVE.items():  # a cut-off server is noticed in seconds
        if name not in params:
            extra[name] = value
    conn = psycopg.connect(url, autocommit=True, **extra)
    try:
        for name, value in session.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_error(error: Exception, url: str) -> StoreError:
    """Why a connection could not be made, and what to do."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return StoreError(f"{display_url(url)} is not a PostgreSQL URL txagg can use: {error}")
    if isinstance(error, psycopg.ProgrammingError):
        return StoreError(f"{display_url(url)} is not a PostgreSQL URL txagg can use: {error}")
    where, text = _where(params), _one_line(error)
    dbname = params.get("dbname") or params.get("user") or "?"
    if "does not exist" in text and f'database "{dbname}"' in text:
        return StoreError(
            f"the PostgreSQL database {dbname} does not exist at {where}: create it "
            f"(createdb {dbname}) or name another in the URL"
        )
    if (
        "authentication failed" in text
        or "pg_hba.conf" in text
        or ("role" in text and "does not exist" in text)
    ):
        return StoreError(f"PostgreSQL at {where} refused the login: {text}")
    return StoreUnreachable(f"cannot reach PostgreSQL at {where}: {text}")


def _store_error(
    error: psycopg.Error, path: str, where: str, conn: psycopg.Connection
) -> StoreError:
    """What a psycopg error means for the store ``path`` (its server ``where``, its
    connection ``conn``), and what to do."""
    text = _one_line(error)
    if isinstance(error, pg_errors.QueryCanceled):
        return QueryTimeout(f"a read of {path} took too long: {text}")
    if isinstance(error, pg_errors.ReadOnlySqlTransaction):
        return StoreError(f"the store {path} is opened read-only: nothing was written")
    if isinstance(error, (pg_errors.LockNotAvailable, pg_errors.DeadlockDetected)):
        return StoreError(f"the store {path} stayed locked by another process: try again later")
    if isinstance(error, pg_errors.NumericValueOutOfRange):
        return StoreError(
            f"the store {path} is damaged: it holds amounts too large to add up "
            f"({text}), which txagg never writes; restore a copy or sync into a new --db"
        )
    if isinstance(error, (pg_errors.DiskFull, pg_errors.OutOfMemory)):
        return StoreError(
            f"PostgreSQL at {where} ran out of room ({text}): nothing of the "
            "interrupted write was kept; free some space and run again"
        )
    if isinstance(error, pg_errors.InsufficientPrivilege):
        return StoreError(
            f"PostgreSQL refused what txagg asked of {path}: {text}; use a role that "
            "owns the store's tables"
        )
    if isinstance(error, (pg_errors.UndefinedTable, pg_errors.UndefinedColumn)):
        return StoreError(
            f"the store {path} is damaged ({text}): restore a copy or sync into a new --db"
        )
    if isinstance(error, psycopg.OperationalError) and conn.closed:
        return StoreUnreachable(
            f"lost the connection to PostgreSQL at {where}: {text}; nothing of an "
            "interrupted write was kept: run again"
        )
    return StoreError(f"the store {path} failed: {text}")


def conn_params(url: str) -> dict:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        return {}


def _has_table(conn: psycopg.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
            "AND tablename = %s",
            (name,),
        ).fetchone()
        is not None
    )

"""Every exception txagg raises on purpose, and the exit code each one means on the command line.

The tree::

    TxaggError                    a failure to report: a message that says why and what to do
    ├── StoreError                the store cannot be used                          exit 1
    │   ├── NoStore               no store at that path (read commands never create one)
    │   ├── NotAStore             a file that is not a txagg store
    │   ├── StoreTooNew           written by a newer txagg: upgrade
    │   ├── DamagedStore          a stored figure txagg never writes
    │   ├── QueryTimeout          a read took longer than it may (an HTTP 503)
    │   ├── StoreUnreachable      PostgreSQL cannot be reached, or the connection was lost
    │   └── SyncLocked            another sync (or verify) holds the store          exit 75
    ├── UpstreamError             the upstream cannot be read, past every retry     exit 1
    ├── NoUpstream                no --api-url, and the store has no upstream yet   exit 2
    ├── OtherUpstream             --api-url is not the upstream of the store        exit 2
    ├── UnknownUser               no transaction of that user (also a LookupError)  exit 3
    ├── NothingSynced             report or verify on a store never synced          exit 1
    └── Unhealthy                 status --check: the store needs attention         exit 4

    ValueError
    ├── InvalidRecord             a record breaks the schema: quarantined, never raised out
    ├── BodyError                 an answer's body cannot be read within the bounds
    │   └── BodyTooLarge
    ├── BadRequest                an HTTP query parameter the API cannot take: a 400
    ├── BadUpstreamUrl            --api-url is not an http(s) URL with a host       exit 2
    └── ReversedRange             --since later than --until                        exit 2

    TransientError                a failure worth retrying (5xx, timeout, bad body)
    ├── Unreachable               no complete answer: refused, reset, timed out
    └── Throttled                 a 429: the shared budget is blocked until Retry-After

    SyncStopped                   a stop was asked for (SIGTERM / SIGINT)           exit 130
    RequestLimitReached           --max-requests is spent: the run ends early (a verify
                                  left short of the end of its range:              exit 5)

The core raises these; only the command line (``cli``, ``__main__``) turns them into exit codes,
with ``exit_code``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_SUCH_USER = 3
EXIT_UNHEALTHY = 4  # status --check: behind, discrepancies recorded, or the last run failed
EXIT_INCOMPLETE = 5  # verify stopped before the end of its range: run it again to resume
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class TxaggError(Exception):
    """A failure to report to the user; the message says why and what to do."""


# ---------------------------------------------------------------- the store


class StoreError(TxaggError):
    """A store that cannot be used; the message says why and what to do."""


class NoStore(StoreError):
    pass


class NotAStore(StoreError):
    pass


class StoreTooNew(StoreError):
    pass


class DamagedStore(StoreError):
    """A stored figure no ingest can have written (edited by hand, or by another program).

    ``detail`` says what is wrong without the store's path, for answers to HTTP clients."""

    def __init__(self, path: object, user_id: object, field: str, value: object):
        what = f"user {_short(user_id)} has an impossible {field} ({_short(value)})"
        self.detail = f"{what}: the store is damaged"
        super().__init__(
            f"the store {path} is damaged: {what}, which txagg never writes; "
            "restore a copy or sync into a new --db"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class QueryTimeout(StoreError):
    """A read cut short because it took longer than it may (``read_snapshot``)."""


class StoreUnreachable(StoreError):
    """The database server cannot be reached, or the connection to it was lost (PostgreSQL):
    nothing of an interrupted write was kept, and trying again later may work."""


class SyncLocked(StoreError):
    """Another sync holds this store."""


# ---------------------------------------------------------------- the upstream


class UpstreamError(TxaggError):
    """The upstream cannot be read (down past the retry bound, or it rejects our requests)."""


class TransientError(Exception):
    """A failure worth retrying: 5xx, timeout, reset, truncated, oversized or non-JSON body."""


class Unreachable(TransientError):
    """No answer at all: the connection was refused or reset, or the request timed out.

    ``reason`` says it briefly ("connection refused"), for the line each retry writes."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Throttled(TransientError):
    def __init__(self, retry_after: float):
        super().__init__(f"429 Too Many Requests, retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class BodyError(ValueError):
    """The body cannot be read within the bounds: too large, or an unknown encoding."""


class BodyTooLarge(BodyError):
    pass


class BadUpstreamUrl(ValueError):
    """An upstream URL txagg cannot use: no scheme, a scheme other than http(s), no host."""


class NoUpstream(TxaggError):
    """No upstream given, and the store is bound to none yet."""

    def __init__(self) -> None:
        super().__init__("no upstream: pass --api-url URL (or set TXAGG_API_URL)")


class OtherUpstream(TxaggError):
    """An upstream other than the one the store is bound to."""

    def __init__(self, store: object, bound: str, given: str):
        super().__init__(
            f"the store {store} belongs to the upstream {bound}, not {given}: "
            f"leave out --api-url to use its own, or move it on purpose with "
            f"'txagg sync --rebind --api-url {given}'"
        )
        self.bound = bound
        self.given = given


class SyncStopped(Exception):
    """A stop was requested (SIGTERM / SIGINT in --follow)."""


class RequestLimitReached(Exception):
    """--max-requests is spent."""


# ---------------------------------------------------------------- records and answers


class InvalidRecord(ValueError):
    """A record that breaks the transaction schema; ``reason`` says how."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownUser(TxaggError, LookupError):
    def __init__(self, user_id: str):
        super().__init__(f"no such user: {user_id}")
        self.user_id = user_id


class NothingSynced(TxaggError):
    """The store was never synced: it holds no sync position and no transaction."""

    def __init__(self) -> None:
        super().__init__("nothing synced yet: run txagg sync first")


class Unhealthy(TxaggError):
    """``status --check``: the store is behind its freshness promise, has discrepancies
    recorded, or its last run failed or ended early; ``problems`` says which."""

    def __init__(self, problems: list[str]):
        super().__init__("unhealthy: " + "; ".join(problems))
        self.problems = problems


class ReversedRange(ValueError):
    """``since`` was given later than ``until``."""


class BadRequest(ValueError):
    """A query parameter the API cannot take; the message says which and why."""


def exit_code(error: BaseException) -> int:
    """The command line's exit code for an exception the core raised."""
    if isinstance(error, SyncLocked):
        return EXIT_LOCKED
    if isinstance(error, UnknownUser):
        return EXIT_NO_SUCH_USER
    if isinstance(error, (ReversedRange, BadRequest, BadUpstreamUrl, NoUpstream, OtherUpstream)):
        return EXIT_USAGE
    if isinstance(error, Unhealthy):
        return EXIT_UNHEALTHY
    if isinstance(error, RequestLimitReached):
        return EXIT_INCOMPLETE
    if isinstance(error, (SyncStopped, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE

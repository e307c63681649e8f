"""What a store remembers of how it is synced: the upstream it belongs to and the rate budget.

A store holds one upstream's transactions, so it belongs to that upstream. The first sync that
gets an answer records the upstream's URL, normalised (``normalise_url``), in the store's sync
state; from then on ``sync``, ``verify`` and ``serve --follow`` use it when given no
``--api-url``, and refuse another URL (``OtherUpstream``) unless ``sync --rebind`` moves the store
on purpose. There is no default upstream: with neither a URL nor a recorded one, ``NoUpstream``.

The budget (``--rate-limit`` / ``--per``) is the upstream's, shared by every process on the
store, so it is remembered with the upstream: a sync records the budget it ran with, and
commands not told one use it (``status`` reports it) instead of the default.

A failed run is remembered too (``last_run`` with its ``error``), for ``status --check``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlsplit

from .errors import BadUpstreamUrl, NoUpstream, OtherUpstream
from .models import format_instant
from .options import SyncOptions, SyncSummary
from .settings import PER_SECONDS, RATE_LIMIT
from .store import Store

UPSTREAM = "upstream"  # the sync state value holding the store's upstream
BUDGET = "budget"  # ... and the budget it was synced with: {"rateLimit": N, "per": SECONDS}
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_url(url: str) -> str:
    """The upstream's identity: scheme, host, port and path, the scheme and host lower-cased,
    a default port left out, no trailing slash (credentials, query and fragment are not part
    of it). BadUpstreamUrl for what is not an http(s) URL with a host."""
    text = url.strip()
    shown = repr(text[:200])
    if "://" not in text:
        raise BadUpstreamUrl(f"{shown} has no scheme: write http://HOST[:PORT] or https://...")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise BadUpstreamUrl(f"{shown} is not a URL ({error})") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise BadUpstreamUrl(f"{shown}: the scheme must be http or https, not {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise BadUpstreamUrl(f"{shown} has no host")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = host if port is None or port == DEFAULT_PORTS[parts.scheme] else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def bound_upstream(store: Store | None) -> str | None:
    """The upstream the store belongs to; None before its first sync (or without a store)."""
    return None if store is None else store.state_value(UPSTREAM)


def choose_upstream(store: Store | None, api_url: str | None, *, rebind: bool = False) -> str:
    """The URL to read: ``api_url`` when given (and it is the store's upstream, unless
    ``rebind``), else the store's own. Raises BadUpstreamUrl, NoUpstream or OtherUpstream, all
    before any request."""
    bound = bound_upstream(store)
    if api_url is None:
        if bound is None:
            raise NoUpstream()
        return bound
    given = normalise_url(api_url)
    if bound is not None and given != bound and not rebind:
        assert store is not None
        raise OtherUpstream(store.path, bound, given)
    return api_url.strip().rstrip("/")


def remembered_budget(store: Store | None) -> tuple[int, float]:
    """The budget the store was last synced with; the defaults before that."""
    budget = None if store is None else store.state_value(BUDGET)
    if not isinstance(budget, dict):
        return RATE_LIMIT, PER_SECONDS
    return budget.get("rateLimit", RATE_LIMIT), budget.get("per", PER_SECONDS)


def budget_for(store: Store | None, rate: int | None, per: float | None) -> tuple[int, float]:
    """The budget to work with: what was given, the rest as the store remembers it."""
    kept_rate, kept_per = remembered_budget(store)
    return (kept_rate if rate is None else rate), (kept_per if per is None else per)


def has_cursor(store: Store | None) -> bool:
    """Whether sync has started reading this store (``--since`` no longer applies)."""
    return store is not None and store.state_value("window_start") is not None


def options_for(
    store: Store | None,
    api_url: str | None,
    settings: dict,
    *,
    rebind: bool = False,
    since: int | None = None,
) -> tuple[SyncOptions, list[str]]:
    """SyncOptions for a run on ``store`` (None: no store there yet) and the warnings to show.

    ``settings`` are SyncOptions fields from the command line, ``rate_limit`` and ``per`` None
    when not given (the store's are used). A ``since`` given for a store that already has a
    cursor is ignored, with a warning."""
    url = choose_upstream(store, api_url, rebind=rebind)
    warnings = []
    if since is not None and has_cursor(store):
        assert store is not None
        position = store.state_value("position")
        where = "" if position is None else f" (at {format_instant(position)})"
        warnings.append(
            f"--since no longer applies: the store already has a sync position{where}; ignored"
        )
        since = None
    rate, per = budget_for(store, settings.get("rate_limit"), settings.get("per"))
    given = {name: value for name, value in settings.items() if name not in ("rate_limit", "per")}
    options = SyncOptions(api_url=url, rate_limit=rate, per=per, **given)
    if since is not None:
        options = replace(options, since=since)
    return options, warnings


def recorder(
    store: Store,
    options: SyncOptions,
    on_page: Callable[[SyncSummary], None] | None = None,
) -> Callable[[SyncSummary], None]:
    """An ``on_page`` for a sync: at its first answer it records the upstream (the store now
    belongs to it) and the budget, then passes every page on to ``on_page``."""
    upstream = normalise_url(options.api_url)
    budget = {"rateLimit": options.rate_limit, "per": options.per}
    recorded = False

    def on_each_page(summary: SyncSummary) -> None:
        nonlocal recorded
        if not recorded:
            recorded = True
            state = store.state()
            if state.get(UPSTREAM) != upstream or state.get(BUDGET) != budget:
                store.put_state(**{UPSTREAM: upstream, BUDGET: budget})
        if on_page is not None:
            on_page(summary)

    return on_each_page


def record_failure(store: Store, message: str, now: float | None = None) -> None:
    """Remember that a run failed, and why, for ``status`` (``lastRun.error``) and
    ``status --check``. The next run that gets through replaces it."""
    now = time.time() if now is None else now
    store.put_state(
        last_run={"at": format_instant(int(now * 1000)), "complete": False, "error": message}
    )

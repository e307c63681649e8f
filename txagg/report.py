"""The answers txagg gives, as plain data shared by the CLI and the HTTP API.

Money leaves here as exact Decimals; ``models.dumps`` writes them as JSON numbers.
"""

from __future__ import annotations

import time
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext

from .errors import NothingSynced, Unhealthy, UnknownUser  # noqa: F401 (re-exported)
from .models import cents_to_decimal, format_instant, format_timestamp
from .settings import (  # noqa: F401 (DEFAULT_EUR_PER_SCR, STALE_AFTER_SECONDS re-exported)
    CHECK_EVERY,
    DEFAULT_EUR_PER_SCR,
    LOAD_WINDOW_MS,
    MAX_EUR_PER_SCR,
    MAX_RATE_DIGITS,
    PAGE_SIZE,
    STALE_AFTER_SECONDS,
)
from .store import Store

CENT = Decimal("0.01")


def as_of_ms(store: Store) -> int | None:
    """The instant up to which the store is known complete (None before the first sync)."""
    return store.state_value("as_of")


def _as_of_text(store: Store) -> str | None:
    as_of = as_of_ms(store)
    return None if as_of is None else format_instant(as_of)


# Exact for every total (at most 19 digits of cents) times every accepted rate.
_EXACT = Context(prec=80, Emax=10**6, Emin=-(10**6))


def parse_eur_rate(text: str) -> Decimal:
    """The EUR per SCR rate: a positive decimal up to MAX_EUR_PER_SCR with at most
    MAX_RATE_DIGITS significant digits; ValueError saying what is wrong otherwise."""
    try:
        rate = Decimal(text.strip()) if isinstance(text, str) and len(text) <= 64 else None
    except InvalidOperation:
        rate = None
    if rate is None or not rate.is_finite() or rate <= 0:
        raise ValueError(f"not a positive number: {text[:64]!r}")
    if rate > MAX_EUR_PER_SCR or len(rate.as_tuple().digits) > MAX_RATE_DIGITS:
        raise ValueError(
            f"{text!r} is out of range: at most {MAX_EUR_PER_SCR} with {MAX_RATE_DIGITS} digits"
        )
    return rate


def to_eur(payout_cents: int, eur_per_scr: Decimal = DEFAULT_EUR_PER_SCR) -> Decimal:
    with localcontext(_EXACT):
        exact = cents_to_decimal(payout_cents) * eur_per_scr
        return exact.quantize(CENT, ROUND_HALF_EVEN).normalize()


def never_synced(store: Store) -> bool:
    """Whether the store was never synced: no sync position and no transaction."""
    return store.state_value("position") is None and not store.counters().get("transactions")


def user_report(store: Store, user_id: str, eur_per_scr: Decimal = DEFAULT_EUR_PER_SCR) -> dict:
    """One user's aggregates, the body of ``report --json`` and ``GET /users/{id}``.

    UnknownUser when the user has no transaction; NothingSynced when the store has none at
    all and was never synced (every user would be unknown: the store is what is missing)."""
    totals = store.user_totals(user_id)
    if totals is None:
        if never_synced(store):
            raise NothingSynced()
        raise UnknownUser(user_id)
    return {
        "userId": totals.user_id,
        "balance": cents_to_decimal(totals.earned - totals.spent - totals.payout),
        "earned": cents_to_decimal(totals.earned),
        "spent": cents_to_decimal(totals.spent),
        "payout": cents_to_decimal(totals.payout),
        "paidOut": to_eur(totals.payout, eur_per_scr),
        "transactions": totals.tx_count,
        "lastTransactionAt": format_timestamp(totals.last_tx_at),
        "asOf": _as_of_text(store),
    }


def payouts_report(
    store: Store,
    *,
    since: int | None = None,
    until: int | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> dict:
    """The requested payouts per user, ordered by user id (the body of ``payouts --json``)."""
    rows = store.payouts(since=since, until=until, after=after, limit=limit)
    return {
        "items": [
            {"userId": user_id, "amount": cents_to_decimal(amount), "count": count}
            for user_id, amount, count in rows
        ],
        "asOf": _as_of_text(store),
    }


def status_report(
    store: Store, *, rate: int | None = None, per: float | None = None, now: float | None = None
) -> dict:
    """Where sync stands: the upstream, position, lag, counts, quarantine, conflicts and the
    rate budget (``rate`` / ``per`` when given, else the one the store was synced with)."""
    # Here, not at the top: ``report USER --json``'s fast path imports this module.
    from .binding import bound_upstream, budget_for

    now = time.time() if now is None else now
    rate, per = budget_for(store, rate, per)
    state = store.state()
    counters = store.counters()
    as_of = state.get("as_of")
    lag = None if as_of is None else max(0, int(now - as_of / 1000))
    budget = store.budget(rate, per, now)
    last_run = state.get("last_run") or {}
    return {
        "store": str(store.path),
        "upstream": bound_upstream(store),
        "position": _instant(state.get("position")),
        "asOf": _instant(as_of),
        "lagSeconds": lag,
        "behind": lag is None or lag > STALE_AFTER_SECONDS,
        "window": {
            "start": _instant(state.get("window_start")),
            "nextPage": state.get("page"),
        },
        "transactions": counters.get("transactions", 0),
        "users": counters.get("users", 0),
        "quarantined": counters.get("quarantined", 0),
        "conflicts": counters.get("conflicts", 0),
        "verifiedUntil": _instant(state.get("verified_until")),
        "load": _load(store, as_of, rate, per),
        "discrepancies": state.get("discrepancies", []),
        "upstreamCounts": _counts_trust(state.get("counts_unreliable")),
        "lastCheck": state.get("last_check"),
        "lastRun": last_run,
        "rateBudget": {
            "limit": rate,
            "perSeconds": Decimal(str(per)),
            "tokensAvailable": Decimal(f"{budget['tokens']:.2f}"),
            "blockedForSeconds": Decimal(f"{budget['blockedFor']:.1f}"),
            "requests": counters.get("requests", 0),
            "throttled": counters.get("throttled", 0),
        },
        "leader": _leader(store.leadership()),
    }


def _leader(found: dict | None) -> dict | None:
    """The store's ``leadership`` as status shows it (None: a backend without one)."""
    if found is None:
        return None
    host, pid = _owner_parts(found["owner"])
    return {
        "owner": found["owner"],
        "host": host,
        "pid": pid,
        "epoch": found["epoch"],
        "leaseUntil": _instant(found["leaseUntilMs"]),
        "active": found["active"],
        "standbys": [
            {
                "owner": standby["owner"],
                **dict(zip(("host", "pid"), _owner_parts(standby["owner"]), strict=True)),
                "lastSeen": _instant(standby["lastSeenMs"]),
            }
            for standby in found["standbys"]
        ],
    }


def _owner_parts(owner: str | None) -> tuple[str | None, int | None]:
    """HOST:PID:TERM into (host, pid)."""
    if owner is None:
        return None, None
    host, _, rest = owner.rpartition(":")[0].rpartition(":")
    return (host, int(rest)) if rest.isdigit() else (owner, None)


def health_problems(status: dict) -> list[str]:
    """What ``status --check`` finds wrong in a ``status_report``: the store is behind its
    freshness promise (or never synced), has discrepancies recorded, or its last run failed or
    ended before catching up. Empty when healthy."""
    problems = []
    lag = status["lagSeconds"]
    if lag is None:
        problems.append("never synced")
    elif lag > STALE_AFTER_SECONDS:
        problems.append(f"{lag} s behind, more than the {STALE_AFTER_SECONDS} s promised")
    if count := len(status["discrepancies"]):
        what = "discrepancy" if count == 1 else "discrepancies"
        problems.append(f"{count} {what} recorded (a complete txagg verify settles them)")
    last_run = status["lastRun"]
    if last_run.get("error"):
        problems.append(f"the last run failed: {last_run['error']}")
    elif last_run.get("complete") is False:
        problems.append("the last run ended before catching up")
    return problems


def check_health(status: dict) -> None:
    """Raise Unhealthy naming every problem ``health_problems`` finds."""
    if problems := health_problems(status):
        raise Unhealthy(problems)


def _load(store: Store, as_of: int | None, rate: int, per: float) -> dict:
    """The upstream's recent load next to what the budget can read: where sync falls behind.

    The ceiling is every request a full page; the late-arrival checks (one every CHECK_EVERY
    seconds by default) come off it.
    """
    per_minute = 60 / per
    ceiling = int(rate * per_minute * PAGE_SIZE)
    sustainable = int(max(0.0, rate * per_minute - 60 / CHECK_EVERY) * PAGE_SIZE)
    recent = None
    if as_of is not None:
        recent = store.count_window(as_of - LOAD_WINDOW_MS, as_of)[1] * 60_000 // LOAD_WINDOW_MS
    return {
        "recentPerMinute": recent,
        "ceilingPerMinute": ceiling,
        "sustainablePerMinute": sustainable,
        "fallsBehind": recent is not None and recent > sustainable,
    }


def _counts_trust(distrust: dict | None) -> dict:
    """Whether the upstream's counts can be believed; when not, since when, why, and when
    they are next chased (checks meanwhile cost one count request each)."""
    if distrust is None:
        return {"reliable": True}
    return {
        "reliable": False,
        "since": distrust["since"],
        "why": distrust["why"],
        "nextRepair": distrust["retryAt"],
    }


def _instant(ms: int | None) -> str | None:
    return None if ms is None else format_instant(ms)

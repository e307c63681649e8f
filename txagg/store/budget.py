"""The shared rate budget's arithmetic, the same for every backend: a token bucket that holds
at most ``rate`` tokens and refills at ``rate / per`` a second, and a 429's block. The backends
keep one row (tokens, updated_at, blocked_until) and read and write it in a transaction; what
happens to it is decided here."""

from __future__ import annotations

from ..settings import MAX_BLOCK_SECONDS, TOKEN_MARGIN

Row = tuple[float, float, float]  # tokens, updated_at, blocked_until (seconds since the epoch)


def refill(row: Row | None, rate: int, per: float, now: float) -> tuple[float, float]:
    """The tokens in the bucket at ``now`` and the block's end, capped at MAX_BLOCK_SECONDS."""
    tokens, updated_at, blocked_until = row if row else (float(rate), now, 0.0)
    tokens = min(float(rate), tokens + max(0.0, now - updated_at) * rate / per)
    return tokens, min(blocked_until, now + MAX_BLOCK_SECONDS)


def take(row: Row | None, rate: int, per: float, now: float) -> tuple[Row, float, bool]:
    """Take one token: (the row to write, seconds to wait (0.0: taken), whether a block is why).
    Once drained, a token is handed out only when 1 + TOKEN_MARGIN have refilled."""
    tokens, blocked_until = refill(row, rate, per, now)
    blocked = blocked_until > now
    if blocked:
        wait = blocked_until - now
    elif tokens >= 1.0 + TOKEN_MARGIN:
        tokens -= 1.0
        wait = 0.0
    else:
        wait = (1.0 + TOKEN_MARGIN - tokens) * per / rate
    return (tokens, now, blocked_until), wait, blocked


def standing(row: Row | None, rate: int, per: float, now: float) -> dict[str, float]:
    """The budget as it stands, without taking any: {"tokens", "blockedFor"} (seconds)."""
    tokens, blocked_until = refill(row, rate, per, now)
    return {"tokens": tokens, "blockedFor": max(0.0, blocked_until - now)}

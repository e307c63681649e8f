"""The token bucket that guards ``/transactions``, and its RateLimit headers."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketState:
    allowed: bool
    remaining: int  # whole tokens left after this request
    retry_after: int  # whole seconds until one token is back (0 when allowed)
    reset: int  # whole seconds until the bucket is full again


class TokenBucket:
    """``capacity`` requests per ``per`` seconds, refilled continuously. Thread-safe."""

    def __init__(self, capacity: int, per: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.per = per
        self.rate = capacity / per  # tokens a second
        self.clock = clock
        self._tokens = float(capacity)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> BucketState:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            allowed = self._tokens >= 1
            if allowed:
                self._tokens -= 1
            retry_after = 0 if allowed else max(1, self._seconds_to_refill(1 - self._tokens))
            reset = self._seconds_to_refill(self.capacity - self._tokens)
            return BucketState(allowed, math.floor(self._tokens), retry_after, reset)

    def _seconds_to_refill(self, tokens: float) -> int:
        # Rounded up, but float noise (30.000000000000004) is no reason for an extra second.
        return math.ceil(round(tokens * self.per / self.capacity, 6))

    def headers(self, state: BucketState) -> dict[str, str]:
        """The IETF httpapi RateLimit headers (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Policy": f'"default";q={self.capacity};w={math.ceil(self.per)}',
            "RateLimit": f'"default";r={state.remaining};t={state.reset}',
        }

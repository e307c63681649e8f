"""``MockConfig``: every option of ``txagg mock-serve``, as plain, printable data.

With ``time_scale`` N the mock's time runs N times faster than the wall clock: the options that
say how often or how long things happen while it runs are in mock time, and the ``real_*``
properties and ``fault_settings`` turn them into the wall-clock values the mock runs on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..settings import MAX_TIME_SCALE
from .faults import Faults, parse_faults

MAX_USERS = 500_000  # 6-digit ids: beyond half of them, drawing unique ones gets slow


@dataclass
class MockConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port
    seed: int = 1
    users: int = 100
    history: int = 1000  # transactions already in the past at start
    history_span: float = 86400.0  # seconds of past that the history covers, ending at start
    tx_per_minute: float = 0.0  # new transactions arriving while it runs
    rate_limit: int = 5  # token bucket: rate_limit requests ...
    per: float = 60.0  # ... per `per` seconds (capacity = rate_limit)
    late_ratio: float = 0.0  # share of live transactions that become visible late
    late_max: float = 0.0  # how late at most (seconds): createdAt = visible_at - U(0, late_max)
    invalid_ratio: float = 0.0  # share of extra invalid records mixed into /transactions
    start: int | None = None  # the clock anchor in ms since epoch; None = now
    faults: str = ""  # the --faults spec (see Faults); late= and invalid= set the options above
    live_for: float | None = None  # seconds after start when live traffic (and drift) stops
    time_scale: float = 1.0  # the mock's time runs this many times faster than the clock
    access_log: bool = False  # one log line per request (txagg.access)

    def __post_init__(self) -> None:
        self._apply_fault_aliases(parse_faults(self.faults))
        checks = [
            (time_scale_holds(self.time_scale), f"time_scale {TIME_SCALE_RULE}"),
            (1 <= self.users <= MAX_USERS, f"users must be between 1 and {MAX_USERS}"),
            (self.history >= 0, "history must not be negative"),
            (self.history_span > 0, "history_span must be positive"),
            (self.tx_per_minute >= 0, "tx_per_minute must not be negative"),
            (self.rate_limit >= 1, "rate_limit must be at least 1"),
            (self.per > 0, "per must be positive"),
            (0 <= self.late_ratio <= 1, "late_ratio must be between 0 and 1"),
            (self.late_max >= 0, "late_max must not be negative"),
            (0 <= self.invalid_ratio <= 1, "invalid_ratio must be between 0 and 1"),
            (self.live_for is None or self.live_for >= 0, "live_for must not be negative"),
        ]
        for holds, message in checks:
            if not holds:
                raise ValueError(message)

    @property
    def fault_settings(self) -> Faults:
        """The --faults settings the mock runs on: durations in wall-clock seconds."""
        return scale_faults(parse_faults(self.faults), self.time_scale)

    # The options in wall-clock units: what happens while the mock runs, time_scale times as
    # often or as short. The past (history, history_span, start) is laid out as given.

    @property
    def real_tx_per_minute(self) -> float:
        return self.tx_per_minute * self.time_scale

    @property
    def real_per(self) -> float:
        return self.per / self.time_scale

    @property
    def real_late_max(self) -> float:
        return self.late_max / self.time_scale

    @property
    def real_live_for(self) -> float | None:
        return None if self.live_for is None else self.live_for / self.time_scale

    def _apply_fault_aliases(self, faults: Faults) -> None:
        """late=P:S and invalid=P are late_ratio/late_max and invalid_ratio under another name."""
        aliases = (
            ("late", ("late_ratio", "late_max"), (faults.late, faults.late_seconds)),
            ("invalid", ("invalid_ratio",), (faults.invalid,)),
        )
        for kind, names, values in aliases:
            if not values[0]:
                continue
            current = tuple(getattr(self, name) for name in names)
            # Equal values are fine: dataclasses.replace() runs this again on the result.
            if any(current) and current != values:
                raise ValueError(f"faults {kind}= contradicts {'/'.join(names)}: give it once")
            for name, value in zip(names, values, strict=True):
                setattr(self, name, value)


TIME_SCALE_RULE = f"must be above 0 and at most {MAX_TIME_SCALE:g}"


def time_scale_holds(value: float) -> bool:
    return math.isfinite(value) and 0 < value <= MAX_TIME_SCALE


def check_time_scale(value: float) -> float:
    """``value`` if it is a valid time scale, else ValueError saying what is allowed."""
    if not time_scale_holds(value):
        raise ValueError(f"{TIME_SCALE_RULE}, got {value:g}")
    return value


def scale_faults(faults: Faults, time_scale: float) -> Faults:
    """The timed faults' SECONDS divided by time_scale; throttle's stays a whole number of at
    least 1 (Retry-After cannot say less), rounded to the nearest."""
    if time_scale == 1:
        return faults
    return dataclasses.replace(
        faults,
        slow_seconds=faults.slow_seconds / time_scale,
        late_seconds=faults.late_seconds / time_scale,
        throttle_seconds=(
            float(max(1, round(faults.throttle_seconds / time_scale)))
            if faults.throttle_seconds
            else 0.0
        ),
    )

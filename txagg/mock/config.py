"""``MockConfig``: every option of ``txagg mock-serve``, as plain, printable data."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        self._apply_fault_aliases(parse_faults(self.faults))
        checks = [
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
        return parse_faults(self.faults)

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

"""The mock's upstream faults: the ``--faults`` spec, per-request decisions, faulty pages.

``Faults`` parses and prints the spec; ``FaultInjector`` draws each ``/transactions`` request's
faults from a generator of its own (seeded from the seed alone, so faults never change the data),
counts what was injected for ``GET /faults``, and shapes a faulty page (duplicates, outside items,
lying ``meta``). docs/mock.md says what each kind does.
"""

from __future__ import annotations

import functools
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

# The fault kinds live in settings, so that ``shapes`` builds the shape of /faults from them
# without importing the mock.
from ..settings import FAULT_KINDS, TIMED_FAULTS
from .records import render_page

# ---------------------------------------------------------------- faults: the spec

MAX_FAULT_SECONDS = 3600.0  # an hour of sleep or Retry-After is a typo, not a test


@dataclass(frozen=True)
class Faults:
    """The parsed ``--faults`` spec: a probability (0..1) per kind, a duration for three of them.

    Syntax: comma-separated ``name=P`` or, for slow, late and throttle, ``name=P:SECONDS``, e.g.
    ``error=0.1,truncate=0.05,slow=0.02:3,late=0.2:90,meta=0.1,throttle=0.05:2``. Each kind at
    most once; the empty spec means no faults. docs/mock.md says what each kind does.
    """

    error: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    nonjson: float = 0.0
    slow: float = 0.0
    late: float = 0.0
    drift: float = 0.0
    duplicate: float = 0.0
    outside: float = 0.0
    meta: float = 0.0
    invalid: float = 0.0
    conflict: float = 0.0
    throttle: float = 0.0
    slow_seconds: float = 0.0
    late_seconds: float = 0.0
    throttle_seconds: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """ValueError, saying which entry is wrong and how to write it, on a bad spec."""
        values: dict[str, float] = {}
        for entry in (part.strip() for part in spec.split(",")):
            if not entry:
                continue
            name, probability, seconds = _parse_fault(entry)
            if name in values:
                raise ValueError(f"--faults: {name} is given twice")
            values[name] = probability
            if seconds is not None:
                values[f"{name}_seconds"] = seconds
        return cls(**values)

    def spec(self) -> str:
        """The canonical spec text: the kinds that are on, in FAULT_KINDS order."""
        return ",".join(
            f"{kind}={_number_text(setting['probability'])}"
            + (f":{_number_text(setting['seconds'])}" if "seconds" in setting else "")
            for kind, setting in self.settings().items()
            if setting["probability"]
        )

    def settings(self) -> dict[str, dict[str, float]]:
        """Every kind with its probability, and its seconds for the timed ones (for /faults)."""
        return {
            kind: {"probability": getattr(self, kind)}
            | ({"seconds": getattr(self, f"{kind}_seconds")} if kind in TIMED_FAULTS else {})
            for kind in FAULT_KINDS
        }


def _number_text(value: float) -> str:
    return f"{value:g}"


def _fault_usage(name: str) -> str:
    return f"{name}=P:SECONDS (e.g. {name}=0.05:2)" if name in TIMED_FAULTS else f"{name}=P"


def _parse_fault(entry: str) -> tuple[str, float, float | None]:
    """One ``name=P[:SECONDS]`` entry as (name, probability, seconds or None)."""
    name, equals, value = (part.strip() for part in entry.partition("="))
    if name not in FAULT_KINDS:
        raise ValueError(f"--faults: unknown fault {name!r}; known: {', '.join(FAULT_KINDS)}")
    probability_text, colon, seconds_text = value.partition(":")
    if not equals or not probability_text:
        raise ValueError(f"--faults: {name} needs a probability: {_fault_usage(name)}")
    if (name in TIMED_FAULTS) != bool(colon):
        needs = "needs a duration" if name in TIMED_FAULTS else "takes no duration"
        raise ValueError(f"--faults: {name} {needs}: {_fault_usage(name)}")
    probability = _fault_number(name, probability_text)
    if not 0 <= probability <= 1:
        raise ValueError(f"--faults: {name}={value}: P must be between 0 and 1")
    if not colon:
        return name, probability, None
    seconds = _fault_number(name, seconds_text)
    if not 0 <= seconds <= MAX_FAULT_SECONDS:
        raise ValueError(f"--faults: {name}={value}: SECONDS must be between 0 and 3600")
    if name == "throttle" and (seconds < 1 or not seconds.is_integer()):
        # Retry-After carries whole seconds (delta-seconds or an HTTP-date).
        raise ValueError(f"--faults: {name}={value}: SECONDS must be a whole number, at least 1")
    return name, probability, seconds


def _fault_number(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"--faults: {name}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"--faults: {name}: {text!r} is not a finite number")
    return number


@functools.lru_cache(maxsize=64)
def parse_faults(spec: str) -> Faults:
    """Faults.parse, cached: MockConfig keeps only the text, so it stays plain, printable data."""
    return Faults.parse(spec)


# ---------------------------------------------------------------- faults: per request

# Drawn once per /transactions request, in this order, whatever the settings: the n-th request
# gets the same decisions for the same seed however big the pages before it were.
REQUEST_FAULTS = (
    "throttle", "error", "reset", "nonjson", "truncate", "slow", "drift", "outside", "meta",
)  # fmt: skip
# These replace the answer; when several fire, the first in this order wins.
ANSWER_FAULTS = ("throttle", "error", "reset", "nonjson", "truncate")
CARRY_MEMORY = 1024  # windows whose next page still owes a duplicate
CONFLICT_DELAY_MS = 5000  # a conflicting version comes up to this much after its original
BAD_GATEWAY_HTML = "<html>bad gateway</html>"


@dataclass(frozen=True)
class RequestFaults:
    """What one /transactions request gets. ``rng`` draws everything else for this request."""

    answer: str | None  # one of ANSWER_FAULTS, or None for a page
    slow: bool
    drift: bool
    outside: bool
    meta: bool
    window: tuple  # (startDate, endDate as asked, limit): which pages belong together
    page: int
    rng: random.Random


class FaultInjector:
    """Decides the faults of each /transactions request and counts every fault injected.

    Its generator is seeded from the seed alone and is not the data's, so faults never change
    the data. Thread-safe.
    """

    def __init__(self, faults: Faults, seed: int):
        self.faults = faults
        self._rng = random.Random(f"txagg-mock-faults:{seed}")
        self._lock = threading.Lock()
        self._per_request = faults.duplicate > 0 or any(
            getattr(faults, kind) for kind in REQUEST_FAULTS
        )
        self.requests = 0
        self.injected = dict.fromkeys(FAULT_KINDS, 0)
        self._carried: OrderedDict[tuple, str] = OrderedDict()

    def decide(self, window: tuple, page: int) -> RequestFaults | None:
        """This request's faults; None (the fast path) when no per-request fault is on."""
        with self._lock:
            self.requests += 1
            if not self._per_request:
                return None
            rolls = {
                kind: self._rng.random() < getattr(self.faults, kind) for kind in REQUEST_FAULTS
            }
            request_rng = random.Random(self._rng.getrandbits(64))
        answer = next((kind for kind in ANSWER_FAULTS if rolls[kind]), None)
        return RequestFaults(
            answer, rolls["slow"], rolls["drift"], rolls["outside"], rolls["meta"],
            window, page, request_rng,
        )  # fmt: skip

    def count(self, kind: str, times: int = 1) -> int:
        """Record an injected fault; returns how many of that kind so far."""
        with self._lock:
            self.injected[kind] += times
            return self.injected[kind]

    def report(self, data_counts: Mapping[str, int], late_arrivals: list[dict]) -> dict:
        """The body of GET /faults."""
        with self._lock:
            injected = {**self.injected, **data_counts}
            requests = self.requests
        return {
            "spec": self.faults.spec(),
            "settings": self.faults.settings(),
            "requests": requests,
            "injected": {kind: injected[kind] for kind in FAULT_KINDS},
            "lateArrivals": late_arrivals,
        }

    # ------------------------------------------------------------ shaping a page

    def shape_page(
        self, items: list[str], outside: list[str], meta: dict, plan: RequestFaults
    ) -> bytes:
        """The page with this request's duplicates, outside items and lies, as the body."""
        carried = self._take_carried(plan)
        shaped = carried + self._duplicate(items, plan)
        for text in outside:
            shaped.insert(plan.rng.randint(0, len(shaped)), text)
        meta = {**meta, "itemCount": len(shaped)}
        if plan.meta:
            meta = lying_meta(meta, plan.rng)
            self.count("meta")
        return render_page(shaped, meta)

    def _duplicate(self, items: list[str], plan: RequestFaults) -> list[str]:
        """Each item again with probability P: later in this page, or first on the next page."""
        probability = self.faults.duplicate
        if not probability:
            return items
        rng = plan.rng
        copies: list[tuple[int, str]] = []  # (position in items to insert before, text)
        carry: str | None = None
        for position, text in enumerate(items):
            if rng.random() >= probability:
                continue
            if carry is None and rng.random() < 0.5:
                carry = text  # one per page is enough to show the next page a repeat
            else:
                copies.append((rng.randint(position + 1, len(items)), text))
        shaped = list(items)
        # From the back, so the positions still to do keep meaning what they meant.
        for position, text in sorted(copies, key=lambda copy: copy[0], reverse=True):
            shaped.insert(position, text)
        if copies:
            self.count("duplicate", len(copies))
        if carry is not None:
            self._remember_carry((*plan.window, plan.page + 1), carry)
        return shaped

    def _remember_carry(self, key: tuple, text: str) -> None:
        with self._lock:
            self._carried[key] = text
            self._carried.move_to_end(key)
            while len(self._carried) > CARRY_MEMORY:
                self._carried.popitem(last=False)

    def _take_carried(self, plan: RequestFaults) -> list[str]:
        with self._lock:
            text = self._carried.pop((*plan.window, plan.page), None)
        if text is None:
            return []
        self.count("duplicate")
        return [text]


def lying_meta(meta: dict, rng: random.Random) -> dict:
    """meta with one to three of totalItems, totalPages, itemCount wrong (still counts >= 0)."""
    names = [name for name in ("totalItems", "totalPages", "itemCount") if rng.random() < 0.5]
    lied = dict(meta)
    for name in names or ["totalItems"]:
        true = meta[name]
        wrong = rng.randint(0, 2 * true + 10)
        lied[name] = wrong if wrong != true else true + 1
    return lied

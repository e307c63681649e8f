"""Late arrivals and repairs: compare windows of the store with the upstream's counts, search
what is short with page probes (or by counting halves), re-read small windows, and tell counts
that lie from records that are missing. Used by sync's checks and by ``txagg verify``."""

from __future__ import annotations

import math
from collections.abc import Callable

from .errors import InvalidRecord
from .models import dates_inside, format_instant, parse_created_at, raw_text
from .options import SyncSummary
from .settings import LATE_AGES_NEEDED, MAX_DISCREPANCIES, REREAD_WAIT_TOKENS
from .store import Store
from .upstream import Page, Upstream

COUNT = "count"  # a window to search by counting its halves (see Reconciler._repair)


class Reconciler:
    """Compares windows of the store with the upstream's counts and re-reads what is short.

    A check's one request gives the upstream's count for a window and one page of it. A
    shortfall is searched with page probes (``probe``), each telling on which side of its page
    the missing records lie, down to one page; where a probe cannot tell, by counting halves.
    ``budget`` (a one-item list, shared by the search) bounds the requests, so an upstream whose
    ``meta`` lies costs a fixed amount; what stays unexplained is recorded as a discrepancy for
    ``status``.
    """

    def __init__(self, store: Store, upstream: Upstream, summary: SyncSummary, page_size: int):
        self.store = store
        self.upstream = upstream
        self.summary = summary
        self.page_size = page_size
        self.found: list[dict] = []  # the discrepancies recorded by this reconciler
        self.unreliable: str | None = None  # why the upstream's counts proved wrong, if they did
        # Asked before each repair step: False defers the rest of a repair to a later check
        # (sync uses it to keep its reads fresh while a repair waits for tokens).
        self.may_spend: Callable[[], bool] = lambda: True
        # How many requests a repair may send now without waiting: a re-read is started only
        # when it can finish with at most REREAD_WAIT_TOKENS more (a re-read cut short is read
        # again from its first page), and once started it only stops for ``may_go_on``.
        self.spendable: Callable[[], float] = lambda: math.inf
        self.may_go_on: Callable[[], bool] = lambda: True
        self.deferred = False
        self.pending: list[list[int]] = []
        self.arrived: list[int] = []  # createdAt of each record the reconciler stored
        self.likely: list[int] = []  # instants where late arrivals were found before, sorted

    def reconcile(
        self,
        low: int,
        high: int,
        budget: list[int],
        *,
        chase: bool = True,
        pending: list[list[int]] | None = None,
        late_ages: list[int] | None = None,
    ) -> dict:
        """Count [low, high] upstream and repair a shortfall. With ``chase`` False (counts known
        to lie) a difference is only reported, never bisected or recorded again.

        A repair stopped by ``may_spend`` leaves its windows still to do in ``self.pending``;
        passed back as ``pending``, they are taken up where they stood, without counting
        [low, high] again. ``late_ages`` (ms before ``high``) are where missing records were
        found before: each probe looks first at the page where half of those inside its window
        lie (see ``_page_for``)."""
        self.unreliable = None
        self.deferred = False
        self.pending = []
        ages = late_ages or []
        self.likely = sorted(high - age for age in ages) if len(ages) >= LATE_AGES_NEEDED else []
        if pending and chase:
            self.pending = self._repair([list(window) for window in pending], budget)
            return {"window": [format_instant(low), format_instant(high)], "resumed": True}
        budget[0] -= 1
        before = self.store.count_window(low, high)[1]
        if chase:
            # The count comes with the middle page of the window: where the counts differ,
            # that page is the search's first probe (see ``probe``).
            page = self._page_for(low, high, before)
            answer = self._read(low, high, page, counting=True)
            total = answer.total
        else:
            total = self.count(low, high)
        open_, closed = self.store.count_window(low, high)
        found = {
            "window": [format_instant(low), format_instant(high)],
            "upstream": total,
            "stored": before,
        }
        if closed > before:
            found["repairedTo"] = closed  # late arrivals on the count's own page
        if total is not None and open_ <= total <= closed:
            return found
        if not chase:
            found["notChased"] = "the upstream's counts have proved unreliable"
            self.unreliable = "its counts still differ from what it serves"
        elif total is None:
            self.discrepancy(low, high, None, "the upstream gave no count", unreliable=True)
        elif total > closed:
            sides = self._sides(low, high, page, answer, total)
            self.pending = self._repair(list(reversed(sides)), budget)
            found["repairedTo"] = self.store.count_window(low, high)[1]
        else:
            self.discrepancy(
                low, high, total, "the upstream counts fewer than the store holds", unreliable=True
            )
        return found

    def count(self, start: int, end: int) -> int | None:
        """The upstream's count for [start, end]; whatever records the answer carries (an
        upstream may ignore ``limit``) are stored like any others."""
        answer = self.upstream.fetch(start, end, 1, 1)
        self._store(answer.items)
        return answer.total

    def _store(self, items: list) -> None:
        if items:
            ingested = self.store.ingest(items)
            self.summary.add_ingest(ingested)
            self.arrived.extend(ingested.new_created_at)

    def split_point(self, start: int, end: int, total: int) -> int | None:
        """Where to cut [start, end] in two, or None when it is small enough to read whole."""
        if total <= self.page_size:
            return None
        middle = self.store.clear_second(start + (end - start) // 2, floor=start, ceiling=end)
        return middle if start < middle < end else None

    def halves(
        self, start: int, middle: int, end: int, total: int, budget: list[int]
    ) -> list[tuple[int, int, int]] | None:
        """Count both halves of [start, end]; None (a discrepancy recorded) when they do not
        add up to the whole. A record the store does not know may sit exactly on the cut, left
        out of both halves by an upstream with exclusive bounds: so a second cut is tried one
        second earlier before the counts are called unreliable."""
        for _cut in range(2):
            if not self.may_spend():
                self.deferred = True
                return None
            if budget[0] < 2:
                self.discrepancy(start, end, total, "repair budget spent")
                return None
            budget[0] -= 2
            left, right = self.count(start, middle), self.count(middle, end)
            if left is None or right is None:
                self.discrepancy(start, end, total, "the upstream gave no count", unreliable=True)
                return None
            if left + right > total + max(2, total // 50):
                # Halves that hold more than the whole: no late arrival explains that much.
                self.discrepancy(
                    start,
                    end,
                    total,
                    "the upstream's halves count more than the whole",
                    unreliable=True,
                )
                return None
            if left + right + self.store.count_window(middle, middle)[1] >= total:
                return [(start, middle, left), (middle, end, right)]
            middle = self.store.clear_second(middle - 1000, floor=start, ceiling=end)
            if not start < middle < end:
                break
        self.discrepancy(start, end, total, "the upstream's counts do not add up", unreliable=True)
        return None

    def _repair(self, pending: list[list], budget: list[int]) -> list[list]:
        """Search and re-read the windows ``[start, end, upstream count(, how)]`` still short,
        oldest first; returns those left when ``may_spend`` says stop (none when done or the
        budget is out). A window is searched with page probes (``probe``) unless ``how`` is
        "count": then with a count of each half (``halves``), the way that needs no
        assumption about the upstream's order."""
        while pending:
            window = pending.pop()
            start, end, total = window[:3]
            if total <= self.store.count_window(start, end)[1]:
                continue
            if not self.may_spend():
                self.deferred = True
                return pending + [window]
            counted = len(window) > 3 and window[3] == COUNT
            middle = self.split_point(start, end, total)
            if middle is None or self._rereading_is_cheaper(start, end, total, budget):
                if not self.reread(start, end, total, budget):
                    return pending + [window]
                continue
            if not counted:
                if budget[0] < 1:
                    self.discrepancy(start, end, total, "repair budget spent")
                    continue
                pending.extend(reversed(self.probe(start, end, total, budget)))
                continue
            halves = self.halves(start, middle, end, total, budget)
            if halves is None:
                if self.deferred:
                    return pending + [window]
                continue
            for low, high, half in reversed(halves):
                if half > self.store.count_window(low, high)[1]:
                    pending.append([low, high, half, COUNT])
        return []

    def probe(self, start: int, end: int, total: int, budget: list[int]) -> list[list]:
        """Read the middle page of [start, end] and tell from it on which side of that page
        the missing records lie: one request, where a bisection step costs two counts.

        The upstream lists a window in createdAt order, so exactly ``(page - 1) * limit`` of its
        records come before the page (all dated at or before the page's first record) and the
        rest after it. Compared with what the store holds on each side, that says how many are
        missing there; the page itself is stored, so a record on it is found at once. The sides
        go back as windows to search, each with the count it should reach; their own probes
        then count them for real, so a wrong guess (records sharing a millisecond across the
        page's edge) costs a request, never a record: what the probes cannot place is
        searched by counting halves."""
        budget[0] -= 1
        page = self._page_for(start, end, total)
        answer = self._read(start, end, page)
        real = answer.total
        if real is None:
            self.discrepancy(start, end, None, "the upstream gave no count", unreliable=True)
            return []
        if real > total + max(2, total // 50):
            self.discrepancy(
                start,
                end,
                real,
                "the upstream counts more in a window than its parent",
                unreliable=True,
            )
            return []
        if real <= self.store.count_window(start, end)[1]:
            return []
        return self._sides(start, end, page, answer, real)

    def _page_for(self, start: int, end: int, records: int) -> int:
        """The page of [start, end] (``records`` long) to probe: the one that halves where the
        missing records likely are. That is half a guess from where late arrivals were found
        before (``likely``, those inside the window) and half a spread over all the records,
        so a probe never splits off much less than it would at the middle, even where the
        guess is wrong. Never the last page when it is partial: a probe reads a full page."""
        full_pages = max(1, records // self.page_size)
        inside = [moment for moment in self.likely if start < moment < end]
        if not inside or records <= self.page_size:
            return max(1, min(full_pages, (-(-records // self.page_size) + 1) // 2))
        ranks = sorted(self.store.count_window(start, moment)[1] for moment in inside)
        rank = _mixed_median(ranks, records)
        return min(full_pages, rank // self.page_size + 1)

    def _read(self, start: int, end: int, page: int, counting: bool = False) -> Page:
        """A page of [start, end], stored; ``counting``: read for its count (not a page read)."""
        answer = self.upstream.fetch(start, end, page, self.page_size)
        self._store(answer.items)
        self.summary.pages += not counting
        return answer

    def _sides(self, start: int, end: int, page: int, answer: Page, real: int) -> list[list]:
        """The windows on either side of a page of [start, end] that still miss records, each
        with the count it should reach; [start, end] to count by halves if they cannot be told."""
        if page == 1 and len(answer.items) < self.page_size:
            # The page held the whole window: nothing more to read, only to judge.
            self.summary.repairs += 1
            self._judge(start, end, real, *_keys_inside(answer.items, start, end))
            return []
        dated = sorted(dates_inside(answer.items, start, end))
        if not dated:
            return [[start, end, real, COUNT]]
        first, last = dated[0], dated[-1]
        ahead = (page - 1) * self.page_size
        behind = real - ahead - len(answer.items)
        held_ahead = self.store.count_window(start, first)[1] - dated.count(first)
        held_behind = self.store.count_window(last, end)[1] - dated.count(last)
        sides = []
        if ahead > held_ahead:
            cut = self.store.clear_second(first + 1000, floor=first, ceiling=end)
            if start < cut < end:
                sides.append(
                    [start, cut, self.store.count_window(start, cut)[1] + ahead - held_ahead]
                )
        if behind > held_behind:
            cut = self.store.clear_second(last, floor=start, ceiling=last + 1)
            if start < cut < end:
                sides.append(
                    [cut, end, self.store.count_window(cut, end)[1] + behind - held_behind]
                )
        return sides or [[start, end, real, COUNT]]

    def _rereading_is_cheaper(self, start: int, end: int, total: int, budget: list[int]) -> bool:
        """A probe finds one missing record in about log2(pages) requests, and often at once;
        many missing records in a few pages are found sooner by reading those pages again."""
        pages = -(-total // self.page_size)
        if pages > budget[0] or pages > self.spendable() + REREAD_WAIT_TOKENS:
            return False
        missing = total - self.store.count_window(start, end)[1]
        return pages <= missing

    def reread(self, start: int, end: int, total: int, budget: list[int]) -> bool:
        """Read a small window again; record a discrepancy only for what stays unexplained.

        A record whose createdAt is unusable has no place in any window of the store, so the
        store's count alone would always come up short where one stands. Having just been
        served ``total`` distinct records that may belong here (and stored every valid one),
        nothing in this window can be missing. Returns False when ``may_spend`` stopped it.
        """
        self.summary.repairs += 1
        served: set[str] = set()
        undated: set[str] = set()
        page = 1
        while budget[0] > 0:
            if not (self.may_spend() if page == 1 else self.may_go_on()):
                self.deferred = True
                return False
            budget[0] -= 1
            result = self.upstream.fetch(start, end, page, self.page_size)
            inside, no_date = _keys_inside(result.items, start, end)
            served.update(inside)
            undated.update(no_date)
            self._store(result.items)
            self.summary.pages += 1
            if len(result.items) < self.page_size:
                break
            page += 1
        self._judge(start, end, total, served, undated)
        return True

    def _judge(self, start: int, end: int, total: int, served: set, undated: set) -> None:
        """After reading all of [start, end]: a discrepancy for what stays unexplained."""
        stored = self.store.count_window(start, end)[1]
        if stored >= total:
            return
        if len(served) < total:
            self.discrepancy(start, end, total, "still short after re-reading", unreliable=True)
        elif undated and stored + len(undated) == total:
            # Explained by records whose createdAt is unusable: from now on they count in this
            # window, so later checks find it complete instead of bisecting down to it again.
            self.store.place_quarantined(sorted(undated), start)

    def discrepancy(
        self, start: int, end: int, total: int | None, why: str, *, unreliable: bool = False
    ) -> dict:
        if unreliable:
            self.unreliable = why
        self.summary.discrepancies += 1
        found = {
            "window": [format_instant(start), format_instant(end)],
            "upstream": total,
            "stored": self.store.count_window(start, end)[1],
            "why": why,
            "at": format_instant(self.upstream.now_ms()),
        }
        recorded = self.store.state_value("discrepancies", [])
        self.store.put_state(discrepancies=(recorded + [found])[-MAX_DISCREPANCIES:])
        self.found.append(found)
        return found


def _mixed_median(ranks: list[int], records: int) -> int:
    """The rank r in [0, records] where half of an even mixture of the uniform spread over the
    records and the sorted ``ranks`` lies below: 0.5 r / records + 0.5 #{ranks <= r} / k = 0.5."""
    k, previous = len(ranks), 0
    for index, at in enumerate(ranks):
        # Below ``at`` (and from ``previous``) the mixture is 0.5 r / records + 0.5 index / k.
        r = records * (1 - index / k)
        if r < at:
            return int(max(r, previous))
        previous = at
    return previous


def _keys_inside(items: list, start: int, end: int) -> tuple[set[str], set[str]]:
    """The distinct records of a page that may stand in [start, end] (those dated inside it and
    those whose date is unusable; ones returned from outside the window are left out), and
    among them the ones whose date is unusable, as the quarantine keeps their text."""
    keys, undated = set(), set()
    for item in items:
        try:
            moment = parse_created_at(item.get("createdAt") if isinstance(item, dict) else None)
        except InvalidRecord:
            moment = None
        if moment is None:
            undated.add(raw_text(item))
            keys.add(raw_text(item))
        elif start <= moment <= end:
            keys.add(raw_text(item))
    return keys, undated

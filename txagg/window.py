"""The read window's bookkeeping for sync: the cursor a page leaves (``next_cursor_after``)
and the arrival rate that paces polls and judges the load (``ArrivalRate``). Plain data in,
plain data out: ``sync.Syncer`` reads pages and commits what these say, with each page.
"""

from __future__ import annotations

from .store import IngestResult


class ArrivalRate:
    """New transactions a second: ``per_second`` smoothed over the last few polls (it paces
    them), and ``steady``, the load (it decides the window and what a search may borrow):
    what the store holds of the last LOAD_WINDOW_MS of the upstream's time, by createdAt, as
    status measures it (``Syncer._judge_load`` sets it after each poll). A poll that read a
    backlog, or little, moves ``per_second`` but not the load."""

    def __init__(self):
        self.per_second: float | None = None
        self.steady: float | None = None
        self._last: float | None = None

    def observe(self, arrived: int, now: float) -> None:
        if self._last is not None and now > self._last:
            sample = arrived / (now - self._last)
            self.per_second = sample if self.per_second is None else (self.per_second + sample) / 2
        self._last = now


def next_cursor_after(
    full: bool,
    start: int,
    page: int,
    as_of: int,
    end: int,
    items: int | None,
    starts: list,
    listing: list,
    ingested: IngestResult,
) -> dict:
    """The cursor after a page of [start, end]: the next page, or this page again next time.

    A short page of ``items`` records ends nothing: everything up to ``end`` has been read, and
    the next run asks for the same page of the same window with a later end (``page_held``
    records come back at its start). So the window stays open and its start stays about
    ``overlap`` behind, where a page that repeats more known records than it held shows a late
    arrival at once. ``items`` None closes the window instead (``Syncer._keeps_window_open``)."""
    if not full and items is None:
        # The window closes: the next one starts where everything is read.
        start, page, held, starts, as_of = end, 1, 0, [], max(as_of, end)
    elif not full:
        as_of = max(as_of, end)
        held = items
    else:
        # Pages come in createdAt order: everything before this page's latest second is read.
        if ingested.max_created_at is not None:
            as_of = max(as_of, min(end, ingested.max_created_at // 1000 * 1000))
        page, held = page + 1, 0
    return {
        "window_start": start,
        "page": page,
        "page_held": held,
        "page_starts": starts,
        "listing": listing,
        "position": as_of,
        "as_of": as_of,
    }

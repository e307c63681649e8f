"""One active syncer among many on a shared store (PostgreSQL): ``sync --follow`` leads while
it holds the store's sync lease and stands by while another process does (see
docs/postgres.md, "One active syncer, fenced").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .models import format_instant
from .options import SyncOptions, SyncSummary
from .store import Store, StoreError, StoreUnreachable, SyncLocked
from .sync import Syncer

log = logging.getLogger("txagg.sync")


def lead_or_stand_by(store: Store, options: SyncOptions, **kwargs) -> SyncSummary:
    """Follow while this process holds the store's sync lease; stand by while another does.

    Standing by, it asks for the lease every ``retry`` seconds (a tenth of ``options.lease``),
    records itself in the store (``standby_seen``, for status) and says who leads each time the
    leader or its epoch changes. Leading, a write that finds the lease lost (SyncLocked: this
    process was paused or cut off past its lease and another took over) or a connection lost
    to the database ends the term: nothing more is written, and it stands by again. Returns
    when ``stop`` is set: the summary of every term led, added up (an empty one if none)."""
    from .store.postgres_lease import owner_id

    stop = kwargs.get("stop") or threading.Event()
    kwargs["stop"] = stop
    timings = store.lease_timings(options.lease)
    me = owner_id()
    summary = SyncSummary()
    said: tuple | None = None
    while not stop.is_set():
        leading = False
        try:
            with store.lock("sync", lease=options.lease):
                leading = True
                said = None
                _quietly(store.standby_gone, me)
                leader = store.leadership()
                log.info(
                    "leading: epoch %s, lease %g s (renewed every %g s)",
                    leader["epoch"],
                    timings.ttl,
                    timings.renew,
                    extra={"event": "leading", "epoch": leader["epoch"]},
                )
                syncer = Syncer(store, options, **kwargs)
                try:
                    syncer.follow()
                finally:
                    summary.add_term(syncer.summary)  # a term ended by a lost lease, too
                    syncer.close()
                return summary
        except SyncLocked as error:
            if leading:
                log.warning("stepping down: %s", error, extra={"event": "stepDown"})
        except StoreUnreachable as error:
            log.warning(
                "%s; %s",
                error,
                "stepping down" if leading else "standing by",
                extra={"event": "stepDown" if leading else "unreachable"},
            )
        try:
            leader = store.leadership()
            store.standby_seen(me)
        except StoreUnreachable:
            stop.wait(timings.retry)
            continue
        seen = (leader["owner"], leader["epoch"])
        if seen != said and leader["active"]:
            said = seen
            until = leader["leaseUntilMs"]
            log.info(
                "standing by: leader %s epoch %s, lease until %s",
                leader["owner"],
                leader["epoch"],
                "?" if until is None else format_instant(until),
                extra={"event": "standby", "leader": leader["owner"], "epoch": leader["epoch"]},
            )
        stop.wait(timings.retry)
    _quietly(store.standby_gone, me)
    return summary


def _quietly(action: Callable[[str], None], argument: str) -> None:
    """A standby's bookkeeping: not worth failing over."""
    try:
        action(argument)
    except StoreError:
        pass

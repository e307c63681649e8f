"""Sync against upstreams that attack or break: nothing they send stops, exhausts or fools it.

Each test here reproduces a way an upstream answer used to stop sync, hang it, blow up its
memory or slip records past the count, against a real server on loopback.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import time
import zlib

import pytest
from conftest import (
    START,
    FakeClock,
    page,
    paged_answer,
    record,
    sync_options,
    txagg_command,
)

from txagg.models import dumps, format_timestamp, parse_time
from txagg.report import status_report
from txagg.store import MAX_BLOCK_SECONDS, Store
from txagg.sync import MAX_RESPONSE_BYTES, Syncer, UpstreamError, sync
from txagg.verify import verify

# ------------------------------------------------------------------ what answers carry


def test_records_on_count_answers_are_stored(scripted, store, tmp_path):
    """An upstream that ignores limit=1 serves real records on the counts: all are kept."""
    items = [record(n, at_s=n) for n in range(3)]

    def answer(query):
        # The count requests carry every item; the page reads carry none of them.
        return page(items if query["limit"] == "1" else [], total=len(items))

    server = scripted([answer])
    summary = sync(store, sync_options(server.url))
    assert "transactions" not in store.counters()  # the pages were empty
    report = verify(store, sync_options(server.url))  # verify counts with limit=1
    assert store.counters()["transactions"] == 3
    assert summary.new == 0 and report.discrepancies == []
    # so do sync's checks once the counts are distrusted (each is a limit=1 count then)
    with Store.open(tmp_path / "distrusting.db") as other:
        distrust = {"since": "x", "why": "y", "strikes": 1, "retryAt": "z", "retryAtMs": 2**62}
        other.put_state(counts_unreliable=distrust)
        sync(other, sync_options(server.url, check_every=0))
        assert other.counters()["transactions"] == 3


LIAR_POOL = [record(n, at_s=n * 7) for n in range(40)]


def _liar(total: int = 5000):
    """meta claims thousands of items and pages; three random records whatever the dates."""
    import random

    rng = random.Random(7)

    def answer(query):
        chosen = rng.sample(LIAR_POOL, 3)
        meta = {"totalItems": total, "itemCount": 3, "itemsPerPage": 1000, "totalPages": 5}
        return 200, {}, dumps({"items": chosen, "meta": meta}).encode()

    return answer


def test_a_meta_that_lies_forever_costs_little_and_shows_in_status(scripted, store):
    server = scripted([_liar()])
    clock = FakeClock(START / 1000 + 3600)
    syncer = Syncer(
        store,
        sync_options(server.url, check_every=120, rate_limit=5, per=60),
        clock=clock,
        sleep=clock.sleep,
    )
    per_check = []
    for _ in range(12):  # 12 checks, two minutes apart
        before = syncer.summary.check_requests
        syncer.run()
        per_check.append(syncer.summary.check_requests - before)
        clock.sleep(120)
    syncer.close()
    # The first check finds out (a count, then a page that comes back short of the count);
    # the next ones cost one count each, but for a full repair now and then, further and
    # further apart.
    assert per_check[0] <= 3, per_check
    assert sum(per_check) <= 12 + 2 * 3, per_check
    assert per_check.count(1) >= 8, per_check
    counts = status_report(store, now=clock())["upstreamCounts"]
    assert counts["reliable"] is False and "short" in counts["why"]
    # Discrepancies are recorded when the counts are chased, not at every check.
    assert len(store.state_value("discrepancies")) <= 3


def test_counts_that_agree_again_end_the_distrust(scripted, store):
    liar = _liar()

    def honest(query):  # what the liar served, now counted and paged right for each window
        start, end = parse_time(query["startDate"]), parse_time(query["endDate"])
        inside = [item for item in LIAR_POOL if start <= parse_time(item["createdAt"]) <= end]
        return paged_answer(inside)(query)

    lying = [True]
    server = scripted([lambda query: liar(query) if lying[0] else honest(query)])
    clock = FakeClock(START / 1000 + 3600)
    syncer = Syncer(
        store, sync_options(server.url, check_every=120), clock=clock, sleep=clock.sleep
    )
    syncer.run()
    distrust = store.state_value("counts_unreliable")
    assert distrust is not None
    lying[0] = False
    clock.now = distrust["retryAtMs"] / 1000  # the next repair is due: the counts now agree
    syncer.run()
    syncer.close()
    assert store.state_value("counts_unreliable") is None
    assert status_report(store, now=clock())["upstreamCounts"] == {"reliable": True}


# ------------------------------------------------------------------ Retry-After


@pytest.mark.parametrize(
    "retry_after", ["1000000000", "Fri, 31 Dec 9999 23:59:59 GMT", "9" * 400, "-5", "1e999"]
)
def test_retry_after_blocks_the_budget_for_a_bounded_time(scripted, store, retry_after, caplog):
    server = scripted([(429, {"Retry-After": retry_after}, b"{}"), page([record(1)])])
    clock = FakeClock(START / 1000 + 60)
    caplog.set_level(logging.WARNING, logger="txagg.sync")
    summary = sync(store, sync_options(server.url, retry_for=600), clock=clock, sleep=clock.sleep)
    assert summary.complete and summary.new == 1
    waited = clock() - (START / 1000 + 60)
    assert waited <= MAX_BLOCK_SECONDS + 1
    assert store.budget(5, 60, clock())["blockedFor"] == 0
    if waited >= 1:
        assert "429" in caplog.text and "waiting" in caplog.text


def test_retry_for_bounds_the_wait_for_a_blocked_budget(scripted, store):
    server = scripted([(429, {"Retry-After": "100000"}, b"{}")])
    clock = FakeClock(START / 1000 + 60)
    with pytest.raises(UpstreamError, match="retry-for"):
        sync(store, sync_options(server.url, retry_for=20), clock=clock, sleep=clock.sleep)
    assert clock() - (START / 1000 + 60) <= 20 + 5


def test_a_block_already_in_the_store_is_cut_back(scripted, store):
    """A store poisoned by an older binary (blocked for years) is usable again."""
    now = START / 1000 + 60
    store.conn.execute(
        "INSERT INTO rate_budget (name, tokens, updated_at, blocked_until) "
        "VALUES ('upstream', 5, ?, ?)",
        (now, now + 10**9),
    )
    assert store.budget(5, 60, now)["blockedFor"] == MAX_BLOCK_SECONDS
    server = scripted([page([record(1)])])
    clock = FakeClock(now)
    summary = sync(store, sync_options(server.url, retry_for=600), clock=clock, sleep=clock.sleep)
    assert summary.new == 1 and clock() - now <= MAX_BLOCK_SECONDS + 1


# ------------------------------------------------------------------ poison records


def _item_text(n: int, **override: str) -> str:
    fields = {
        "id": json.dumps(f"00000000-0000-4000-8000-{n:012d}"),
        "userId": '"000001"',
        "createdAt": json.dumps(format_timestamp(START + n * 1000)),
        "type": '"earned"',
        "amount": "1.5",
        **override,
    }
    return "{" + ",".join(f'"{name}":{value}' for name, value in fields.items()) + "}"


POISON = {
    "lone surrogate in id": _item_text(101, id='"\\ud800"'),
    "lone surrogate in userId": _item_text(102, userId='"ab\\udfffcd"'),
    "control character in userId": _item_text(103, userId='"a\\u0000b"'),
    "amount 1e999999999": _item_text(104, amount="1e999999999"),
    "amount 1e-999999999": _item_text(105, amount="1e-999999999"),
    "amount with 28 decimals": _item_text(106, amount="10.0100000000000000000000000001"),
    "amount just under 10^10 with 21 decimals": _item_text(
        107, amount="9999999999.999999999999999999999"
    ),
    "amount with 5000 digits": _item_text(108, amount="9" * 5000),
    "amount -0": _item_text(109, amount="-0"),
    "amount 0E-7": _item_text(110, amount="0E-7"),
    "amount NaN": _item_text(111, amount="NaN"),
    "amount -Infinity": _item_text(112, amount="-Infinity"),
    "record nested 600 deep": _item_text(113, extra="[" * 600 + "]" * 600),
    "type nested 600 deep": _item_text(114, type="[" * 600 + "]" * 600),
    "record is an array nested 600 deep": "[" * 600 + "]" * 600,
    "type is a 5000-digit number": _item_text(115, type="7" * 5000),
}


def test_poison_records_are_quarantined_and_the_rest_of_the_page_stored(scripted, store):
    good = [_item_text(n) for n in range(5)]
    items = good[:2] + list(POISON.values()) + good[2:]
    body = ('{"items":[' + ",".join(items) + f'],"meta":{{"totalItems":{len(items)}}}}}').encode()
    server = scripted([(200, {}, body)])
    summary = sync(store, sync_options(server.url))
    assert summary.complete and summary.new == 5
    assert summary.quarantined == len(POISON)
    assert store.user_totals("000001").earned == 5 * 150
    reasons = [row[0] for row in store.conn.execute("SELECT reason FROM quarantine")]
    assert len(reasons) == len(POISON)
    # A second run over the same page changes nothing: quarantine is idempotent too.
    store.put_state(window_start=START, page=1)
    again = sync(store, sync_options(server.url))
    assert (again.new, again.quarantined) == (0, 0)
    assert store.counters()["quarantined"] == len(POISON)


def test_a_body_nested_100000_deep_is_a_transient_error_with_a_clear_message(scripted, store):
    server = scripted([(200, {}, b'{"items":' + b"[" * 100_000 + b"]" * 100_000 + b"}")])
    with pytest.raises(UpstreamError, match="nested too deep"):
        sync(store, sync_options(server.url, retry_for=0.3))
    assert len(server.requests) >= 2  # retried, within the bound


def test_sync_follow_outlives_a_poison_answer(scripted, db_path):
    """One bad answer, then good ones: --follow keeps going and stores what comes."""
    deep = (200, {}, b"[" * 100_000 + b"]" * 100_000)
    good = page([record(1), record(2, at_s=1)])
    server = scripted([deep, deep, good])
    process = subprocess.run(
        _sync_command(server.url, db_path, "--retry-for", "30", "--json"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["new"] == 2 and "Traceback" not in process.stderr
    with Store.open(db_path, create=False) as store:
        assert store.counters()["transactions"] == 2


# ------------------------------------------------------------------ bounded resources


def _sync_command(url: str, db_path, *extra: str) -> list[str]:
    """``txagg sync`` of a fresh store from ``url``, with no budget to speak of."""
    return txagg_command(
        "sync", "--db", str(db_path), "--api-url", url, "--since", "2023-11-14",
        "--rate-limit", "1000", "--per", "1", *extra,
    )  # fmt: skip


def _http(status: str, headers: dict, body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def _run_sync_measured(url: str, db_path, *extra: str) -> tuple[int, str, float, int]:
    """``txagg sync`` in a child of a small wrapper: its exit code, stderr, seconds and
    peak memory (KiB), measured for that process alone."""
    wrapper = (
        "import resource, subprocess, sys, time;"
        "began = time.monotonic();"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "sys.stderr.write(p.stderr);"
        "print(p.returncode, round(time.monotonic() - began, 2),"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = _sync_command(url, db_path, "--timeout", "2", "--retry-for", "3", *extra)
    process = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, timeout=180
    )
    code, seconds, peak = process.stdout.split()
    return int(code), process.stderr, float(seconds), int(peak)


def _stream(send, chunk: bytes, total: int) -> None:
    sent = 0
    while sent < total and send(chunk):
        sent += len(chunk)


def test_a_200_mb_body_is_refused_without_reading_it_into_memory(raw_upstream, db_path):
    prefix = b'{"items":[' + b'{"pad":"' + b"x" * 1000 + b'"},'

    def answer(send, query):
        if send(_http("200 OK", {"Content-Length": str(200 * 1024 * 1024)}, prefix)):
            _stream(send, b"x" * 65536, 200 * 1024 * 1024)

    code, stderr, _seconds, peak = _run_sync_measured(raw_upstream(answer).url, db_path)
    assert code == 1 and f"larger than {MAX_RESPONSE_BYTES:,} bytes" in stderr
    assert "Traceback" not in stderr
    assert peak < 150 * 1024, f"peak RSS {peak} KiB"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "gzip, gzip"])
def test_a_compression_bomb_stops_at_the_cap(raw_upstream, db_path, encoding):
    plain = b'{"items":[' + b" " * (256 * 1024 * 1024) + b"]}"
    bomb = zlib.compress(plain, 9) if encoding == "deflate" else gzip.compress(plain, 9)
    if encoding == "gzip, gzip":
        bomb = gzip.compress(bomb, 9)

    def answer(send, query):
        send(_http("200 OK", {"Content-Encoding": encoding, "Content-Length": len(bomb)}, bomb))

    code, stderr, _seconds, peak = _run_sync_measured(raw_upstream(answer).url, db_path)
    assert code == 1 and "larger than" in stderr and "decompressed" in stderr, stderr
    assert peak < 150 * 1024, f"peak RSS {peak} KiB"


def test_compressed_answers_are_read(raw_upstream, db_path):
    items = [record(n, at_s=n) for n in range(50)]
    body = gzip.compress(page(items)[2])

    def answer(send, query):
        send(_http("200 OK", {"Content-Encoding": "gzip", "Content-Length": len(body)}, body))

    code, stderr, _seconds, _peak = _run_sync_measured(raw_upstream(answer).url, db_path)
    assert code == 0, stderr
    with Store.open(db_path, create=False) as store:
        assert store.counters()["transactions"] == 50


def test_an_unknown_content_encoding_is_a_clear_error(raw_upstream, db_path):
    def answer(send, query):
        send(_http("200 OK", {"Content-Encoding": "br", "Content-Length": "4"}, b"abcd"))

    code, stderr, _seconds, _peak = _run_sync_measured(raw_upstream(answer).url, db_path)
    assert code == 1 and "unsupported Content-Encoding" in stderr


def _drip(send, data: bytes, every: float = 0.25) -> None:
    for byte in data:
        if not send(bytes([byte])):
            return
        time.sleep(every)


@pytest.mark.parametrize(
    "kind", ["endless chunked body", "body dripped", "headers dripped", "silence after headers"]
)
def test_a_request_ends_by_its_deadline_whatever_the_server_does(raw_upstream, db_path, kind):
    def answer(send, query):
        if kind == "endless chunked body":
            if send(_http("200 OK", {"Transfer-Encoding": "chunked"}, b"")):
                chunk = b"400\r\n" + b" " * 1024 + b"\r\n"  # 100 KiB/s: never near the cap
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and send(chunk):
                    time.sleep(0.01)
        elif kind == "body dripped":
            if send(_http("200 OK", {"Content-Length": "100000"}, b'{"items": [')):
                _drip(send, b" " * 400)
        elif kind == "headers dripped":
            _drip(send, b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 400)
        else:
            send(_http("200 OK", {"Content-Length": "100"}, b""))
            time.sleep(30)

    code, stderr, seconds, _peak = _run_sync_measured(raw_upstream(answer).url, db_path)
    # --timeout 2 bounds each request, --retry-for 3 the retries: done in seconds, not never.
    assert code == 1 and "within 2 s" in stderr, stderr
    assert seconds < 30


# ------------------------------------------------------------------ late arrivals, sooner


def test_late_arrivals_are_found_within_a_minute_when_the_budget_is_idle(tmp_path):
    """At low load the spare budget goes to checks: a transaction that shows up late (inside
    the overlap) is in the store well before the 120 s check interval would bring it."""
    import threading

    import httpx
    from conftest import FakeUpstream

    base = 1_700_000_000
    items = [(f"tx{n}", (base + n) * 1000, base + n) for n in range(900)]  # one a second
    late = {f"tx{5000 + n}": base + 200 + 60 * n for n in range(8)}  # id: when visible
    items += [(tx_id, (at - 70) * 1000 + 500, at) for tx_id, at in late.items()]
    clock = FakeClock(base + 5)
    upstream = FakeUpstream(items, clock, inclusive_start=True, inclusive_end=False)
    stop = threading.Event()
    stored_at: dict[str, float] = {}

    with Store.open(tmp_path / "store.db") as store:

        def sleep(seconds: float) -> None:
            clock.now += seconds
            for tx_id in late.keys() - stored_at.keys():
                found = store.conn.execute("SELECT 1 FROM transactions WHERE id = ?", (tx_id,))
                if found.fetchone():
                    stored_at[tx_id] = clock.now
            if clock.now > base + 800:
                stop.set()

        options = sync_options(
            "http://upstream.test", since=base * 1000, settle=5, overlap=300, check_every=120,
            rate_limit=5, per=60, interval=30,
        )  # fmt: skip
        syncer = Syncer(
            store, options, transport=httpx.MockTransport(upstream.handle), clock=clock,
            sleep=sleep, stop=stop,
        )  # fmt: skip
        summary = syncer.follow()
        syncer.close()
    delays = sorted(stored_at[tx_id] - late[tx_id] for tx_id in stored_at)
    assert len(delays) == len(late), (delays, summary)
    assert delays[-1] <= 60, delays
    assert summary.checks >= 700 / 60, summary  # more often than once every 120 s


def test_an_explained_undated_record_costs_later_checks_nothing(tmp_path):
    """A record with an unusable createdAt is bisected down to once; once explained, it has a
    place, and the next checks find the window complete in one count request."""
    import httpx
    from conftest import FakeUpstream

    base = 1_700_000_000
    items = [(f"tx{n}", (base + n) * 1000, base + n) for n in range(60)]
    clock = FakeClock(base + 200)
    upstream = FakeUpstream(items, clock, True, True, broken={"tx37"})
    options = sync_options(
        "http://upstream.test", since=base * 1000, overlap=300, check_every=0, page_size=10
    )
    with Store.open(tmp_path / "store.db") as store:
        costs = []
        for _ in range(3):
            syncer = Syncer(
                store, options, transport=httpx.MockTransport(upstream.handle), clock=clock,
                sleep=clock.sleep,
            )  # fmt: skip
            summary = syncer.run()
            syncer.close()
            costs.append(summary.check_requests)
            clock.sleep(10)
        assert store.counters()["transactions"] == 59 and store.counters()["quarantined"] == 1
        placed = store.conn.execute("SELECT created_at FROM quarantine").fetchone()[0]
        assert placed is not None and (base - 1) * 1000 <= placed <= (base + 37) * 1000
        assert not store.state_value("discrepancies")
    assert costs[0] > 1, costs  # the first check bisects down to the undated record
    assert costs[1:] == [1, 1], costs  # then one count each: the window adds up

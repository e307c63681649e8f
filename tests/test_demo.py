"""``txagg demo``: the newcomer's first run, again and again, on real stores and a real mock."""

from __future__ import annotations

from decimal import Decimal

import pytest
from conftest import record, run_txagg

from txagg.demo import DEMO_MARK, DEMO_USERS, DemoRefused, demo_upstream, run_demo
from txagg.store import Store


def test_the_demo_runs_twice_on_the_same_store(db_path):
    first = run_demo(db_path)
    assert first["mismatches"] == [] and first["users"] == DEMO_USERS
    assert first["sync"]["new"] > 0 and first["store"] == str(db_path)
    second = run_demo(db_path)
    assert second["mismatches"] == []
    assert second["sync"]["new"] == 0  # the same data: nothing new to read
    assert {**second["report"], "asOf": None} == {**first["report"], "asOf": None}
    assert second["payouts"] == first["payouts"]
    with Store.open(db_path) as store:
        assert store.state_value(DEMO_MARK) == demo_upstream()
        assert store.counters()["transactions"] == first["sync"]["new"]
        assert store.counters().get("conflicts", 0) == 0


def test_txagg_demo_twice_with_db_and_without(tmp_path):
    db = tmp_path / "demo.db"
    runs = [run_txagg("demo", "--db", str(db)) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert f"All {DEMO_USERS} users match the mock's ground truth" in result.stdout
    assert "Synced 0 transactions" in runs[1].stdout
    fresh = run_txagg("demo")  # a temporary store of its own every time
    assert fresh.returncode == 0, fresh.stderr
    assert "Synced 0 transactions" not in fresh.stdout and str(tmp_path) not in fresh.stdout


def test_the_demo_refuses_a_store_it_did_not_fill(db_path):
    with Store.open(db_path) as store:
        store.ingest([record(1, "000001", "earned", Decimal("2.5"))], state={"as_of": 1})
    result = run_txagg("demo", "--db", str(db_path))
    assert result.returncode == 1
    assert "holds data the demo did not put there" in result.stderr
    assert "Traceback" not in result.stderr
    with Store.open(db_path) as store:
        assert store.counters()["transactions"] == 1  # untouched: no mock data mixed in
        assert store.state_value(DEMO_MARK) is None


def test_the_demo_refuses_a_store_synced_elsewhere_even_if_empty(db_path):
    with Store.open(db_path) as store:
        store.put_state(as_of=1_700_000_000_000, position=1_700_000_000_000)
    with pytest.raises(DemoRefused, match="did not put there"):
        run_demo(db_path)

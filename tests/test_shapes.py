"""The shapes in ``txagg.shapes`` are what the code writes.

The CLI's ``--json`` answers and the mock's bodies are checked twice against the shape they
claim: by pydantic (strict), and by the JSON Schema generated from it, the one the OpenAPI
documents publish (formats included). A key, a type or a null the code writes without the shape
saying so fails here. The HTTP answers are checked against the served documents by schemathesis
(test_server.py, test_mock_faults.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import jsonschema_rs
import pytest
from conftest import START, page, record, run_txagg
from starlette.datastructures import QueryParams

from txagg import shapes
from txagg.errors import BadRequest
from txagg.mock import MockConfig, MockUpstream, openapi_document, parse_window_query
from txagg.models import dumps
from txagg.server import ServeConfig
from txagg.server import openapi_document as serve_document
from txagg.server.views import parse_payouts_query
from txagg.store import Store
from txagg.testing import FakeClock


def check(shape: type, text: str | bytes) -> dict:
    """``text`` is a JSON document of ``shape``; returns it decoded."""
    shapes.adapter(shape).validate_json(text, strict=True)
    root = {"$ref": shapes.REF.format(model=shape.__name__)}
    root["components"] = {"schemas": shapes.openapi_schemas(shape)}
    document = json.loads(text)
    jsonschema_rs.Draft202012Validator(root, validate_formats=True).validate(document)
    return document


def test_check_refuses_what_drifts_from_the_shape():
    good = (
        '{"userId": "074092", "balance": -40.8, "earned": 1.2, "spent": 12, "payout": 30, '
        '"paidOut": 30, "transactions": 3, "lastTransactionAt": "2023-03-16T12:33:11.000Z", '
        '"asOf": null}'
    )
    check(shapes.UserReport, good)
    for drifted in (
        good.replace('"asOf": null', '"asOf": null, "extra": 1'),  # an undeclared key
        good.replace('"earned": 1.2', '"earned": "1.2"'),  # money as text
        good.replace('"transactions": 3', '"transactions": true'),
        good.replace('"transactions": 3, ', ""),  # a missing key
        good.replace("2023-03-16T12:33:11.000Z", "2023-03-16 12:33:11"),  # not RFC 3339
    ):
        with pytest.raises(ValueError):
            check(shapes.UserReport, drifted)


@pytest.fixture
def filled(db_path: Path) -> Path:
    with Store.open(db_path) as store:
        store.ingest(
            [
                record(1, user="074092", kind="earned", amount=Decimal("1.2"), at_s=0),
                record(2, user="074092", kind="spent", amount=Decimal("12"), at_s=1),
                record(3, user="074092", kind="payout", amount=Decimal("30"), at_s=2),
            ],
            state={"as_of": START + 100_000, "position": START + 100_000},
        )
    return db_path


def json_output(*args: str) -> str:
    result = run_txagg(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_report_and_payouts_json_have_their_shapes(filled):
    db = ("--db", str(filled))
    fast = check(shapes.UserReport, json_output("report", "074092", "--json", *db))
    full = check(shapes.UserReport, json_output("report", "074092", "--eur-per-scr", "0.9", *db))
    assert (fast["paidOut"], full["paidOut"]) == (30, 27)
    payouts = check(shapes.PayoutList, json_output("payouts", "--json", *db))
    assert payouts["items"] == [{"userId": "074092", "amount": 30, "count": 1}]


def test_status_json_has_its_shape_before_and_after_syncs(tmp_path, filled, scripted):
    never = tmp_path / "never.db"
    Store.open(never).close()
    body = check(shapes.StatusReport, json_output("status", "--json", "--db", str(never)))
    assert body["asOf"] is None and body["lastRun"] == {} and body["lastCheck"] is None
    assert body["upstream"] is None
    check(shapes.StatusReport, json_output("status", "--json", "--db", str(filled)))
    # A real sync whose closing check meets an upstream that counts fewer than it served.
    items = [record(n, at_s=n) for n in range(3)]

    def counts_lie(query: dict):
        return page(items if query.get("page", "1") == "1" else [], total=1)

    server = scripted([counts_lie])
    synced = str(tmp_path / "synced.db")
    fast = ("--rate-limit", "100000", "--per", "1", "--settle", "0", "--retry-for", "10")
    json_output("sync", "--api-url", server.url, "--db", synced, *fast)
    body = check(shapes.StatusReport, json_output("status", "--json", "--db", synced))
    assert body["upstream"] == server.url
    assert body["lastRun"] and body["lastCheck"] and body["discrepancies"]
    assert body["upstreamCounts"]["reliable"] is False


def test_the_mock_bodies_have_their_shapes():
    clock = FakeClock(START / 1000)
    faults = "late=0.5:30,slow=0.1:2,conflict=0.2,meta=0.1"
    options = {"seed": 3, "users": 10, "history": 200, "start": START, "tx_per_minute": 600}
    upstream = MockUpstream(MockConfig(**options, faults=faults), clock)
    clock.now += 60
    first = check(shapes.Page, upstream.window(None, None, 1, 1000)[0])
    assert len(first["items"]) > 200
    report = check(shapes.FaultReport, json.dumps(upstream.fault_report()))
    assert report["lateArrivals"] and report["settings"]["slow"]["seconds"] == 2
    users = check(
        shapes.UserList, dumps({"items": upstream.all_reports(), "asOf": upstream.as_of()})
    )
    check(shapes.UserReport, dumps(upstream.user_report(users["items"][0]["userId"])))
    check(shapes.PayoutList, dumps({"items": upstream.payouts(), "asOf": upstream.as_of()}))


# ---------------------------------------------------------------- the documents


def refs(value) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(refs(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(refs(item) for item in value))
    return set()


@pytest.mark.parametrize(
    "document",
    [
        serve_document(ServeConfig(db=Path("unused.db"), port=0, token="t")),
        openapi_document(MockConfig(faults="error=0.1,nonjson=0.1")),
    ],
    ids=["serve", "mock"],
)
def test_every_reference_of_the_documents_resolves(document):
    for ref in refs(document):
        target = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref


def test_the_documented_query_defaults_are_what_the_parsers_apply():
    def defaults(shape) -> dict:
        return {
            parameter["name"]: parameter["schema"]["default"]
            for parameter in shapes.query_parameters(shape)
            if "default" in parameter["schema"]
        }

    parsed = parse_payouts_query(QueryParams(""))
    assert defaults(shapes.PayoutsParameters) == {"limit": parsed.limit}
    limit = next(
        p for p in shapes.query_parameters(shapes.PayoutsParameters) if p["name"] == "limit"
    )
    assert parse_payouts_query(QueryParams(f"limit={limit['schema']['maximum']}"))
    with pytest.raises(BadRequest):
        parse_payouts_query(QueryParams(f"limit={limit['schema']['maximum'] + 1}"))
    _, _, page, per_page = parse_window_query({})
    assert defaults(shapes.TransactionsParameters) == {"page": page, "limit": per_page}


def test_no_stdlib_only_path_imports_pydantic(filled):
    """The report fast path, the core and the servers' packages never import pydantic; only
    building a document does."""
    code = (
        "import sys\n"
        "import txagg.models, txagg.report, txagg.store, txagg.server, txagg.mock\n"
        "from txagg.__main__ import _fast_report\n"
        f"assert _fast_report(['report', '074092', '--json', '--db', {str(filled)!r}]) == 0\n"
        "print(sorted(name for name in sys.modules if name.startswith('pydantic')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"

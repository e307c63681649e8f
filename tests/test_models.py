from decimal import Decimal

import pytest

from txagg.models import (
    InvalidRecord,
    Transaction,
    dumps,
    format_cents,
    format_instant,
    format_query_time,
    format_timestamp,
    loads,
    parse_amount,
    parse_time,
    parse_transaction,
)

GOOD = {
    "id": "41bbdf81-735c-4aea-beb3-3e5f433a30c5",
    "userId": "074092",
    "createdAt": "2023-03-16T12:33:11.000Z",
    "type": "payout",
    "amount": 30,
}


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (0, "0"),
        (5760, "57.6"),
        (1200, "12"),
        (1, "0.01"),
        (-4080, "-40.8"),
        (123456789, "1234567.89"),
    ],
)
def test_format_cents_is_the_shortest_exact_decimal(cents, text):
    assert format_cents(cents) == text


def test_amounts_parse_to_exact_cents():
    assert parse_amount(30) == 3000
    assert parse_amount(Decimal("57.6")) == 5760
    assert parse_amount(Decimal("0.1")) + parse_amount(Decimal("0.2")) == 30
    assert parse_amount(0.1) == 10  # a float from a library caller means its shortest repr


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"amount": None}, "not a number"),
        ({"amount": "30"}, "not a number"),
        ({"amount": True}, "not a number"),
        ({"amount": 0}, "not positive"),
        ({"amount": -5}, "not positive"),
        ({"amount": Decimal("1.005")}, "more than 2 decimal places"),
        ({"amount": Decimal("1e15")}, "above the maximum"),
        ({"amount": Decimal("NaN")}, "finite"),
        ({"type": "refund"}, "unknown type"),
        ({"createdAt": "yesterday"}, "not a parseable date"),
        ({"createdAt": "2023-03-16T12:33:11"}, "no time zone"),
        ({"createdAt": 1678970000}, "not a date string"),
        ({"id": ""}, "id is not a non-empty string"),
        ({"userId": 74092}, "userId is not a non-empty string"),
        ({"userId": "x" * 10_000}, "longer than"),
    ],
)
def test_invalid_records_say_why(change, reason):
    with pytest.raises(InvalidRecord, match=reason):
        parse_transaction({**GOOD, **change})


def test_missing_fields_are_named():
    broken = dict(GOOD)
    del broken["amount"], broken["type"]
    with pytest.raises(InvalidRecord, match="missing field: type, amount"):
        parse_transaction(broken)
    with pytest.raises(InvalidRecord, match="not a JSON object"):
        parse_transaction(["a list"])


def test_a_record_round_trips_through_the_upstream_json():
    tx = parse_transaction(
        loads(
            '{"id": "a", "userId": "074092", "createdAt": '
            '"2023-03-16T12:33:11.250Z", "type": "spent", "amount": 57.6}'
        )
    )
    assert tx == Transaction("a", "074092", parse_time("2023-03-16T12:33:11.250Z"), "spent", 5760)
    assert parse_transaction(loads(tx.to_json())) == tx
    assert format_timestamp(tx.created_at) == "2023-03-16T12:33:11.250Z"


def test_time_formats():
    ms = parse_time("2023-02-01 00:00:00")
    assert ms == parse_time("2023-02-01T00:00:00Z") == parse_time("2023-02-01T00:00:00.000Z")
    assert ms == parse_time("2023-02-01")
    assert ms == parse_time("2023-02-01T01:00:00+01:00")
    assert format_query_time(ms) == "2023-02-01 00:00:00"
    assert format_query_time(ms, "iso") == "2023-02-01T00:00:00Z"
    assert format_instant(ms + 999) == "2023-02-01T00:00:00Z"
    with pytest.raises(ValueError, match="not a date/time"):
        parse_time("last tuesday")


def test_dumps_writes_decimals_exactly_and_refuses_floats():
    total = sum((Decimal("0.1"),) * 3, Decimal(0)) + Decimal("57.5")
    assert dumps({"a": total, "b": [Decimal("30.00"), None, True, "x"]}) == (
        '{"a": 57.8, "b": [30, null, true, "x"]}'
    )
    with pytest.raises(TypeError):
        dumps({"a": 0.1})

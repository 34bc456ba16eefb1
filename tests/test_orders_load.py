"""Loading checkout orders into the ledger, against a real PostgreSQL (fixture `pool`)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest

from devstack.demo import DEMO_FILE
from domain.errors import OrderConflict
from domain.orders import OrdersFile
from ledger.orders import (
    LoadReport,
    OrdersFileError,
    load_orders,
    order_source_hash,
    orders_json_schema,
    parse_orders_file,
)

DEMO_IDS = ["O-1001", "O-1002", "O-1003", "O-1004", "O-1005", "O-2001", "O-2002"]
TABLES = (
    "checkout_orders",
    "payments",
    "sub_orders",
    "order_lines",
    "coupon_redemptions",
    "coupon_footprints",
)


def demo_text() -> str:
    return DEMO_FILE.read_text()


def demo_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(demo_text())
    return doc


def demo_file() -> OrdersFile:
    return parse_orders_file(demo_text())


def small_order(order_id: str, payment_id: str, **changes: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": order_id,
        "buyer_id": "B-1",
        "currency": "EUR",
        "placed_at": "2026-05-01T12:00:00Z",
        "payment": {
            "payment_id": payment_id,
            "method": "card",
            "validation": "validated",
            "capture": "captured",
        },
        "sub_orders": [
            {"seller_id": "S-1", "lines": [{"sku": "A", "quantity": 1, "unit_price_minor": 1000}]}
        ],
    }
    order.update(changes)
    return order


def as_file(*orders: dict[str, Any]) -> OrdersFile:
    return OrdersFile.model_validate({"orders": list(orders)})


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def ledger_snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every order table, to prove a refused load changed nothing at all."""
    async with pool.acquire() as conn:
        return {
            t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3")]
            for t in TABLES
        }


# --- loading the demo file -----------------------------------------------------------------------


async def test_demo_file_loads(pool: asyncpg.Pool) -> None:
    report = await load_orders(pool, demo_file())
    assert report == LoadReport(loaded=DEMO_IDS, unchanged=[])
    assert await row_counts(pool) == {
        "checkout_orders": 7,
        "payments": 7,
        "sub_orders": 9,
        "order_lines": 15,
        "coupon_redemptions": 2,
        "coupon_footprints": 4,
    }
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT p.order_id, p.method, p.validation, p.capture, s.seller_id, s.status"
            " FROM payments p JOIN sub_orders s USING (order_id) ORDER BY 1, 5"
        )
    assert [tuple(r) for r in rows] == [
        ("O-1001", "card", "unvalidated", "authorized", "S-7", "unvalidated"),
        ("O-1002", "card", "validated", "captured", "S-7", "accepted"),
        ("O-1003", "wallet", "validated", "captured", "S-8", "accepted"),
        ("O-1004", "bank_transfer", "validated", "captured", "S-9", "accepted"),
        ("O-1005", "card", "validated", "captured", "S-10", "accepted"),
        ("O-2001", "card", "validated", "captured", "S-7", "accepted"),
        ("O-2001", "card", "validated", "captured", "S-8", "accepted"),
        ("O-2002", "card", "validated", "captured", "S-7", "accepted"),
        ("O-2002", "card", "validated", "captured", "S-8", "accepted"),
    ]


async def test_o2001_amounts_match_hand_computation(pool: asyncpg.Pool) -> None:
    # O-2001, coupon SPRING10 of 1000 over every line of S-7 and S-8:
    #   S-7: 1 x 1999 = 1999, 3 x 850 = 2550, 1 x 1249 = 1249   items 5798, shipping 499
    #   S-8: 2 x 649 = 1298,  1 x 5490 = 5490                   items 6788, shipping 299
    #   total weight 12586
    # exact shares 1000 * w / 12586, floor and remainder (out of 12586):
    #   1999 -> 158 r 10412 | 2550 -> 202 r 7628 | 1249 -> 99 r 2986
    #   1298 -> 103 r 1642  | 5490 -> 436 r 2504
    # floors sum to 998: the 2 units left go to the largest remainders, 10412 and 7628
    #   -> 159, 203, 99 | 103, 436  (sum 1000; the biggest line does not get one)
    # S-7: discount 159+203+99 = 461, cash 5798 - 461 + 499 = 5836
    # S-8: discount 103+436 = 539,    cash 6788 - 539 + 299 = 6548
    # payment 5836 + 6548 = 12384
    await load_orders(pool, demo_file())
    async with pool.acquire() as conn:
        lines = await conn.fetch(
            "SELECT seller_id, line_no, quantity, unit_price_minor, discount_minor"
            " FROM order_lines WHERE order_id = 'O-2001' ORDER BY seller_id, line_no"
        )
        subs = await conn.fetch(
            "SELECT seller_id, items_minor, discount_minor, shipping_minor, cash_minor"
            " FROM sub_orders WHERE order_id = 'O-2001' ORDER BY seller_id"
        )
        payment = await conn.fetchrow(
            "SELECT payment_id, amount_minor, currency, refunded_minor FROM payments"
            " WHERE order_id = 'O-2001'"
        )
        coupon = await conn.fetchrow(
            "SELECT coupon_code, discount_minor, expires_at, restored_at FROM coupon_redemptions"
            " WHERE redemption_id = 'R-2001'"
        )
        footprint = await conn.fetch(
            "SELECT order_id, seller_id FROM coupon_footprints WHERE redemption_id = 'R-2001'"
            " ORDER BY seller_id"
        )
    assert [tuple(r) for r in lines] == [
        ("S-7", 1, 1, 1999, 159),
        ("S-7", 2, 3, 850, 203),
        ("S-7", 3, 1, 1249, 99),
        ("S-8", 1, 2, 649, 103),
        ("S-8", 2, 1, 5490, 436),
    ]
    assert [tuple(r) for r in subs] == [
        ("S-7", 5798, 461, 499, 5836),
        ("S-8", 6788, 539, 299, 6548),
    ]
    assert tuple(payment) == ("P-2001", 12384, "EUR", 0)
    assert coupon["coupon_code"] == "SPRING10"
    assert coupon["discount_minor"] == 1000
    assert coupon["expires_at"].isoformat() == "2030-01-01T00:00:00+00:00"
    assert coupon["restored_at"] is None
    assert [tuple(r) for r in footprint] == [("O-2001", "S-7"), ("O-2001", "S-8")]


async def test_ledger_totals_are_consistent_for_every_order(pool: asyncpg.Pool) -> None:
    await load_orders(pool, demo_file())
    async with pool.acquire() as conn:
        subs = await conn.fetch(
            """
            SELECT s.order_id, s.seller_id, s.items_minor, s.discount_minor, s.shipping_minor,
                   s.cash_minor,
                   (SELECT sum(quantity * unit_price_minor) FROM order_lines l
                     WHERE l.order_id = s.order_id AND l.seller_id = s.seller_id) AS line_items,
                   (SELECT sum(discount_minor) FROM order_lines l
                     WHERE l.order_id = s.order_id AND l.seller_id = s.seller_id) AS line_discount
            FROM sub_orders s
            """
        )
        payments = await conn.fetch(
            "SELECT p.order_id, p.amount_minor, (SELECT sum(cash_minor) FROM sub_orders s"
            " WHERE s.order_id = p.order_id) AS cash FROM payments p"
        )
        coupons = await conn.fetch(
            """
            SELECT r.redemption_id, r.discount_minor,
                   (SELECT sum(l.discount_minor) FROM order_lines l
                      JOIN coupon_footprints f
                        ON f.order_id = l.order_id AND f.seller_id = l.seller_id
                     WHERE f.redemption_id = r.redemption_id) AS allocated
            FROM coupon_redemptions r
            """
        )
    assert len(subs) == 9
    for s in subs:
        assert s["cash_minor"] == s["items_minor"] - s["discount_minor"] + s["shipping_minor"]
        assert s["items_minor"] == s["line_items"]
        assert s["discount_minor"] == s["line_discount"]
    assert len(payments) == 7
    for p in payments:
        assert p["amount_minor"] == p["cash"]
    assert {(c["redemption_id"], c["discount_minor"], c["allocated"]) for c in coupons} == {
        ("R-2001", 1000, 1000),
        ("R-2002", 1000, 1000),
    }


# --- idempotency and conflicts -------------------------------------------------------------------


async def test_loading_twice_reports_unchanged_and_writes_nothing(pool: asyncpg.Pool) -> None:
    await load_orders(pool, demo_file())
    before = await ledger_snapshot(pool)
    again = await load_orders(pool, demo_file())
    assert again == LoadReport(loaded=[], unchanged=DEMO_IDS)
    assert await ledger_snapshot(pool) == before


async def test_reformatted_document_is_the_same_order(pool: asyncpg.Pool) -> None:
    # Key order, whitespace and spelled-out defaults do not make a different document.
    await load_orders(pool, demo_file())
    doc = demo_doc()
    for order in doc["orders"]:
        order.setdefault("coupons", [])
        for sub in order["sub_orders"]:
            for line in sub["lines"]:
                line.setdefault("description", "")
    reordered = {"orders": [dict(reversed(list(o.items()))) for o in doc["orders"]]}
    report = await load_orders(pool, parse_orders_file(json.dumps(reordered, indent=1)))
    assert report == LoadReport(loaded=[], unchanged=DEMO_IDS)


async def test_mixed_file_loads_new_orders_and_skips_known_ones(pool: asyncpg.Pool) -> None:
    await load_orders(pool, as_file(small_order("O-1", "P-1")))
    report = await load_orders(pool, as_file(small_order("O-2", "P-2"), small_order("O-1", "P-1")))
    assert report == LoadReport(loaded=["O-2"], unchanged=["O-1"])
    assert (await row_counts(pool))["checkout_orders"] == 2


async def test_changed_document_under_same_id_conflicts_and_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    await load_orders(pool, demo_file())
    before = await ledger_snapshot(pool)
    doc = demo_doc()
    doc["orders"][1]["sub_orders"][0]["lines"][0]["unit_price_minor"] += 1  # O-1002 repriced
    doc["orders"].append(small_order("O-NEW", "P-NEW"))  # a new order in the same file
    with pytest.raises(OrderConflict, match=r"order O-1002 is already loaded with different"):
        await load_orders(pool, parse_orders_file(json.dumps(doc)))
    assert await ledger_snapshot(pool) == before
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM payments WHERE order_id='O-NEW'") == 0


async def test_second_order_bad_means_first_is_not_written_either(pool: asyncpg.Pool) -> None:
    # O-1 is in the ledger. The file's first order (O-A) is fine; the second one clashes with O-1.
    await load_orders(pool, as_file(small_order("O-1", "P-1")))
    before = await ledger_snapshot(pool)
    counts = await row_counts(pool)

    clashing = small_order("O-1", "P-1", buyer_id="B-other")
    with pytest.raises(OrderConflict, match="O-1"):
        await load_orders(pool, as_file(small_order("O-A", "P-A"), clashing))
    assert await row_counts(pool) == counts
    assert await ledger_snapshot(pool) == before

    # Same with a payment id that already belongs to another order.
    stolen_payment = small_order("O-B", "P-1")
    with pytest.raises(OrderConflict, match=r"order O-B: payment P-1 already belongs to order O-1"):
        await load_orders(pool, as_file(small_order("O-A", "P-A"), stolen_payment))
    assert await ledger_snapshot(pool) == before


async def test_redemption_id_of_another_order_conflicts(pool: asyncpg.Pool) -> None:
    await load_orders(pool, demo_file())
    before = await ledger_snapshot(pool)
    reused = small_order(
        "O-9",
        "P-9",
        coupons=[
            {
                "redemption_id": "R-2001",
                "coupon_code": "SPRING10",
                "discount_minor": 100,
                "expires_at": "2030-01-01T00:00:00Z",
                "footprint": ["S-1"],
            }
        ],
    )
    with pytest.raises(
        OrderConflict, match=r"order O-9: coupon redemption R-2001 already belongs to order O-2001"
    ):
        await load_orders(pool, as_file(reused))
    assert await ledger_snapshot(pool) == before


async def test_concurrent_loads_write_each_order_once(pool: asyncpg.Pool) -> None:
    # Two operators load overlapping files at once (in opposite order): no deadlock, no
    # duplicate, no false conflict; each order is loaded by exactly one of them.
    doc = demo_doc()
    forward = parse_orders_file(json.dumps(doc))
    backward = parse_orders_file(json.dumps({"orders": list(reversed(doc["orders"]))}))
    first, second = await asyncio.gather(load_orders(pool, forward), load_orders(pool, backward))
    assert sorted(first.loaded + second.loaded) == DEMO_IDS
    assert sorted(first.unchanged + second.unchanged) == DEMO_IDS
    assert (await row_counts(pool))["order_lines"] == 15


async def test_reload_leaves_a_cancelled_sub_order_alone(pool: asyncpg.Pool) -> None:
    # The ledger moves sub-orders on (cancelled); re-loading the order system's file must not
    # put them back.
    await load_orders(pool, demo_file())
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE sub_orders SET status = 'cancelled'"
            " WHERE order_id = 'O-1001' AND seller_id = 'S-7'"
        )
    assert (await load_orders(pool, demo_file())).unchanged == DEMO_IDS
    async with pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM sub_orders WHERE order_id = 'O-1001' AND seller_id = 'S-7'"
        )
    assert status == "cancelled"


async def test_naive_timestamps_are_read_as_utc(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg reads a naive datetime in the process's local zone; pretend the loading host is in
    # Tokyo to prove the loader does not depend on it.
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        await load_orders(pool, as_file(small_order("O-1", "P-1", placed_at="2026-05-01T12:00:00")))
        async with pool.acquire() as conn:
            placed = await conn.fetchval("SELECT placed_at FROM checkout_orders")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert placed.isoformat() == "2026-05-01T12:00:00+00:00"


def test_source_hash_ignores_formatting_but_not_content() -> None:
    a = as_file(small_order("O-1", "P-1")).orders[0]
    b = as_file(small_order("O-1", "P-1", coupons=[])).orders[0]
    c = as_file(small_order("O-1", "P-1", buyer_id="B-2")).orders[0]
    assert order_source_hash(a) == order_source_hash(b)
    assert order_source_hash(a) != order_source_hash(c)
    assert len(order_source_hash(a)) == 64


# --- parsing errors ------------------------------------------------------------------------------


def file_with(order: dict[str, Any]) -> str:
    return json.dumps({"orders": [small_order("O-0", "P-0"), order]})


def test_negative_price_names_the_field() -> None:
    order = small_order("O-1", "P-1")
    order["sub_orders"][0]["lines"][0]["unit_price_minor"] = -5
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(file_with(order))
    assert str(err.value) == (
        "orders[1].sub_orders[0].lines[0].unit_price_minor: "
        "Input should be greater than or equal to 0"
    )


def test_zero_quantity_names_the_field() -> None:
    order = small_order("O-1", "P-1")
    order["sub_orders"] = [
        {"seller_id": "S-1", "lines": [{"sku": "A", "quantity": 1, "unit_price_minor": 1}]},
        {"seller_id": "S-2", "lines": [{"sku": "B", "quantity": 0, "unit_price_minor": 1}]},
    ]
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(json.dumps({"orders": [order]}))
    assert str(err.value) == (
        "orders[0].sub_orders[1].lines[0].quantity: Input should be greater than or equal to 1"
    )


def test_unknown_field_names_the_field() -> None:
    order = small_order("O-1", "P-1")
    order["payment"]["amount"] = 100
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(file_with(order))
    assert str(err.value) == "orders[1].payment.amount: Extra inputs are not permitted"


def test_unknown_seller_in_coupon_footprint_names_the_coupon() -> None:
    order = small_order(
        "O-1",
        "P-1",
        coupons=[
            {
                "redemption_id": "R-1",
                "coupon_code": "SPRING10",
                "discount_minor": 100,
                "expires_at": "2030-01-01T00:00:00Z",
                "footprint": ["S-1", "S-99"],
            }
        ],
    )
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(file_with(order))
    assert str(err.value) == "orders[1]: coupons[0].footprint names unknown sellers: ['S-99']"


def test_bad_json_gives_line_and_column() -> None:
    text = '{\n  "orders": [\n    {"order_id": "O-1",}\n  ]\n}'
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(text)
    assert str(err.value) == (
        "invalid JSON at line 3, column 24: Expecting property name enclosed in double quotes"
    )


def test_several_problems_are_all_reported() -> None:
    order = small_order("O-1", "P-1", currency="eur")
    order["payment"]["method"] = "cheque"
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(json.dumps({"orders": [order]}))
    assert err.value.problems == [
        "orders[0].currency: String should match pattern '^[A-Z]{3}$'",
        "orders[0].payment.method: Input should be 'card', 'wallet', 'balance' or 'bank_transfer'",
    ]


def test_file_level_problems_have_readable_messages() -> None:
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file(json.dumps({"orders": [small_order("O-1", "P-1")] * 2}))
    assert str(err.value) == "orders: order_id repeats within the file"
    with pytest.raises(OrdersFileError) as err:
        parse_orders_file("[]")
    assert str(err.value).startswith("(document): ")


# --- JSON schema ---------------------------------------------------------------------------------


def test_json_schema_describes_the_file() -> None:
    schema = orders_json_schema()
    assert schema["type"] == "object"
    assert schema["required"] == ["orders"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["orders"]["type"] == "array"
    defs = schema["$defs"]
    assert set(defs["CheckoutOrderIn"]["required"]) >= {
        "order_id",
        "buyer_id",
        "currency",
        "placed_at",
        "payment",
        "sub_orders",
    }
    assert set(defs["OrderLine"]["required"]) == {"sku", "quantity", "unit_price_minor"}
    assert defs["OrderLine"]["properties"]["quantity"]["minimum"] == 1
    assert set(defs["CouponRedemptionIn"]["required"]) >= {"redemption_id", "footprint"}
    json.dumps(schema)  # exportable as is


def _check_keys(doc: Any, schema: dict[str, Any], defs: dict[str, Any], path: str) -> None:
    """A small structural check (objects' required/known keys, arrays' items, through $ref) for
    when the `jsonschema` package is not installed: it is not a dependency of this project."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return  # unions (none on the required paths) are left to the model itself
    if schema.get("type") == "object":
        assert isinstance(doc, dict), path
        assert set(schema.get("required", [])) <= set(doc), path
        if schema.get("additionalProperties") is False:
            assert set(doc) <= set(schema["properties"]), path
        for key, value in doc.items():
            _check_keys(value, schema["properties"][key], defs, f"{path}.{key}")
    elif schema.get("type") == "array":
        assert isinstance(doc, list), path
        for i, item in enumerate(doc):
            _check_keys(item, schema["items"], defs, f"{path}[{i}]")


def test_json_schema_validates_the_demo_file() -> None:
    schema = orders_json_schema()
    bad = demo_doc()
    bad["orders"][0]["sub_orders"][0]["lines"][0]["colour"] = "red"
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        _check_keys(demo_doc(), schema, schema["$defs"], "")
        with pytest.raises(AssertionError):
            _check_keys(bad, schema, schema["$defs"], "")
        return
    jsonschema.validate(demo_doc(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)

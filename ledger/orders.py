"""Loading checkout orders from the order system into the ledger (`ordercancel orders load`).

The order system owns orders; the ledger keeps a priced copy (per-line coupon allocation, cash per
sub-order) so that cancellations know what a refund returns. A file is loaded in one transaction:
either every order in it is in the ledger afterwards (newly or already), or nothing was written.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, ValidationError

from domain.errors import OrderConflict
from domain.orders import CheckoutOrderIn, OrdersFile, PricedSubOrder, price_order

__all__ = [
    "LoadReport",
    "OrdersFileError",
    "load_orders",
    "order_source_hash",
    "orders_json_schema",
    "parse_orders_file",
]

# A file with thousands of mistakes is not made clearer by listing them all.
_MAX_REPORTED_ERRORS = 20


class LoadReport(BaseModel):
    """What a load did: order ids written now, and order ids that were already loaded as is."""

    model_config = ConfigDict(frozen=True)

    loaded: list[str]
    unchanged: list[str]


class OrdersFileError(ValueError):
    """An orders file that is not valid JSON or not a valid `OrdersFile`.

    The message has one line per problem, each starting with the path of the field at fault
    (`orders[0].sub_orders[1].lines[0].quantity: ...`), so an operator can fix the file without
    reading pydantic's internals. `problems` holds the same lines.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:_MAX_REPORTED_ERRORS]
        if len(problems) > len(shown):
            shown = [*shown, f"... and {len(problems) - len(shown)} more problems"]
        super().__init__("\n".join(shown))


# --- parsing -------------------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    """('orders', 0, 'sub_orders', 1, 'quantity') -> 'orders[0].sub_orders[1].quantity'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _problem(error: Any) -> str:
    """One readable line from one entry of `ValidationError.errors()`."""
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        # Our model validators write messages that already name the field inside the object
        # (`coupons[0].footprint names unknown sellers`); pydantic's "Value error, " prefix
        # adds nothing for a reader.
        message = str(error["ctx"]["error"])
    else:
        message = str(error["msg"])
    path = _path(tuple(error["loc"]))
    if not path:
        # Whole-file checks (duplicate ids across orders) already start with the field name.
        return message if error["type"] == "value_error" else f"(document): {message}"
    return f"{path}: {message}"


def parse_orders_file(text: str) -> OrdersFile:
    """Parse and validate an orders file, raising `OrdersFileError` with readable paths."""
    try:
        # The stdlib parser is only used for its error position (line/column) and message,
        # which are clearer than the JSON error pydantic reports.
        json.loads(text)
    except json.JSONDecodeError as err:
        raise OrdersFileError(
            [f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"]
        ) from err
    try:
        return OrdersFile.model_validate_json(text)
    except ValidationError as err:
        raise OrdersFileError(
            [_problem(e) for e in err.errors(include_url=False, include_input=False)]
        ) from err


def orders_json_schema() -> dict[str, Any]:
    """The JSON Schema of the orders file format (`ordercancel orders schema`)."""
    schema = OrdersFile.model_json_schema()
    # pydantic emits draft 2020-12; say so, so that validators pick the right dialect.
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --- hashing -------------------------------------------------------------------------------------


def order_source_hash(order: CheckoutOrderIn) -> str:
    """sha256 of the order's canonical JSON.

    Keys are sorted and defaults left out, so the hash depends on what the document says, not on
    its formatting, key order, or on optional fields a later version of the model may add (those
    would otherwise turn every re-load of an old order into a false conflict).
    """
    canonical = json.dumps(
        order.model_dump(mode="json", exclude_defaults=True),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _utc(moment: datetime) -> datetime:
    """The file format allows a timestamp without offset; asyncpg would read such a value in the
    loading host's local time zone, so the same file would store different instants on different
    machines. Read it as UTC instead, the order system's convention."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# --- loading -------------------------------------------------------------------------------------


async def load_orders(pool: asyncpg.Pool, orders: OrdersFile) -> LoadReport:
    """Write the orders of `orders` into the ledger, in one transaction.

    An order id already loaded with the same content is reported `unchanged` and not touched (its
    sub-orders may have been cancelled since; a re-load must not undo that). An order id already
    loaded with different content, or a payment/redemption id that belongs to another order,
    raises `OrderConflict` and nothing from the file is written.
    """
    # Pure work first, so that the transaction is as short as the writes.
    hashes = {o.order_id: order_source_hash(o) for o in orders.orders}
    # Inserting in order-id order means two concurrent loads of overlapping files take their row
    # locks in the same order: one waits for the other instead of deadlocking.
    by_id = sorted(orders.orders, key=lambda o: o.order_id)

    async with pool.acquire() as conn, conn.transaction():
        try:
            new_ids = await _insert_checkout_orders(conn, by_id, hashes)
            await _check_existing(conn, [o for o in by_id if o.order_id not in new_ids], hashes)
            new_orders = [o for o in by_id if o.order_id in new_ids]
            await _check_foreign_ids(conn, new_orders)
            await _insert_details(conn, new_orders)
        except asyncpg.UniqueViolationError as err:
            # Backstop for a concurrent load that took the same payment or redemption id between
            # our check and our insert; the check above gives the friendlier message otherwise.
            raise OrderConflict(
                f"the orders file clashes with data already in the ledger: {err.detail or err}"
            ) from err

    return LoadReport(
        loaded=[o.order_id for o in orders.orders if o.order_id in new_ids],
        unchanged=[o.order_id for o in orders.orders if o.order_id not in new_ids],
    )


async def _insert_checkout_orders(
    conn: asyncpg.Connection, orders: list[CheckoutOrderIn], hashes: dict[str, str]
) -> set[str]:
    """Insert the order headers that are not there yet; return the ids inserted now.

    ON CONFLICT DO NOTHING (rather than a SELECT first) makes a concurrent load of the same id
    wait for the other transaction and then see its row, so the hash comparison below is never
    made against a row that is about to appear.
    """
    rows = await conn.fetch(
        """
        INSERT INTO checkout_orders (order_id, buyer_id, currency, source_hash, placed_at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
        ON CONFLICT (order_id) DO NOTHING
        RETURNING order_id
        """,
        [o.order_id for o in orders],
        [o.buyer_id for o in orders],
        [o.currency for o in orders],
        [hashes[o.order_id] for o in orders],
        [_utc(o.placed_at) for o in orders],
    )
    return {r["order_id"] for r in rows}


async def _check_existing(
    conn: asyncpg.Connection, orders: list[CheckoutOrderIn], hashes: dict[str, str]
) -> None:
    """Orders already in the ledger must be the same document; anything else is a conflict."""
    if not orders:
        return
    stored = {
        r["order_id"]: r["source_hash"]
        for r in await conn.fetch(
            "SELECT order_id, source_hash FROM checkout_orders WHERE order_id = ANY($1::text[])",
            [o.order_id for o in orders],
        )
    }
    changed = [o.order_id for o in orders if stored.get(o.order_id) != hashes[o.order_id]]
    if changed:
        raise OrderConflict(
            f"order {changed[0]} is already loaded with different content"
            + (f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if changed[1:] else "")
            + "; the order system's orders are never edited here, nothing was loaded"
        )


async def _check_foreign_ids(conn: asyncpg.Connection, orders: list[CheckoutOrderIn]) -> None:
    """A new order's payment id and redemption ids must not belong to an order already loaded."""
    if not orders:
        return
    payment = await conn.fetchrow(
        "SELECT payment_id, order_id FROM payments WHERE payment_id = ANY($1::text[])"
        " ORDER BY payment_id LIMIT 1",
        [o.payment.payment_id for o in orders],
    )
    if payment is not None:
        mine = next(o.order_id for o in orders if o.payment.payment_id == payment["payment_id"])
        raise OrderConflict(
            f"order {mine}: payment {payment['payment_id']} already belongs to order "
            f"{payment['order_id']}; nothing was loaded"
        )
    redemption = await conn.fetchrow(
        "SELECT redemption_id, order_id FROM coupon_redemptions"
        " WHERE redemption_id = ANY($1::text[]) ORDER BY redemption_id LIMIT 1",
        [c.redemption_id for o in orders for c in o.coupons],
    )
    if redemption is not None:
        mine = next(
            o.order_id
            for o in orders
            if any(c.redemption_id == redemption["redemption_id"] for c in o.coupons)
        )
        raise OrderConflict(
            f"order {mine}: coupon redemption {redemption['redemption_id']} already belongs to "
            f"order {redemption['order_id']}; nothing was loaded"
        )


async def _insert_details(conn: asyncpg.Connection, orders: list[CheckoutOrderIn]) -> None:
    """Payments, sub-orders, lines and coupons of the orders inserted now."""
    if not orders:
        return
    priced: dict[str, list[PricedSubOrder]] = {o.order_id: price_order(o) for o in orders}

    await conn.executemany(
        """
        INSERT INTO payments
            (payment_id, order_id, method, validation, capture, amount_minor, currency,
             captured_minor)
        -- Captured at checkout: captured in full (migration 009).
        VALUES ($1, $2, $3, $4, $5, $6::bigint, $7,
                CASE WHEN $5 = 'captured' THEN $6::bigint ELSE 0 END)
        """,
        [
            (
                o.payment.payment_id,
                o.order_id,
                o.payment.method.value,
                o.payment.validation.value,
                o.payment.capture.value,
                # One payment covers the checkout: the cash of every sub-order, no more.
                sum(s.cash_minor for s in priced[o.order_id]),
                o.currency,
            )
            for o in orders
        ],
    )
    await conn.executemany(
        """
        INSERT INTO sub_orders (order_id, seller_id, status, items_minor, discount_minor,
                                shipping_minor, cash_minor)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        [
            (
                o.order_id,
                s.seller_id,
                s.status.value,
                s.items_minor,
                s.discount_minor,
                s.shipping_minor,
                s.cash_minor,
            )
            for o in orders
            for s in priced[o.order_id]
        ],
    )
    await conn.executemany(
        """
        INSERT INTO order_lines (order_id, seller_id, line_no, sku, quantity, unit_price_minor,
                                 discount_minor)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        [
            (
                o.order_id,
                s.seller_id,
                line.line_no,
                line.sku,
                line.quantity,
                line.unit_price_minor,
                line.discount_minor,
            )
            for o in orders
            for s in priced[o.order_id]
            for line in s.lines
        ],
    )
    coupons = [(o, c) for o in orders for c in o.coupons]
    if coupons:
        await conn.executemany(
            """
            INSERT INTO coupon_redemptions
                (redemption_id, order_id, coupon_code, discount_minor, expires_at)
            VALUES ($1, $2, $3, $4, $5)
            """,
            [
                (c.redemption_id, o.order_id, c.coupon_code, c.discount_minor, _utc(c.expires_at))
                for o, c in coupons
            ],
        )
        await conn.executemany(
            """
            INSERT INTO coupon_footprints (redemption_id, order_id, seller_id)
            VALUES ($1, $2, $3)
            """,
            [(c.redemption_id, o.order_id, seller) for o, c in coupons for seller in c.footprint],
        )

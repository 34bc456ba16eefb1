"""What the API tests share: orders loaded for a request, request bodies, keys in headers and the
check of a problem document (api/errors.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx

from ledger.orders import load_orders, parse_orders_file


def order_document(
    order_id: str,
    *,
    buyer: str,
    sellers: tuple[str, ...],
    validated: bool = True,
    coupon: bool = False,
    quantity: int = 2,
    unit_price_minor: int = 1250,
) -> dict[str, Any]:
    """An order of `sellers` for `buyer`, in the orders-file format. Validated: captured,
    accepted by the sellers (request path). Not validated: only authorised (instant path, a
    void). With `coupon`, a coupon over every seller."""
    order: dict[str, Any] = {
        "order_id": order_id,
        "buyer_id": buyer,
        "currency": "EUR",
        "placed_at": "2026-03-10T10:00:00Z",
        "payment": {
            "payment_id": f"P-{order_id}",
            "method": "card",
            "validation": "validated" if validated else "unvalidated",
            "capture": "captured" if validated else "authorized",
        },
        "sub_orders": [
            {
                "seller_id": seller,
                "seller_accepted": validated,
                "shipping_minor": 300,
                "lines": [
                    {
                        "sku": f"SKU-{seller}",
                        "quantity": quantity,
                        "unit_price_minor": unit_price_minor,
                    }
                ],
            }
            for seller in sellers
        ],
    }
    if coupon:
        order["coupons"] = [
            {
                "redemption_id": f"R-{order_id}",
                "coupon_code": "API5",
                "discount_minor": 500,
                "expires_at": "2099-01-01T00:00:00Z",
                "footprint": list(sellers),
            }
        ]
    return order


async def load_order(
    pool: asyncpg.Pool,
    prefix: str,
    *,
    buyer: str,
    seller: str | None = None,
    sellers: tuple[str, ...] = (),
    paid: bool = True,
    **options: Any,
) -> str:
    """Load a new order (`order_document`) with an id no other run used; its id."""
    order_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    every = sellers or ((seller,) if seller else ())
    assert every, "an order needs a seller"
    document = order_document(order_id, buyer=buyer, sellers=every, validated=paid, **options)
    report = await load_orders(pool, parse_orders_file(json.dumps({"orders": [document]})))
    assert report.loaded == [order_id]
    return order_id


def request_body(
    order_id: str, seller: str, buyer: str, *, reason: str = "out_of_stock", **extra: Any
) -> dict[str, Any]:
    """The body of `POST /v1/cancellations`."""
    return {"order_id": order_id, "seller_id": seller, "buyer_id": buyer, "reason": reason, **extra}


def bearer(keys: dict[str, str], principal: str | None) -> dict[str, str]:
    """The Authorization header of `principal`'s key; none for None."""
    return {"Authorization": f"Bearer {keys[principal]}"} if principal else {}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A problem document (application/problem+json) of `status` and `code`, with a detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert problem["status"] == status and problem["detail"], problem
    return problem

"""Orders and settings made up on the spot for a test: ids no other run has used, orders in the
orders-file format (one builder, `order_document`), refund timings short enough to wait for."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from infra.settings import Settings


def fast_refund_settings(**overrides: Any) -> Settings:
    """The worker's settings with refund timings (and the window floor) short enough for a
    test."""
    return Settings(
        **{
            "refund_poll_interval": timedelta(milliseconds=200),
            "refund_poll_max_interval": timedelta(seconds=1),
            "refund_submit_initial_interval": timedelta(milliseconds=100),
            "refund_submit_max_interval": timedelta(seconds=1),
            # R19: tests give sellers windows of seconds (helpers.policies).
            "seller_response_window_floor": timedelta(milliseconds=500),
            **overrides,
        }
    )


def order_document(
    order_id: str,
    *,
    buyer_id: str,
    sellers: tuple[str, ...],
    validated: bool = True,
    coupon: bool = False,
    quantity: int = 2,
    unit_price_minor: int = 1250,
) -> dict[str, Any]:
    """An order of `sellers` for `buyer_id`, in the orders-file format. Validated: paid by card
    and captured, accepted by the sellers (request path). Not validated: only authorised (instant
    path, a void). With `coupon`, a coupon over every seller (restored when they are all
    cancelled and refunded)."""
    order: dict[str, Any] = {
        "order_id": order_id,
        "buyer_id": buyer_id,
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
                "coupon_code": "TEST5",
                "discount_minor": 500,
                "expires_at": "2099-01-01T00:00:00Z",
                "footprint": list(sellers),
            }
        ]
    return order


def one_seller_order(
    order_id: str, *, buyer_id: str, seller_id: str, **options: Any
) -> dict[str, Any]:
    """`order_document` of the one seller `seller_id`."""
    return order_document(order_id, buyer_id=buyer_id, sellers=(seller_id,), **options)


def orders_file(*orders: dict[str, Any]) -> str:
    return json.dumps({"orders": list(orders)})


def unique(prefix: str) -> str:
    """An id no other run on a shared server has used (workflow ids are business keys)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"

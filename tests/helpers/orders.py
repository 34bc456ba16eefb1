"""Orders and settings made up on the spot for a test: ids no other run has used, orders of one
seller in the orders-file format, refund timings short enough to wait for."""

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


def one_seller_order(
    order_id: str,
    *,
    buyer_id: str,
    seller_id: str,
    validated: bool = True,
    coupon: bool = False,
) -> dict[str, Any]:
    """An order of one seller for the orders file. Validated: paid by card and captured, the
    seller has accepted (request path). Not validated: only authorised (instant path). With
    `coupon`, a coupon paid for it (restored when it is cancelled and refunded)."""
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
                "seller_id": seller_id,
                "seller_accepted": validated,
                "shipping_minor": 300,
                "lines": [{"sku": "E2E-SKU", "quantity": 2, "unit_price_minor": 1250}],
            }
        ],
    }
    if coupon:
        order["coupons"] = [
            {
                "redemption_id": f"R-{order_id}",
                "coupon_code": "E2E5",
                "discount_minor": 500,
                "expires_at": "2099-01-01T00:00:00Z",
                "footprint": [seller_id],
            }
        ]
    return order


def orders_file(*orders: dict[str, Any]) -> str:
    return json.dumps({"orders": list(orders)})


def unique(prefix: str) -> str:
    """An id no other run on a shared server has used (workflow ids are business keys)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"

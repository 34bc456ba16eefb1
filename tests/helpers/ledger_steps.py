"""Ledger steps shared by the ledger tests and the outbox tests: the demo orders, fresh orders,
and each business step of a cancellation driven straight on `ledger.repository.Ledger`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from devstack.demo import DEMO_FILE
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CaptureState,
    CouponOutcome,
    EtaRange,
    PaymentMethod,
    PaymentValidation,
    RequestCancellationInput,
    TransitionInput,
)
from domain.orders import (
    CheckoutOrderIn,
    CouponRedemptionIn,
    OrderLine,
    PaymentIn,
    SubOrderIn,
)
from domain.rules import DEFAULT_ETA_TABLE, cancellation_id
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger, RefundRecord

BUYERS = {
    "O-1001": "B-501",
    "O-1002": "B-502",
    "O-1003": "B-503",
    "O-2001": "B-601",
    "O-2002": "B-602",
}


# --- helpers -------------------------------------------------------------------------------------


async def load_demo(pool: asyncpg.Pool) -> Ledger:
    await load_orders(pool, parse_orders_file(DEMO_FILE.read_text()))
    return Ledger(pool)


def request(order_id: str, seller_id: str, buyer_id: str | None = None) -> RequestCancellationInput:
    return RequestCancellationInput(
        order_id=order_id,
        seller_id=seller_id,
        buyer_id=buyer_id or BUYERS[order_id],
        reason=CancellationReason.ORDERED_BY_MISTAKE,
        reason_text="bought the wrong colour",
    )


def fresh_order(
    order_id: str,
    *,
    sellers: tuple[str, ...] = ("S-7",),
    unvalidated: bool = False,
    coupon_expires: datetime | None = None,
) -> CheckoutOrderIn:
    """A small order built with the order-file models (one line per seller, optional coupon
    whose footprint is every seller)."""
    return CheckoutOrderIn(
        order_id=order_id,
        buyer_id="B-1",
        currency="EUR",
        placed_at=datetime(2026, 5, 1, 12, tzinfo=UTC),
        payment=PaymentIn(
            payment_id="P" + order_id,
            method=PaymentMethod.CARD,
            validation=(
                PaymentValidation.UNVALIDATED if unvalidated else PaymentValidation.VALIDATED
            ),
            capture=CaptureState.AUTHORIZED if unvalidated else CaptureState.CAPTURED,
        ),
        sub_orders=[
            SubOrderIn(
                seller_id=seller,
                lines=[OrderLine(sku="SKU-" + seller, quantity=1, unit_price_minor=2000 + 500 * i)],
                shipping_minor=300,
                seller_accepted=not unvalidated,
            )
            for i, seller in enumerate(sellers)
        ],
        coupons=(
            [
                CouponRedemptionIn(
                    redemption_id="R" + order_id,
                    coupon_code="SPRING10",
                    discount_minor=700,
                    expires_at=coupon_expires,
                    footprint=list(sellers),
                )
            ]
            if coupon_expires is not None
            else []
        ),
    )


FUTURE = datetime(2030, 1, 1, tzinfo=UTC)


async def snapshot(pool: asyncpg.Pool) -> dict[str, Any]:
    """Everything a cancellation can write, to prove that a refused call wrote nothing."""
    return {
        "cancellations": await pool.fetch("SELECT * FROM cancellations ORDER BY 1"),
        "events": await pool.fetchval("SELECT count(*) FROM cancellation_events"),
        "refunds": await pool.fetch("SELECT * FROM refunds ORDER BY 1"),
        "decisions": await pool.fetchval("SELECT count(*) FROM coupon_decisions"),
        "payments": await pool.fetch("SELECT payment_id, refunded_minor FROM payments ORDER BY 1"),
        "sub_orders": await pool.fetch(
            "SELECT order_id, seller_id, status, status_changed_at FROM sub_orders ORDER BY 1, 2"
        ),
        "coupons": await pool.fetch(
            "SELECT redemption_id, restored_at, restored_by FROM coupon_redemptions ORDER BY 1"
        ),
    }


async def events(pool: asyncpg.Pool, cid: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT kind FROM cancellation_events WHERE cancellation_id = $1 ORDER BY event_id", cid
    )
    return [r["kind"] for r in rows]


async def refunded(pool: asyncpg.Pool, payment_id: str) -> int:
    value: int = await pool.fetchval(
        "SELECT refunded_minor FROM payments WHERE payment_id = $1", payment_id
    )
    return value


async def cash(pool: asyncpg.Pool, order_id: str, seller_id: str) -> int:
    value: int = await pool.fetchval(
        "SELECT cash_minor FROM sub_orders WHERE order_id = $1 AND seller_id = $2",
        order_id,
        seller_id,
    )
    return value


async def ask_refund(ledger: Ledger, cid: str) -> RefundRecord:
    return await ledger.request_refund(
        cancellation_id=cid,
        event_key="refund_requested",
        now=datetime.now(UTC),
        eta_table=DEFAULT_ETA_TABLE,
    )


def some_eta() -> EtaRange:
    now = datetime.now(UTC)
    return EtaRange(earliest=now + timedelta(days=3), latest=now + timedelta(days=20))


async def approve(ledger: Ledger, cid: str) -> None:
    """The seller's acceptance as the workflow records it: status and sub-order in one step."""
    await ledger.record_transition(
        TransitionInput(
            cancellation_id=cid,
            status=CancellationStatus.APPROVED,
            actor="seller",
            kind="approved",
            event_key="approved",
            cancel_sub_order=True,
        )
    )


async def cancel_and_request_refund(
    ledger: Ledger, order_id: str, seller_id: str, buyer_id: str | None = None
) -> str:
    """Open (either path), approve if needed, and record the refund intent (dot 1)."""
    cid = cancellation_id(order_id, seller_id)
    opened = await ledger.open_cancellation(
        cancellation_id=cid, request=request(order_id, seller_id, buyer_id)
    )
    if opened.path is CancellationPath.REQUEST:
        await approve(ledger, cid)
    await ask_refund(ledger, cid)
    return cid


async def confirm(ledger: Ledger, cid: str) -> None:
    await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_" + cid, eta=some_eta(), event_key="submitted"
    )
    await ledger.record_refund_confirmed(cancellation_id=cid, event_key="confirmed")


async def fully_refund(
    ledger: Ledger, order_id: str, seller_id: str, buyer_id: str | None = None
) -> str:
    cid = await cancel_and_request_refund(ledger, order_id, seller_id, buyer_id)
    await confirm(ledger, cid)
    return cid


async def decide(ledger: Ledger, cid: str) -> CouponOutcome:
    return await ledger.decide_coupon(cancellation_id=cid, event_key="coupon")


# --- R1: the instant path and the request path -----------------------------------------------

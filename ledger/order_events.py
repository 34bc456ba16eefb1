"""The order system keeps the ledger live (R13, R14): orders posted one by one, and the events
that follow them (payment validated, payment captured, seller accepted, sub-order shipped).

Each event is applied in one transaction that first locks the order's sub-orders (in seller-id
order), then its payment. The cancellation's opening (`ledger_open_cancellation`, migration 009)
locks its sub-order the same way before it reads anything, so an event and an instant
cancellation of the same sub-order serialise (R1): the first to commit wins, and the other reads
the state it left. Nothing is half-applied: an event that cannot be applied raises, and the
transaction writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import asyncpg

from domain.errors import (
    CaptureExceedsAuthorisation,
    OrderEventConflict,
    OrderNotFound,
    SubOrderAlreadyShipped,
    SubOrderNotFound,
)
from domain.models import CaptureState, Money, PaymentMethod, PaymentValidation, SubOrderStatus
from domain.order_events import (
    CaptureAmountMismatch,
    EventOutcome,
    NothingToCapture,
    OrderAccepted,
    OrderEventIn,
    OrderEventResult,
    OrderEventType,
    PaymentState,
    SubOrderState,
)
from domain.orders import CheckoutOrderIn, OrdersFile
from ledger.orders import load_orders

__all__ = [
    "apply_order_event",
    "event_hash",
    "mark_notified",
    "order_state",
    "post_order",
    "refuse_if_shipped",
    "refuse_if_shipped_else_amount",
]

PENDING = ("awaiting_seller", "escalated")


def _utc(moment: datetime) -> datetime:
    """A time without offset is the order system's UTC (as in the orders file)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def event_hash(order_id: str, event: OrderEventIn) -> str:
    """sha256 of the event as validated (and its order): the same event in other whitespace,
    key order or time-zone offset is the same event."""
    document = {
        **event.model_dump(mode="json", exclude={"occurred_at"}),
        "occurred_at": _utc(event.occurred_at).isoformat(),
        "order_id": order_id,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- orders ---------------------------------------------------------------------------------------


async def post_order(pool: asyncpg.Pool, order: CheckoutOrderIn) -> OrderAccepted:
    """One checkout order, as the orders file has them (ledger.orders): written now, or already
    there as the same document (`created: false`, nothing changes); another document under the
    same id raises `OrderConflict` and nothing is written."""
    report = await load_orders(pool, OrdersFile(orders=[order]))
    async with pool.acquire() as conn:
        payment, sub_orders = await order_state(conn, order.order_id)
    return OrderAccepted(
        order_id=order.order_id,
        created=order.order_id in report.loaded,
        payment=payment,
        sub_orders=sub_orders,
    )


async def order_state(
    conn: asyncpg.Connection, order_id: str
) -> tuple[PaymentState, list[SubOrderState]]:
    payment = await conn.fetchrow(
        "SELECT validation, capture, amount_minor, captured_minor, currency FROM payments"
        " WHERE order_id = $1",
        order_id,
    )
    if payment is None:
        raise OrderNotFound(f"no order {order_id}")
    subs = await conn.fetch(
        """
        SELECT s.seller_id, s.status, s.seller_accepted_at, s.shipped_at, c.cancellation_id
        FROM sub_orders s
        LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
        WHERE s.order_id = $1 ORDER BY s.seller_id
        """,
        order_id,
    )
    return (
        PaymentState(
            validation=PaymentValidation(payment["validation"]),
            capture=CaptureState(payment["capture"]),
            amount_minor=payment["amount_minor"],
            captured_minor=payment["captured_minor"],
            currency=payment["currency"].strip(),
        ),
        [
            SubOrderState(
                seller_id=s["seller_id"],
                status=SubOrderStatus(s["status"]),
                # The seller's acceptance arrived as an event (or its shipment did).
                seller_accepted=s["seller_accepted_at"] is not None,
                shipped=s["shipped_at"] is not None,
                cancellation_id=s["cancellation_id"],
            )
            for s in subs
        ],
    )


# --- events ---------------------------------------------------------------------------------------


async def apply_order_event(
    pool: asyncpg.Pool, order_id: str, event: OrderEventIn
) -> OrderEventResult:
    """Apply the event once, in one transaction; a redelivery of the same event id with the same
    document gets the first answer (`duplicate: true`), with another document raises
    `OrderEventConflict`. Unknown order: `OrderNotFound`; unknown sub-order: `SubOrderNotFound`;
    a capture above the authorisation: `CaptureExceedsAuthorisation`. Nothing is written then."""
    digest = event_hash(order_id, event)
    try:
        async with pool.acquire() as conn, conn.transaction():
            result = await _apply(conn, order_id, event, digest)
    except asyncpg.UniqueViolationError as err:
        # The same event id, delivered at the same moment for another order (for the same
        # order, the sub-order locks made the second delivery wait and read the first).
        raise OrderEventConflict(
            f"event {event.event_id} was already recorded with another document"
        ) from err
    return result


async def _apply(
    conn: asyncpg.Connection, order_id: str, event: OrderEventIn, digest: str
) -> OrderEventResult:
    # The locks first, always in this order: the order's sub-orders (by seller id), then its
    # payment. Every statement after them sees what was committed before they were granted.
    subs = {
        r["seller_id"]: r
        for r in await conn.fetch(
            "SELECT seller_id, status, seller_accepted_at, shipped_at FROM sub_orders"
            " WHERE order_id = $1 ORDER BY seller_id FOR UPDATE",
            order_id,
        )
    }
    if not subs:
        raise OrderNotFound(f"no order {order_id}")
    payment = await conn.fetchrow(
        "SELECT validation, capture, amount_minor, captured_minor, released_minor FROM payments"
        " WHERE order_id = $1 FOR UPDATE",
        order_id,
    )
    assert payment is not None  # every order has its payment (ledger.orders)

    seen = await conn.fetchrow(
        "SELECT order_id, body_hash, outcome, detail, cancellation_id, notified_at, seller_id"
        " FROM order_events WHERE event_id = $1",
        event.event_id,
    )
    if seen is not None:
        if seen["body_hash"] != digest:
            raise OrderEventConflict(
                f"event {event.event_id} was already recorded with another document"
                f" ({event.type.value} of order {seen['order_id']} as first received);"
                " an event id names one event"
            )
        return await _result(
            conn,
            order_id,
            event,
            outcome=EventOutcome(seen["outcome"]),
            detail=seen["detail"],
            cancellation_id=seen["cancellation_id"],
            notified=seen["notified_at"] is not None,
            duplicate=True,
        )

    if event.type.per_sub_order and event.seller_id not in subs:
        raise SubOrderNotFound(f"order {order_id} has no sub-order of seller {event.seller_id}")

    cancellations = {
        r["seller_id"]: r
        for r in await conn.fetch(
            "SELECT seller_id, cancellation_id, path, status FROM cancellations"
            " WHERE order_id = $1",
            order_id,
        )
    }
    at = _utc(event.occurred_at)
    cancellation_id: str | None = None
    match event.type:
        case OrderEventType.PAYMENT_VALIDATED | OrderEventType.PAYMENT_CAPTURED:
            outcome, detail = await _payment_event(conn, order_id, event, payment, subs)
        case OrderEventType.SELLER_ACCEPTED:
            assert event.seller_id is not None
            outcome, detail = await _seller_accepted(
                conn, order_id, event.seller_id, at, subs, cancellations
            )
        case OrderEventType.SUB_ORDER_SHIPPED:
            assert event.seller_id is not None
            outcome, detail, cancellation_id = await _shipped(
                conn, order_id, event.seller_id, at, subs, cancellations
            )

    amount = (
        (event.amount_minor if event.amount_minor is not None else payment["amount_minor"])
        if event.type is OrderEventType.PAYMENT_CAPTURED
        else None
    )
    await conn.execute(
        """
        INSERT INTO order_events (event_id, order_id, type, seller_id, amount_minor, occurred_at,
            body_hash, outcome, detail, cancellation_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        """,
        event.event_id,
        order_id,
        event.type.value,
        event.seller_id,
        amount,
        at,
        digest,
        outcome.value,
        detail,
        cancellation_id,
    )
    return await _result(
        conn,
        order_id,
        event,
        outcome=outcome,
        detail=detail,
        cancellation_id=cancellation_id,
        notified=False,
        duplicate=False,
    )


async def _accept_unvalidated(conn: asyncpg.Connection, order_id: str, sellers: list[str]) -> None:
    """R1: these sub-orders leave the instant path (they go through their seller from now on)."""
    await conn.execute(
        "UPDATE sub_orders SET status = 'accepted', status_changed_at = clock_timestamp()"
        " WHERE order_id = $1 AND seller_id = ANY($2::text[]) AND status = 'unvalidated'",
        order_id,
        sellers,
    )


def _cancelled_note(
    sellers: list[str], cancellations: dict[str, asyncpg.Record] | None = None
) -> str:
    if not sellers:
        return ""
    named = ", ".join(
        f"{s} (cancellation {cancellations[s]['cancellation_id']}, {cancellations[s]['path']} path)"
        if cancellations and s in cancellations
        else s
        for s in sellers
    )
    return f"; already cancelled, and stays so: {named}"


async def _payment_event(
    conn: asyncpg.Connection,
    order_id: str,
    event: OrderEventIn,
    payment: asyncpg.Record,
    subs: dict[str, asyncpg.Record],
) -> tuple[EventOutcome, str]:
    unvalidated = [s for s, r in subs.items() if r["status"] == "unvalidated"]
    cancelled = [s for s, r in subs.items() if r["status"] == "cancelled"]
    if event.type is OrderEventType.PAYMENT_VALIDATED:
        if payment["validation"] == "validated":
            why = "captured" if payment["capture"] == "captured" else "validated"
            return EventOutcome.UNCHANGED, f"the payment was already {why}: nothing changes"
        await conn.execute(
            "UPDATE payments SET validation = 'validated' WHERE order_id = $1", order_id
        )
        await _accept_unvalidated(conn, order_id, unvalidated)
        return EventOutcome.APPLIED, (
            "payment validated"
            + (
                f"; a cancellation of {', '.join(unvalidated)} now waits for the seller"
                " (request path)"
                if unvalidated
                else ""
            )
            + _cancelled_note(cancelled)
        )
    # Captured implies validated (R13).
    # R15: a capture takes what is left of the authorisation: the shares released by
    # cancellations before it are not captured. A given amount must be exactly that; a capture
    # of less would leave shares neither captured nor released, which no cancellation could
    # refund or release afterwards.
    authorised: int = payment["amount_minor"]
    released: int = payment["released_minor"]
    capturable = authorised - released
    amounts = f"authorised {authorised}, released {released}, capturable {capturable}"
    if payment["capture"] == "captured":
        if event.amount_minor is not None and event.amount_minor != payment["captured_minor"]:
            raise CaptureAmountMismatch(
                f"amount_minor {event.amount_minor}: the payment was already captured"
                f" ({payment['captured_minor']}; {amounts}); nothing changes"
            )
        return EventOutcome.UNCHANGED, (
            f"the payment was already captured ({payment['captured_minor']}): nothing changes"
        )
    if capturable <= 0:
        raise NothingToCapture(
            f"nothing to capture: every share of the payment was released by a cancellation"
            f" ({amounts})"
        )
    amount = event.amount_minor if event.amount_minor is not None else capturable
    if amount > capturable:
        raise CaptureExceedsAuthorisation(
            f"amount_minor {amount} exceeds what the payment can capture ({capturable}:"
            f" authorised {authorised}, released {released})"
        )
    if amount != capturable:
        raise CaptureAmountMismatch(
            f"amount_minor {amount} is not what the payment can capture ({amounts}): a capture"
            " takes all that is left of the authorisation (R15); leave amount_minor out or"
            f" send {capturable}"
        )
    await conn.execute(
        "UPDATE payments SET validation = 'validated', capture = 'captured', captured_minor = $2"
        " WHERE order_id = $1",
        order_id,
        amount,
    )
    await _accept_unvalidated(conn, order_id, unvalidated)
    return EventOutcome.APPLIED, (
        f"payment captured ({amount} of {authorised}); a cancellation refunds it from now on"
        + (" (and validated)" if payment["validation"] == "unvalidated" else "")
        + _cancelled_note(cancelled)
    )


async def _seller_accepted(
    conn: asyncpg.Connection,
    order_id: str,
    seller_id: str,
    at: datetime,
    subs: dict[str, asyncpg.Record],
    cancellations: dict[str, asyncpg.Record],
) -> tuple[EventOutcome, str]:
    sub = subs[seller_id]
    if sub["status"] == "cancelled":
        # R1: the cancellation committed first; the acceptance is recorded, nothing resurrects.
        return EventOutcome.SUB_ORDER_CANCELLED, (
            f"recorded; sub-order {seller_id} was cancelled before the acceptance arrived"
            + _cancelled_note([seller_id], cancellations).removeprefix("; already cancelled")
        )
    if sub["seller_accepted_at"] is not None:
        return EventOutcome.UNCHANGED, f"seller {seller_id} had already accepted: nothing changes"
    await conn.execute(
        "UPDATE sub_orders SET seller_accepted_at = $3 WHERE order_id = $1 AND seller_id = $2",
        order_id,
        seller_id,
        at,
    )
    await _accept_unvalidated(conn, order_id, [seller_id])
    return EventOutcome.APPLIED, (
        f"seller {seller_id} accepted"
        + (
            "; a cancellation now waits for the seller (request path)"
            if sub["status"] == "unvalidated"
            else ""
        )
    )


async def _shipped(
    conn: asyncpg.Connection,
    order_id: str,
    seller_id: str,
    at: datetime,
    subs: dict[str, asyncpg.Record],
    cancellations: dict[str, asyncpg.Record],
) -> tuple[EventOutcome, str, str | None]:
    sub = subs[seller_id]
    if sub["status"] == "cancelled":
        return (
            EventOutcome.SUB_ORDER_CANCELLED,
            f"recorded; sub-order {seller_id} was cancelled before it shipped"
            + _cancelled_note([seller_id], cancellations).removeprefix("; already cancelled"),
            None,
        )
    if sub["shipped_at"] is not None:
        return EventOutcome.UNCHANGED, f"sub-order {seller_id} had already shipped", None
    # Shipped implies accepted (R13).
    await conn.execute(
        "UPDATE sub_orders SET shipped_at = $3, seller_accepted_at = coalesce(seller_accepted_at,"
        " $3) WHERE order_id = $1 AND seller_id = $2",
        order_id,
        seller_id,
        at,
    )
    await _accept_unvalidated(conn, order_id, [seller_id])
    waiting = cancellations.get(seller_id)
    if waiting is not None and waiting["status"] in PENDING:
        # R14: the shipment is the seller's answer; the workflow is told after the commit.
        return (
            EventOutcome.REQUEST_REJECTED,
            f"sub-order {seller_id} shipped; the request {waiting['cancellation_id']} waiting for"
            " the seller ends rejected (shipped)",
            waiting["cancellation_id"],
        )
    return (
        EventOutcome.APPLIED,
        f"sub-order {seller_id} shipped; it can no longer be cancelled",
        None,
    )


async def _result(
    conn: asyncpg.Connection,
    order_id: str,
    event: OrderEventIn,
    *,
    outcome: EventOutcome,
    detail: str,
    cancellation_id: str | None,
    notified: bool,
    duplicate: bool,
) -> OrderEventResult:
    payment, sub_orders = await order_state(conn, order_id)
    if outcome is EventOutcome.SUB_ORDER_CANCELLED and cancellation_id is None:
        # The cancellation that came first (None when the order system cancelled it).
        cancellation_id = next(
            (s.cancellation_id for s in sub_orders if s.seller_id == event.seller_id), None
        )
    return OrderEventResult(
        event_id=event.event_id,
        order_id=order_id,
        type=event.type,
        seller_id=event.seller_id,
        outcome=outcome,
        detail=detail,
        duplicate=duplicate,
        cancellation_id=cancellation_id,
        workflow_notified=notified if outcome is EventOutcome.REQUEST_REJECTED else None,
        payment=payment,
        sub_orders=sub_orders,
    )


async def mark_notified(pool: asyncpg.Pool, event_id: str) -> None:
    """The workflow of the request this shipment ended has been told (R14)."""
    await pool.execute(
        "UPDATE order_events SET notified_at = coalesce(notified_at, clock_timestamp())"
        " WHERE event_id = $1",
        event_id,
    )


async def refuse_if_shipped(pool: asyncpg.Pool, *, order_id: str, seller_id: str) -> None:
    """R14, before a cancellation is started: a shipped sub-order without a cancellation is not
    cancelled here (`SubOrderAlreadyShipped`). The opening refuses it again, under the lock."""
    await refuse_if_shipped_else_amount(pool, order_id=order_id, seller_id=seller_id)


async def refuse_if_shipped_else_amount(
    pool: asyncpg.Pool, *, order_id: str, seller_id: str
) -> tuple[Money, PaymentMethod] | None:
    """`refuse_if_shipped`, and the cash paid for the sub-order and how (for the one-line
    summary, as `Ledger.sub_order_amount` gives it; None: unknown sub-order), in one round
    trip."""
    row = await pool.fetchrow(
        """
        SELECT s.shipped_at IS NOT NULL AND c.cancellation_id IS NULL AS shipped,
            s.cash_minor, p.currency, p.method
        FROM sub_orders s
        JOIN payments p ON p.order_id = s.order_id
        LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
        WHERE s.order_id = $1 AND s.seller_id = $2
        """,
        order_id,
        seller_id,
    )
    if row is None:
        return None
    if row["shipped"]:
        raise SubOrderAlreadyShipped(
            f"already_shipped: sub-order {order_id}/{seller_id} has shipped; it cannot be"
            " cancelled here (a return or a dispute can)"
        )
    money = Money(amount_minor=row["cash_minor"], currency=row["currency"].strip())
    return money, PaymentMethod(row["method"])

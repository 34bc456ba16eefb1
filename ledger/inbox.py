"""R17, looking things up from the ledger (never from Temporal's visibility store): the list of
cancellations (a seller's inbox, an operator's search), keyset-paged; and the buyer's order
view, every sub-order of a checkout with its cancellation.

The list's order (migration 012): requests awaiting their seller first, the soonest deadline
first; then every other cancellation, oldest first; ties by id. A cursor is the last row's
sort key, opaque to callers (base64 of JSON). Pages are stable while new cancellations
arrive: a new row sorts before the cursor (not seen by this walk) or after it (seen once), and
the rows that were there are each seen once. A row whose status changes between two pages may
move across the cursor (a decided request leaves the waiting group): read the last page again
if that matters.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

import asyncpg

from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CouponOutcome,
    EtaRange,
    Money,
    Record,
    RefundDot,
    RefundView,
    SubOrderStatus,
)
from domain.rules import parse_cancellation_id, refund_dots
from ledger.repository import Ledger, refund_times

LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 200


class InvalidCursor(ValueError):
    """A cursor this service did not hand out (or one from another version of it)."""


class CancellationSummary(Record):
    """One row of the list."""

    cancellation_id: str
    order_id: str
    seller_id: str
    buyer_id: str
    reason: CancellationReason
    path: CancellationPath
    status: CancellationStatus
    seller_deadline: datetime | None = None
    requested_at: datetime
    updated_at: datetime


class CancellationPage(Record):
    items: list[CancellationSummary]
    # Pass as `cursor` for the next page; None: this was the last one.
    next_cursor: str | None = None


def encode_cursor(rank: int, at: datetime, cancellation_id: str) -> str:
    raw = json.dumps([rank, at.isoformat(), cancellation_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        rank, at, cancellation_id = json.loads(raw)
        parsed = datetime.fromisoformat(at)
        # Exactly what `encode_cursor` writes: a rank (an int, not a bool or a float), a time
        # with its zone, a cancellation id (nothing PostgreSQL could refuse).
        if (
            type(rank) is not int
            or rank not in (0, 1)
            or parsed.tzinfo is None
            or not isinstance(cancellation_id, str)
            or parse_cancellation_id(cancellation_id) is None
        ):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("not a cursor this service handed out") from None
    return rank, parsed, cancellation_id


async def list_cancellations(
    pool: asyncpg.Pool,
    *,
    seller_id: str | None = None,
    buyer_id: str | None = None,
    order_id: str | None = None,
    status: CancellationStatus | None = None,
    cursor: str | None = None,
    limit: int = LIST_LIMIT_DEFAULT,
) -> CancellationPage:
    """One page of the cancellations matching every filter given (None: any)."""
    after = decode_cursor(cursor) if cursor is not None else None
    rows = await pool.fetch(
        """
        SELECT cancellation_id, order_id, seller_id, buyer_id, reason, path, status,
               seller_deadline, created_at, updated_at, inbox_rank, inbox_at
        FROM cancellations
        WHERE ($1::text IS NULL OR seller_id = $1)
          AND ($2::text IS NULL OR buyer_id = $2)
          AND ($3::text IS NULL OR order_id = $3)
          AND ($4::text IS NULL OR status = $4)
          AND ($5::smallint IS NULL
               OR (inbox_rank, inbox_at, cancellation_id) > ($5::smallint, $6, $7::text))
        ORDER BY inbox_rank, inbox_at, cancellation_id
        LIMIT $8
        """,
        seller_id,
        buyer_id,
        order_id,
        status.value if status is not None else None,
        after[0] if after else None,
        after[1] if after else None,
        after[2] if after else None,
        limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if more else None
    return CancellationPage(
        items=[
            CancellationSummary(
                cancellation_id=r["cancellation_id"],
                order_id=r["order_id"],
                seller_id=r["seller_id"],
                buyer_id=r["buyer_id"],
                reason=CancellationReason(r["reason"]),
                path=CancellationPath(r["path"]),
                status=CancellationStatus(r["status"]),
                seller_deadline=r["seller_deadline"],
                requested_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ],
        next_cursor=(
            encode_cursor(last["inbox_rank"], last["inbox_at"], last["cancellation_id"])
            if last is not None
            else None
        ),
    )


# --- the buyer's order view ------------------------------------------------------------------


class OrderCancellationView(Record):
    """A sub-order's cancellation as the buyer's order page shows it."""

    cancellation_id: str
    status: CancellationStatus
    path: CancellationPath
    reason: CancellationReason
    requested_at: datetime
    seller_deadline: datetime | None = None
    refund: RefundView | None = None
    # The three dots, each with when it happened (`at`), the last one with the ETA.
    dots: list[RefundDot]
    eta: EtaRange | None = None
    # As it stands now: a coupon a sibling restored later shows as restored.
    coupon: CouponOutcome | None = None


class SubOrderView(Record):
    seller_id: str
    status: SubOrderStatus
    amount: Money
    cancellation: OrderCancellationView | None = None


class OrderView(Record):
    order_id: str
    buyer_id: str
    sub_orders: list[SubOrderView]


async def order_view(ledger: Ledger, *, order_id: str) -> OrderView | None:
    """Every sub-order of the checkout order with its cancellation if any (None: no order)."""
    pool = ledger.pool
    order = await pool.fetchrow(
        "SELECT order_id, buyer_id, rtrim(currency) AS currency FROM checkout_orders"
        " WHERE order_id = $1",
        order_id,
    )
    if order is None:
        return None
    rows = await pool.fetch(
        """
        SELECT s.seller_id, s.status AS sub_status, s.cash_minor, c.cancellation_id, c.status,
               c.path, c.reason, c.created_at, c.seller_deadline
        FROM sub_orders s
        LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
        WHERE s.order_id = $1
        ORDER BY s.seller_id
        """,
        order_id,
    )
    subs = []
    for r in rows:
        cancellation = None
        if r["cancellation_id"] is not None:
            cid = r["cancellation_id"]
            refund = await ledger.latest_refund(cancellation_id=cid)
            view = refund.view if refund is not None else None
            cancellation = OrderCancellationView(
                cancellation_id=cid,
                status=CancellationStatus(r["status"]),
                path=CancellationPath(r["path"]),
                reason=CancellationReason(r["reason"]),
                requested_at=r["created_at"],
                seller_deadline=r["seller_deadline"],
                refund=view,
                dots=refund_dots(view, refund_times(refund)),
                eta=view.eta if view is not None else None,
                coupon=await ledger.coupon_outcome(cancellation_id=cid),
            )
        subs.append(
            SubOrderView(
                seller_id=r["seller_id"],
                status=SubOrderStatus(r["sub_status"]),
                amount=Money(amount_minor=r["cash_minor"], currency=order["currency"]),
                cancellation=cancellation,
            )
        )
    return OrderView(order_id=order["order_id"], buyer_id=order["buyer_id"], sub_orders=subs)

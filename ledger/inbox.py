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
import re
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
    RefundStage,
    RefundView,
    SubOrderStatus,
)
from domain.rules import parse_cancellation_id
from ledger.repository import (
    VIEW_EXTRAS_COLUMNS,
    VIEW_EXTRAS_JOINS,
    Ledger,
    buyer_dots,
    refund_times,
)

LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 200

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # domain.models.Identifier


class InvalidCursor(ValueError):
    """Not a cursor as this service writes them (cursors are not signed: any well-formed one
    is taken, and only says where to resume)."""


class InvalidFilter(ValueError):
    """A filter value that is no identifier: the API's 400 `invalid_filter`, the CLI's exit 2."""


def check_filter(name: str, value: str | None) -> str | None:
    """The one check of a list filter (seller, buyer, order id), for the API and the CLI: None
    (no filter) or an identifier ([A-Za-z0-9][A-Za-z0-9_.:-], at most 64 characters)."""
    if value is not None and not _IDENTIFIER.fullmatch(value):
        raise InvalidFilter(
            f"{name}: an identifier ([A-Za-z0-9][A-Za-z0-9_.:-], at most 64 characters)"
        )
    return value


class CancellationSummary(Record):
    """One row of the list."""

    cancellation_id: str
    order_id: str
    seller_id: str
    buyer_id: str
    reason: CancellationReason
    # The buyer's own words for the seller ("" when none).
    reason_text: str = ""
    path: CancellationPath
    status: CancellationStatus
    seller_deadline: datetime | None = None
    # Why it was rejected (`shipped`, or the seller's or operator's words); None unless rejected.
    decision_reason: str | None = None
    requested_at: datetime
    # The latest change, the coupon outcome's included (a sibling's later restoration).
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
        raise InvalidCursor("not a valid cursor") from None
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
    for name, value in (("seller_id", seller_id), ("buyer_id", buyer_id), ("order_id", order_id)):
        check_filter(name, value)
    after = decode_cursor(cursor) if cursor is not None else None
    rows = await pool.fetch(
        f"""
        SELECT c.cancellation_id, c.order_id, c.seller_id, c.buyer_id, c.reason, c.reason_text,
               c.path, c.status, c.seller_deadline, c.created_at, c.inbox_rank, c.inbox_at,
               {VIEW_EXTRAS_COLUMNS}
        FROM (
            SELECT * FROM cancellations
            WHERE ($1::text IS NULL OR seller_id = $1)
              AND ($2::text IS NULL OR buyer_id = $2)
              AND ($3::text IS NULL OR order_id = $3)
              AND ($4::text IS NULL OR status = $4)
              AND ($5::smallint IS NULL
                   OR (inbox_rank, inbox_at, cancellation_id) > ($5::smallint, $6, $7::text))
            ORDER BY inbox_rank, inbox_at, cancellation_id
            LIMIT $8
        ) c
        {VIEW_EXTRAS_JOINS}
        ORDER BY c.inbox_rank, c.inbox_at, c.cancellation_id
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
                reason_text=r["reason_text"],
                path=CancellationPath(r["path"]),
                status=CancellationStatus(r["status"]),
                seller_deadline=r["seller_deadline"],
                decision_reason=r["decision_reason"],
                requested_at=r["created_at"],
                updated_at=r["changed_at"],
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
    # The buyer's own words for the seller ("" when none).
    reason_text: str = ""
    # Why it was rejected (`shipped`, or the seller's or operator's words) and by whom; None
    # unless rejected.
    decision_reason: str | None = None
    decided_by: str | None = None
    requested_at: datetime
    # The latest change, the coupon outcome's included (a sibling's later restoration).
    updated_at: datetime
    seller_deadline: datetime | None = None
    refund: RefundView | None = None
    # The three dots, each with when it happened (`at`), the last one with the ETA.
    dots: list[RefundDot]
    # When the money should be back; None before the refund is submitted and once it is
    # confirmed (the money is back: `refund.eta` keeps the estimate that was given).
    eta: EtaRange | None = None
    # As it stands now: a coupon a sibling restored later shows as restored.
    coupon: CouponOutcome | None = None


class SubOrderView(Record):
    seller_id: str
    # unvalidated, accepted, shipped (the order system said so, R14), cancelled.
    status: SubOrderStatus
    # The cash paid for the sub-order: its price less its share of the coupon (what a
    # cancellation refunds).
    amount: Money
    cancellation: OrderCancellationView | None = None


class OrderView(Record):
    order_id: str
    buyer_id: str
    sub_orders: list[SubOrderView]


def _sub_order_status(stored: str, shipped_at: datetime | None) -> SubOrderStatus:
    """The stored status, or `shipped` once the order system said so (a shipped sub-order is
    never cancelled: R14)."""
    status = SubOrderStatus(stored)
    if shipped_at is not None and status is not SubOrderStatus.CANCELLED:
        return SubOrderStatus.SHIPPED
    return status


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
        f"""
        SELECT s.seller_id, s.status AS sub_status, s.shipped_at, s.cash_minor,
               c.cancellation_id, c.status, c.path, c.reason, c.reason_text, c.created_at,
               c.seller_deadline, {VIEW_EXTRAS_COLUMNS}
        FROM sub_orders s
        LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
        {VIEW_EXTRAS_JOINS}
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
                reason_text=r["reason_text"],
                decision_reason=r["decision_reason"],
                decided_by=r["decided_by"],
                requested_at=r["created_at"],
                updated_at=r["changed_at"],
                seller_deadline=r["seller_deadline"],
                refund=view,
                dots=buyer_dots(view, refund_times(refund)),
                eta=view.eta
                if view is not None and view.stage is not RefundStage.CONFIRMED
                else None,
                coupon=await ledger.coupon_outcome(cancellation_id=cid),
            )
        subs.append(
            SubOrderView(
                seller_id=r["seller_id"],
                status=_sub_order_status(r["sub_status"], r["shipped_at"]),
                amount=Money(amount_minor=r["cash_minor"], currency=order["currency"]),
                cancellation=cancellation,
            )
        )
    return OrderView(order_id=order["order_id"], buyer_id=order["buyer_id"], sub_orders=subs)

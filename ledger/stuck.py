"""Stuck work (issue 20): requests still waiting for their seller, or escalated to operators,
oldest first, with how long they have waited and how long is left of the seller's deadline as
the ledger recorded it when they opened (R19), whatever window they had."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import asyncpg

from domain.models import CancellationStatus, Record

WAITING = (CancellationStatus.AWAITING_SELLER.value, CancellationStatus.ESCALATED.value)


class StuckCancellation(Record):
    cancellation_id: str
    order_id: str
    seller_id: str
    buyer_id: str
    status: CancellationStatus
    requested_at: datetime
    # None: opened before the ledger recorded deadlines (migration 008).
    seller_deadline: datetime | None = None
    # Whole seconds (plain numbers for any client): the window the request opened with, how
    # long it has waited, and how long is left of it (negative once the deadline has passed:
    # an escalated request waits for an operator).
    response_window_seconds: int | None = None
    waited_seconds: int
    left_seconds: int | None = None

    @property
    def waited(self) -> timedelta:
        return timedelta(seconds=self.waited_seconds)

    @property
    def left(self) -> timedelta | None:
        return None if self.left_seconds is None else timedelta(seconds=self.left_seconds)


async def stuck_cancellations(
    pool: asyncpg.Pool, *, older_than: timedelta = timedelta(0), limit: int = 1000
) -> list[StuckCancellation]:
    """Waiting requests requested at least `older_than` ago, oldest first (at most `limit`)."""
    rows = await pool.fetch(
        """
        SELECT cancellation_id, order_id, seller_id, buyer_id, status, created_at,
               seller_deadline, response_window, now() AS now
        FROM cancellations
        WHERE status = ANY($1::text[]) AND created_at <= now() - $2::interval
        ORDER BY created_at, cancellation_id
        LIMIT $3
        """,
        list(WAITING),
        older_than,
        limit,
    )
    return [
        StuckCancellation(
            cancellation_id=r["cancellation_id"],
            order_id=r["order_id"],
            seller_id=r["seller_id"],
            buyer_id=r["buyer_id"],
            status=CancellationStatus(r["status"]),
            requested_at=r["created_at"],
            seller_deadline=r["seller_deadline"],
            response_window_seconds=_seconds(r["response_window"]),
            waited_seconds=_seconds(r["now"] - r["created_at"]),
            left_seconds=_seconds(r["seller_deadline"] - r["now"])
            if r["seller_deadline"]
            else None,
        )
        for r in rows
    ]


def _seconds(value: timedelta | None) -> int | None:
    """Whole seconds, towards minus infinity (a deadline 0.4 s ago has -1 s left)."""
    return None if value is None else math.floor(value.total_seconds())

"""Read-only views of the ledger for the operators' tools (`starter.refunds`,
`starter.reconcile`): the refunds as the ledger has them. The pool is the caller's."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from domain.models import Money, Record, RefundKind, RefundStage


class LedgerRefund(Record):
    """One refund as the ledger records it (every generation), for reconciliation."""

    idempotency_key: str
    cancellation_id: str
    generation: int
    payment_id: str
    kind: RefundKind
    amount: Money
    stage: RefundStage
    provider_ref: str | None = None


class ParkedRefund(Record):
    """The latest refund of a cancellation, with what an operator needs to judge a retry."""

    cancellation_id: str
    order_id: str
    seller_id: str
    idempotency_key: str
    # The refund's generation (1 for the first key, 2 for `…:refund-submit-2`, ...).
    generation: int = 1
    stage: RefundStage
    amount: Money
    last_error: str | None = None
    # Passes that ended parked, over every run of the cancellation (refund_failed,
    # refund_declined and refund_reversed events): the N of the last error's "(pass N)".
    passes: int
    # Calls to the provider to create this refund (generation), failed ones included.
    provider_calls: int = 0
    # When it parked the last time: refunds.failed_at (reversed_at for a reversal).
    failed_since: datetime | None = None


# The audit events that end a pass of the refund parked: a failure, a decline for good, a
# reversal. `passes` counts them; the "(pass N)" of a parking's error is the same count.
PARKED_KINDS = ("refund_failed", "refund_declined", "refund_reversed")


async def parked_passes(
    pool: asyncpg.Pool, cancellation_id: str, *, excluding_event_key: str | None = None
) -> int:
    """How many passes of this cancellation's refund ended parked, over all its runs; without
    the event `excluding_event_key` (the one being recorded: a retried activity counts the
    same)."""
    count: int = await pool.fetchval(
        """
        SELECT count(*) FROM cancellation_events
        WHERE cancellation_id = $1 AND kind = ANY($2::text[])
          AND ($3::text IS NULL OR event_key IS DISTINCT FROM $3)
        """,
        cancellation_id,
        list(PARKED_KINDS),
        excluding_event_key,
    )
    return count


def _money(row: asyncpg.Record) -> Money:
    return Money(amount_minor=row["amount_minor"], currency=row["currency"].strip())


async def all_refunds(pool: asyncpg.Pool) -> list[LedgerRefund]:
    rows = await pool.fetch(
        "SELECT idempotency_key, cancellation_id, generation, payment_id, kind, amount_minor,"
        " currency, stage, provider_ref FROM refunds ORDER BY requested_at, idempotency_key"
    )
    return [
        LedgerRefund(
            idempotency_key=r["idempotency_key"],
            cancellation_id=r["cancellation_id"],
            generation=r["generation"],
            payment_id=r["payment_id"],
            kind=RefundKind(r["kind"]),
            amount=_money(r),
            stage=RefundStage(r["stage"]),
            provider_ref=r["provider_ref"],
        )
        for r in rows
    ]


async def latest_refunds(pool: asyncpg.Pool, cancellation_ids: Sequence[str]) -> list[ParkedRefund]:
    """The latest refund generation of each of these cancellations (those that have one)."""
    rows = await pool.fetch(
        """
        SELECT DISTINCT ON (r.cancellation_id)
            r.cancellation_id, c.order_id, c.seller_id, r.idempotency_key, r.generation, r.stage,
            r.amount_minor, r.currency, r.last_error, r.attempts AS provider_calls,
            CASE WHEN r.stage = 'reversed' THEN r.reversed_at ELSE r.failed_at END
                AS failed_since,
            (SELECT count(*) FROM cancellation_events e
             WHERE e.cancellation_id = r.cancellation_id
               AND e.kind = ANY($2::text[])) AS passes
        FROM refunds r JOIN cancellations c USING (cancellation_id)
        WHERE r.cancellation_id = ANY($1::text[])
        ORDER BY r.cancellation_id, r.generation DESC
        """,
        list(cancellation_ids),
        list(PARKED_KINDS),
    )
    return [
        ParkedRefund(
            cancellation_id=r["cancellation_id"],
            order_id=r["order_id"],
            seller_id=r["seller_id"],
            idempotency_key=r["idempotency_key"],
            generation=r["generation"],
            stage=RefundStage(r["stage"]),
            amount=_money(r),
            last_error=r["last_error"],
            passes=r["passes"],
            provider_calls=r["provider_calls"],
            failed_since=r["failed_since"],
        )
        for r in rows
    ]

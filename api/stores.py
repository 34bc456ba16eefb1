"""What the API itself reads and writes in PostgreSQL: its idempotency keys, and the one
question about a sub-order it asks before starting a workflow."""

from __future__ import annotations

import hashlib
from datetime import datetime

import asyncpg

from domain.models import Record, RequestCancellationInput, SubOrderStatus


class IdempotencyRecord(Record):
    request_hash: str
    cancellation_id: str
    created_at: datetime


def request_hash(request: RequestCancellationInput) -> str:
    """Of the request as validated: the same request in other whitespace or key order is the
    same request."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(
        self, *, principal: str, key: str, request_hash: str, cancellation_id: str
    ) -> IdempotencyRecord:
        """Record the key for this request, or return what it was first recorded for (a
        concurrent first use included: the insert waits for it, the read after sees it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO api_idempotency_keys (principal, idempotency_key, request_hash,
                    cancellation_id)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (principal, idempotency_key) DO NOTHING
                """,
                principal,
                key,
                request_hash,
                cancellation_id,
            )
            row = await conn.fetchrow(
                "SELECT request_hash, cancellation_id, created_at FROM api_idempotency_keys"
                " WHERE principal = $1 AND idempotency_key = $2",
                principal,
                key,
            )
        assert row is not None
        return IdempotencyRecord(**dict(row))


class SubOrderState(Record):
    buyer_id: str
    status: SubOrderStatus
    cancellation_id: str | None = None
    shipped: bool = False


class SubOrders:
    """Read-only: whether a sub-order exists for this buyer and may still be cancelled, so that
    a request that cannot succeed is refused before it becomes a failed workflow."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def state(self, *, order_id: str, seller_id: str) -> SubOrderState | None:
        row = await self._pool.fetchrow(
            """
            SELECT o.buyer_id, s.status, c.cancellation_id, s.shipped_at IS NOT NULL AS shipped
            FROM sub_orders s
            JOIN checkout_orders o ON o.order_id = s.order_id
            LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
            WHERE s.order_id = $1 AND s.seller_id = $2
            """,
            order_id,
            seller_id,
        )
        return SubOrderState(**dict(row)) if row is not None else None

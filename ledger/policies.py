"""Sellers' policies (R19): each seller's response window, and optionally its timeout policy.

A seller without a row gets the worker's defaults (ORDERCANCEL_SELLER_RESPONSE_WINDOW,
ORDERCANCEL_TIMEOUT_POLICY). No window is below the floor
(ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR):
`set_policy` refuses one, and the opening of a cancellation applies the floor again (migration
008), so a floor raised later wins over an older policy. A policy applies to cancellations opened
after it is set; one that is waiting keeps the deadline the ledger recorded when it opened.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from domain.errors import LedgerError
from domain.models import Record, TimeoutPolicy


class WindowBelowFloor(LedgerError):
    error_type = "WindowBelowFloor"


class SellerPolicy(Record):
    seller_id: str
    response_window: timedelta
    timeout_policy: TimeoutPolicy | None = None
    updated_by: str = ""
    updated_at: datetime | None = None


async def set_policy(
    pool: asyncpg.Pool,
    *,
    seller_id: str,
    response_window: timedelta,
    floor: timedelta,
    timeout_policy: TimeoutPolicy | None = None,
    updated_by: str = "",
) -> SellerPolicy:
    """Set (or replace) a seller's policy; a window below the floor is refused, nothing written."""
    if response_window < floor or response_window <= timedelta(0):
        raise WindowBelowFloor(
            f"a response window of {response_window} is below the floor of {floor}"
            " (ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR, R19)"
        )
    row = await pool.fetchrow(
        """
        INSERT INTO seller_policies (seller_id, response_window, timeout_policy, updated_by)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (seller_id) DO UPDATE SET
            response_window = EXCLUDED.response_window,
            timeout_policy = EXCLUDED.timeout_policy,
            updated_by = EXCLUDED.updated_by,
            updated_at = now()
        RETURNING *
        """,
        seller_id,
        response_window,
        timeout_policy.value if timeout_policy else None,
        updated_by,
    )
    assert row is not None
    return _policy(row)


async def clear_policy(pool: asyncpg.Pool, *, seller_id: str) -> bool:
    """Back to the defaults. False: the seller had no policy."""
    result = await pool.execute("DELETE FROM seller_policies WHERE seller_id = $1", seller_id)
    return result != "DELETE 0"


async def get_policy(pool: asyncpg.Pool, *, seller_id: str) -> SellerPolicy | None:
    row = await pool.fetchrow("SELECT * FROM seller_policies WHERE seller_id = $1", seller_id)
    return _policy(row) if row else None


async def list_policies(pool: asyncpg.Pool) -> list[SellerPolicy]:
    rows = await pool.fetch("SELECT * FROM seller_policies ORDER BY seller_id")
    return [_policy(row) for row in rows]


def _policy(row: asyncpg.Record) -> SellerPolicy:
    return SellerPolicy(
        seller_id=row["seller_id"],
        response_window=row["response_window"],
        timeout_policy=TimeoutPolicy(row["timeout_policy"]) if row["timeout_policy"] else None,
        updated_by=row["updated_by"],
        updated_at=row["updated_at"],
    )

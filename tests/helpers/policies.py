"""Sellers' windows for tests (R19): a request no longer carries one, the seller's policy does."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from ledger.policies import set_policy

# The floor a test's worker runs with when it needs windows of seconds
# (Settings(seller_response_window_floor=TEST_FLOOR)).
TEST_FLOOR = timedelta(milliseconds=500)


async def seller_window(pool: asyncpg.Pool, seller_id: str, window: timedelta) -> None:
    """Give `seller_id` this response window (the test's worker must run with a floor below
    it, e.g. `TEST_FLOOR`)."""
    await set_policy(
        pool, seller_id=seller_id, response_window=window, floor=timedelta(0), updated_by="test"
    )

"""R19, second half: a decision is in time if the Temporal server received it before the
deadline, even when no worker ran at that moment. On a real dev server: the worker stops, the
seller's signal reaches the server before (or after) the deadline, the deadline passes, a worker
starts again and gets the signal and the fired timer in one workflow task.

The seller's policy gives a 3 s window and the timeout policy is `auto_reject`, so the outcome
tells who won: `completed` (approved by the seller) or `rejected` (the timer)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.policies import seller_window
from helpers.wait import wait_for_status
from temporalio.client import Client

from domain.models import (
    CancellationReason,
    CancellationStatus,
    RequestCancellationInput,
    TimeoutPolicy,
)
from infra.client import connect
from infra.settings import Settings
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

WINDOW = timedelta(seconds=3)
BUYER = "B-TIME"


@dataclass
class World:
    client: Client
    pool: asyncpg.Pool
    settings: Settings


@pytest.fixture(scope="module")
async def world(temporal_address: str, e2e_database_url: str) -> AsyncIterator[World]:
    client = await connect(temporal_address)
    pool = await create_pool(e2e_database_url, min_size=1, max_size=5)
    settings = fast_refund_settings(
        task_queue=f"time-{uuid.uuid4().hex[:8]}", timeout_policy=TimeoutPolicy.AUTO_REJECT
    )
    try:
        yield World(client, pool, settings)
    finally:
        await pool.close()


async def decided_while_no_worker_ran(world: World, *, signal_after_deadline: bool) -> str:
    seller = unique("S-TIME")
    order_id = unique("OT")
    await load_orders(
        world.pool,
        parse_orders_file(
            orders_file(one_seller_order(order_id, buyer_id=BUYER, seller_id=seller))
        ),
    )
    await seller_window(world.pool, seller, WINDOW)
    request = RequestCancellationInput(
        order_id=order_id, seller_id=seller, buyer_id=BUYER, reason=CancellationReason.OTHER
    )
    async with build_worker(world.client, world.pool, world.settings):
        handle = await start_cancellation(
            world.client, request, task_queue=world.settings.task_queue
        )
        view = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    assert view.seller_deadline is not None
    # No worker runs now. The signal reaches the server (and its history) either way.
    if signal_after_deadline:
        await asyncio.sleep(WINDOW.total_seconds() + 1)
    await handle.signal(
        OrderCancellation.seller_decision,
        {"seller_id": seller, "decision": "accept", "reason": "in stock after all"},
    )
    if not signal_after_deadline:
        await asyncio.sleep(WINDOW.total_seconds() + 1)
    async with build_worker(world.client, world.pool, world.settings):
        result = await asyncio.wait_for(handle.result(), 60)
    return result.status.value


async def test_a_decision_received_before_the_deadline_counts_though_no_worker_ran(
    world: World,
) -> None:
    assert await decided_while_no_worker_ran(world, signal_after_deadline=False) == "completed"


async def test_a_decision_received_after_the_deadline_does_not_beat_the_timer(
    world: World,
) -> None:
    assert await decided_while_no_worker_ran(world, signal_after_deadline=True) == "rejected"

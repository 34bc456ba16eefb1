"""What the failed-refund tool tests share (tests/test_refund_tools.py, tests/test_reconcile.py):
the product's worker with the provider simulator on the real dev server and a fresh ledger, and
helpers that make cancellations park in `refund_failed` or complete.

Each module gets its own dev server and database (`temporal_address`, `e2e_database_url` from
tests/conftest.py); each test makes orders and sellers of its own, so visibility queries by
seller see only that test's cancellations.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowHandle

from domain.models import (
    CancellationReason,
    CancellationResult,
    RequestCancellationInput,
)
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.policies import seller_window
from helpers.wait import eventually
from infra.client import connect
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.requests import start_cancellation
from workers.worker import build_worker

ORDERCANCEL = str(Path(sys.executable).parent / "ordercancel")
BUYER = "B-RT"
# A provider outage: every call fails before anything is recorded, for far longer than the
# worker's attempts (ORDERCANCEL_REFUND_SUBMIT_MAX_ATTEMPTS=2 below).
OUTAGE = SimulatorFaults(transient_failures=1_000_000)


@dataclass
class RefundStack:
    address: str
    client: Client
    pool: asyncpg.Pool
    provider: SimulatedProvider
    database_url: str
    task_queue: str

    def cli_env(self) -> dict[str, str]:
        return {
            "TEMPORAL_ADDRESS": self.address,
            "DATABASE_URL": self.database_url,
            "ORDERCANCEL_TASK_QUEUE": self.task_queue,
            "ORDERCANCEL_LOG_LEVEL": "warning",
        }


@asynccontextmanager
async def refund_stack(
    temporal_address: str, database_url: str, **settings: Any
) -> AsyncIterator[RefundStack]:
    """The product's worker (`build_worker`): 2 provider attempts per pass, short intervals."""
    client = await connect(temporal_address)
    pool = await create_pool(database_url, min_size=1, max_size=10)
    provider = SimulatedProvider(pool, confirm_after_polls=0)
    task_queue = f"refund-tools-{uuid.uuid4().hex[:8]}"
    worker = build_worker(
        client,
        pool,
        fast_refund_settings(refund_submit_max_attempts=2, **settings),
        provider=provider,
        task_queue=task_queue,
    )
    try:
        async with worker:
            yield RefundStack(temporal_address, client, pool, provider, database_url, task_queue)
    finally:
        await pool.close()


@dataclass
class Cancellation:
    handle: WorkflowHandle[Any, CancellationResult]
    order_id: str
    payment_id: str
    redemption_id: str

    @property
    def id(self) -> str:
        return self.handle.id


async def cancellations(
    stack: RefundStack,
    count: int,
    *,
    seller: str,
    faults: SimulatorFaults | None = None,
    window: timedelta = timedelta(seconds=1),
) -> list[Cancellation]:
    """`count` one-seller orders paid with a coupon, each cancelled (approved by the timer
    after `window`, the seller's policy: R19), with `faults` injected at the provider for their
    payments first. Returns once the ledger has opened each (with this window)."""
    orders = [
        one_seller_order(unique("RT"), buyer_id=BUYER, seller_id=seller, coupon=True)
        for _ in range(count)
    ]
    await load_orders(stack.pool, parse_orders_file(orders_file(*orders)))
    await seller_window(stack.pool, seller, window)
    made = []
    for order in orders:
        payment_id = order["payment"]["payment_id"]
        if faults is not None:
            await stack.provider.set_faults(payment_id, faults)
        handle = await start_cancellation(
            stack.client,
            RequestCancellationInput(
                order_id=order["order_id"],
                seller_id=seller,
                buyer_id=BUYER,
                reason=CancellationReason.OUT_OF_STOCK,
            ),
            task_queue=stack.task_queue,
        )
        made.append(
            Cancellation(
                handle, order["order_id"], payment_id, order["coupons"][0]["redemption_id"]
            )
        )

    # Opened under this policy before a later call sets another for the same seller.
    async def all_opened() -> None:
        ids = [c.id for c in made]
        found = await stack.pool.fetchval(
            "SELECT count(*) FROM cancellations WHERE cancellation_id = ANY($1::text[])", ids
        )
        assert found == len(ids), f"{len(ids) - found} of {len(ids)} not opened yet"

    await eventually(all_opened)
    return made


async def all_results(made: Sequence[Cancellation], within: float = 30) -> list[CancellationResult]:
    return list(await asyncio.wait_for(asyncio.gather(*(c.handle.result() for c in made)), within))


async def succeeded_at_provider(pool: asyncpg.Pool, payment_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM provider_sim.refunds WHERE payment_id = $1 AND status = 'succeeded'",
        payment_id,
    )
    return count

"""What operators see of a completed cancellation is true, on the real dev server (issue 20.2):
a coupon a sibling restores is `CouponOutcome="restored"` on every sub-order's cancellation, so
the daily query "completed today, coupon not restored" (docs/observability.md) does not list it;
and a completed cancellation's current details hold no stale last error and no ETA."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.wait import assert_listed, current_details, eventually, wait_for_status
from temporalio.client import Client, WorkflowHandle

from domain.models import (
    CancellationReason,
    CancellationStatus,
    Decision,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
)
from infra.client import connect
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.cancellations import locate
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

Handle = WorkflowHandle[Any, Any]


@dataclass
class World:
    client: Client
    pool: asyncpg.Pool
    task_queue: str
    started_at: datetime

    async def start(self, order_id: str, seller_id: str, buyer_id: str) -> Handle:
        return await start_cancellation(
            self.client,
            RequestCancellationInput(
                order_id=order_id,
                seller_id=seller_id,
                buyer_id=buyer_id,
                reason=CancellationReason.ORDERED_BY_MISTAKE,
            ),
            task_queue=self.task_queue,
            ledger=Ledger(self.pool),
        )

    async def accept(self, handle: Handle, seller_id: str) -> None:
        await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=seller_id, decision=Decision.ACCEPT, reason="ok"),
        )


@pytest.fixture(scope="module")
async def world(temporal_address: str, e2e_database_url: str) -> AsyncIterator[World]:
    client = await connect(temporal_address)
    pool = await create_pool(e2e_database_url, min_size=1, max_size=10)
    task_queue = f"coupon-vis-{uuid.uuid4().hex[:8]}"
    try:
        async with build_worker(client, pool, fast_refund_settings(), task_queue=task_queue):
            yield World(client, pool, task_queue, datetime.now(UTC))
    finally:
        await pool.close()


def two_seller_order(order_id: str, buyer_id: str, sellers: tuple[str, str]) -> dict[str, Any]:
    """One checkout, two sellers, one coupon paying for both (like the demo's O-2001)."""
    order = one_seller_order(order_id, buyer_id=buyer_id, seller_id=sellers[0], coupon=True)
    second = dict(order["sub_orders"][0], seller_id=sellers[1])
    order["sub_orders"].append(second)
    order["coupons"][0]["footprint"] = list(sellers)
    return order


async def test_a_sibling_restoring_the_coupon_shows_on_both_cancellations(world: World) -> None:
    order_id, buyer = unique("OCV"), unique("B-CV")
    sellers = (unique("S-CV-A"), unique("S-CV-B"))
    await load_orders(
        world.pool, parse_orders_file(orders_file(two_seller_order(order_id, buyer, sellers)))
    )
    handles = [await world.start(order_id, s, buyer) for s in sellers]
    # Both sellers accept together, as in the demo: the first to decide finds the other one's
    # refund still on its way (partial_refund), the second restores the coupon.
    await asyncio.gather(*(world.accept(h, s) for h, s in zip(handles, sellers, strict=True)))
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
    assert {r.status for r in results} == {CancellationStatus.COMPLETED}

    for handle in handles:
        desc = await handle.describe()
        attrs = desc.typed_search_attributes
        assert attrs.get(sa.CANCELLATION_STATUS) == "completed", handle.id
        assert attrs.get(sa.COUPON_OUTCOME) == "restored", handle.id
        details = await current_details(handle)
        assert "Coupon: restored" in details, details
        assert "ETA" not in details and "Last error" not in details, details

    # The documented query does not list them (nor does its converse miss them).
    today = world.started_at.replace(hour=0, minute=0, second=0, microsecond=0)
    since = today.strftime("%Y-%m-%dT%H:%M:%SZ")
    scope = f'OrderId="{order_id}" AND TaskQueue="{world.task_queue}"'
    await assert_listed(
        world.client,
        f'CancellationStatus="completed" AND CouponOutcome != "restored"'
        f' AND CloseTime >= "{since}" AND {scope}',
        set(),
    )
    await assert_listed(
        world.client,
        f'CancellationStatus="completed" AND CouponOutcome = "restored" AND {scope}',
        {h.id for h in handles},
    )


async def test_a_sibling_that_has_ended_is_not_signalled(world: World) -> None:
    """Sub-orders cancelled in turn: the first ends with `partial_refund` (the other sub-order was
    not being refunded, so it waits for nothing); the second restores the coupon and tells no
    one, as the first's run has ended: no signal command, so no failed external signal in its
    history (a billable action and events for nothing). The first's story still gets the
    ending (R12)."""
    order_id, buyer = unique("OCT"), unique("B-CT")
    sellers = (unique("S-CT-A"), unique("S-CT-B"))
    await load_orders(
        world.pool, parse_orders_file(orders_file(two_seller_order(order_id, buyer, sellers)))
    )
    first = await world.start(order_id, sellers[0], buyer)
    await world.accept(first, sellers[0])
    assert (await asyncio.wait_for(first.result(), 60)).status is CancellationStatus.COMPLETED
    first_attrs = (await first.describe()).typed_search_attributes
    assert first_attrs.get(sa.COUPON_OUTCOME) == "partial_refund"

    second = await world.start(order_id, sellers[1], buyer)
    await world.accept(second, sellers[1])
    assert (await asyncio.wait_for(second.result(), 60)).status is CancellationStatus.COMPLETED
    assert (await second.describe()).typed_search_attributes.get(sa.COUPON_OUTCOME) == "restored"
    events = [e async for e in second.fetch_history_events()]
    assert not [
        e
        for e in events
        if e.HasField("signal_external_workflow_execution_initiated_event_attributes")
    ]
    kinds = await world.pool.fetchval(
        "SELECT array_agg(kind) FROM cancellation_events WHERE cancellation_id = $1", first.id
    )
    assert "coupon_restored" in kinds, kinds


async def test_a_completed_cancellation_shows_no_stale_error_or_eta(world: World) -> None:
    """Parked (the provider refused), retried by an operator, completed: the last error and
    the ETA were true on the way, not once the refund is confirmed."""
    order_id, buyer, seller = unique("OCE"), unique("B-CE"), unique("S-CE")
    order = one_seller_order(order_id, buyer_id=buyer, seller_id=seller)
    await load_orders(world.pool, parse_orders_file(orders_file(order)))
    provider = SimulatedProvider(world.pool)
    await provider.set_faults(f"P-{order_id}", SimulatorFaults(final_failure="card_closed"))
    handle = await world.start(order_id, seller, buyer)
    await world.accept(handle, seller)
    parked = await wait_for_status(handle, CancellationStatus.REFUND_FAILED, timeout=30)
    assert parked.last_error is not None
    assert "Last error" in await current_details(handle)

    await provider.set_faults(f"P-{order_id}", SimulatorFaults())
    await handle.execute_update(
        OrderCancellation.retry_refund,
        RetryRefundRequest(operator_id="sre-1", reason="card replaced"),
    )
    result = await asyncio.wait_for(handle.result(), 30)
    assert result.status is CancellationStatus.COMPLETED

    async def settled() -> str:
        details = await current_details(handle)
        assert details.startswith("**Completed**"), details
        return details

    details = await eventually(settled)
    assert "Last error" not in details and "ETA" not in details, details
    located = await locate(world.client, Ledger(world.pool), handle.id)
    assert located is not None and located.view.last_error is None, located

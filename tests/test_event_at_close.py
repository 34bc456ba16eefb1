"""No provider event is lost while a cancellation closes (issue 16 item 7), on the real Temporal
dev server and the real PostgreSQL.

The provider confirms a refund and reverses it moments later (the simulator's
`fail_after_success`); its reversal event is forwarded the instant the ledger shows the refund
confirmed, give or take a few milliseconds, many times over. The event then lands anywhere in the
closing: before the workflow has heard of the confirmation, while it decides the coupon, in the
workflow task that completes it, or after it has closed. Each time the refund must end reversed
and the cancellation parked in `refund_failed` for an operator, and the event's recorded outcome
is never `ignored`.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.stacks import WorkerStack, worker_stack
from helpers.wait import eventually, wait_for_status
from temporalio.client import Client

import starter.payment_events as payment_events
from domain.models import (
    CancellationReason,
    CancellationStatus,
    PaymentEvent,
    PaymentEventType,
    RequestCancellationInput,
)
from ledger.orders import load_orders, parse_orders_file
from payments.provider import SimulatorFaults
from starter.payment_events import ForwardOutcome, forward_payment_event
from starter.requests import start_cancellation
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

ROUNDS = 24
AT_ONCE = 6


Stack = WorkerStack


@pytest.fixture
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Stack]:
    async with worker_stack(
        temporal_address,
        e2e_database_url,
        fast_refund_settings(),
        name="event-at-close",
        max_size=12,
    ) as stack:
        yield stack


async def approved_with_refund_reversed_later(stack: Stack) -> str:
    """A captured one-seller order whose refund the provider reverses after confirming it;
    its cancellation requested and accepted. Returns the cancellation id."""
    order_id = unique("O-close")
    await load_orders(
        stack.pool,
        parse_orders_file(orders_file(one_seller_order(order_id, buyer_id="B-1", seller_id="S-1"))),
    )
    await stack.provider.set_faults(f"P-{order_id}", SimulatorFaults(fail_after_success=True))
    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=order_id,
            seller_id="S-1",
            buyer_id="B-1",
            reason=CancellationReason.CANNOT_SHIP,
        ),
        task_queue=stack.task_queue,
    )
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.execute_update(
        OrderCancellation.decide, {"seller_id": "S-1", "decision": "accept"}
    )
    return handle.id


async def confirmed_ref(stack: Stack, cancellation_id: str) -> str:
    """The refund's provider reference, the moment the ledger records it confirmed."""
    while True:
        row = await stack.pool.fetchrow(
            "SELECT stage, provider_ref FROM refunds WHERE cancellation_id = $1", cancellation_id
        )
        if row is not None and row["stage"] == "confirmed":
            ref: str = row["provider_ref"]
            return ref
        await asyncio.sleep(0.002)


def reversal(provider_ref: str) -> PaymentEvent:
    return PaymentEvent(
        event_id=f"evt_{uuid.uuid4().hex[:12]}",
        type=PaymentEventType.REFUND_REVERSED,
        provider_ref=provider_ref,
        failure_code="card_closed",
    )


async def parked_with_refund_reversed(stack: Stack, cancellation_id: str) -> None:
    async def check() -> None:
        row = await stack.pool.fetchrow(
            "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
            " WHERE c.cancellation_id = $1 AND r.generation = 1",
            cancellation_id,
        )
        assert row is not None
        assert (row["status"], row["stage"]) == ("refund_failed", "reversed"), cancellation_id

    await eventually(check, timeout=30)
    handle = stack.client.get_workflow_handle_for(OrderCancellation.run, cancellation_id)
    await wait_for_status(handle, CancellationStatus.REFUND_FAILED)


async def one_round(stack: Stack, rng: random.Random) -> ForwardOutcome:
    cancellation_id = await approved_with_refund_reversed_later(stack)
    provider_ref = await confirmed_ref(stack, cancellation_id)
    # Anywhere in the closing: the coupon step, the completion, the close itself, or after.
    await asyncio.sleep(rng.choice([0, 0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4]))
    forwarded = await forward_payment_event(
        stack.client, stack.ledger, reversal(provider_ref), task_queue=stack.task_queue
    )
    assert forwarded.outcome in (ForwardOutcome.DELIVERED, ForwardOutcome.REOPENED), forwarded
    assert forwarded.cancellation_id == cancellation_id
    await parked_with_refund_reversed(stack, cancellation_id)
    return forwarded.outcome


async def test_a_reversal_racing_the_close_always_parks_the_cancellation(stack: Stack) -> None:
    rng = random.Random(16)
    outcomes: list[ForwardOutcome] = []
    for start in range(0, ROUNDS, AT_ONCE):
        outcomes += await asyncio.gather(
            *(one_round(stack, rng) for _ in range(start, min(ROUNDS, start + AT_ONCE)))
        )
    # Nothing was recorded as ignored, whichever side of the close the event landed on.
    ignored = await stack.pool.fetchval(
        "SELECT count(*) FROM payment_events WHERE outcome = 'ignored'"
    )
    assert ignored == 0
    assert len(outcomes) == ROUNDS


async def test_a_reversal_whose_run_closes_between_look_and_signal_reopens_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The narrowest window, made certain: the starter looks, sees the run still open, and the
    # run closes before the signal reaches it (the server answers NOT_FOUND to the signal).
    cancellation_id = await approved_with_refund_reversed_later(stack)
    handle = stack.client.get_workflow_handle_for(OrderCancellation.run, cancellation_id)
    assert (await handle.result()).status is CancellationStatus.COMPLETED
    provider_ref = await confirmed_ref(stack, cancellation_id)

    async def still_running(client: Client, workflow_id: str) -> bool:
        return True

    monkeypatch.setattr(payment_events, "_running", still_running)
    event = reversal(provider_ref)
    forwarded = await forward_payment_event(
        stack.client, stack.ledger, event, task_queue=stack.task_queue
    )
    assert forwarded.outcome is ForwardOutcome.REOPENED
    await parked_with_refund_reversed(stack, cancellation_id)
    assert await stack.ledger.payment_event_outcome(event_id=event.event_id) == (
        "reopened",
        cancellation_id,
    )

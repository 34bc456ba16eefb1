"""R15 on the real stack (Temporal dev server, PostgreSQL, the provider simulator): cancelling one
seller's share of an authorised multi-seller payment releases that share and keeps the
authorisation; the authorisation is voided only when the last share is released; the later
capture takes what is left. The ledger shows authorised, released, captured and refunded, and its
constraint refuses amounts that do not add up.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import stripe
from helpers.localstripe import API_KEY, payment_intent
from helpers.orders import fast_refund_settings, orders_file, unique
from helpers.stacks import WorkerStack, worker_stack
from helpers.wait import wait_for_status
from rich.console import Console

from cli.render import render_view
from domain.errors import CaptureExceedsAuthorisation, ProviderFinalError
from domain.models import (
    CancellationReason,
    CancellationStatus,
    Money,
    PaymentAmounts,
    RefundKind,
    RefundStage,
    RequestCancellationInput,
)
from domain.order_events import EventOutcome, OrderEventIn, OrderEventType
from infra.client import connect
from ledger.db import create_pool
from ledger.order_events import apply_order_event
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider
from payments.stripe_provider import StripeProvider
from starter.cancellations import locate
from starter.requests import start_cancellation
from workers.worker import build_worker

pytestmark = pytest.mark.e2e


Stack = WorkerStack


@pytest.fixture
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Stack]:
    async with worker_stack(
        temporal_address, e2e_database_url, fast_refund_settings(), name="partial-auth", max_size=8
    ) as stack:
        yield stack


def two_seller_order(order_id: str) -> dict[str, Any]:
    """One checkout of S-1 (2 x 10.00 + 3.00 shipping = 23.00) and S-2 (30.00 + 4.00 = 34.00),
    paid by card, authorised only (57.00), payment not validated yet (instant path, R1)."""
    return {
        "order_id": order_id,
        "buyer_id": "B-15",
        "currency": "EUR",
        "placed_at": "2026-03-10T10:00:00Z",
        "payment": {
            "payment_id": f"P-{order_id}",
            "method": "card",
            "validation": "unvalidated",
            "capture": "authorized",
        },
        "sub_orders": [
            {
                "seller_id": "S-1",
                "seller_accepted": False,
                "shipping_minor": 300,
                "lines": [{"sku": "A", "quantity": 2, "unit_price_minor": 1000}],
            },
            {
                "seller_id": "S-2",
                "seller_accepted": False,
                "shipping_minor": 400,
                "lines": [{"sku": "B", "quantity": 1, "unit_price_minor": 3000}],
            },
        ],
    }


async def cancel(stack: Stack, order_id: str, seller_id: str, *, captured: bool = False) -> str:
    """One seller's share cancelled to the end: instantly a void while the payment is only
    authorised; once it is `captured`, the seller accepts and the share is refunded."""
    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=order_id,
            seller_id=seller_id,
            buyer_id="B-15",
            reason=CancellationReason.ORDERED_BY_MISTAKE,
        ),
        task_queue=stack.task_queue,
    )
    if captured:
        await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
        await handle.signal("seller_decision", {"seller_id": seller_id, "decision": "accept"})
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None
    assert result.refund.kind is (RefundKind.REFUND if captured else RefundKind.VOID)
    assert result.refund.stage is RefundStage.CONFIRMED
    return handle.id


async def amounts(stack: Stack, cancellation_id: str) -> PaymentAmounts:
    located = await locate(stack.client, stack.ledger, cancellation_id)
    assert located is not None and located.view.payment is not None
    return located.view.payment


async def test_one_share_is_released_and_the_last_one_voids_the_authorisation(
    stack: Stack,
) -> None:
    order_id = unique("O-r15")
    payment_id = f"P-{order_id}"
    await load_orders(stack.pool, parse_orders_file(orders_file(two_seller_order(order_id))))

    first = await cancel(stack, order_id, "S-1")
    # S-1's 23.00 released; the authorisation still holds S-2's 34.00 for the capture.
    held = await stack.provider.authorisation(payment_id)
    assert held is not None
    assert (held["status"], held["amount_minor"], held["released_minor"]) == (
        "authorised",
        5700,
        2300,
    )
    assert await amounts(stack, first) == PaymentAmounts(
        payment_id=payment_id,
        currency="EUR",
        authorised_minor=5700,
        released_minor=2300,
        captured_minor=0,
        refunded_minor=0,
    )

    # What `ordercancel status` prints of it.
    out = io.StringIO()
    located = await locate(stack.client, stack.ledger, first)
    assert located is not None
    render_view(Console(file=out, width=200), located.view)
    assert (
        f"payment {payment_id} (EUR, minor units): authorised 5700, released 2300, captured 0,"
        " refunded 0"
    ) in out.getvalue()

    second = await cancel(stack, order_id, "S-2")
    # Nothing left to capture: now the authorisation is voided.
    held = await stack.provider.authorisation(payment_id)
    assert held is not None
    assert (held["status"], held["released_minor"]) == ("voided", 5700)
    assert (await amounts(stack, second)).released_minor == 5700
    # Each share went to the provider once.
    calls = await stack.pool.fetch(
        "SELECT outcome FROM provider_sim.calls"
        " WHERE payment_id = $1 AND operation = 'create_refund'",
        payment_id,
    )
    assert [c["outcome"] for c in calls] == ["created", "created"]
    # A capture now finds nothing to take.
    with pytest.raises(ProviderFinalError, match="nothing to capture"):
        await stack.provider.capture_remaining(
            payment_id=payment_id, idempotency_key=f"{order_id}:cap"
        )


async def test_on_stripe_the_first_share_is_noted_and_the_last_cancels_the_intent(
    temporal_address: str, e2e_database_url: str, request: pytest.FixtureRequest
) -> None:
    # The same story with the worker on the Stripe adapter, against localstripe: the payment id
    # of the order is the PaymentIntent's.
    localstripe: str = request.getfixturevalue("localstripe_url")
    stripe_api: stripe.StripeClient = request.getfixturevalue("stripe_client")
    intent = await payment_intent(stripe_api, 5700, captured=False)
    order = two_seller_order(unique("O-r15s"))
    order["payment"]["payment_id"] = intent.id
    client = await connect(temporal_address)
    pool = await create_pool(e2e_database_url, min_size=1, max_size=8)
    provider = StripeProvider.connect(API_KEY, api_base=localstripe)
    task_queue = f"partial-auth-stripe-{uuid.uuid4()}"
    try:
        await load_orders(pool, parse_orders_file(orders_file(order)))
        async with build_worker(
            client, pool, fast_refund_settings(), provider=provider, task_queue=task_queue
        ):
            stack = Stack(client, pool, Ledger(pool), SimulatedProvider(pool), task_queue)
            first = await cancel(stack, order["order_id"], "S-1")
            seen = await stripe_api.v1.payment_intents.retrieve_async(intent.id)
            assert seen.status == "requires_capture"  # S-2's share is still to be captured
            refund = await stack.ledger.get_refund(cancellation_id=first)
            (entry,) = [k for k in seen.metadata.to_dict() if k.startswith("oc_rel_")]
            assert refund.view.provider_ref == f"{intent.id}:release:{entry[len('oc_rel_') :]}"
            assert (await amounts(stack, first)).released_minor == 2300

            await cancel(stack, order["order_id"], "S-2")
            seen = await stripe_api.v1.payment_intents.retrieve_async(intent.id)
            assert seen.status == "canceled"
            assert (await amounts(stack, first)).released_minor == 5700
    finally:
        await pool.close()


async def test_the_capture_after_one_release_takes_only_what_is_left(stack: Stack) -> None:
    order_id = unique("O-r15")
    payment_id = f"P-{order_id}"
    await load_orders(stack.pool, parse_orders_file(orders_file(two_seller_order(order_id))))
    await cancel(stack, order_id, "S-1")

    captured = await stack.provider.capture_remaining(
        payment_id=payment_id, idempotency_key=f"{order_id}:capture"
    )
    assert captured == Money(amount_minor=3400, currency="EUR")
    again = await stack.provider.capture_remaining(
        payment_id=payment_id, idempotency_key=f"{order_id}:capture"
    )
    assert again == captured
    held = await stack.provider.authorisation(payment_id)
    assert held is not None
    assert (held["status"], held["released_minor"], held["captured_minor"]) == (
        "captured",
        2300,
        3400,
    )


async def test_the_ledger_refuses_amounts_that_do_not_add_up(stack: Stack) -> None:
    order_id = unique("O-r15")
    payment_id = f"P-{order_id}"
    await load_orders(stack.pool, parse_orders_file(orders_file(two_seller_order(order_id))))
    # Released money is money promised back: never more than it, never negative.
    with pytest.raises(asyncpg.CheckViolationError, match="releases_within_refunds"):
        await stack.pool.execute(
            "UPDATE payments SET released_minor = 100 WHERE payment_id = $1", payment_id
        )
    with pytest.raises(asyncpg.CheckViolationError, match=r"refunds_within_payment|amounts_add_up"):
        await stack.pool.execute(
            "UPDATE payments SET refunded_minor = 5701, released_minor = 5701"
            " WHERE payment_id = $1",
            payment_id,
        )
    row = await stack.pool.fetchrow(
        "SELECT released_minor, refunded_minor FROM payments WHERE payment_id = $1", payment_id
    )
    assert dict(row) == {"released_minor": 0, "refunded_minor": 0}


async def test_the_order_systems_capture_after_a_release_takes_what_is_left(stack: Stack) -> None:
    """R15 through the order system's event: after S-1's share is released, `payment_captured`
    captures S-2's share by default, and more than that is refused, changing nothing."""
    order_id = unique("O-r15")
    await load_orders(stack.pool, parse_orders_file(orders_file(two_seller_order(order_id))))
    first = await cancel(stack, order_id, "S-1")

    def captured(event_id: str, amount_minor: int | None) -> OrderEventIn:
        return OrderEventIn(
            event_id=event_id,
            type=OrderEventType.PAYMENT_CAPTURED,
            amount_minor=amount_minor,
            occurred_at=datetime.now(UTC),
        )

    with pytest.raises(CaptureExceedsAuthorisation, match=r"can capture \(3400"):
        await apply_order_event(stack.pool, order_id, captured(f"{order_id}:too-much", 5700))
    assert (await amounts(stack, first)).captured_minor == 0

    result = await apply_order_event(stack.pool, order_id, captured(f"{order_id}:cap", None))
    assert result.outcome is EventOutcome.APPLIED
    assert await amounts(stack, first) == PaymentAmounts(
        payment_id=f"P-{order_id}",
        currency="EUR",
        authorised_minor=5700,
        released_minor=2300,
        captured_minor=3400,
        refunded_minor=0,
    )
    # S-2 cancelled after the capture: a refund of its share, within what was captured.
    second = await cancel(stack, order_id, "S-2", captured=True)
    assert await amounts(stack, second) == PaymentAmounts(
        payment_id=f"P-{order_id}",
        currency="EUR",
        authorised_minor=5700,
        released_minor=2300,
        captured_minor=3400,
        refunded_minor=3400,
    )
    # And the ledger itself refuses a capture that would take a released share.
    with pytest.raises(asyncpg.CheckViolationError, match="amounts_add_up"):
        await stack.pool.execute(
            "UPDATE payments SET captured_minor = 5700 WHERE order_id = $1", order_id
        )

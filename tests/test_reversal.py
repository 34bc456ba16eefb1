"""A refund the provider confirmed and later reports failed (R7, R10, R11), end to end through the
real workflow, the real ledger and the provider simulator (on the time-skipping server).

The provider's webhook event reopens the ended cancellation in a new run of the same workflow
id; the run asks the provider, reverses the refund in the ledger (taking back a coupon that
counted on it), parks in `refund_failed`, and an operator's retry makes a new refund with a new
idempotency key. Nothing is refunded twice; the coupon is never given back twice at once.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from helpers.wait import current_details, wait_for_status
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from devstack.demo import DEMO_FILE
from domain.models import (
    CancellationReason,
    CancellationStatus,
    CouponOutcomeKind,
    PaymentEvent,
    PaymentEventType,
    RefundStage,
    RequestCancellationInput,
)
from domain.rules import refund_idempotency_key
from infra.settings import Settings
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.cancellations import Located, locate
from starter.payment_events import ForwardOutcome, forward_payment_event
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation


@dataclass
class Stack:
    client: Client
    pool: asyncpg.Pool
    ledger: Ledger
    provider: SimulatedProvider
    task_queue: str
    # The time-skipping server is shared by the session: each test gets orders of its own, so
    # workflow ids never meet another test's.
    tag: str

    def id(self, demo_id: str) -> str:
        """This test's copy of a demo order, payment or redemption id."""
        return demo_id.replace("-", f"{self.tag}-", 1)


@pytest.fixture
async def stack(time_skipping_env: WorkflowEnvironment, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    tag = uuid.uuid4().hex[:6]
    text = re.sub(r'"([OPR])-', lambda m: f'"{m.group(1)}{tag}-', DEMO_FILE.read_text())
    await load_orders(pool, parse_orders_file(text))
    settings = Settings(
        refund_poll_interval=timedelta(seconds=1),
        refund_submit_initial_interval=timedelta(milliseconds=100),
    )
    provider = SimulatedProvider(pool, confirm_after_polls=0)
    task_queue = f"reversal-{uuid.uuid4()}"
    worker = build_worker(
        time_skipping_env.client, pool, settings, provider=provider, task_queue=task_queue
    )
    async with worker:
        yield Stack(time_skipping_env.client, pool, Ledger(pool), provider, task_queue, tag)


async def cancel(stack: Stack, order_id: str, seller_id: str, buyer_id: str) -> str:
    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=stack.id(order_id),
            seller_id=seller_id,
            buyer_id=buyer_id,
            reason=CancellationReason.CANNOT_SHIP,
        ),
        task_queue=stack.task_queue,
    )
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.execute_update(
        OrderCancellation.decide, {"seller_id": seller_id, "decision": "accept"}
    )
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    return handle.id


def reversal(stack: Stack, provider_ref: str, event_id: str | None = None) -> PaymentEvent:
    return PaymentEvent(
        event_id=event_id or f"evt_{uuid.uuid4().hex[:12]}",
        type=PaymentEventType.REFUND_REVERSED,
        provider_ref=provider_ref,
        failure_code="card_closed",
    )


async def test_reversed_refund_reopens_parks_and_a_retry_refunds_once_more(stack: Stack) -> None:
    # Both sub-orders of O-2001 cancelled; the coupon comes back once.
    P, R = stack.id("P-2001"), stack.id("R-2001")
    await stack.provider.set_faults(P, SimulatorFaults(fail_after_success=True))
    s7 = await cancel(stack, "O-2001", "S-7", "B-601")
    s8 = await cancel(stack, "O-2001", "S-8", "B-601")
    assert await stack.pool.fetchval(
        f"SELECT restored_at IS NOT NULL FROM coupon_redemptions WHERE redemption_id = '{R}'"
    )
    first = await stack.ledger.get_refund(cancellation_id=s7)
    assert first.view.provider_ref is not None
    paid = await stack.pool.fetchval(f"SELECT amount_minor FROM payments WHERE payment_id='{P}'")

    # The provider reports S-7's refund failed after success.
    forwarded = await forward_payment_event(
        stack.client,
        stack.ledger,
        reversal(stack, first.view.provider_ref),
        task_queue=stack.task_queue,
    )
    assert forwarded.outcome is ForwardOutcome.REOPENED and forwarded.cancellation_id == s7
    handle = stack.client.get_workflow_handle_for(OrderCancellation.run, s7)
    parked = await wait_for_status(handle, CancellationStatus.REFUND_FAILED)
    assert parked.last_error is not None and "card_closed" in parked.last_error
    # What the Web UI tells the operator: pay the buyer some other way first; no stale ETA.
    details = await current_details(handle)
    assert "find a way to pay the buyer" in details and "ETA" not in details, details

    # The ledger: refund reversed and its money no longer counted as refunded; the coupon
    # taken back, on both sub-orders' stories.
    reversed_row = await stack.pool.fetchrow(
        "SELECT stage, generation FROM refunds WHERE idempotency_key = $1",
        refund_idempotency_key(s7),
    )
    assert tuple(reversed_row) == ("reversed", 1)
    s8_cash = await stack.pool.fetchval(
        "SELECT amount_minor FROM refunds WHERE cancellation_id = $1", s8
    )
    assert (
        await stack.pool.fetchval(f"SELECT refunded_minor FROM payments WHERE payment_id = '{P}'")
        == s8_cash
    )
    assert (
        await stack.pool.fetchval(
            f"SELECT restored_at FROM coupon_redemptions WHERE redemption_id = '{R}'"
        )
        is None
    )
    for wid in (s7, s8):
        kinds = [e.kind for e in await stack.ledger.audit_trail(cancellation_id=wid)]
        assert "coupon_revoked" in kinds, wid
        seen = await stack.ledger.coupon_outcome(cancellation_id=wid)
        assert seen is not None and seen.outcome is CouponOutcomeKind.PARTIAL_REFUND, wid
    assert "refund_reversed" in [e.kind for e in await stack.ledger.audit_trail(cancellation_id=s7)]

    # An operator retries: a new refund, with a key of its own, and the coupon comes back.
    await handle.execute_update(
        OrderCancellation.retry_refund, {"operator_id": "sre-1", "reason": "new card on file"}
    )
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None
    assert result.refund.idempotency_key == refund_idempotency_key(s7, 2)
    assert result.refund.stage is RefundStage.CONFIRMED
    assert result.coupon is not None and result.coupon.outcome is CouponOutcomeKind.RESTORED

    # Exactly one refund of S-7 succeeded at the provider; the payment never over-refunded.
    at_provider = await stack.pool.fetch(
        "SELECT idempotency_key, status FROM provider_sim.refunds"
        " WHERE idempotency_key LIKE $1 || '%' ORDER BY created_at",
        s7,
    )
    assert [(r["idempotency_key"], r["status"]) for r in at_provider] == [
        (refund_idempotency_key(s7), "failed"),
        (refund_idempotency_key(s7, 2), "succeeded"),
    ]
    refunded = await stack.pool.fetchval(
        f"SELECT refunded_minor FROM payments WHERE payment_id = '{P}'"
    )
    assert refunded == paid
    restorations = await stack.pool.fetch(
        "SELECT cancellation_id FROM coupon_decisions"
        f" WHERE redemption_id = '{R}' AND performed_restore AND superseded_at IS NULL"
    )
    assert [r["cancellation_id"] for r in restorations] == [s7]


async def test_a_stale_reversal_event_changes_nothing(stack: Stack) -> None:
    cid = await cancel(stack, "O-1002", "S-7", "B-502")
    refund = await stack.ledger.get_refund(cancellation_id=cid)
    assert refund.view.provider_ref is not None
    forwarded = await forward_payment_event(
        stack.client,
        stack.ledger,
        reversal(stack, refund.view.provider_ref),
        task_queue=stack.task_queue,
    )
    assert forwarded.outcome is ForwardOutcome.REOPENED
    # The new run asks the provider, which still says succeeded: it ends as it was.
    result = await stack.client.get_workflow_handle_for(OrderCancellation.run, cid).result()
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
    kinds = [
        e.kind
        for e in (await stack.client.get_workflow_handle(cid).query(OrderCancellation.status)).audit
    ]
    assert "reversal_not_confirmed" in kinds
    row = await stack.pool.fetchrow(
        "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
        " WHERE cancellation_id = $1",
        cid,
    )
    assert tuple(row) == ("completed", "confirmed")


async def test_a_reversal_the_provider_will_not_let_us_read_ends_the_check(stack: Stack) -> None:
    """Issue 18: the provider refuses the read that would verify a reversal (a 4xx). The check
    ends instead of retrying forever or failing the run: the refund stays confirmed, the
    cancellation completes again, and the story says the reversal could not be verified
    (`ordercancel reconcile` is the backstop)."""
    cid = await cancel(stack, "O-1002", "S-7", "B-502")
    refund = await stack.ledger.get_refund(cancellation_id=cid)
    assert refund.view.provider_ref is not None
    await stack.provider.set_faults(stack.id("P-1002"), SimulatorFaults(read_errors=1))

    forwarded = await forward_payment_event(
        stack.client,
        stack.ledger,
        reversal(stack, refund.view.provider_ref),
        task_queue=stack.task_queue,
    )

    assert forwarded.outcome is ForwardOutcome.REOPENED
    handle = stack.client.get_workflow_handle_for(OrderCancellation.run, cid)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
    story = await stack.ledger.audit_trail(cancellation_id=cid)
    unverified = [e for e in story if e.kind == "reversal_not_verified"]
    assert len(unverified) == 1 and "RefundStatusUnreadable" in unverified[0].detail
    row = await stack.pool.fetchrow(
        "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
        " WHERE cancellation_id = $1",
        cid,
    )
    assert tuple(row) == ("completed", "confirmed")


async def test_events_are_handled_once_and_unknown_refunds_are_said_so(stack: Stack) -> None:
    cid = await cancel(stack, "O-1002", "S-7", "B-502")
    refund = await stack.ledger.get_refund(cancellation_id=cid)
    confirmed = PaymentEvent(
        event_id="evt_confirmed_1",
        type=PaymentEventType.REFUND_CONFIRMED,
        provider_ref=refund.view.provider_ref,
    )
    first = await forward_payment_event(
        stack.client, stack.ledger, confirmed, task_queue=stack.task_queue
    )
    # The cancellation has ended and "confirmed" changes nothing: no new run.
    assert first.outcome is ForwardOutcome.IGNORED and not first.duplicate
    again = await forward_payment_event(
        stack.client, stack.ledger, confirmed, task_queue=stack.task_queue
    )
    assert again.outcome is ForwardOutcome.IGNORED and again.duplicate
    assert again.cancellation_id == first.cancellation_id == cid
    unknown = await forward_payment_event(
        stack.client,
        stack.ledger,
        PaymentEvent(event_id="evt_x", type=PaymentEventType.REFUND_FAILED, provider_ref="re_x"),
        task_queue=stack.task_queue,
    )
    assert unknown.outcome is ForwardOutcome.UNKNOWN_REFUND
    assert await stack.pool.fetchval("SELECT count(*) FROM payment_events") == 2
    # No new run was started for it (the test server has no visibility: ask the run itself).
    info = (await stack.client.get_workflow_handle(cid).describe()).raw_description
    assert (
        info.workflow_execution_info.execution.run_id == info.workflow_execution_info.first_run_id
    )


async def test_a_refund_the_ledger_refuses_to_record_parks_instead_of_failing(
    stack: Stack,
) -> None:
    """Issue 18: a non-retryable ledger error while recording the refund (here the payment is
    already counted as fully refunded: RefundLimitExceeded) parks the cancellation in
    refund_failed for an operator instead of failing the workflow; once the cause is fixed,
    the operator's retry records and makes the refund, once."""
    payment = stack.id("P-1002")
    await stack.pool.execute(
        "UPDATE payments SET refunded_minor = amount_minor WHERE payment_id = $1", payment
    )
    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=stack.id("O-1002"),
            seller_id="S-7",
            buyer_id="B-502",
            reason=CancellationReason.CANNOT_SHIP,
        ),
        task_queue=stack.task_queue,
    )
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.execute_update(
        OrderCancellation.decide, {"seller_id": "S-7", "decision": "accept"}
    )

    parked = await wait_for_status(handle, CancellationStatus.REFUND_FAILED)

    assert parked.last_error is not None and "RefundLimitExceeded" in parked.last_error
    assert (
        await stack.pool.fetchval(
            "SELECT status FROM cancellations WHERE cancellation_id = $1", handle.id
        )
        == "refund_failed"
    )
    await stack.pool.execute(
        "UPDATE payments SET refunded_minor = 0 WHERE payment_id = $1", payment
    )
    await handle.execute_update(
        OrderCancellation.retry_refund, {"operator_id": "sre-1", "reason": "ledger fixed"}
    )
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None and result.refund.generation == 1
    assert (
        await stack.pool.fetchval(
            "SELECT count(*) FROM provider_sim.refunds WHERE payment_id = $1", payment
        )
        == 1
    )


async def test_status_tells_one_story_across_runs(stack: Stack) -> None:
    """`locate` (what `ordercancel status` and the API show) of a cancellation reopened by a
    reversal: the whole audit trail of every run, in order, once; and the sibling whose
    coupon was revoked shows it (R12, issue 20.3)."""
    P = stack.id("P-2001")
    await stack.provider.set_faults(P, SimulatorFaults(fail_after_success=True))
    s7 = await cancel(stack, "O-2001", "S-7", "B-601")
    s8 = await cancel(stack, "O-2001", "S-8", "B-601")
    first = await stack.ledger.get_refund(cancellation_id=s7)
    assert first.view.provider_ref is not None
    await forward_payment_event(
        stack.client,
        stack.ledger,
        reversal(stack, first.view.provider_ref),
        task_queue=stack.task_queue,
    )
    handle = stack.client.get_workflow_handle_for(OrderCancellation.run, s7)
    await wait_for_status(handle, CancellationStatus.REFUND_FAILED)

    # The new run's own `status` query invents no second request: it begins by saying where
    # the earlier run's story is, then tells its own steps.
    own = await handle.query(OrderCancellation.status)
    own_kinds = [e.kind for e in own.audit]
    assert "requested" not in own_kinds, own_kinds
    assert own_kinds[0] == "earlier_runs_in_ledger", own_kinds
    assert "ledger" in own.audit[0].detail and own.audit[0].actor == "system"
    assert own_kinds.index("payment_event") < own_kinds.index("refund_reversed"), own_kinds

    def story_of(located: Located | None) -> list[str]:
        assert located is not None
        return [e.kind for e in located.view.audit]

    # The new run is running: its story begins with the first run's, once.
    located = await locate(stack.client, stack.ledger, s7)
    assert located is not None and located.source == "workflow" and located.running
    kinds = story_of(located)
    assert kinds.count("requested") == 1 and kinds[0] == "requested", kinds
    assert "resumed" not in kinds, kinds
    # The seller's deadline the ledger recorded at the opening, though the new run has none.
    recorded = await stack.pool.fetchval(
        "SELECT seller_deadline FROM cancellations WHERE cancellation_id = $1", s7
    )
    assert recorded is not None and located.view.seller_deadline == recorded
    # The first run's decision is its ledger row (the seller's message was a note of that run).
    approved = next(e for e in located.view.audit if e.kind == "approved")
    assert approved.actor == "seller:S-7", approved
    for earlier, later in (
        ("approved", "refund_confirmed"),
        ("refund_confirmed", "completed"),
        ("completed", "payment_event"),
        ("payment_event", "refund_reversed"),
    ):
        assert kinds.index(earlier) < kinds.index(later), (earlier, later, kinds)
    assert kinds.count("approved") == 1 and kinds.count("refund_confirmed") == 1, kinds
    assert "coupon_revoked" in kinds, kinds
    assert any(k.startswith("coupon_") and k != "coupon_revoked" for k in kinds), kinds

    # The sibling has ended: its story has the coupon taken back.
    sibling = story_of(await locate(stack.client, stack.ledger, s8))
    assert "coupon_revoked" in sibling, sibling
    assert sibling.count("requested") == 1, sibling

    # Retried and completed again: the ledger tells both runs, each step once per run.
    await handle.execute_update(
        OrderCancellation.retry_refund, {"operator_id": "sre-1", "reason": "new card on file"}
    )
    await handle.result()
    ended = await locate(stack.client, stack.ledger, s7)
    assert ended is not None and not ended.running
    kinds = story_of(ended)
    assert kinds.count("requested") == 1 and kinds.count("approved") == 1, kinds
    assert kinds.count("refund_confirmed") == 2 and kinds.count("completed") == 2, kinds
    assert kinds.index("coupon_revoked") < kinds.index("refund_retry"), kinds
    # The provider's reversal stays in the story once the run that noted it has ended (the
    # ledger keeps it), once, before what it caused.
    assert kinds.count("payment_event") == 1, kinds
    assert kinds.index("payment_event") < kinds.index("coupon_revoked"), kinds

"""The payment provider's webhook events, delivered to the cancellation they concern.

Providers deliver at least once and in any order, so: each event id is handled once (the
ledger's `payment_events`), an event only wakes the workflow (which then asks the provider),
and a reversal of a refund that already completed reopens the cancellation in a new run of the
same workflow id (signal-with-start), which parks it in `refund_failed` for an operator.
"""

from __future__ import annotations

from enum import StrEnum

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from domain.models import PaymentEvent, PaymentEventType, Record
from infra.settings import TASK_QUEUE
from ledger.repository import Ledger
from starter.requests import details, start_attributes, summary
from workflows.order_cancellation import OrderCancellation


class ForwardOutcome(StrEnum):
    DELIVERED = "delivered"  # signalled to the running cancellation
    REOPENED = "reopened"  # a reversal of an ended cancellation: a new run handles it
    IGNORED = "ignored"  # the cancellation has ended and the event changes nothing
    UNKNOWN_REFUND = "unknown_refund"  # no refund of ours has that reference or key


class ForwardResult(Record):
    event_id: str
    outcome: ForwardOutcome
    cancellation_id: str | None = None
    duplicate: bool = False


async def forward_payment_event(
    client: Client, ledger: Ledger, event: PaymentEvent, *, task_queue: str = TASK_QUEUE
) -> ForwardResult:
    previous = await ledger.payment_event_outcome(event_id=event.event_id)
    if previous is not None:
        outcome_before, cancellation_before = previous
        return ForwardResult(
            event_id=event.event_id,
            outcome=ForwardOutcome(outcome_before),
            cancellation_id=cancellation_before,
            duplicate=True,
        )
    cancellation_id = await ledger.find_refund_owner(
        provider_ref=event.provider_ref, refund_key=event.refund_key
    )
    if cancellation_id is None:
        outcome = ForwardOutcome.UNKNOWN_REFUND
    elif event.type is PaymentEventType.REFUND_REVERSED and not await _running(
        client, cancellation_id
    ):
        outcome = await _reopen(client, ledger, event, cancellation_id, task_queue)
    else:
        try:
            await client.get_workflow_handle(cancellation_id).signal(
                OrderCancellation.payment_event, event
            )
            outcome = ForwardOutcome.DELIVERED
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            if event.type is PaymentEventType.REFUND_REVERSED:
                # The run closed between the look and the signal: a reversal still matters,
                # so it reopens the cancellation like one that arrived later (issue 16 item 7).
                outcome = await _reopen(client, ledger, event, cancellation_id, task_queue)
            else:
                # The cancellation has ended and its refund stands: a late confirmation or
                # failure report changes nothing (the workflow only acts on reversals then).
                outcome = ForwardOutcome.IGNORED
    recorded = await ledger.record_payment_event(
        event, cancellation_id=cancellation_id, outcome=outcome.value
    )
    return ForwardResult(
        event_id=event.event_id,
        outcome=ForwardOutcome(recorded),
        cancellation_id=cancellation_id,
        duplicate=recorded != outcome.value,
    )


async def _reopen(
    client: Client, ledger: Ledger, event: PaymentEvent, cancellation_id: str, task_queue: str
) -> ForwardOutcome:
    """A new run of the ended cancellation, started with the event. (Had one been started
    meanwhile, USE_EXISTING turns this into a plain signal to it.)"""
    request = await ledger.original_request(cancellation_id=cancellation_id)
    amount = await ledger.sub_order_amount(order_id=request.order_id, seller_id=request.seller_id)
    await client.start_workflow(
        OrderCancellation.run,
        request,
        id=cancellation_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        start_signal="payment_event",
        start_signal_args=[event],
        search_attributes=start_attributes(request),
        # The same summary and details as the first run (starter.requests), so the reopened
        # run is as readable in the Web UI; the summary says why this run exists.
        static_summary=f"{summary(request, amount)}; reopened by {event.type.value}",
        static_details=details(request),
    )
    return ForwardOutcome.REOPENED


async def _running(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING

"""Each activity as `OrderCancellation` calls it: its input, timeout, retry policy and the
summary the Web UI shows. One function per activity, one command each.

The ledger writes are retried until they go through (a business failure says so with a
non-retryable type); the provider calls follow the refund policy the ledger returned (R9, R10).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

from activities.history_activities import HistoryActivities
from activities.ledger_activities import (
    LEDGER_DATA_REFUSED,
    ApproveInput,
    CompleteInput,
    LedgerActivities,
)
from activities.refund_activities import (
    REFUND_FAILED_AT_PROVIDER,
    REFUND_REJECTED,
    REFUND_STATUS_UNREADABLE,
    RefundActivities,
    SubmitRefundInput,
)
from domain.models import (
    CancellationStatus,
    CouponDecision,
    CouponInput,
    EventInput,
    Money,
    OpenCancellationInput,
    OpenCancellationResult,
    RefundFailureInput,
    RefundPolicy,
    RefundRequestInput,
    RefundStepInput,
    RefundView,
    RequestCancellationInput,
    SignalsBeforeInput,
    TransitionInput,
)

LEDGER_TIMEOUT = timedelta(seconds=30)
# A ledger write that fails for a business reason says so with a non-retryable type; anything
# else (database restarting, network) is retried until it goes through.
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=30),
)
PROVIDER_TIMEOUT = timedelta(seconds=60)
# About 20 minutes of asking (1 s doubling to 5 min) before a reversal check gives up.
VERIFY_REVERSAL_MAX_ATTEMPTS = 10

# --- the ledger --------------------------------------------------------------------------------


def data_refused(err: ActivityError) -> bool:
    """The ledger refused the data of a write for good (`LEDGER_DATA_REFUSED`)."""
    cause = err.cause
    return isinstance(cause, ApplicationError) and cause.type == LEDGER_DATA_REFUSED


async def signals_before(signal_name: str, deadline: datetime) -> int:
    """R19: how many `signal_name` signals the server received in this run before `deadline`."""
    info = workflow.info()
    return await workflow.execute_activity_method(
        HistoryActivities.signals_before,
        SignalsBeforeInput(
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            signal_name=signal_name,
            deadline=deadline,
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary="Did the seller's decision reach the server before the deadline?",
    )


async def open_cancellation(
    cancellation_id: str, request: RequestCancellationInput
) -> OpenCancellationResult:
    return await workflow.execute_activity_method(
        LedgerActivities.open_cancellation,
        OpenCancellationInput(cancellation_id=cancellation_id, request=request),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary="Read the sub-order and choose the instant or request path",
    )


async def record_transition(
    cancellation_id: str,
    status: CancellationStatus,
    actor: str,
    kind: str,
    detail: str,
    *,
    event_key: str,
    cancel_sub_order: bool,
) -> None:
    await workflow.execute_activity_method(
        LedgerActivities.record_transition,
        TransitionInput(
            cancellation_id=cancellation_id,
            status=status,
            actor=actor,
            kind=kind,
            detail=detail,
            event_key=event_key,
            cancel_sub_order=cancel_sub_order,
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary=f"Record: {kind}",
    )


async def approve_and_request_refund(
    transition: TransitionInput, amount: Money, *, refund_key: str
) -> RefundView | None:
    """The lean shape's approval: one activity records it and the refund (dot 1)."""
    return await workflow.execute_activity_method(
        LedgerActivities.approve_and_request_refund,
        ApproveInput(
            transition=transition,
            refund=RefundRequestInput(
                cancellation_id=transition.cancellation_id, event_key=refund_key
            ),
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary=f"Record: {transition.kind}, and the refund of {amount} (dot 1)",
    )


async def complete_with_coupon(coupon_key: str, transition: TransitionInput) -> CouponDecision:
    """The lean shape's last step: the coupon decision and the completion, one activity."""
    return await workflow.execute_activity_method(
        LedgerActivities.complete_with_coupon,
        CompleteInput(
            coupon=CouponInput(cancellation_id=transition.cancellation_id, event_key=coupon_key),
            transition=transition,
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary="Decide whether the coupon comes back, and record: completed",
    )


async def record_event(
    cancellation_id: str, actor: str, kind: str, detail: str, *, event_key: str
) -> None:
    await workflow.execute_activity_method(
        LedgerActivities.record_event,
        EventInput(
            cancellation_id=cancellation_id,
            actor=actor,
            kind=kind,
            detail=detail,
            event_key=event_key,
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary=f"Record: {kind}",
    )


async def request_refund(cancellation_id: str, amount: Money, *, event_key: str) -> RefundView:
    return await workflow.execute_activity_method(
        LedgerActivities.request_refund,
        RefundRequestInput(cancellation_id=cancellation_id, event_key=event_key),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary=f"Record the refund of {amount} (dot 1)",
    )


async def record_refund_failed(
    step: RefundStepInput, error: str, *, attempts: int, final: bool
) -> RefundView:
    return await workflow.execute_activity_method(
        LedgerActivities.record_refund_failed,
        RefundFailureInput(
            cancellation_id=step.cancellation_id,
            idempotency_key=step.idempotency_key,
            error=error,
            attempts=attempts,
            event_key=step.event_key,
            final=final,
        ),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary="Park the refund for an operator",
    )


async def restore_coupon(
    cancellation_id: str, *, event_key: str, again: bool = False
) -> CouponDecision:
    return await workflow.execute_activity_method(
        LedgerActivities.restore_coupon,
        CouponInput(cancellation_id=cancellation_id, event_key=event_key, again=again),
        start_to_close_timeout=LEDGER_TIMEOUT,
        retry_policy=LEDGER_RETRY,
        summary=(
            "Read the coupon again: a sibling cancellation decided"
            if again
            else "Decide whether the coupon comes back"
        ),
    )


# --- the sibling cancellations of a coupon (R11) -----------------------------------------------

COUPON_SETTLED = "coupon_settled"


async def coupon_settled(cancellation_ids: list[str]) -> None:
    """Signal `coupon_settled` to each sibling that may wait on this decision (one command
    each). One that has ended cannot be told and need not be: it waited for every sibling whose
    refund was on its way, and the ledger has the rest."""

    async def tell(cancellation_id: str) -> None:
        try:
            await workflow.get_external_workflow_handle(cancellation_id).signal(COUPON_SETTLED)
        except FailureError:
            pass

    await asyncio.gather(*(tell(c) for c in cancellation_ids))


# --- the payment provider ----------------------------------------------------------------------


async def submit_refund(
    step: RefundStepInput, refund: RefundView, policy: RefundPolicy
) -> RefundView:
    return await workflow.execute_activity_method(
        RefundActivities.submit_refund,
        step,
        start_to_close_timeout=PROVIDER_TIMEOUT,
        retry_policy=RetryPolicy(
            initial_interval=policy.submit_initial_interval,
            maximum_interval=policy.submit_max_interval,
            maximum_attempts=policy.submit_max_attempts,
            non_retryable_error_types=[REFUND_REJECTED],
        ),
        summary=f"Submit the {refund.kind.value} to the payment provider (dot 2)",
    )


async def submit_refund_and_confirm(
    step: RefundStepInput, refund: RefundView, policy: RefundPolicy, *, confirm_key: str
) -> RefundView:
    """The lean shape's submit: confirmed at once when the provider answers synchronously."""
    return await workflow.execute_activity_method(
        RefundActivities.submit_refund_and_confirm,
        SubmitRefundInput(**step.model_dump(), confirm_event_key=confirm_key),
        start_to_close_timeout=PROVIDER_TIMEOUT,
        retry_policy=RetryPolicy(
            initial_interval=policy.submit_initial_interval,
            maximum_interval=policy.submit_max_interval,
            maximum_attempts=policy.submit_max_attempts,
            non_retryable_error_types=[REFUND_REJECTED],
        ),
        summary=(
            f"Submit the {refund.kind.value} to the payment provider (dot 2; dot 3 if it"
            " answers at once)"
        ),
    )


async def confirm_refund(step: RefundStepInput, policy: RefundPolicy) -> RefundView:
    return await workflow.execute_activity_method(
        RefundActivities.confirm_refund,
        step,
        start_to_close_timeout=PROVIDER_TIMEOUT,
        # Only an unreachable provider is retried here; "pending" is an answer.
        retry_policy=RetryPolicy(
            initial_interval=policy.submit_initial_interval,
            maximum_interval=policy.submit_max_interval,
            non_retryable_error_types=[REFUND_FAILED_AT_PROVIDER],
        ),
        summary="Ask the provider whether the refund is confirmed (dot 3)",
    )


async def verify_reversal(step: RefundStepInput) -> RefundView:
    return await workflow.execute_activity_method(
        RefundActivities.verify_reversal,
        step,
        start_to_close_timeout=PROVIDER_TIMEOUT,
        # Bounded (issue 18): a provider that will not say ends the check instead of retrying
        # forever; a refused read ends it at once.
        retry_policy=RetryPolicy(
            initial_interval=timedelta(seconds=1),
            maximum_interval=timedelta(minutes=5),
            maximum_attempts=VERIFY_REVERSAL_MAX_ATTEMPTS,
            non_retryable_error_types=[REFUND_STATUS_UNREADABLE],
        ),
        summary="Check with the provider that the refund was reversed",
    )

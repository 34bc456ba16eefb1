"""The workflow under test without its servers: named fake activities that record every call,
a harness that starts `OrderCancellation` on a worker of its own, and the small helpers the
workflow tests share (status, refusals, the seller's decisions)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.ledger_activities import ApproveInput, CompleteInput
from activities.refund_activities import SubmitRefundInput
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationResult,
    CaptureState,
    CouponDecision,
    CouponInput,
    CouponOutcome,
    CouponOutcomeKind,
    EventInput,
    Money,
    OpenCancellationInput,
    OpenCancellationResult,
    PaymentMethod,
    RefundFailureInput,
    RefundKind,
    RefundPolicy,
    RefundRequestInput,
    RefundStage,
    RefundStepInput,
    RefundView,
    RequestCancellationInput,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import cancellation_id, refund_idempotency_key
from helpers.wait import status_of, wait_for_status  # noqa: F401  (re-exported for the workflow tests)
from starter.requests import start_attributes
from workers.worker import workflow_runner
from workflows.order_cancellation import OrderCancellation

AMOUNT = Money(amount_minor=2540, currency="EUR")


@dataclass
class FakeActivities:
    """Stands in for the ledger and the provider; records every call in order."""

    path: CancellationPath = CancellationPath.REQUEST
    timeout_policy: TimeoutPolicy = TimeoutPolicy.AUTO_APPROVE
    # The seller's window as the ledger's policy gives it (R19): never the request's.
    response_window: timedelta = timedelta(hours=48)
    # Exceptions raised by successive submit_refund calls; empty: succeed.
    submit_failures: list[Exception] = field(default_factory=list)
    # How many times confirm_refund answers "still pending" before the provider confirms.
    pending_confirms: int = 0
    poll_interval: timedelta = timedelta(milliseconds=10)
    # The provider confirms at submit (a synchronous answer): no `confirm_refund` then.
    answers_at_once: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args(self, name: str) -> list[Any]:
        return [arg for n, arg in self.calls if n == name]

    def _refund(self, stage: RefundStage, cid: str) -> RefundView:
        return RefundView(
            idempotency_key=refund_idempotency_key(cid),
            kind=RefundKind.REFUND,
            amount=AMOUNT,
            stage=stage,
            provider_ref="re_1" if stage is not RefundStage.REQUESTED else None,
        )

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        @activity.defn(name="open_cancellation")
        async def open_cancellation(params: OpenCancellationInput) -> OpenCancellationResult:
            self.calls.append(("open_cancellation", params))
            return OpenCancellationResult(
                path=self.path,
                amount=AMOUNT,
                payment_method=PaymentMethod.CARD,
                capture=CaptureState.CAPTURED,
                response_window=self.response_window,
                timeout_policy=self.timeout_policy,
                refund_policy=RefundPolicy(
                    submit_initial_interval=timedelta(milliseconds=10),
                    submit_max_attempts=2,
                    poll_interval=self.poll_interval,
                    poll_max_interval=timedelta(hours=2),
                ),
            )

        @activity.defn(name="record_transition")
        async def record_transition(params: TransitionInput) -> None:
            self.calls.append(("record_transition", params))

        @activity.defn(name="record_event")
        async def record_event(params: EventInput) -> None:
            self.calls.append(("record_event", params))

        @activity.defn(name="request_refund")
        async def request_refund(params: RefundRequestInput) -> RefundView:
            self.calls.append(("request_refund", params))
            return self._refund(RefundStage.REQUESTED, params.cancellation_id)

        @activity.defn(name="submit_refund")
        async def submit_refund(params: RefundStepInput) -> RefundView:
            self.calls.append(("submit_refund", params))
            if self.submit_failures:
                raise self.submit_failures.pop(0)
            return self._refund(RefundStage.SUBMITTED, params.cancellation_id)

        @activity.defn(name="confirm_refund")
        async def confirm_refund(params: RefundStepInput) -> RefundView:
            self.calls.append(("confirm_refund", params))
            if self.pending_confirms > 0:
                self.pending_confirms -= 1
                return self._refund(RefundStage.SUBMITTED, params.cancellation_id)
            return self._refund(RefundStage.CONFIRMED, params.cancellation_id)

        @activity.defn(name="record_refund_failed")
        async def record_refund_failed(params: RefundFailureInput) -> RefundView:
            self.calls.append(("record_refund_failed", params))
            stage = RefundStage.DECLINED if params.final else RefundStage.FAILED
            return self._refund(stage, params.cancellation_id)

        @activity.defn(name="restore_coupon")
        async def restore_coupon(params: CouponInput) -> CouponDecision:
            self.calls.append(("restore_coupon", params))
            return CouponDecision(
                outcome=CouponOutcome(outcome=CouponOutcomeKind.NO_COUPON, reason="no coupon")
            )

        # The lean shape's steps (workflow `LEAN_SHAPE`): each records the calls of the steps it
        # joins, so that a test reads the same sequence whichever shape ran.
        @activity.defn(name="approve_and_request_refund")
        async def approve_and_request_refund(params: ApproveInput) -> RefundView | None:
            await record_transition(params.transition)
            return await request_refund(params.refund)

        @activity.defn(name="submit_refund_and_confirm")
        async def submit_refund_and_confirm(params: SubmitRefundInput) -> RefundView:
            view = await submit_refund(params)
            if not self.answers_at_once:
                return view
            self.calls.append(("confirmed_at_submit", params))
            return self._refund(RefundStage.CONFIRMED, params.cancellation_id)

        @activity.defn(name="complete_with_coupon")
        async def complete_with_coupon(params: CompleteInput) -> CouponDecision:
            decision = await restore_coupon(params.coupon)
            await record_transition(params.transition)
            return decision

        return [
            approve_and_request_refund,
            submit_refund_and_confirm,
            complete_with_coupon,
            open_cancellation,
            record_transition,
            record_event,
            request_refund,
            submit_refund,
            confirm_refund,
            record_refund_failed,
            restore_coupon,
        ]


@dataclass
class Harness:
    env: WorkflowEnvironment
    fakes: FakeActivities
    task_queue: str

    async def start(
        self, *, with_attributes: bool = False, **overrides: Any
    ) -> WorkflowHandle[Any, CancellationResult]:
        """Started bare, as any client may, or (`with_attributes`) with the search attributes
        the product's starter sets."""
        request = RequestCancellationInput(
            order_id=overrides.pop("order_id", f"O-{uuid.uuid4().hex[:8]}"),
            seller_id="S-7",
            buyer_id="B-1",
            reason=CancellationReason.OUT_OF_STOCK,
            **overrides,
        )
        return await self.env.client.start_workflow(
            OrderCancellation.run,
            request,
            id=cancellation_id(request.order_id, request.seller_id),
            task_queue=self.task_queue,
            search_attributes=start_attributes(request) if with_attributes else None,
        )


async def refused(handle: WorkflowHandle[Any, Any], update: Any, payload: Any) -> ApplicationError:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(update, payload)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


def accept(seller: str = "S-7", reason: str = "ok") -> dict[str, str]:
    return {"seller_id": seller, "decision": "accept", "reason": reason}


def reject(seller: str = "S-7", reason: str = "already shipped") -> dict[str, str]:
    return {"seller_id": seller, "decision": "reject", "reason": reason}


def start_fake_worker(
    env: WorkflowEnvironment, fakes: FakeActivities, *, cache_size: int = 1000
) -> tuple[Worker, Harness]:
    """A worker of `OrderCancellation` over `fakes` on a task queue of its own, running."""
    task_queue = f"tq-{uuid.uuid4()}"
    worker = Worker(
        env.client,
        task_queue=task_queue,
        workflows=[OrderCancellation],
        activities=fakes.activities(),
        workflow_runner=workflow_runner(),
        max_cached_workflows=cache_size,
    )
    asyncio.get_running_loop().create_task(worker.run())
    return worker, Harness(env, fakes, task_queue)

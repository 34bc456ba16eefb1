"""`OrderCancellation`: one workflow per cancelled sub-order, written as the rule book reads.

`run` is the story: open the cancellation (R1: instant, or a request to the seller), the seller
decides within the response window (R3-R5), the money is refunded (R7-R10), the coupon comes
back or not (R11), the cancellation completes; a refund the provider reverses later goes round
again (R7, R10). Every step is an audit row in the ledger (R12).

It only orchestrates: the rules are pure functions in `domain.rules`, every write is an
activity (`workflows.steps`), what operators see is `workflows.visibility`, and messages are
read by `workflows.messages`. Names here (workflow type, signals, updates, query) are a public
contract. A change to the commands this code issues must keep running cancellations
replayable: docs/workflow-changes.md.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import REFUND_FAILED_AT_PROVIDER, REFUND_REJECTED
    from domain import rules
    from domain.errors import DecisionRefused, RefusalCode
    from domain.models import (
        AuditEntry,
        CancellationPath,
        CancellationReason,
        CancellationResult,
        CancellationStatus,
        CarriedState,
        CouponDecision,
        CouponOutcome,
        CouponOutcomeKind,
        Decision,
        OpenCancellationResult,
        PaymentEvent,
        RefundStage,
        RefundStepInput,
        RefundView,
        RequestCancellationInput,
        RetryRefundRequest,
        TransitionInput,
        WithdrawRequest,
    )
    from workflows import messages, steps
    from workflows.handlers import (
        REFUSALS_RECORDED,
        CancellationInbox,
        answered,
        next_key,
        note,
        show_latest_message,
    )
    from workflows.visibility import Visibility

# Statuses a cancellation has before the seller's decision; a run that finds the ledger past
# them resumes instead of asking again.
_BEFORE_DECISION = (
    CancellationStatus.OPENING,
    CancellationStatus.AWAITING_SELLER,
    CancellationStatus.ESCALATED,
)


# A run continues as new when Temporal suggests it, or past these (Temporal's own limits are
# 51,200 events and 50 MB, with warnings from 10,240 events and 10 MB).
HISTORY_EVENTS = 2_000
HISTORY_EVENTS_MIN = 500
HISTORY_BYTES = 2 * 1024 * 1024

# The lean shape (issue 19): one activity per business step (approve with the refund's dot 1,
# the coupon with the completion), the provider's synchronous answer confirms at submit, and a
# status passed within one step is upserted with the next one. Asked where the shapes diverge
# (`_lean`); histories without its marker replay the shape before it.
LEAN_SHAPE = "lean-shape-v1"


def _read_input(args: tuple[Any, ...]) -> tuple[RequestCancellationInput, Any, str | None]:
    """The request, the carried state (or None) and what is wrong with the input (or None)."""
    try:
        if not 1 <= len(args) <= 2:
            raise DecisionRefused(
                RefusalCode.INVALID_PAYLOAD,
                f"invalid payload: expected one RequestCancellationInput, got {len(args)}"
                " arguments",
            )
        request = messages.parse(RequestCancellationInput, args[0])
    except DecisionRefused as err:
        placeholder = RequestCancellationInput.model_construct(
            order_id="?", seller_id="?", buyer_id="?", reason=CancellationReason.OTHER
        )
        return placeholder, None, err.message
    return request, args[1] if len(args) == 2 else None, None


@workflow.defn(name="OrderCancellation")
class OrderCancellation(CancellationInbox):
    """The story of one cancellation; its handlers are in `CancellationInbox`."""

    @workflow.init
    def __init__(self, *args: Any) -> None:
        # Validators can run before `run` (an update sent right after start): everything they
        # read is set here. The input is read here rather than by the SDK's decoder, so that
        # a start with a malformed input (any client can start one) fails the run with
        # `invalid_payload` instead of failing its workflow task for ever; and so that a run
        # continued as new gets its carried state as a second argument.
        request, carried, self._bad_input = _read_input(args)
        self._request = request
        self._id = workflow.info().workflow_id
        self._status = CancellationStatus.OPENING
        self._opened: OpenCancellationResult | None = None
        self._decision: Decision | None = None
        self._decided_by = ""
        self._decision_reason = ""
        self._withdrawal: WithdrawRequest | None = None
        self._shipped_event: str | None = None
        self._retry: RetryRefundRequest | None = None
        self._deadline: datetime | None = None
        self._seller_signals = 0
        self._late_signal: int | None = None
        self._refund: RefundView | None = None
        self._coupon: CouponOutcome | None = None
        # Sibling cancellations whose refund is on its way: the coupon may come back with them.
        self._coupon_waiting: list[str] = []
        self._coupon_news = False
        self._last_error: str | None = None
        self._provider_news = False
        self._reversal: PaymentEvent | None = None
        self._audit: list[AuditEntry] = []
        self._visible = Visibility()
        # Audit rows written by the ledger get keys from this counter, in workflow order, so a
        # retried activity writes its row once and a replay produces the same keys. The run id
        # in each key keeps a later run of the same cancellation (reopened by a reversed refund)
        # from reusing the first run's keys, whose rows ON CONFLICT DO NOTHING would drop.
        # 000-requested and 001-path are written once, by the first `open_cancellation`.
        self._seq = 1
        self._run_id = workflow.info().run_id
        self._refused = 0
        # The lean shape (`_lean`); a refund recorded with the approval (`_approve`).
        self._lean_shape = False
        self._refund_recorded = False
        # A run Temporal started by continue-as-new carries on from where the last one waited
        # (`_continue_as_new`); any other start (a client's extra argument) begins afresh.
        self._phase: str | None = None
        if carried is not None and workflow.info().continued_run_id is not None:
            self._restore(CarriedState.model_validate(carried))

    # --- the story: open -> the seller decides -> refund -> coupon -> complete --------------

    @workflow.run
    async def run(self, *args: Any) -> CancellationResult:
        """Input: one `RequestCancellationInput` (a run continued as new: and its state)."""
        if self._bad_input is not None:
            raise ApplicationError(
                self._bad_input, type=RefusalCode.INVALID_PAYLOAD.value, non_retryable=True
            )
        request = self._request
        if self._phase is not None:
            return await self._carry_on(self._phase)
        if rules.cancellation_id(request.order_id, request.seller_id) != self._id:
            # Any client picks the workflow id it starts (R20): one that is not this request's
            # sub-order's would open a second cancellation of it, or merge two. Nothing is
            # written; the ledger refuses the same (CancellationIdMismatch).
            raise ApplicationError(
                f"workflow id {self._id} is not the cancellation of order {request.order_id}"
                f" / seller {request.seller_id}",
                type="CancellationIdMismatch",
                non_retryable=True,
            )
        opened = await self._open(request)
        resumed_at = opened.ledger_status
        if resumed_at in (CancellationStatus.REJECTED, CancellationStatus.WITHDRAWN):
            # A new run of a request that ended: nothing is left to do.
            self._set_status(resumed_at, "system", "resumed", "the request had already ended")
            return await self._finish()
        if resumed_at is CancellationStatus.COMPLETED and not await self._reopened(opened):
            # Another start of a completed cancellation (any client may start one): it
            # reports the outcome the ledger has and changes nothing (R20).
            self._set_status(resumed_at, "system", "resumed", "the cancellation had completed")
            return await self._finish()
        if opened.path is CancellationPath.INSTANT and opened.refund is None:
            self._set_status(
                CancellationStatus.APPROVED,
                "system",
                "cancelled_instantly",
                "payment not validated yet: cancelled without the seller (R1)",
                upsert=not self._lean(),
            )
        elif resumed_at is not None and resumed_at not in _BEFORE_DECISION:
            # A new run of a cancellation past its decision (e.g. reopened by a reversed
            # refund): carry on from where the ledger says it stands.
            self._refund = opened.refund
            self._set_status(
                resumed_at, "system", "resumed", f"a new run resumes at {resumed_at.value}"
            )
        elif not await self._seller_decides(opened):
            return await self._finish()
        await self._settle(opened)
        return await self._finish()

    async def _open(self, request: RequestCancellationInput) -> OpenCancellationResult:
        """R1: the ledger reads the sub-order and chooses the instant or the request path.
        The attributes naming the order, seller and buyer are shown once the ledger has taken
        the request (another buyer's start of an existing cancellation is refused there)."""
        opened = await steps.open_cancellation(self._id, request)
        self._visible.start(request)
        self._opened = opened
        self._visible.opened(opened)
        note(
            self,
            f"buyer:{request.buyer_id}",
            "requested",
            f"reason {request.reason.value} ({request.reason.fault.value} fault)",
        )
        return opened

    async def _reopened(self, opened: OpenCancellationResult) -> bool:
        """A run that finds its cancellation completed works only for the provider's reversal
        of the refund, which reopens it with the `payment_event` that starts the run
        (starter.payment_events): that event is judged, against the refund the ledger has,
        before anything else happens."""
        self._refund = opened.refund
        self._coupon = opened.coupon
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._reversal is not None

    async def _seller_decides(self, opened: OpenCancellationResult) -> bool:
        """R3-R5: wait on a durable timer for the seller (escalated: for an operator); the
        buyer may withdraw meanwhile. True when the cancellation is approved."""
        if self._deadline is None:
            # R19: the policy's window from now, on the workflow's clock (Temporal's: the one a
            # decision's arrival is judged by). A later run of a cancellation the ledger already
            # had (restarted by hand) keeps the deadline the ledger recorded at its opening.
            fresh = opened.opened_now or opened.seller_deadline is None
            self._deadline = (
                workflow.now() + opened.response_window if fresh else opened.seller_deadline
            )
            assert self._deadline is not None
            self._set_status(
                CancellationStatus.AWAITING_SELLER,
                "system",
                "awaiting_seller",
                f"seller {self._request.seller_id} has until {self._deadline.isoformat()}",
            )
        if self._status is CancellationStatus.AWAITING_SELLER:
            # What is left of the window (all of it, unless a previous run waited already).
            window = self._deadline - workflow.now()
            timed_out = False
            try:
                if window <= timedelta(0):
                    raise TimeoutError
                await self._wait(
                    lambda: answered(self),
                    "seller",
                    timeout=window,
                    summary="Seller response window",
                )
            except TimeoutError:
                timed_out = True
            # R19: a seller's signal handled once the deadline had passed (with the timer, after
            # no worker ran) counts if the server received it before the deadline, and only
            # then; a decision accepted before the timer fired in the same task still counts.
            late = self._late_signal is not None and not await self._received_in_time()
            if late:
                self._withdraw_late_decision()
            if timed_out or late:
                if not answered(self) and self._on_timeout(opened):
                    await self._transition(
                        CancellationStatus.ESCALATED,
                        "timer",
                        "escalated",
                        "seller did not answer in time; an operator decides (resolve_escalation)",
                    )
        if self._status is CancellationStatus.ESCALATED:
            await self._wait(lambda: answered(self), "seller")

        if self._withdrawal is not None and self._decision is None:
            await self._transition(
                CancellationStatus.WITHDRAWN,
                f"buyer:{self._withdrawal.buyer_id}",
                "withdrawn",
                self._withdrawal.reason,
            )
            return False
        if self._decision is Decision.REJECT:
            await self._transition(
                CancellationStatus.REJECTED, self._decided_by, "rejected", self._decision_reason
            )
            return False
        if self._lean():
            await self._approve(opened)
            return True
        await self._transition(
            CancellationStatus.APPROVED,
            self._decided_by,
            "approved",
            self._decision_reason,
            cancel_sub_order=True,
        )
        return True

    def _lean(self) -> bool:
        """Whether this cancellation takes the lean shape (`LEAN_SHAPE`)."""
        self._lean_shape = workflow.patched(LEAN_SHAPE)
        return self._lean_shape

    async def _approve(self, opened: OpenCancellationResult) -> None:
        """The lean approval: the ledger records it and the refund (dot 1) in one activity;
        the status shown is refund_requested. A refund the ledger refused is asked again by
        `_refund_money`, which parks it (issue 18)."""
        transition = TransitionInput(
            cancellation_id=self._id,
            status=CancellationStatus.APPROVED,
            actor=self._decided_by,
            kind="approved",
            detail=self._decision_reason,
            event_key=next_key(self, "approved"),
            cancel_sub_order=True,
        )
        refund_key = next_key(self, "refund_requested")
        try:
            refund = await steps.approve_and_request_refund(
                transition, opened.amount, refund_key=refund_key
            )
        except ActivityError as err:
            if not steps.data_refused(err):
                raise
            transition = transition.model_copy(
                update={
                    "actor": rules.safe_text(transition.actor, 200),
                    "detail": rules.safe_text(transition.detail, 2000),
                }
            )
            refund = await steps.approve_and_request_refund(
                transition, opened.amount, refund_key=refund_key
            )
        self._set_status(
            CancellationStatus.APPROVED,
            transition.actor,
            "approved",
            transition.detail,
            logged_by_activity=True,
            upsert=refund is None,
        )
        if refund is None:
            return
        self._refund = refund
        self._refund_recorded = True
        if refund.stage is RefundStage.REQUESTED:
            self._set_status(
                CancellationStatus.REFUND_REQUESTED,
                "system",
                "refund_requested",
                logged_by_activity=True,
            )

    async def _received_in_time(self) -> bool:
        assert self._deadline is not None and self._late_signal is not None
        received = await steps.signals_before("seller_decision", self._deadline)
        return self._late_signal <= received

    def _withdraw_late_decision(self) -> None:
        """The seller's signal reached the server after the deadline: the timer decides."""
        note(
            self,
            self._decided_by,
            "seller_decision_refused",
            f"{RefusalCode.NOT_PENDING.value}: received after the deadline"
            f" {self._deadline.isoformat() if self._deadline else ''}",
        )
        self._decision = None
        self._decided_by = ""
        self._decision_reason = ""
        self._late_signal = None

    def _on_timeout(self, opened: OpenCancellationResult) -> bool:
        """R4: the policy decides for a silent seller. Synchronous, so no decision can slip in
        between the timer firing and the status changing. True: escalated to operators."""
        outcome = rules.timeout_outcome(opened.timeout_policy)
        if outcome is None:
            self._status = CancellationStatus.ESCALATED
            return True
        self._decision = outcome
        self._decided_by = "timer"
        self._decision_reason = (
            f"seller did not answer within {opened.response_window}: {opened.timeout_policy.value}"
        )
        return False

    async def _settle(self, opened: OpenCancellationResult) -> None:
        """Refund, coupon, done; and if the provider reverses the refund after success, park
        for an operator and do it again with a new refund (R7, R10, R11)."""
        while True:
            if self._refund is None or self._refund.stage is not RefundStage.CONFIRMED:
                await self._refund_money(opened)
            if self._coupon is None:
                # Reset before asking: a sibling's word that arrives meanwhile is not lost.
                self._coupon_news = False
                completes = self._reversal is None and self._status is not (
                    CancellationStatus.COMPLETED
                )
                if completes and self._lean():
                    # One step: the coupon decision and the completion.
                    decision = await steps.complete_with_coupon(
                        next_key(self, "coupon"),
                        TransitionInput(
                            cancellation_id=self._id,
                            status=CancellationStatus.COMPLETED,
                            actor="system",
                            kind="completed",
                            event_key=next_key(self, "completed"),
                        ),
                    )
                else:
                    decision = await steps.restore_coupon(
                        self._id, event_key=next_key(self, "coupon")
                    )
                    completes = False
                coupon = self._take_coupon(decision)
                note(self, "system", f"coupon_{coupon.outcome.value}", coupon.reason)
                # Siblings that decided partial_refund may be waiting on this decision.
                await steps.coupon_settled(decision.notify)
                if completes:
                    # The coupon's search attribute goes with the completed status.
                    self._set_status(
                        CancellationStatus.COMPLETED, "system", "completed", logged_by_activity=True
                    )
            assert self._coupon is not None
            if self._reversal is None and self._status is not CancellationStatus.COMPLETED:
                # The coupon's search attribute goes with the completed status.
                await self._transition(CancellationStatus.COMPLETED, "system", "completed")
            else:
                # No status change to carry it: on its own (nothing if already shown).
                self._visible.show_coupon(self._coupon, waiting_on=self._coupon_waiting)
            if self._reversal is None:
                await self._coupon_settles()
            if self._reversal is None and not await self._late_reversal():
                return
            await self._handle_reversal()

    async def _late_reversal(self) -> bool:
        """A provider event that arrived as the cancellation completes (its handler still
        waiting, or delivered in the last workflow task) is judged before the run ends: a
        reversal is handled here, never dropped with the closing run (issue 16 item 7)."""
        if not workflow.patched("drain-payment-events-v1"):
            return False
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._reversal is not None

    def _take_coupon(self, decision: CouponDecision) -> CouponOutcome:
        self._coupon = decision.outcome
        partial = decision.outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
        self._coupon_waiting = list(decision.waiting_on) if partial else []
        return self._coupon

    async def _coupon_settles(self) -> None:
        """R11 across siblings, so that what operators search is true once the run has ended
        (an ended run's search attributes can no longer change): a cancellation that found the
        coupon `partial_refund` while sibling cancellations were refunding stays open, completed,
        until each of them has decided its coupon (signal `coupon_settled`), and ends with the
        outcome as it then stands: `restored` if the last one gave it back."""
        while self._coupon_waiting and self._reversal is None:
            await self._wait(lambda: self._coupon_news or self._reversal is not None, "coupon")
            if self._reversal is not None:
                return
            self._coupon_news = False
            before = self._coupon
            decision = await steps.restore_coupon(self._id, event_key="", again=True)
            coupon = self._take_coupon(decision)
            if before is None or coupon.outcome is not before.outcome:
                # The ledger has the row (written by the sibling that restored it).
                note(self, "system", f"coupon_{coupon.outcome.value}", coupon.reason)
            self._visible.show_coupon(coupon, waiting_on=self._coupon_waiting)

    # --- the refund: requested -> submitted -> confirmed, or parked (R7-R10) ----------------

    async def _refund_money(self, opened: OpenCancellationResult) -> None:
        """R7-R10: requested -> submitted -> confirmed; park in refund_failed, never fail."""
        passes = 0
        # Recorded with the approval (the lean shape), or not yet.
        requested, self._refund_recorded = self._refund_recorded, False
        while True:
            passes += 1
            try:
                # Dot 1 once per run, and again when the refund is dead under its key (declined
                # for good: the operator's retry needs a new refund) or was never recorded
                # (the ledger refused it: parked like any failure, issue 18).
                if not requested or self._refund is None or self._refund.stage.is_dead:
                    await self._request_refund(opened)
                    requested = True
                assert self._refund is not None
                # The confirmation recorded (and logged) by the submit in this pass.
                confirmed_now = False
                if self._refund.stage in (RefundStage.REQUESTED, RefundStage.FAILED):
                    # Dot 2, retried under the same idempotency key (R9).
                    step = self._refund_step("refund_submitted")
                    policy = opened.refund_policy
                    if self._lean():
                        # Confirmed at once when the provider answers synchronously.
                        self._refund = await steps.submit_refund_and_confirm(
                            step,
                            self._refund,
                            policy,
                            confirm_key=next_key(self, "refund_confirmed"),
                        )
                        confirmed_now = self._refund.stage is RefundStage.CONFIRMED
                    else:
                        self._refund = await steps.submit_refund(step, self._refund, policy)
                    # The provider took it: an earlier failure is history (the audit trail has
                    # it), as the ledger clears it too.
                    self._last_error = None
                    self._set_status(
                        CancellationStatus.REFUND_SUBMITTED,
                        "provider",
                        "refund_submitted",
                        logged_by_activity=True,
                        upsert=not self._lean_shape,
                    )
                # `confirm_refund` (or the submit) logs the confirmation it records; one found
                # recorded before this run began is logged here.
                asked = self._refund.stage is not RefundStage.CONFIRMED
                if asked:
                    self._refund = await self._await_confirmation(opened)
                self._last_error = None
                self._set_status(
                    CancellationStatus.REFUND_CONFIRMED,
                    "provider",
                    "refund_confirmed",
                    logged_by_activity=asked or confirmed_now,
                    upsert=not self._lean_shape,
                )
                return
            except ActivityError as err:
                await self._park_refund(err, passes)

    async def _request_refund(self, opened: OpenCancellationResult) -> None:
        """Dot 1: the ledger records the refund (a new generation after a decline)."""
        event_key = next_key(self, "refund_requested")
        self._refund = await steps.request_refund(self._id, opened.amount, event_key=event_key)
        if self._refund.stage is RefundStage.REQUESTED:
            self._set_status(
                CancellationStatus.REFUND_REQUESTED,
                "system",
                "refund_requested",
                logged_by_activity=True,
            )

    async def _await_confirmation(self, opened: OpenCancellationResult) -> RefundView:
        """Dot 3: ask the provider; while it says "pending", wait on a durable timer that grows
        to the maximum poll interval, or less when the provider's webhook (signal
        `payment_event`) says something happened. The provider's answer is the truth; the
        webhook only wakes the workflow up."""
        policy = opened.refund_policy
        wait = policy.poll_interval
        while True:
            # Reset before asking, so an event that arrives while the activity runs is not lost.
            self._provider_news = False
            refund = await steps.confirm_refund(self._refund_step("refund_confirmed"), policy)
            if refund.stage is RefundStage.CONFIRMED:
                return refund
            self._refund = refund
            self._visible.next_check(refund, workflow.now() + wait)
            try:
                await self._wait(
                    lambda: self._provider_news,
                    "settle",
                    timeout=wait,
                    summary="Wait for the provider (poll interval, or its webhook)",
                )
            except TimeoutError:
                pass
            wait = min(wait * 1.5, policy.poll_max_interval)

    async def _park_refund(self, err: ActivityError, passes: int) -> None:
        """R10: retries exhausted, or the provider refused for good (declined: the operator's
        retry makes a new refund with a new key); refund_failed until an operator acts."""
        cause = err.cause
        message = _failure_text(err)
        self._last_error = message
        final = isinstance(cause, ApplicationError) and cause.type in (
            REFUND_REJECTED,
            REFUND_FAILED_AT_PROVIDER,
        )
        if self._refund is None or self._refund.stage.is_dead:
            # The ledger refused to record the refund (e.g. RefundLimitExceeded): there is no
            # live refund to mark failed; the cancellation itself parks (issue 18).
            await self._transition(
                CancellationStatus.REFUND_FAILED, "system", "refund_failed", message
            )
        else:
            self._refund = await steps.record_refund_failed(
                self._refund_step("refund_failed"), message, attempts=passes, final=final
            )
            self._set_status(CancellationStatus.REFUND_FAILED, "system", "refund_failed", message)
        workflow.logger.warning("refund parked in refund_failed: %s", message)
        await self._wait_for_operator()

    async def _wait_for_operator(self) -> None:
        """R10: parked, durably, for as long as it takes, until update `retry_refund`."""
        await self._wait(lambda: self._retry is not None, "parked")
        retry = self._retry
        assert retry is not None
        # Still scheduled while it is recorded: a second retry meanwhile is refused.
        await self._transition(
            CancellationStatus.REFUND_REQUESTED,
            f"operator:{retry.operator_id}",
            "refund_retry",
            retry.reason,
        )
        self._retry = None

    async def _handle_reversal(self) -> None:
        """The provider's event says the confirmed refund failed after all. The provider is
        asked (the event may be stale); if it agrees, the refund is reversed in the ledger (the
        coupon decision with it) and the cancellation waits in refund_failed for an operator,
        whose retry makes a new refund with its own idempotency key."""
        event, self._reversal = self._reversal, None
        assert event is not None
        try:
            self._refund = await steps.verify_reversal(self._refund_step("refund_reversed"))
        except ActivityError as err:
            # The provider would not say (a refused read, or still unreachable after the
            # check's attempts): the check ends, the refund stays as the ledger has it, and
            # reconciliation is the backstop (issue 18). The audit trail says why; the
            # cancellation stays completed, with no error standing.
            await self._record_note(
                "system", "reversal_not_verified", f"event {event.event_id}: {_failure_text(err)}"
            )
            return
        if self._refund.stage is not RefundStage.REVERSED:
            note(
                self,
                "system",
                "reversal_not_confirmed",
                f"event {event.event_id}: the provider still reports the refund succeeded",
            )
            return
        self._coupon = None
        self._last_error = self._refund.last_error
        self._set_status(
            CancellationStatus.REFUND_FAILED,
            "provider",
            "refund_reversed",
            self._refund.last_error or "",
        )
        workflow.logger.warning("refund reversed by the provider: %s", self._refund.last_error)
        await self._wait_for_operator()

    async def _record_note(self, actor: str, kind: str, detail: str) -> None:
        """An audit row with no status change, here and in the ledger (R12)."""
        note(self, actor, kind, detail)
        await steps.record_event(self._id, actor, kind, detail, event_key=next_key(self, kind))

    # --- a history kept short: continue as new where the run waits (R20) -------------------

    def _history_full(self) -> bool:
        info = workflow.info()
        length = info.get_current_history_length()
        # Never on a short history, whatever is suggested: a fresh run must not continue as
        # new again at once (the time-skipping test server, for one, suggests it throughout).
        return length > HISTORY_EVENTS_MIN and (
            info.is_continue_as_new_suggested()
            or length > HISTORY_EVENTS
            or info.get_current_history_size() > HISTORY_BYTES
        )

    async def _wait(
        self,
        done: Callable[[], bool],
        phase: str,
        *,
        timeout: timedelta | None = None,
        summary: str | None = None,
    ) -> None:
        """`workflow.wait_condition(done, timeout)` (TimeoutError included), except that when
        messages grew the history too long meanwhile, the run drains its handlers and
        continues as new from `phase`, its whole state carried: whatever clients send, no run
        comes near Temporal's history limits."""
        if self._lean_shape:
            # What operators search shows the stage the cancellation waits in.
            self._visible.catch_up()
        await workflow.wait_condition(
            lambda: done() or self._history_full(), timeout=timeout, timeout_summary=summary
        )
        if done():
            return
        await workflow.wait_condition(workflow.all_handlers_finished)
        if done():
            return
        workflow.continue_as_new(args=[self._request, self._carry(phase)])

    def _carry(self, phase: str) -> CarriedState:
        assert self._opened is not None
        return CarriedState(
            phase=phase,
            status=self._status,
            opened=self._opened,
            deadline=self._deadline,
            decision=self._decision,
            decided_by=self._decided_by,
            decision_reason=self._decision_reason,
            withdrawal=self._withdrawal,
            refund=self._refund,
            coupon=self._coupon,
            coupon_waiting=self._coupon_waiting,
            last_error=self._last_error,
            reversal=self._reversal,
            audit=self._audit,
            refused=self._refused,
            seq=self._seq,
        )

    def _restore(self, carried: CarriedState) -> None:
        self._phase = carried.phase
        self._status = carried.status
        self._opened = carried.opened
        self._deadline = carried.deadline
        self._decision = carried.decision
        self._decided_by = carried.decided_by
        self._decision_reason = carried.decision_reason
        self._withdrawal = carried.withdrawal
        self._refund = carried.refund
        self._coupon = carried.coupon
        self._coupon_waiting = list(carried.coupon_waiting)
        self._last_error = carried.last_error
        self._reversal = carried.reversal
        self._audit = list(carried.audit)
        self._refused = carried.refused
        self._seq = carried.seq

    async def _carry_on(self, phase: str) -> CancellationResult:
        """The story from where the previous run continued as new: waiting for the seller
        (or an operator, escalated), parked for an operator's retry, refunding, or completed and
        waiting for its siblings' coupon decisions (`coupon`, in `_settle`)."""
        opened = self._opened
        assert opened is not None
        self._visible.resumed(opened)
        show_latest_message(self)
        self._visible.show(
            self._status,
            self._refund,
            self._coupon,
            deadline=self._deadline,
            last_error=self._last_error,
        )
        if phase == "seller":
            if not await self._seller_decides(opened):
                return await self._finish()
        elif phase == "parked":
            await self._wait_for_operator()
        await self._settle(opened)
        return await self._finish()

    def _refund_step(self, kind: str) -> RefundStepInput:
        assert self._refund is not None
        return RefundStepInput(
            cancellation_id=self._id,
            idempotency_key=self._refund.idempotency_key,
            event_key=next_key(self, kind),
        )

    async def _finish(self) -> CancellationResult:
        if self._lean_shape:
            self._visible.catch_up()
        # Refused signals may still be writing their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        assert self._opened is not None
        if self._refused > REFUSALS_RECORDED:
            detail = (
                f"{self._refused} messages were refused in all; the first"
                f" {REFUSALS_RECORDED} are recorded"
            )
            note(self, "system", "refusals_counted", detail)
            await steps.record_event(
                self._id, "system", "refusals_counted", detail, event_key=next_key(self, "refusals")
            )
        return CancellationResult(
            cancellation_id=self._id,
            status=self._status,
            path=self._opened.path,
            refund=self._refund,
            coupon=self._coupon,
        )

    # --- state changes: here, in what operators see, in the ledger (R12) ------------------

    def _set_status(
        self,
        status: CancellationStatus,
        actor: str,
        kind: str,
        detail: str = "",
        *,
        logged_by_activity: bool = False,
        upsert: bool = True,
    ) -> None:
        """Change the status here and in what operators see (one upsert; `upsert=False`, the
        lean shape: a status passed within one step, in the details now and in the search
        attributes with the next upsert, or before the workflow waits). The ledger row is
        written by the activity that caused the change.

        One log line per status change: the activity that records the change writes it
        (`logged_by_activity`); this writes the line only for changes no activity logs. A line
        from workflow code costs several times one from an activity (docs/performance.md)."""
        self._status = status
        note(self, actor, kind, detail)
        if not logged_by_activity:
            workflow.logger.info(
                "cancellation_%s", kind, extra={"status": status.value, "actor": actor}
            )
        self._visible.show(
            status,
            self._refund,
            self._coupon,
            deadline=self._deadline,
            last_error=self._last_error,
            upsert=upsert,
        )

    async def _transition(
        self,
        status: CancellationStatus,
        actor: str,
        kind: str,
        detail: str = "",
        *,
        cancel_sub_order: bool = False,
    ) -> None:
        """Record the change in the ledger, then show it: the workflow never says a status the
        ledger did not record. Text the ledger refuses for its data (it cannot come from a
        message, whose models refuse it: defence in depth) is recorded escaped; a transition
        the ledger refuses for good fails the workflow with the status as the ledger has it."""
        event_key = next_key(self, kind)
        try:
            await steps.record_transition(
                self._id,
                status,
                actor,
                kind,
                detail,
                event_key=event_key,
                cancel_sub_order=cancel_sub_order,
            )
        except ActivityError as err:
            if not steps.data_refused(err):
                raise
            actor, detail = rules.safe_text(actor, 200), rules.safe_text(detail, 2000)
            await steps.record_transition(
                self._id,
                status,
                actor,
                kind,
                detail,
                event_key=event_key,
                cancel_sub_order=cancel_sub_order,
            )
        # `record_transition` logged the change once it was recorded.
        self._set_status(status, actor, kind, detail, logged_by_activity=True)


def _failure_text(err: ActivityError) -> str:
    """`Type: message` of an activity's failure, as operators read it (last_error)."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type:
        return f"{cause.type}: {cause.message}"
    return str(cause) if cause is not None else str(err)

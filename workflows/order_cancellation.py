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
from functools import partial
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
    """The story of one cancellation; its handlers are in `CancellationInbox`.

    The class holds the state, `run` and `_open` (the step a test's subclass extends,
    tests/test_upgrade.py); the other steps are the module's functions of the instance (`wf`).
    The sandbox imports this module and applies `workflow.defn` once per workflow run, and
    `workflow.defn` inspects every member of the class through the sandbox's wrapped builtins:
    about 0.2 ms of every run for 27 members (docs/performance.md)."""

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
            _restore(self, CarriedState.model_validate(carried))

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
            return await _carry_on(self, self._phase)
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
            _set_status(self, resumed_at, "system", "resumed", "the request had already ended")
            return await _finish(self)
        if resumed_at is CancellationStatus.COMPLETED and not await _reopened(self, opened):
            # Another start of a completed cancellation (any client may start one): it
            # reports the outcome the ledger has and changes nothing (R20).
            _set_status(self, resumed_at, "system", "resumed", "the cancellation had completed")
            return await _finish(self)
        if opened.path is CancellationPath.INSTANT and opened.refund is None:
            _set_status(
                self,
                CancellationStatus.APPROVED,
                "system",
                "cancelled_instantly",
                "payment not validated yet: cancelled without the seller (R1)",
                upsert=not _lean(self),
            )
        elif resumed_at is not None and resumed_at not in _BEFORE_DECISION:
            # A new run of a cancellation past its decision (e.g. reopened by a reversed
            # refund): carry on from where the ledger says it stands.
            self._refund = opened.refund
            _set_status(
                self, resumed_at, "system", "resumed", f"a new run resumes at {resumed_at.value}"
            )
        elif not await _seller_decides(self, opened):
            return await _finish(self)
        await _settle(self, opened)
        return await _finish(self)

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


async def _reopened(wf: OrderCancellation, opened: OpenCancellationResult) -> bool:
    """A run that finds its cancellation completed works only for the provider's reversal
    of the refund, which reopens it with the `payment_event` that starts the run
    (starter.payment_events): that event is judged, against the refund the ledger has,
    before anything else happens."""
    wf._refund = opened.refund
    wf._coupon = opened.coupon
    await workflow.wait_condition(workflow.all_handlers_finished)
    return wf._reversal is not None


async def _seller_decides(wf: OrderCancellation, opened: OpenCancellationResult) -> bool:
    """R3-R5: wait on a durable timer for the seller (escalated: for an operator); the
    buyer may withdraw meanwhile. True when the cancellation is approved."""
    if wf._deadline is None:
        # R19: the policy's window from now, on the workflow's clock (Temporal's: the one a
        # decision's arrival is judged by). A later run of a cancellation the ledger already
        # had (restarted by hand) keeps the deadline the ledger recorded at its opening.
        fresh = opened.opened_now or opened.seller_deadline is None
        wf._deadline = workflow.now() + opened.response_window if fresh else opened.seller_deadline
        assert wf._deadline is not None
        _set_status(
            wf,
            CancellationStatus.AWAITING_SELLER,
            "system",
            "awaiting_seller",
            f"seller {wf._request.seller_id} has until {wf._deadline.isoformat()}",
        )
    if wf._status is CancellationStatus.AWAITING_SELLER:
        # What is left of the window (all of it, unless a previous run waited already).
        window = wf._deadline - workflow.now()
        timed_out = False
        try:
            if window <= timedelta(0):
                raise TimeoutError
            await _wait(
                wf,
                lambda: answered(wf),
                "seller",
                timeout=window,
                summary="Seller response window",
            )
        except TimeoutError:
            timed_out = True
        # R19: a seller's signal handled once the deadline had passed (with the timer, after
        # no worker ran) counts if the server received it before the deadline, and only
        # then; a decision accepted before the timer fired in the same task still counts.
        late = wf._late_signal is not None and not await _received_in_time(wf)
        if late:
            _withdraw_late_decision(wf)
        if timed_out or late:
            if not answered(wf) and _on_timeout(wf, opened):
                await _transition(
                    wf,
                    CancellationStatus.ESCALATED,
                    "timer",
                    "escalated",
                    "seller did not answer in time; an operator decides (resolve_escalation)",
                )
    if wf._status is CancellationStatus.ESCALATED:
        await _wait(wf, lambda: answered(wf), "seller")

    if wf._withdrawal is not None and wf._decision is None:
        await _transition(
            wf,
            CancellationStatus.WITHDRAWN,
            f"buyer:{wf._withdrawal.buyer_id}",
            "withdrawn",
            wf._withdrawal.reason,
        )
        return False
    if wf._decision is Decision.REJECT:
        await _transition(
            wf, CancellationStatus.REJECTED, wf._decided_by, "rejected", wf._decision_reason
        )
        return False
    if _lean(wf):
        await _approve(wf, opened)
        return True
    await _transition(
        wf,
        CancellationStatus.APPROVED,
        wf._decided_by,
        "approved",
        wf._decision_reason,
        cancel_sub_order=True,
    )
    return True


def _lean(wf: OrderCancellation) -> bool:
    """Whether this cancellation takes the lean shape (`LEAN_SHAPE`)."""
    wf._lean_shape = workflow.patched(LEAN_SHAPE)
    return wf._lean_shape


async def _approve(wf: OrderCancellation, opened: OpenCancellationResult) -> None:
    """The lean approval: the ledger records it and the refund (dot 1) in one activity;
    the status shown is refund_requested. A refund the ledger refused is asked again by
    `_refund_money`, which parks it (issue 18)."""
    transition = TransitionInput(
        cancellation_id=wf._id,
        status=CancellationStatus.APPROVED,
        actor=wf._decided_by,
        kind="approved",
        detail=wf._decision_reason,
        event_key=next_key(wf, "approved"),
        cancel_sub_order=True,
    )
    refund_key = next_key(wf, "refund_requested")
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
    _set_status(
        wf,
        CancellationStatus.APPROVED,
        transition.actor,
        "approved",
        transition.detail,
        logged_by_activity=True,
        upsert=refund is None,
    )
    if refund is None:
        return
    wf._refund = refund
    wf._refund_recorded = True
    if refund.stage is RefundStage.REQUESTED:
        _set_status(
            wf,
            CancellationStatus.REFUND_REQUESTED,
            "system",
            "refund_requested",
            logged_by_activity=True,
        )


async def _received_in_time(wf: OrderCancellation) -> bool:
    assert wf._deadline is not None and wf._late_signal is not None
    received = await steps.signals_before("seller_decision", wf._deadline)
    return wf._late_signal <= received


def _withdraw_late_decision(wf: OrderCancellation) -> None:
    """The seller's signal reached the server after the deadline: the timer decides."""
    note(
        wf,
        wf._decided_by,
        "seller_decision_refused",
        f"{RefusalCode.NOT_PENDING.value}: received after the deadline"
        f" {wf._deadline.isoformat() if wf._deadline else ''}",
    )
    wf._decision = None
    wf._decided_by = ""
    wf._decision_reason = ""
    wf._late_signal = None


def _on_timeout(wf: OrderCancellation, opened: OpenCancellationResult) -> bool:
    """R4: the policy decides for a silent seller. Synchronous, so no decision can slip in
    between the timer firing and the status changing. True: escalated to operators."""
    outcome = rules.timeout_outcome(opened.timeout_policy)
    if outcome is None:
        wf._status = CancellationStatus.ESCALATED
        return True
    wf._decision = outcome
    wf._decided_by = "timer"
    wf._decision_reason = (
        f"seller did not answer within {opened.response_window}: {opened.timeout_policy.value}"
    )
    return False


async def _settle(wf: OrderCancellation, opened: OpenCancellationResult) -> None:
    """Refund, coupon, done; and if the provider reverses the refund after success, park
    for an operator and do it again with a new refund (R7, R10, R11)."""
    while True:
        if wf._refund is None or wf._refund.stage is not RefundStage.CONFIRMED:
            await _refund_money(wf, opened)
        if wf._coupon is None:
            # Reset before asking: a sibling's word that arrives meanwhile is not lost.
            wf._coupon_news = False
            completes = wf._reversal is None and wf._status is not (CancellationStatus.COMPLETED)
            if completes and _lean(wf):
                # One step: the coupon decision and the completion.
                decision = await steps.complete_with_coupon(
                    next_key(wf, "coupon"),
                    TransitionInput(
                        cancellation_id=wf._id,
                        status=CancellationStatus.COMPLETED,
                        actor="system",
                        kind="completed",
                        event_key=next_key(wf, "completed"),
                    ),
                )
            else:
                decision = await steps.restore_coupon(wf._id, event_key=next_key(wf, "coupon"))
                completes = False
            coupon = _take_coupon(wf, decision)
            note(wf, "system", f"coupon_{coupon.outcome.value}", coupon.reason)
            # Siblings that decided partial_refund may be waiting on this decision.
            await steps.coupon_settled(decision.notify)
            if completes:
                # The coupon's search attribute goes with the completed status.
                _set_status(
                    wf, CancellationStatus.COMPLETED, "system", "completed", logged_by_activity=True
                )
        assert wf._coupon is not None
        if wf._reversal is None and wf._status is not CancellationStatus.COMPLETED:
            # The coupon's search attribute goes with the completed status.
            await _transition(wf, CancellationStatus.COMPLETED, "system", "completed")
        else:
            # No status change to carry it: on its own (nothing if already shown).
            wf._visible.show_coupon(wf._coupon, waiting_on=wf._coupon_waiting)
        if wf._reversal is None:
            await _coupon_settles(wf)
        if wf._reversal is None and not await _late_reversal(wf):
            return
        await _handle_reversal(wf)


async def _late_reversal(wf: OrderCancellation) -> bool:
    """A provider event that arrived as the cancellation completes (its handler still
    waiting, or delivered in the last workflow task) is judged before the run ends: a
    reversal is handled here, never dropped with the closing run (issue 16 item 7)."""
    if not workflow.patched("drain-payment-events-v1"):
        return False
    await workflow.wait_condition(workflow.all_handlers_finished)
    return wf._reversal is not None


def _take_coupon(wf: OrderCancellation, decision: CouponDecision) -> CouponOutcome:
    wf._coupon = decision.outcome
    partial = decision.outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
    wf._coupon_waiting = list(decision.waiting_on) if partial else []
    return wf._coupon


async def _coupon_settles(wf: OrderCancellation) -> None:
    """R11 across siblings, so that what operators search is true once the run has ended
    (an ended run's search attributes can no longer change): a cancellation that found the
    coupon `partial_refund` while sibling cancellations were refunding stays open, completed,
    until each of them has decided its coupon (signal `coupon_settled`), and ends with the
    outcome as it then stands: `restored` if the last one gave it back."""
    while wf._coupon_waiting and wf._reversal is None:
        await _wait(wf, lambda: wf._coupon_news or wf._reversal is not None, "coupon")
        if wf._reversal is not None:
            return
        wf._coupon_news = False
        before = wf._coupon
        decision = await steps.restore_coupon(wf._id, event_key="", again=True)
        coupon = _take_coupon(wf, decision)
        if before is None or coupon.outcome is not before.outcome:
            # The ledger has the row (written by the sibling that restored it).
            note(wf, "system", f"coupon_{coupon.outcome.value}", coupon.reason)
        wf._visible.show_coupon(coupon, waiting_on=wf._coupon_waiting)


# --- the refund: requested -> submitted -> confirmed, or parked (R7-R10) ----------------


async def _refund_money(wf: OrderCancellation, opened: OpenCancellationResult) -> None:
    """R7-R10: requested -> submitted -> confirmed; park in refund_failed, never fail."""
    passes = 0
    # Recorded with the approval (the lean shape), or not yet.
    requested, wf._refund_recorded = wf._refund_recorded, False
    while True:
        passes += 1
        try:
            # Dot 1 once per run, and again when the refund is dead under its key (declined
            # for good: the operator's retry needs a new refund) or was never recorded
            # (the ledger refused it: parked like any failure, issue 18).
            if not requested or wf._refund is None or wf._refund.stage.is_dead:
                await _request_refund(wf, opened)
                requested = True
            assert wf._refund is not None
            # The confirmation recorded (and logged) by the submit in this pass.
            confirmed_now = False
            if wf._refund.stage in (RefundStage.REQUESTED, RefundStage.FAILED):
                # Dot 2, retried under the same idempotency key (R9).
                step = _refund_step(wf, "refund_submitted")
                policy = opened.refund_policy
                if _lean(wf):
                    # Confirmed at once when the provider answers synchronously.
                    wf._refund = await steps.submit_refund_and_confirm(
                        step,
                        wf._refund,
                        policy,
                        confirm_key=next_key(wf, "refund_confirmed"),
                    )
                    confirmed_now = wf._refund.stage is RefundStage.CONFIRMED
                else:
                    wf._refund = await steps.submit_refund(step, wf._refund, policy)
                # The provider took it: an earlier failure is history (the audit trail has
                # it), as the ledger clears it too.
                wf._last_error = None
                _set_status(
                    wf,
                    CancellationStatus.REFUND_SUBMITTED,
                    "provider",
                    "refund_submitted",
                    logged_by_activity=True,
                    upsert=not wf._lean_shape,
                )
            # `confirm_refund` (or the submit) logs the confirmation it records; one found
            # recorded before this run began is logged here.
            asked = wf._refund.stage is not RefundStage.CONFIRMED
            if asked:
                wf._refund = await _await_confirmation(wf, opened)
            wf._last_error = None
            _set_status(
                wf,
                CancellationStatus.REFUND_CONFIRMED,
                "provider",
                "refund_confirmed",
                logged_by_activity=asked or confirmed_now,
                upsert=not wf._lean_shape,
            )
            return
        except ActivityError as err:
            await _park_refund(wf, err, passes)


async def _request_refund(wf: OrderCancellation, opened: OpenCancellationResult) -> None:
    """Dot 1: the ledger records the refund (a new generation after a decline)."""
    event_key = next_key(wf, "refund_requested")
    wf._refund = await steps.request_refund(wf._id, opened.amount, event_key=event_key)
    if wf._refund.stage is RefundStage.REQUESTED:
        _set_status(
            wf,
            CancellationStatus.REFUND_REQUESTED,
            "system",
            "refund_requested",
            logged_by_activity=True,
        )


async def _await_confirmation(wf: OrderCancellation, opened: OpenCancellationResult) -> RefundView:
    """Dot 3: ask the provider; while it says "pending", wait on a durable timer that grows
    to the maximum poll interval, or less when the provider's webhook (signal
    `payment_event`) says something happened. The provider's answer is the truth; the
    webhook only wakes the workflow up."""
    policy = opened.refund_policy
    wait = policy.poll_interval
    while True:
        # Reset before asking, so an event that arrives while the activity runs is not lost.
        wf._provider_news = False
        refund = await steps.confirm_refund(_refund_step(wf, "refund_confirmed"), policy)
        if refund.stage is RefundStage.CONFIRMED:
            return refund
        wf._refund = refund
        wf._visible.next_check(refund, workflow.now() + wait)
        try:
            await _wait(
                wf,
                lambda: wf._provider_news,
                "settle",
                timeout=wait,
                summary="Wait for the provider (poll interval, or its webhook)",
            )
        except TimeoutError:
            pass
        wait = min(wait * 1.5, policy.poll_max_interval)


async def _park_refund(wf: OrderCancellation, err: ActivityError, passes: int) -> None:
    """R10: retries exhausted, or the provider refused for good (declined: the operator's
    retry makes a new refund with a new key); refund_failed until an operator acts."""
    cause = err.cause
    message = _failure_text(err)
    wf._last_error = message
    final = isinstance(cause, ApplicationError) and cause.type in (
        REFUND_REJECTED,
        REFUND_FAILED_AT_PROVIDER,
    )
    if wf._refund is None or wf._refund.stage.is_dead:
        # The ledger refused to record the refund (e.g. RefundLimitExceeded): there is no
        # live refund to mark failed; the cancellation itself parks (issue 18).
        await _transition(wf, CancellationStatus.REFUND_FAILED, "system", "refund_failed", message)
    else:
        wf._refund = await steps.record_refund_failed(
            _refund_step(wf, "refund_failed"), message, attempts=passes, final=final
        )
        _set_status(wf, CancellationStatus.REFUND_FAILED, "system", "refund_failed", message)
    workflow.logger.warning("refund parked in refund_failed: %s", message)
    await _wait_for_operator(wf)


async def _wait_for_operator(wf: OrderCancellation) -> None:
    """R10: parked, durably, for as long as it takes, until update `retry_refund`."""
    await _wait(wf, lambda: wf._retry is not None, "parked")
    retry = wf._retry
    assert retry is not None
    # Still scheduled while it is recorded: a second retry meanwhile is refused.
    await _transition(
        wf,
        CancellationStatus.REFUND_REQUESTED,
        f"operator:{retry.operator_id}",
        "refund_retry",
        retry.reason,
    )
    wf._retry = None


async def _handle_reversal(wf: OrderCancellation) -> None:
    """The provider's event says the confirmed refund failed after all. The provider is
    asked (the event may be stale); if it agrees, the refund is reversed in the ledger (the
    coupon decision with it) and the cancellation waits in refund_failed for an operator,
    whose retry makes a new refund with its own idempotency key."""
    event, wf._reversal = wf._reversal, None
    assert event is not None
    try:
        wf._refund = await steps.verify_reversal(_refund_step(wf, "refund_reversed"))
    except ActivityError as err:
        # The provider would not say (a refused read, or still unreachable after the
        # check's attempts): the check ends, the refund stays as the ledger has it, and
        # reconciliation is the backstop (issue 18). The audit trail says why; the
        # cancellation stays completed, with no error standing.
        await _record_note(
            wf, "system", "reversal_not_verified", f"event {event.event_id}: {_failure_text(err)}"
        )
        return
    if wf._refund.stage is not RefundStage.REVERSED:
        note(
            wf,
            "system",
            "reversal_not_confirmed",
            f"event {event.event_id}: the provider still reports the refund succeeded",
        )
        return
    wf._coupon = None
    wf._last_error = wf._refund.last_error
    _set_status(
        wf,
        CancellationStatus.REFUND_FAILED,
        "provider",
        "refund_reversed",
        wf._refund.last_error or "",
    )
    workflow.logger.warning("refund reversed by the provider: %s", wf._refund.last_error)
    await _wait_for_operator(wf)


async def _record_note(wf: OrderCancellation, actor: str, kind: str, detail: str) -> None:
    """An audit row with no status change, here and in the ledger (R12)."""
    note(wf, actor, kind, detail)
    await steps.record_event(wf._id, actor, kind, detail, event_key=next_key(wf, kind))


# --- a history kept short: continue as new where the run waits (R20) -------------------


def _history_full(wf: OrderCancellation) -> bool:
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
    wf: OrderCancellation,
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
    if wf._lean_shape:
        # What operators search shows the stage the cancellation waits in.
        wf._visible.catch_up()
    await workflow.wait_condition(
        lambda: done() or _history_full(wf), timeout=timeout, timeout_summary=summary
    )
    if done():
        return
    await workflow.wait_condition(workflow.all_handlers_finished)
    if done():
        return
    workflow.continue_as_new(args=[wf._request, _carry(wf, phase)])


def _carry(wf: OrderCancellation, phase: str) -> CarriedState:
    assert wf._opened is not None
    return CarriedState(
        phase=phase,
        status=wf._status,
        opened=wf._opened,
        deadline=wf._deadline,
        decision=wf._decision,
        decided_by=wf._decided_by,
        decision_reason=wf._decision_reason,
        withdrawal=wf._withdrawal,
        refund=wf._refund,
        coupon=wf._coupon,
        coupon_waiting=wf._coupon_waiting,
        last_error=wf._last_error,
        reversal=wf._reversal,
        audit=wf._audit,
        refused=wf._refused,
        seq=wf._seq,
    )


def _restore(wf: OrderCancellation, carried: CarriedState) -> None:
    wf._phase = carried.phase
    wf._status = carried.status
    wf._opened = carried.opened
    wf._deadline = carried.deadline
    wf._decision = carried.decision
    wf._decided_by = carried.decided_by
    wf._decision_reason = carried.decision_reason
    wf._withdrawal = carried.withdrawal
    wf._refund = carried.refund
    wf._coupon = carried.coupon
    wf._coupon_waiting = list(carried.coupon_waiting)
    wf._last_error = carried.last_error
    wf._reversal = carried.reversal
    wf._audit = list(carried.audit)
    wf._refused = carried.refused
    wf._seq = carried.seq


async def _carry_on(wf: OrderCancellation, phase: str) -> CancellationResult:
    """The story from where the previous run continued as new: waiting for the seller
    (or an operator, escalated), parked for an operator's retry, refunding, or completed and
    waiting for its siblings' coupon decisions (`coupon`, in `_settle`)."""
    opened = wf._opened
    assert opened is not None
    wf._visible.resumed(opened)
    show_latest_message(wf)
    wf._visible.show(
        wf._status,
        wf._refund,
        wf._coupon,
        deadline=wf._deadline,
        last_error=wf._last_error,
    )
    if phase == "seller":
        if not await _seller_decides(wf, opened):
            return await _finish(wf)
    elif phase == "parked":
        await _wait_for_operator(wf)
    await _settle(wf, opened)
    return await _finish(wf)


def _refund_step(wf: OrderCancellation, kind: str) -> RefundStepInput:
    assert wf._refund is not None
    return RefundStepInput(
        cancellation_id=wf._id,
        idempotency_key=wf._refund.idempotency_key,
        event_key=next_key(wf, kind),
    )


async def _finish(wf: OrderCancellation) -> CancellationResult:
    if wf._lean_shape:
        wf._visible.catch_up()
    # Refused signals may still be writing their audit rows.
    await workflow.wait_condition(workflow.all_handlers_finished)
    assert wf._opened is not None
    if wf._refused > REFUSALS_RECORDED:
        detail = (
            f"{wf._refused} messages were refused in all; the first"
            f" {REFUSALS_RECORDED} are recorded"
        )
        note(wf, "system", "refusals_counted", detail)
        await steps.record_event(
            wf._id, "system", "refusals_counted", detail, event_key=next_key(wf, "refusals")
        )
    return CancellationResult(
        cancellation_id=wf._id,
        status=wf._status,
        path=wf._opened.path,
        refund=wf._refund,
        coupon=wf._coupon,
    )


# --- state changes: here, in what operators see, in the ledger (R12) ------------------


def _set_status(
    wf: OrderCancellation,
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
    wf._status = status
    note(wf, actor, kind, detail)
    if not logged_by_activity:
        workflow.logger.info(
            "cancellation_%s", kind, extra={"status": status.value, "actor": actor}
        )
    wf._visible.show(
        status,
        wf._refund,
        wf._coupon,
        deadline=wf._deadline,
        last_error=wf._last_error,
        upsert=upsert,
    )


async def _transition(
    wf: OrderCancellation,
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
    record = partial(
        steps.record_transition,
        wf._id,
        status,
        event_key=next_key(wf, kind),
        cancel_sub_order=cancel_sub_order,
    )
    try:
        await record(actor, kind, detail)
    except ActivityError as err:
        if not steps.data_refused(err):
            raise
        actor, detail = rules.safe_text(actor, 200), rules.safe_text(detail, 2000)
        await record(actor, kind, detail)
    # `record_transition` logged the change once it was recorded.
    _set_status(wf, status, actor, kind, detail, logged_by_activity=True)


def _failure_text(err: ActivityError) -> str:
    """`Type: message` of an activity's failure, as operators read it (last_error)."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type:
        return f"{cause.type}: {cause.message}"
    return str(cause) if cause is not None else str(err)

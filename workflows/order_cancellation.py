"""`OrderCancellation`: one workflow per cancelled sub-order.

It only orchestrates: the rules are pure functions in `domain.rules`, every write goes through
an activity. Names here (workflow type, signals, updates, query) are a public contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from activities.ledger_activities import LedgerActivities
    from activities.refund_activities import (
        REFUND_FAILED_AT_PROVIDER,
        REFUND_REJECTED,
        RefundActivities,
    )
    from domain import rules
    from domain.errors import DecisionRefused, RefusalCode
    from domain.models import (
        AuditEntry,
        CancellationPath,
        CancellationResult,
        CancellationStatus,
        CancellationView,
        CouponInput,
        CouponOutcome,
        Decision,
        DecisionReceipt,
        EventInput,
        OpenCancellationInput,
        OpenCancellationResult,
        OperatorDecision,
        PaymentEvent,
        PaymentEventType,
        RefundFailureInput,
        RefundPolicy,
        RefundRequestInput,
        RefundStage,
        RefundStepInput,
        RefundView,
        RequestCancellationInput,
        RetryRefundRequest,
        SellerDecision,
        TimeoutPolicy,
        TransitionInput,
        WithdrawRequest,
    )
    from workflows import search_attributes as sa

# Patch ids: a change to the commands a workflow issues must not break cancellations already
# running (their histories replay against this code). Each id guards one such change; remove a
# guard only once no history recorded before it can still be replayed (docs/operations.md).
MEMO_PATCH = "memo-with-amounts-v1"
# A refund the provider refused for good is declined and retried as a new generation with a
# new idempotency key (before: retried under the same key, which a provider answers the same).
DECLINED_PATCH = "declined-refund-new-generation-v1"
# A seller's (or operator's) decision that arrives in the same workflow task as the buyer's
# accepted withdrawal is refused: the withdrawal came first (before: the decision also won).
WITHDRAWAL_FIRST_PATCH = "withdrawal-before-decision-v1"
# Fewer search-attribute upserts, every stage as visible (docs/performance.md, A1-A3): the start
# attributes are not upserted again when the starter set them, the seller deadline goes with
# the awaiting_seller status, the coupon outcome with the completed status, and the coupon's
# unset with the refund_failed status of a reversal: one command each instead of two.
LEAN_UPSERTS_PATCH = "fewer-search-attribute-upserts-v1"

LEDGER_TIMEOUT = timedelta(seconds=30)
# A ledger write that fails for a business reason says so with a non-retryable type; anything
# else (database restarting, network) is retried until it goes through.
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=30),
)
PROVIDER_TIMEOUT = timedelta(seconds=60)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], payload: Any) -> M:
    """Messages arrive as plain JSON from any client; a malformed one is a refusal with the
    fields at fault, never an exception that fails the workflow task."""
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in err.errors()
        )
        raise DecisionRefused(RefusalCode.INVALID_PAYLOAD, f"invalid payload: {fields}") from err


# Statuses a cancellation has before the seller's decision; a run that finds the ledger past
# them resumes instead of asking again.
_BEFORE_DECISION = (
    CancellationStatus.OPENING,
    CancellationStatus.AWAITING_SELLER,
    CancellationStatus.ESCALATED,
)

# What operators read in the Web UI for each state: a headline and the next step.
_STAGE_TEXT: dict[CancellationStatus, tuple[str, str]] = {
    CancellationStatus.OPENING: ("Opening", "read the sub-order and choose the path"),
    CancellationStatus.AWAITING_SELLER: (
        "Waiting for the seller",
        "the seller accepts or rejects (update `decide` / signal `seller_decision`)",
    ),
    CancellationStatus.ESCALATED: (
        "Escalated to operators",
        "an operator decides (update `resolve_escalation`)",
    ),
    CancellationStatus.REJECTED: ("Rejected", "nothing: the order goes on"),
    CancellationStatus.WITHDRAWN: ("Withdrawn by the buyer", "nothing: the order goes on"),
    CancellationStatus.APPROVED: ("Approved", "record the refund"),
    CancellationStatus.REFUND_REQUESTED: (
        "Refund requested (dot 1)",
        "submit it to the payment provider",
    ),
    CancellationStatus.REFUND_SUBMITTED: (
        "Refund in progress (dot 2)",
        "the provider confirms the refund",
    ),
    CancellationStatus.REFUND_CONFIRMED: (
        "Refund completed (dot 3)",
        "decide whether the coupon comes back",
    ),
    CancellationStatus.REFUND_FAILED: (
        "Refund failed: waiting for an operator",
        "an operator retries (update `retry_refund`, or `ordercancel refunds retry`)",
    ),
    CancellationStatus.COMPLETED: ("Completed", "nothing: the cancellation is done"),
}


def _one(args: tuple[Any, ...]) -> Any:
    """Handlers take `*args` so that a message with no argument or several (any client, the
    `temporal` CLI with two --input flags) is refused like any malformed payload instead of
    raising TypeError, which would fail every workflow task from then on."""
    if len(args) != 1:
        raise DecisionRefused(
            RefusalCode.INVALID_PAYLOAD,
            f"invalid payload: expected exactly one JSON object, got {len(args)} arguments",
        )
    return args[0]


def _refuse_unless(check: Callable[[Any], object], args: tuple[Any, ...]) -> None:
    """An update validator: the caller gets the refusal's code as the failure type."""
    try:
        check(_one(args))
    except DecisionRefused as err:
        raise ApplicationError(err.message, type=err.code.value, non_retryable=True) from None


@workflow.defn(name="OrderCancellation")
class OrderCancellation:
    @workflow.init
    def __init__(self, request: RequestCancellationInput) -> None:
        # Validators can run before `run` (an update sent right after start): everything they
        # read is set here.
        self._request = request
        self._id = workflow.info().workflow_id
        self._status = CancellationStatus.OPENING
        self._opened: OpenCancellationResult | None = None
        self._decision: Decision | None = None
        self._decided_by = ""
        self._decision_reason = ""
        self._withdrawal: WithdrawRequest | None = None
        self._retry: RetryRefundRequest | None = None
        self._deadline: datetime | None = None
        self._refund: RefundView | None = None
        self._coupon: CouponOutcome | None = None
        self._last_error: str | None = None
        self._provider_news = False
        self._reversal: PaymentEvent | None = None
        self._next_check: datetime | None = None
        self._since = workflow.now()
        self._audit: list[AuditEntry] = []
        # Audit rows written by the ledger get keys from this counter, in workflow order, so a
        # retried activity writes its row once and a replay produces the same keys. The run id
        # in each key keeps a later run of the same cancellation (reopened by a reversed refund)
        # from reusing the first run's keys, whose rows ON CONFLICT DO NOTHING would drop.
        # 000-requested and 001-path are written once, by the first `open_cancellation`.
        self._seq = 1
        self._run_id = workflow.info().run_id
        self._lean = False

    # --- main flow --------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: RequestCancellationInput) -> CancellationResult:
        # Asked once, first: a run begun on older code keeps the older commands to its end.
        self._lean = workflow.patched(LEAN_UPSERTS_PATCH)
        start: list[SearchAttributeUpdate[Any]] = [
            sa.ORDER_ID.value_set(request.order_id),
            sa.SELLER_ID.value_set(request.seller_id),
            sa.BUYER_ID.value_set(request.buyer_id),
            sa.CANCELLATION_STATUS.value_set(self._status.value),
            sa.REFUND_STAGE.value_set(0),
        ]
        if self._lean:
            # Only what the starter did not set (`starter.requests.start_attributes` sets all;
            # another client may set none).
            present = workflow.info().typed_search_attributes
            start = [u for u in start if present.get(u.key) != u.value]
        if start:
            workflow.upsert_search_attributes(start)
        opened = await workflow.execute_activity_method(
            LedgerActivities.open_cancellation,
            OpenCancellationInput(cancellation_id=self._id, request=request),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary="Read the sub-order and choose the instant or request path",
        )
        self._opened = opened
        self._record_memo(opened)
        self._note(
            f"buyer:{request.buyer_id}",
            "requested",
            f"reason {request.reason.value} ({request.reason.fault.value} fault)",
        )
        resumed_at = opened.ledger_status
        if resumed_at in (CancellationStatus.REJECTED, CancellationStatus.WITHDRAWN):
            # A new run of a request that ended: nothing is left to do.
            self._set_status(resumed_at, "system", "resumed", "the request had already ended")
            return await self._finish()
        if opened.path is CancellationPath.INSTANT and opened.refund is None:
            self._set_status(
                CancellationStatus.APPROVED,
                "system",
                "cancelled_instantly",
                "payment not validated yet: cancelled without the seller (R1)",
            )
        elif resumed_at is not None and resumed_at not in _BEFORE_DECISION:
            # A new run of a cancellation past its decision (e.g. reopened by a reversed
            # refund): carry on from where the ledger says it stands.
            self._refund = opened.refund
            self._set_status(
                resumed_at, "system", "resumed", f"a new run resumes at {resumed_at.value}"
            )
        else:
            approved = await self._await_seller(opened)
            if not approved:
                return await self._finish()
        await self._settle(opened)
        return await self._finish()

    def _record_memo(self, opened: OpenCancellationResult) -> None:
        """What operators read without opening the history: the money at stake. Added after
        cancellations were already running, hence the patch guard (see MEMO_PATCH)."""
        if workflow.patched(MEMO_PATCH):
            workflow.upsert_memo(
                {
                    "amount_minor": opened.amount.amount_minor,
                    "currency": opened.amount.currency,
                    "payment_method": opened.payment_method.value,
                    "amount": str(opened.amount),
                }
            )

    async def _settle(self, opened: OpenCancellationResult) -> None:
        """Refund, coupon, done; and if the provider reverses the refund after success, park
        for an operator and do it again with a new refund (R7, R10, R11)."""
        while True:
            if self._refund is None or self._refund.stage is not RefundStage.CONFIRMED:
                await self._refund_money(opened)
            coupon_attribute: list[SearchAttributeUpdate[Any]] = []
            if self._coupon is None:
                coupon_attribute = await self._decide_coupon()
            completing = self._reversal is None and self._status is not CancellationStatus.COMPLETED
            if coupon_attribute and not (self._lean and completing):
                workflow.upsert_search_attributes(coupon_attribute)
                coupon_attribute = []
            if completing:
                await self._transition(
                    CancellationStatus.COMPLETED, "system", "completed", extra=coupon_attribute
                )
            if self._reversal is None:
                return
            await self._handle_reversal()

    async def _decide_coupon(self) -> list[SearchAttributeUpdate[Any]]:
        """The coupon decision; returns its search attribute for the caller to upsert."""
        self._coupon = await workflow.execute_activity_method(
            LedgerActivities.restore_coupon,
            CouponInput(cancellation_id=self._id, event_key=self._key("coupon")),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary="Decide whether the coupon comes back",
        )
        self._note("system", f"coupon_{self._coupon.outcome.value}", self._coupon.reason)
        return [sa.COUPON_OUTCOME.value_set(self._coupon.outcome.value)]

    async def _handle_reversal(self) -> None:
        """The provider's event says the confirmed refund failed after all. The provider is
        asked (the event may be stale); if it agrees, the refund is reversed in the ledger (the
        coupon decision with it) and the cancellation waits in refund_failed for an operator,
        whose retry makes a new refund with its own idempotency key."""
        event, self._reversal = self._reversal, None
        assert event is not None and self._refund is not None
        self._refund = await workflow.execute_activity_method(
            RefundActivities.verify_reversal,
            self._refund_step("refund_reversed"),
            start_to_close_timeout=PROVIDER_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=5)
            ),
            summary="Check with the provider that the refund was reversed",
        )
        if self._refund.stage is not RefundStage.REVERSED:
            self._note(
                "system",
                "reversal_not_confirmed",
                f"event {event.event_id}: the provider still reports the refund succeeded",
            )
            return
        self._coupon = None
        self._last_error = self._refund.last_error
        coupon_unset = [sa.COUPON_OUTCOME.value_unset()]
        if not self._lean:
            workflow.upsert_search_attributes(coupon_unset)
        self._set_status(
            CancellationStatus.REFUND_FAILED,
            "provider",
            "refund_reversed",
            self._refund.last_error or "",
            extra=coupon_unset if self._lean else (),
        )
        workflow.logger.warning("refund reversed by the provider: %s", self._refund.last_error)
        await self._wait_for_operator()

    async def _await_seller(self, opened: OpenCancellationResult) -> bool:
        """R3-R5: wait on a durable timer for the seller. True when the cancellation is approved."""
        self._deadline = workflow.now() + opened.response_window
        deadline = [sa.SELLER_DEADLINE.value_set(self._deadline)]
        if not self._lean:
            workflow.upsert_search_attributes(deadline)
        self._set_status(
            CancellationStatus.AWAITING_SELLER,
            "system",
            "awaiting_seller",
            f"seller {self._request.seller_id} has until {self._deadline.isoformat()}",
            extra=deadline if self._lean else (),
        )
        try:
            await workflow.wait_condition(
                lambda: self._decision is not None or self._withdrawal is not None,
                timeout=opened.response_window,
                timeout_summary="Seller response window",
            )
        except TimeoutError:
            # A decision accepted in the same task as the timer fired still counts: the seller
            # answered in time.
            if self._decision is None and self._withdrawal is None:
                self._on_timeout(opened)
        if self._status is CancellationStatus.ESCALATED:
            await self._transition(
                CancellationStatus.ESCALATED,
                "timer",
                "escalated",
                "seller did not answer in time; an operator decides (resolve_escalation)",
            )
            await workflow.wait_condition(
                lambda: self._decision is not None or self._withdrawal is not None
            )

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
        await self._transition(
            CancellationStatus.APPROVED,
            self._decided_by,
            "approved",
            self._decision_reason,
            cancel_sub_order=True,
        )
        return True

    def _on_timeout(self, opened: OpenCancellationResult) -> None:
        """R4: the policy decides for a silent seller. Synchronous, so no decision can slip in
        between the timer firing and the status changing."""
        outcome = rules.timeout_outcome(opened.timeout_policy)
        if outcome is None:
            self._status = CancellationStatus.ESCALATED
            return
        self._decision = outcome
        self._decided_by = "timer"
        self._decision_reason = (
            f"seller did not answer within {opened.response_window}: {opened.timeout_policy.value}"
        )

    async def _refund_money(self, opened: OpenCancellationResult) -> None:
        """R7-R10: requested -> submitted -> confirmed; park in refund_failed, never fail."""
        await self._request_refund(opened)
        policy = opened.refund_policy
        passes = 0
        while True:
            passes += 1
            assert self._refund is not None
            if self._refund.stage.is_dead:
                # Declined for good under its key: the operator's retry needs a new refund.
                await self._request_refund(opened)
            try:
                if self._refund.stage in (RefundStage.REQUESTED, RefundStage.FAILED):
                    await self._submit(policy)
                # `confirm_refund` logs the confirmation it records; one found recorded
                # before this run began is logged here.
                asked = self._refund.stage is not RefundStage.CONFIRMED
                if asked:
                    self._refund = await self._await_confirmation(opened)
                self._set_status(
                    CancellationStatus.REFUND_CONFIRMED,
                    "provider",
                    "refund_confirmed",
                    logged_by_activity=asked,
                )
                return
            except ActivityError as err:
                await self._park_refund(err, passes)

    async def _request_refund(self, opened: OpenCancellationResult) -> None:
        self._refund = await workflow.execute_activity_method(
            LedgerActivities.request_refund,
            RefundRequestInput(cancellation_id=self._id, event_key=self._key("refund_requested")),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary=f"Record the refund of {opened.amount} (dot 1)",
        )
        if self._refund.stage is RefundStage.REQUESTED:
            self._set_status(
                CancellationStatus.REFUND_REQUESTED,
                "system",
                "refund_requested",
                logged_by_activity=True,
            )

    async def _submit(self, policy: RefundPolicy) -> None:
        assert self._refund is not None
        self._refund = await workflow.execute_activity_method(
            RefundActivities.submit_refund,
            self._refund_step("refund_submitted"),
            start_to_close_timeout=PROVIDER_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=policy.submit_initial_interval,
                maximum_interval=policy.submit_max_interval,
                maximum_attempts=policy.submit_max_attempts,
                non_retryable_error_types=[REFUND_REJECTED],
            ),
            summary=f"Submit the {self._refund.kind.value} to the payment provider (dot 2)",
        )
        self._set_status(
            CancellationStatus.REFUND_SUBMITTED,
            "provider",
            "refund_submitted",
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
            refund = await workflow.execute_activity_method(
                RefundActivities.confirm_refund,
                self._refund_step("refund_confirmed"),
                start_to_close_timeout=PROVIDER_TIMEOUT,
                # Only an unreachable provider is retried here; "pending" is an answer.
                retry_policy=RetryPolicy(
                    initial_interval=policy.submit_initial_interval,
                    maximum_interval=policy.submit_max_interval,
                    non_retryable_error_types=[REFUND_FAILED_AT_PROVIDER],
                ),
                summary="Ask the provider whether the refund is confirmed (dot 3)",
            )
            if refund.stage is RefundStage.CONFIRMED:
                return refund
            self._refund = refund
            self._next_check = workflow.now() + wait
            workflow.set_current_details(self._details())
            try:
                await workflow.wait_condition(
                    lambda: self._provider_news,
                    timeout=wait,
                    timeout_summary="Wait for the provider (poll interval, or its webhook)",
                )
            except TimeoutError:
                pass
            wait = min(wait * 1.5, policy.poll_max_interval)

    async def _park_refund(self, err: ActivityError, passes: int) -> None:
        cause = err.cause
        message = str(cause) if cause is not None else str(err)
        if isinstance(cause, ApplicationError) and cause.type:
            message = f"{cause.type}: {cause.message}"
        self._last_error = message
        assert self._refund is not None
        final = (
            isinstance(cause, ApplicationError)
            and cause.type in (REFUND_REJECTED, REFUND_FAILED_AT_PROVIDER)
            and workflow.patched(DECLINED_PATCH)
        )
        self._refund = await workflow.execute_activity_method(
            LedgerActivities.record_refund_failed,
            RefundFailureInput(
                cancellation_id=self._id,
                idempotency_key=self._refund.idempotency_key,
                error=message,
                attempts=passes,
                event_key=self._key("refund_failed"),
                final=final,
            ),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary="Park the refund for an operator",
        )
        self._set_status(CancellationStatus.REFUND_FAILED, "system", "refund_failed", message)
        workflow.logger.warning("refund parked in refund_failed: %s", message)
        await self._wait_for_operator()

    async def _wait_for_operator(self) -> None:
        """R10: parked, durably, for as long as it takes, until update `retry_refund`."""
        await workflow.wait_condition(lambda: self._retry is not None)
        assert self._retry is not None
        retry, self._retry = self._retry, None
        await self._transition(
            CancellationStatus.REFUND_REQUESTED,
            f"operator:{retry.operator_id}",
            "refund_retry",
            retry.reason,
        )

    def _refund_step(self, kind: str) -> RefundStepInput:
        assert self._refund is not None
        return RefundStepInput(
            cancellation_id=self._id,
            idempotency_key=self._refund.idempotency_key,
            event_key=self._key(kind),
        )

    async def _finish(self) -> CancellationResult:
        # Refused signals may still be writing their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        assert self._opened is not None
        return CancellationResult(
            cancellation_id=self._id,
            status=self._status,
            path=self._opened.path,
            refund=self._refund,
            coupon=self._coupon,
        )

    # --- state changes ----------------------------------------------------------------------

    def _key(self, kind: str) -> str:
        self._seq += 1
        return f"{self._seq:03d}-{kind}@{self._run_id}"

    def _note(self, actor: str, kind: str, detail: str = "") -> None:
        self._audit.append(AuditEntry(at=workflow.now(), actor=actor, kind=kind, detail=detail))

    def _set_status(
        self,
        status: CancellationStatus,
        actor: str,
        kind: str,
        detail: str = "",
        *,
        extra: Sequence[SearchAttributeUpdate[Any]] = (),
        logged_by_activity: bool = False,
    ) -> None:
        """Change the status here, in the search attributes and the details operators read.
        The ledger row is written by the activity that caused the change. `extra` attributes
        that change with the status go in the same upsert (one command).

        One log line per status change: the activity that records the change writes it
        (`logged_by_activity`); this writes the line only for changes no activity logs. A line
        from workflow code costs several times one from an activity (docs/performance.md)."""
        self._status = status
        self._since = workflow.now()
        self._note(actor, kind, detail)
        if not logged_by_activity:
            workflow.logger.info(
                "cancellation_%s", kind, extra={"status": status.value, "actor": actor}
            )
        stage = self._refund.stage.dots if self._refund is not None else 0
        workflow.upsert_search_attributes(
            [
                sa.CANCELLATION_STATUS.value_set(status.value),
                sa.REFUND_STAGE.value_set(stage),
                *extra,
            ]
        )
        workflow.set_current_details(self._details())

    async def _transition(
        self,
        status: CancellationStatus,
        actor: str,
        kind: str,
        detail: str = "",
        *,
        cancel_sub_order: bool = False,
        extra: Sequence[SearchAttributeUpdate[Any]] = (),
    ) -> None:
        # `record_transition` logs the change once it is recorded.
        self._set_status(status, actor, kind, detail, extra=extra, logged_by_activity=True)
        await workflow.execute_activity_method(
            LedgerActivities.record_transition,
            TransitionInput(
                cancellation_id=self._id,
                status=status,
                actor=actor,
                kind=kind,
                detail=detail,
                event_key=self._key(kind),
                cancel_sub_order=cancel_sub_order,
            ),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary=f"Record: {kind}",
        )

    def _details(self) -> str:
        """Markdown for the Web UI: what is happening, since when, what comes next, ETA, error."""
        headline, next_step = _STAGE_TEXT[self._status]
        if self._status is CancellationStatus.AWAITING_SELLER and self._deadline is not None:
            next_step += f" by {self._deadline:%Y-%m-%d %H:%M} UTC; then {self._policy_text()}"
        if self._status is CancellationStatus.REFUND_SUBMITTED and self._next_check is not None:
            next_step += (
                f" (next check {self._next_check:%Y-%m-%d %H:%M:%S} UTC, or on its webhook)"
            )
        lines = [
            f"**{headline}** since {self._since:%Y-%m-%d %H:%M:%S} UTC",
            f"Next: {next_step}",
        ]
        if self._refund is not None:
            refund = self._refund
            lines.append(
                f"Refund: {refund.kind.value} of {refund.amount}, stage {refund.stage.value}"
                f" ({refund.stage.dots}/3)"
                + (f", provider ref {refund.provider_ref}" if refund.provider_ref else "")
            )
            if refund.eta is not None:
                lines.append(f"ETA: {refund.eta.earliest:%Y-%m-%d} to {refund.eta.latest:%Y-%m-%d}")
        if self._coupon is not None:
            lines.append(f"Coupon: {self._coupon.outcome.value} ({self._coupon.reason})")
        if self._last_error and self._status is CancellationStatus.REFUND_FAILED:
            lines.append(f"Last error: {self._last_error}")
        return "\n\n".join(lines)

    def _policy_text(self) -> str:
        policy = self._opened.timeout_policy if self._opened is not None else None
        return {
            None: "the timeout policy applies",
            TimeoutPolicy.AUTO_APPROVE: "approved automatically",
            TimeoutPolicy.AUTO_REJECT: "rejected automatically",
            TimeoutPolicy.ESCALATE: "escalated to operators",
        }[policy]

    async def _refuse(self, actor: str, kind: str, err: DecisionRefused) -> None:
        """A signal cannot be refused to its sender: record the refusal and change nothing."""
        detail = f"{err.code.value}: {err.message}"
        self._note(actor, kind, detail)
        workflow.logger.warning("%s refused: %s", kind, detail)
        event_key = self._key(kind)
        # The ledger row of the cancellation exists once the first activity has run.
        await workflow.wait_condition(lambda: self._opened is not None)
        await workflow.execute_activity_method(
            LedgerActivities.record_event,
            EventInput(
                cancellation_id=self._id,
                actor=actor,
                kind=kind,
                detail=detail,
                event_key=event_key,
            ),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
            summary=f"Record: {kind}",
        )

    # --- seller decision: update `decide` and signal `seller_decision` (same payload) -------

    def _withdrawn(self, *, in_validator: bool) -> bool:
        """Whether a withdrawal was accepted before this decision (in the same workflow task:
        an earlier one has already ended the wait). Validators never run on replay, so they
        judge plainly; handlers ask through WITHDRAWAL_FIRST_PATCH, and only when it matters,
        so histories recorded before the fix replay as they ran."""
        if self._withdrawal is None:
            return False
        return in_validator or workflow.patched(WITHDRAWAL_FIRST_PATCH)

    def _check_seller(self, payload: Any, *, in_validator: bool = False) -> SellerDecision:
        decision = _parse(SellerDecision, payload)
        rules.check_seller_decision(
            status=self._status,
            expected_seller=self._request.seller_id,
            seller_id=decision.seller_id,
            already_decided=self._decision is not None
            or self._withdrawn(in_validator=in_validator),
        )
        return decision

    def _take_decision(self, decision: Decision, actor: str, reason: str) -> DecisionReceipt:
        self._decision = decision
        self._decided_by = actor
        self._decision_reason = reason
        self._note(actor, f"decision_{decision.value}", reason)
        return DecisionReceipt(
            cancellation_id=self._id,
            accepted=True,
            status=(
                CancellationStatus.APPROVED
                if decision is Decision.ACCEPT
                else CancellationStatus.REJECTED
            ),
            message=f"{decision.value} recorded",
        )

    # Payloads are typed `Any` on purpose: they are validated here, so a malformed message from
    # any client becomes a specific refusal instead of being dropped by the SDK's decoder; and
    # taken as `*args`, so that a message with a missing or extra argument is refused too.
    @workflow.update
    def decide(self, *args: Any) -> DecisionReceipt:
        decision = self._check_seller(_one(args))
        return self._take_decision(
            decision.decision, f"seller:{decision.seller_id}", decision.reason
        )

    @decide.validator
    def _validate_decide(self, *args: Any) -> None:
        _refuse_unless(lambda payload: self._check_seller(payload, in_validator=True), args)

    @workflow.signal
    async def seller_decision(self, *args: Any) -> None:
        payload = args[0] if len(args) == 1 else None
        try:
            decision = self._check_seller(_one(args))
        except DecisionRefused as err:
            seller = payload.get("seller_id") if isinstance(payload, dict) else None
            await self._refuse(f"seller:{seller or '?'}", "seller_decision_refused", err)
            return
        self._take_decision(decision.decision, f"seller:{decision.seller_id}", decision.reason)

    # --- buyer withdrawal -------------------------------------------------------------------

    @workflow.signal
    async def withdraw(self, *args: Any) -> None:
        payload = args[0] if len(args) == 1 else None
        try:
            request = _parse(WithdrawRequest, _one(args))
            rules.check_withdrawal(
                status=self._status,
                expected_buyer=self._request.buyer_id,
                buyer_id=request.buyer_id,
            )
            if self._decision is not None or self._withdrawal is not None:
                raise DecisionRefused(
                    RefusalCode.ALREADY_DECIDED, "the request was already decided or withdrawn"
                )
        except DecisionRefused as err:
            buyer = payload.get("buyer_id") if isinstance(payload, dict) else None
            await self._refuse(f"buyer:{buyer or '?'}", "withdraw_refused", err)
            return
        self._withdrawal = request
        self._note(f"buyer:{request.buyer_id}", "withdraw_requested", request.reason)

    # --- the payment provider's webhook ------------------------------------------------------

    @workflow.signal
    async def payment_event(self, *args: Any) -> None:
        # A reopening run gets its event with its start: judge it once the refund is known.
        await workflow.wait_condition(lambda: self._opened is not None)
        try:
            event = _parse(PaymentEvent, _one(args))
            refund = self._refund
            ours = refund is not None and (
                (event.provider_ref is not None and event.provider_ref == refund.provider_ref)
                or (event.refund_key is not None and event.refund_key == refund.idempotency_key)
            )
            if not ours:
                raise DecisionRefused(
                    RefusalCode.UNKNOWN_REFUND,
                    f"event {event.event_id} names no refund of this cancellation",
                )
        except DecisionRefused as err:
            await self._refuse("provider", "payment_event_refused", err)
            return
        self._note("provider", "payment_event", f"{event.type.value} ({event.event_id})")
        self._provider_news = True
        if (
            event.type is PaymentEventType.REFUND_REVERSED
            and self._refund is not None
            and self._refund.stage is RefundStage.CONFIRMED
        ):
            # Before confirmation the provider's own answer reports a failure; after it, only
            # this tells the workflow to look again.
            self._reversal = event

    # --- operators --------------------------------------------------------------------------

    def _check_operator(self, payload: Any, *, in_validator: bool = False) -> OperatorDecision:
        decision = _parse(OperatorDecision, payload)
        if (
            self._status is not CancellationStatus.ESCALATED
            or self._decision is not None
            or self._withdrawn(in_validator=in_validator)
        ):
            raise DecisionRefused(
                RefusalCode.NOT_ESCALATED,
                f"only an escalated request takes an operator decision (status: "
                f"{self._status.value})",
            )
        return decision

    @workflow.update
    def resolve_escalation(self, *args: Any) -> DecisionReceipt:
        decision = self._check_operator(_one(args))
        return self._take_decision(
            decision.decision, f"operator:{decision.operator_id}", decision.reason
        )

    @resolve_escalation.validator
    def _validate_resolve(self, *args: Any) -> None:
        _refuse_unless(lambda payload: self._check_operator(payload, in_validator=True), args)

    def _check_retry(self, payload: Any) -> RetryRefundRequest:
        request = _parse(RetryRefundRequest, payload)
        if self._status is not CancellationStatus.REFUND_FAILED or self._retry is not None:
            raise DecisionRefused(
                RefusalCode.NOT_REFUND_FAILED,
                f"only a cancellation in refund_failed can be retried (status: "
                f"{self._status.value})",
            )
        return request

    @workflow.update
    def retry_refund(self, *args: Any) -> DecisionReceipt:
        self._retry = self._check_retry(_one(args))
        return DecisionReceipt(
            cancellation_id=self._id,
            accepted=True,
            status=CancellationStatus.REFUND_REQUESTED,
            message="refund retry scheduled with the same idempotency key",
        )

    @retry_refund.validator
    def _validate_retry(self, *args: Any) -> None:
        _refuse_unless(self._check_retry, args)

    # --- status -----------------------------------------------------------------------------

    @workflow.query
    def status(self) -> CancellationView:
        return CancellationView(
            cancellation_id=self._id,
            order_id=self._request.order_id,
            seller_id=self._request.seller_id,
            buyer_id=self._request.buyer_id,
            reason=self._request.reason,
            path=self._opened.path if self._opened else None,
            status=self._status,
            seller_deadline=self._deadline,
            refund=self._refund,
            dots=rules.refund_dots(self._refund),
            coupon=self._coupon,
            last_error=self._last_error,
            audit=list(self._audit),
        )

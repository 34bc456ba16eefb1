"""What the outside world sends to a cancellation, and what it reads back.

The signal, update and query handlers of `OrderCancellation` (a public contract: their names
and payloads), in a base class so that `workflows.order_cancellation` reads as the story alone.
The state they share with the story is declared here and set by `OrderCancellation.__init__`.

Payloads are typed `Any` on purpose: `workflows.messages` validates them, so a malformed message
from any client becomes a specific refusal instead of being dropped by the SDK's decoder; and
taken as `*args`, so that a missing or extra argument is refused too (R20). A signal cannot be
refused to its sender: the refusal is recorded and changes nothing. An update is refused by its
validator, before it enters the history.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from temporalio import workflow

from domain import rules
from domain.errors import DecisionRefused, RefusalCode
from domain.models import (
    AuditEntry,
    CancellationStatus,
    CancellationView,
    CouponOutcome,
    Decision,
    DecisionReceipt,
    MessageReceipt,
    MessageRequest,
    OpenCancellationResult,
    OperatorDecision,
    PaymentEvent,
    PaymentEventType,
    RefundStage,
    RefundView,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
    WithdrawRequest,
)
from domain.order_events import ORDER_SYSTEM, SHIPPED_REASON
from workflows import messages, steps
from workflows.visibility import Visibility

# Refused signals written to the audit trail, per cancellation; the rest are counted.
REFUSALS_RECORDED = 20
# The first note of the `status` query of a run that an earlier run's cancellation started.
EARLIER_RUNS = "earlier_runs_in_ledger"


class CancellationInbox:
    _request: RequestCancellationInput
    _id: str
    _run_id: str
    _seq: int
    _status: CancellationStatus
    _opened: OpenCancellationResult | None
    _decision: Decision | None
    _decided_by: str
    _decision_reason: str
    _withdrawal: WithdrawRequest | None
    _retry: RetryRefundRequest | None
    _deadline: datetime | None
    _seller_signals: int
    _late_signal: int | None
    _refund: RefundView | None
    _coupon: CouponOutcome | None
    _last_error: str | None
    _provider_news: bool
    _coupon_news: bool
    _reversal: PaymentEvent | None
    _audit: list[AuditEntry]
    _refused: int
    # R14: the shipment event that ended the request (a redelivery of it changes nothing).
    _shipped_event: str | None
    _visible: Visibility

    # --- messages ---------------------------------------------------------------------------

    # The seller's decision (R3): update `decide` and signal `seller_decision`, same payload.

    @workflow.update
    def decide(self, *args: Any) -> DecisionReceipt:
        decision = check_seller(self, messages.one(args))
        return take_decision(
            self, decision.decision, f"seller:{decision.seller_id}", decision.reason
        )

    @decide.validator
    def _validate_decide(self, *args: Any) -> None:
        messages.refuse_unless(partial(check_seller, self), args)

    @workflow.signal
    async def seller_decision(self, *args: Any) -> None:
        # R19: the how-manieth seller_decision of this run (history order among signals), and
        # whether it was handled when the deadline had passed (then maybe received after it).
        self._seller_signals += 1
        try:
            decision = check_seller(self, messages.one(args))
        except DecisionRefused as err:
            seller = messages.claimed(args, "seller_id")
            await refuse(self, f"seller:{seller}", "seller_decision_refused", err)
            return
        if self._deadline is not None and workflow.now() >= self._deadline:
            self._late_signal = self._seller_signals
        take_decision(self, decision.decision, f"seller:{decision.seller_id}", decision.reason)

    # The buyer withdraws a pending request (R5).

    @workflow.signal
    async def withdraw(self, *args: Any) -> None:
        try:
            request = messages.withdrawal(
                messages.one(args),
                status=self._status,
                buyer_id=self._request.buyer_id,
                answered=answered(self),
            )
        except DecisionRefused as err:
            buyer = messages.claimed(args, "buyer_id")
            await refuse(self, f"buyer:{buyer}", "withdraw_refused", err)
            return
        self._withdrawal = request
        note(self, f"buyer:{request.buyer_id}", "withdraw_requested", request.reason)

    # The payment provider's webhook (R7): wakes the confirmation up, or reports a reversal.

    @workflow.signal
    async def payment_event(self, *args: Any) -> None:
        # A reopening run gets its event with its start: judge it once the refund is known.
        await workflow.wait_condition(lambda: self._opened is not None)
        try:
            event = messages.payment_event(messages.one(args), self._refund)
        except DecisionRefused as err:
            await refuse(self, "provider", "payment_event_refused", err)
            return
        note(self, "provider", "payment_event", f"{event.type.value} ({event.event_id})")
        self._provider_news = True
        if event.type is PaymentEventType.REFUND_REVERSED and self._refund is not None:
            if self._refund.stage is RefundStage.CONFIRMED:
                # Before confirmation the provider's own answer reports a failure; after it,
                # only this tells the workflow to look again.
                self._reversal = event
            elif self._refund.stage is RefundStage.SUBMITTED and workflow.patched(
                "reversal-before-confirmation-v1"
            ):
                # The provider confirmed the refund and reversed it while the workflow had not
                # yet heard of the confirmation: kept, and checked once the refund is
                # confirmed, instead of being dropped (issue 16 item 7).
                self._reversal = event

    # The sub-order shipped while its request waited for the seller (R14): sent by the
    # order-events service once the ledger recorded the shipment. The shipment is the seller's
    # answer: the request ends rejected, reason "shipped", and the order goes on.

    @workflow.signal
    async def order_shipped(self, *args: Any) -> None:
        await workflow.wait_condition(lambda: self._opened is not None)
        assert self._opened is not None
        if self._shipped_event is not None and messages.claimed(args, "event_id") == (
            self._shipped_event
        ):
            return  # told again (the service redelivers until it knows this was received)
        try:
            shipped = messages.order_shipped(
                messages.one(args),
                status=self._status,
                seller_id=self._request.seller_id,
                path=self._opened.path,
            )
        except DecisionRefused as err:
            await refuse(self, messages.claimed(args, "sent_by"), "order_shipped_refused", err)
            return
        if answered(self):
            await refuse(
                self,
                ORDER_SYSTEM,
                "order_shipped_refused",
                DecisionRefused(
                    RefusalCode.ALREADY_DECIDED,
                    f"shipped ({shipped.event_id}) after the request was answered: that answer"
                    " stands",
                ),
            )
            return
        self._shipped_event = shipped.event_id
        take_decision(self, Decision.REJECT, ORDER_SYSTEM, SHIPPED_REASON)

    # A sibling cancellation decided its coupon (R11): one that waits for it reads its own
    # again. Any payload is ignored: the ledger, read by the workflow, is the truth.

    @workflow.signal(name=steps.COUPON_SETTLED)
    def coupon_settled(self, *args: Any) -> None:
        self._coupon_news = True

    # Operators: decide an escalated request (R4), retry a parked refund (R10).

    @workflow.update
    def resolve_escalation(self, *args: Any) -> DecisionReceipt:
        decision = check_operator(self, messages.one(args))
        return take_decision(
            self, decision.decision, f"operator:{decision.operator_id}", decision.reason
        )

    @resolve_escalation.validator
    def _validate_resolve(self, *args: Any) -> None:
        messages.refuse_unless(partial(check_operator, self), args)

    @workflow.update
    def retry_refund(self, *args: Any) -> DecisionReceipt:
        self._retry = check_retry(self, messages.one(args))
        return DecisionReceipt(
            cancellation_id=self._id,
            accepted=True,
            status=CancellationStatus.REFUND_REQUESTED,
            message=retry_plan(self),
        )

    @retry_refund.validator
    def _validate_retry(self, *args: Any) -> None:
        messages.refuse_unless(partial(check_retry, self), args)

    # Buyer and seller write on a request while it waits for the seller (R18). The messages
    # are the audit notes of kind `message` (carried across continue-as-new with the rest).

    @workflow.update
    async def message(self, *args: Any) -> MessageReceipt:
        # Checked again here: another message or a decision may have come in since the
        # validator ran. The note is taken before the activity, so the count holds at once.
        request = check_message(self, messages.one(args))
        author = f"{request.author.value}:{request.author_id}"
        note(self, author, rules.MESSAGE_KIND, request.text)
        at = workflow.now()
        count = message_count(self)
        show_latest_message(self)
        await steps.record_event(
            self._id,
            author,
            rules.MESSAGE_KIND,
            request.text,
            event_key=next_key(self, rules.MESSAGE_KIND),
        )
        return MessageReceipt(
            cancellation_id=self._id,
            author=author,
            text=request.text,
            at=at,
            messages=count,
            messages_left=max(rules.MESSAGES_MAX - count, 0),
        )

    @message.validator
    def _validate_message(self, *args: Any) -> None:
        messages.refuse_unless(partial(check_message, self), args)

    # --- status: what the API and the buyer's order page read (R17) ---------------------

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
            audit=own_story(self),
            refused_messages=self._refused,
            messages=rules.messages_of(self._audit),
        )


# --- the handlers' helpers ----------------------------------------------------------------
# Functions of the workflow's state rather than methods: `workflow.defn` checks every member of
# the workflow class (its bases' included) each time the sandbox loads the class, once per
# workflow run, at about 20 us of CPU per member (docs/performance.md).


def answered(wf: CancellationInbox) -> bool:
    """Decided, or withdrawn by the buyer: whichever came first stands (R3, R5)."""
    return wf._decision is not None or wf._withdrawal is not None


def next_key(wf: CancellationInbox, kind: str) -> str:
    wf._seq += 1
    return f"{wf._seq:03d}-{kind}@{wf._run_id}"


def note(wf: CancellationInbox, actor: str, kind: str, detail: str = "") -> None:
    wf._audit.append(AuditEntry(at=workflow.now(), actor=actor, kind=kind, detail=detail))


async def refuse(wf: CancellationInbox, actor: str, kind: str, err: DecisionRefused) -> None:
    """A signal cannot be refused to its sender: record the refusal and change nothing.
    Only the first `REFUSALS_RECORDED` are written down (audit trail, log); the others are
    counted (`refused_messages` in the status; one row with the count at the end), so that
    a flood costs one history event per signal and nothing else (R20)."""
    wf._refused += 1
    if wf._refused > REFUSALS_RECORDED:
        return
    detail = rules.safe_text(f"{err.code.value}: {err.message}")
    note(wf, actor, kind, detail)
    workflow.logger.warning("%s refused: %s", kind, detail)
    event_key = next_key(wf, kind)
    # The ledger row of the cancellation exists once the first activity has run.
    await workflow.wait_condition(lambda: wf._opened is not None)
    await steps.record_event(wf._id, actor, kind, detail, event_key=event_key)


def take_decision(
    wf: CancellationInbox, decision: Decision, actor: str, reason: str
) -> DecisionReceipt:
    wf._decision = decision
    wf._decided_by = actor
    wf._decision_reason = reason
    note(wf, actor, f"decision_{decision.value}", reason)
    accepted = decision is Decision.ACCEPT
    return DecisionReceipt(
        cancellation_id=wf._id,
        accepted=True,
        status=CancellationStatus.APPROVED if accepted else CancellationStatus.REJECTED,
        message=f"{decision.value} recorded",
    )


def check_seller(wf: CancellationInbox, payload: Any) -> SellerDecision:
    return messages.seller_decision(
        payload,
        status=wf._status,
        seller_id=wf._request.seller_id,
        answered=answered(wf),
    )


def check_operator(wf: CancellationInbox, payload: Any) -> OperatorDecision:
    return messages.operator_decision(payload, status=wf._status, answered=answered(wf))


def check_retry(wf: CancellationInbox, payload: Any) -> RetryRefundRequest:
    return messages.retry_request(payload, status=wf._status, scheduled=wf._retry is not None)


def retry_plan(wf: CancellationInbox) -> str:
    """Which refund the retry makes, by the key it will use (R10): the parked one's again,
    or, when the provider declined or reversed it (dead under its key), the next
    generation's, as the ledger will record it (`domain.rules.refund_idempotency_key`)."""
    refund = wf._refund
    if refund is None:
        key = rules.refund_idempotency_key(wf._id)
        return f"refund retry scheduled: a new refund under idempotency key {key}"
    if refund.stage.is_dead:
        generation = refund.generation + 1
        key = rules.refund_idempotency_key(wf._id, generation)
        return (
            f"refund retry scheduled: a new refund (generation {generation}) under"
            f" idempotency key {key}; {refund.idempotency_key} was {refund.stage.value}"
        )
    return (
        "refund retry scheduled with the same idempotency key"
        f" {refund.idempotency_key} ({refund.attempts} provider call(s) so far)"
    )


def message_count(wf: CancellationInbox) -> int:
    return sum(1 for e in wf._audit if e.kind == rules.MESSAGE_KIND)


def check_message(wf: CancellationInbox, payload: Any) -> MessageRequest:
    return messages.message(
        payload,
        status=wf._status,
        answered=answered(wf),
        buyer_id=wf._request.buyer_id,
        seller_id=wf._request.seller_id,
        count=message_count(wf),
    )


def show_latest_message(wf: CancellationInbox) -> None:
    """The latest message in the Web UI's current details (none: nothing changes)."""
    latest = next((e for e in reversed(wf._audit) if e.kind == rules.MESSAGE_KIND), None)
    if latest is not None:
        wf._visible.message(latest.actor, latest.detail, latest.at)


def own_story(wf: CancellationInbox) -> list[AuditEntry]:
    """This run's notes. A run that took over a cancellation an earlier run opened (a
    reversal reopened it, or another start of an ended one) knows only its own steps: its
    `requested` note would invent a second request, so it says instead where the earlier
    runs' story is. A run continued as new carries its chain's notes and says the same
    when that chain began on a reopened one. `starter.cancellations.one_story` (what
    `ordercancel status` and the API show) tells the whole story from the ledger."""
    audit = list(wf._audit)
    if wf._opened is None or wf._opened.opened_now:
        return audit
    for i, entry in enumerate(audit):
        if entry.kind == "requested":
            audit[i] = AuditEntry(
                at=entry.at,
                actor="system",
                kind=EARLIER_RUNS,
                detail="an earlier run opened this cancellation: its requests, decisions"
                " and refunds are in the ledger's audit trail (ordercancel status,"
                " GET /v1/cancellations/{id})",
            )
            break
    return audit

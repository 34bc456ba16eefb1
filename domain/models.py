"""The data that crosses boundaries: workflow/activity inputs and results, ledger rows, views.

Every model is a pydantic v2 model, serialised by `temporalio.contrib.pydantic`. Models that
travel through Temporal histories may gain optional fields later; they never lose or rename one.
Money is always integer minor units plus an ISO 4217 code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# R20: text from outside is printable Unicode. C0 and C1 control characters are refused (NUL,
# which PostgreSQL cannot store, among them), and so are lone surrogates (not encodable as
# UTF-8 at all); long free text may hold line breaks and tabs, nothing else of the kind. Every
# identifier and every free-text field is one of the annotated types below, so the API (422
# `invalid_payload`), the update validators and the signal handlers (`invalid_payload`) refuse
# the same thing before it reaches the ledger.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
FREE_TEXT_MAX = 2000


def _refuse_control(pattern: re.Pattern[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        found = pattern.search(value)
        if found is not None:
            raise ValueError(
                f"control character U+{ord(found.group()):04X} at position {found.start()}:"
                " text must be printable Unicode"
            )
        return value

    return check


# One line, no control character at all: tokens from other systems (event ids, references).
# (Placed after the length and pattern constraints, so that those stay in the JSON Schema.)
_ONE_LINE = AfterValidator(_refuse_control(_CONTROL))
# Free text a person wrote: printable, line breaks (\n) and tabs allowed, bounded.
FreeText = Annotated[
    str,
    StringConstraints(max_length=FREE_TEXT_MAX),
    AfterValidator(_refuse_control(_CONTROL_BUT_LINES)),
]
# Identifiers come from other systems; keep them to a safe, readable alphabet so they can be
# embedded in workflow ids, idempotency keys and log lines without escaping (printable by
# construction). `~` is not in it: it separates the order from the seller in a workflow id
# (`domain.rules.cancellation_id`), which is therefore one-to-one.
Identifier = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"), _ONE_LINE
]
# A provider's token (event id, reference, failure code): printable, one line, bounded.
ProviderToken = Annotated[str, StringConstraints(min_length=1, max_length=255), _ONE_LINE]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
MinorUnits = Annotated[int, Field(ge=0, le=10**15)]


class Strict(BaseModel):
    """Base for inputs from outside: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Record(BaseModel):
    """Base for values this service produces itself (results, views, ledger rows).

    Unknown fields are ignored so that an older worker can read what a newer one wrote.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)


class Money(Strict):
    amount_minor: MinorUnits
    currency: Currency

    def __str__(self) -> str:
        # Display only; two decimals is right for the currencies the demo uses. Amounts are
        # never computed from this text.
        return f"{self.amount_minor // 100}.{self.amount_minor % 100:02d} {self.currency}"


# --- reasons (R6) -------------------------------------------------------------------------------


class Fault(StrEnum):
    BUYER = "buyer"
    SELLER = "seller"


class CancellationReason(StrEnum):
    ORDERED_BY_MISTAKE = "ordered_by_mistake"
    DUPLICATE_ORDER = "duplicate_order"
    OUT_OF_STOCK = "out_of_stock"
    CANNOT_SHIP = "cannot_ship"
    SELLER_UNREACHABLE = "seller_unreachable"
    OTHER = "other"

    @property
    def fault(self) -> Fault:
        return REASON_FAULT[self]


# R6 lists "other" among the seller-attributed reasons; buyers who simply changed their mind
# choose "ordered_by_mistake".
REASON_FAULT: dict[CancellationReason, Fault] = {
    CancellationReason.ORDERED_BY_MISTAKE: Fault.BUYER,
    CancellationReason.DUPLICATE_ORDER: Fault.BUYER,
    CancellationReason.OUT_OF_STOCK: Fault.SELLER,
    CancellationReason.CANNOT_SHIP: Fault.SELLER,
    CancellationReason.SELLER_UNREACHABLE: Fault.SELLER,
    CancellationReason.OTHER: Fault.SELLER,
}


# --- orders (owned by the order system; loaded, never edited here) ------------------------------


class PaymentMethod(StrEnum):
    CARD = "card"
    WALLET = "wallet"
    BALANCE = "balance"
    BANK_TRANSFER = "bank_transfer"


class PaymentValidation(StrEnum):
    UNVALIDATED = "unvalidated"
    VALIDATED = "validated"


class CaptureState(StrEnum):
    AUTHORIZED = "authorized"
    CAPTURED = "captured"


class SubOrderStatus(StrEnum):
    UNVALIDATED = "unvalidated"  # payment being verified, seller has not accepted: instant path
    ACCEPTED = "accepted"  # payment validated and seller accepted: request path
    CANCELLED = "cancelled"
    # Shipped (R14; the order events, migration 009): read from `shipped_at`, not a stored status.
    SHIPPED = "shipped"


# --- cancellations ------------------------------------------------------------------------------


class CancellationPath(StrEnum):
    INSTANT = "instant"
    REQUEST = "request"


class CancellationStatus(StrEnum):
    """One value per state; the `CancellationStatus` search attribute carries it."""

    OPENING = "opening"
    AWAITING_SELLER = "awaiting_seller"
    ESCALATED = "escalated"
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"
    APPROVED = "approved"
    REFUND_REQUESTED = "refund_requested"
    REFUND_SUBMITTED = "refund_submitted"
    REFUND_CONFIRMED = "refund_confirmed"
    REFUND_FAILED = "refund_failed"
    COMPLETED = "completed"

    @property
    def is_terminal(self) -> bool:
        return self in (
            CancellationStatus.REJECTED,
            CancellationStatus.WITHDRAWN,
            CancellationStatus.COMPLETED,
        )


class Decision(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"


class TimeoutPolicy(StrEnum):
    AUTO_APPROVE = "auto_approve"
    AUTO_REJECT = "auto_reject"
    ESCALATE = "escalate"


class RefundKind(StrEnum):
    VOID = "void"  # money only authorised (R2)
    REFUND = "refund"  # money captured


class RefundStage(StrEnum):
    REQUESTED = "requested"  # dot 1: dispute finished
    SUBMITTED = "submitted"  # dot 2: refund in progress
    CONFIRMED = "confirmed"  # dot 3: refund completed
    FAILED = "failed"  # parked; the same refund is retried with the same key
    DECLINED = "declined"  # refused for good by the provider: a retry makes a new generation
    REVERSED = "reversed"  # confirmed, then reported failed by the provider (R7)

    @property
    def dots(self) -> int:
        return 3 if self is RefundStage.CONFIRMED else 2 if self is RefundStage.SUBMITTED else 1

    @property
    def is_dead(self) -> bool:
        """Dead at the provider under its key: only a new generation can refund the money."""
        return self in (RefundStage.DECLINED, RefundStage.REVERSED)


class CouponOutcomeKind(StrEnum):
    RESTORED = "restored"
    PARTIAL_REFUND = "partial_refund"
    EXPIRED = "expired"
    NO_COUPON = "no_coupon"


WINDOW_NOT_ALLOWED = (
    "response_window is not allowed: the seller's response window is the marketplace's policy"
    " (R19, `ordercancel sellers policy`), not the buyer's request"
)


class RequestCancellationInput(Strict):
    """What a buyer asks for. Workflow input of `OrderCancellation`."""

    order_id: Identifier
    seller_id: Identifier
    buyer_id: Identifier
    reason: CancellationReason
    reason_text: FreeText = ""

    @model_validator(mode="before")
    @classmethod
    def _no_window(cls, data: Any) -> Any:
        """R19: the seller's window is the marketplace's policy, never the buyer's request. A
        request that names one (as clients before R19 could) is refused, whatever its value."""
        if isinstance(data, Mapping) and "response_window" in data:
            raise ValueError(WINDOW_NOT_ALLOWED)
        return data


class SellerDecision(Strict):
    """Payload of signal `seller_decision` and update `decide`: plain JSON for any client."""

    seller_id: Identifier
    decision: Decision
    reason: FreeText = ""


class WithdrawRequest(Strict):
    """Payload of signal `withdraw`."""

    buyer_id: Identifier
    reason: FreeText = ""


class MessageAuthor(StrEnum):
    BUYER = "buyer"
    SELLER = "seller"


class MessageRequest(Strict):
    """Payload of update `message` (R18): a short message from the cancellation's buyer or its
    seller while the request waits for the seller. `author_id` must be the cancellation's buyer
    (author `buyer`) or seller (author `seller`); the API sets both from the caller's key. The
    text is printable (R20) and at most `MESSAGE_TEXT_MAX` characters once trimmed (longer:
    `message_too_long`); a cancellation takes at most `MESSAGES_MAX` (`too_many_messages`)."""

    author: MessageAuthor
    author_id: Identifier
    text: Annotated[FreeText, StringConstraints(min_length=1)]


class Message(Record):
    """A message on a cancellation as the status view shows it (R18)."""

    at: datetime
    author: str  # `buyer:<id>` or `seller:<id>`
    text: str


class MessageReceipt(Record):
    """What update `message` returns: the message as recorded, and how many more it takes."""

    cancellation_id: str
    author: str
    text: str
    at: datetime
    messages: int
    messages_left: int


class OperatorDecision(Strict):
    """Payload of update `resolve_escalation`: an operator decides an escalated request."""

    operator_id: Identifier
    decision: Decision
    reason: FreeText = ""


class RetryRefundRequest(Strict):
    """Payload of update `retry_refund`."""

    operator_id: Identifier
    reason: FreeText = ""


class PaymentEventType(StrEnum):
    REFUND_CONFIRMED = "refund_confirmed"
    REFUND_FAILED = "refund_failed"
    # The provider confirmed the refund, then reports it failed (e.g. a closed card) (R7).
    REFUND_REVERSED = "refund_reversed"


class PaymentEvent(Strict):
    """The provider's asynchronous news about a refund; payload of signal `payment_event`.

    It only wakes the workflow up: the workflow then asks the provider itself, so a forged or
    stale event can change nothing."""

    event_id: ProviderToken
    type: PaymentEventType
    provider_ref: ProviderToken | None = None
    # Our idempotency key, as providers echo it back (refund metadata).
    refund_key: ProviderToken | None = None
    failure_code: Annotated[str, StringConstraints(max_length=255), _ONE_LINE] | None = None
    occurred_at: datetime | None = None


class DecisionReceipt(Record):
    """What an update returns: the decision took effect and what the cancellation does next."""

    cancellation_id: str
    accepted: bool
    status: CancellationStatus
    message: str


class EtaRange(Record):
    earliest: datetime
    latest: datetime


class RefundDot(Record):
    stage: RefundStage
    label: str
    done: bool
    at: datetime | None = None
    eta: EtaRange | None = None


class RefundView(Record):
    idempotency_key: str
    generation: int = 1
    kind: RefundKind
    amount: Money
    stage: RefundStage
    provider_ref: str | None = None
    eta: EtaRange | None = None
    attempts: int = 0
    last_error: str | None = None


class CouponOutcome(Record):
    outcome: CouponOutcomeKind
    reason: str
    redemption_id: str | None = None
    active_sub_orders: list[str] = Field(default_factory=list)


class CouponDecision(Record):
    """What activity `restore_coupon` tells the workflow (R11): the outcome as it stands now (a
    sibling may have restored the coupon since this cancellation decided), the sibling
    cancellations whose refund is still on its way and undecided, so that the coupon may still
    come back with them (`waiting_on`), and the siblings that decided `partial_refund` and may
    be waiting on this one (`notify`)."""

    outcome: CouponOutcome
    waiting_on: list[str] = Field(default_factory=list)
    notify: list[str] = Field(default_factory=list)


class AuditEntry(Record):
    at: datetime
    actor: str
    kind: str
    detail: str = ""


class PaymentAmounts(Record):
    """R15: the money of the payment a cancellation belongs to, as the ledger counts it. What
    was authorised; released from the authorisation (sub-orders cancelled before capture); of
    the rest, captured; and of that, refunded (or promised back by a live refund)."""

    payment_id: str
    currency: Currency
    authorised_minor: MinorUnits
    released_minor: MinorUnits
    captured_minor: MinorUnits
    refunded_minor: MinorUnits


class CancellationView(Record):
    """Query `status` result (and the CLI's view of a finished cancellation, from the ledger)."""

    cancellation_id: str
    order_id: str
    seller_id: str
    buyer_id: str
    reason: CancellationReason
    # The buyer's own words for the seller (the request's `reason_text`; "" when none).
    reason_text: str = ""
    path: CancellationPath | None = None
    status: CancellationStatus
    seller_deadline: datetime | None = None
    # Why a request was rejected and by whom, from the `rejected` audit row: `shipped` (by the
    # order system, R14), the seller's or operator's words, or the timeout policy's. None
    # unless rejected.
    decision_reason: str | None = None
    decided_by: str | None = None
    # The latest change, the coupon outcome's included (a sibling's later restoration).
    updated_at: datetime | None = None
    refund: RefundView | None = None
    dots: list[RefundDot] = Field(default_factory=list)
    coupon: CouponOutcome | None = None
    last_error: str | None = None
    audit: list[AuditEntry] = Field(default_factory=list)
    # Messages refused so far (R20): the audit trail holds only the first few of them.
    refused_messages: int = 0
    # R18: what buyer and seller wrote on the request, oldest first (also in `audit`).
    messages: list[Message] = Field(default_factory=list)
    # From the ledger (the workflow does not keep it): None in the workflow's own answer.
    payment: PaymentAmounts | None = None


class CancellationResult(Record):
    """Workflow result."""

    cancellation_id: str
    status: CancellationStatus
    path: CancellationPath
    refund: RefundView | None = None
    coupon: CouponOutcome | None = None


# --- activity contracts --------------------------------------------------------------------------


class OpenCancellationInput(Record):
    cancellation_id: str
    request: RequestCancellationInput


class RefundPolicy(Record):
    submit_initial_interval: timedelta = timedelta(seconds=1)
    submit_max_interval: timedelta = timedelta(minutes=5)
    submit_max_attempts: int = 8
    poll_interval: timedelta = timedelta(seconds=5)
    poll_max_interval: timedelta = timedelta(hours=1)


class SignalsBeforeInput(Record):
    """Input of activity `signals_before` (R19: was a decision received in time?)."""

    workflow_id: str
    run_id: str
    signal_name: str
    deadline: datetime


class OpenCancellationResult(Record):
    """The sub-order as the ledger saw it, and which path the atomic transition chose (R1)."""

    path: CancellationPath
    amount: Money  # cash paid for the sub-order: what a refund returns
    payment_method: PaymentMethod
    capture: CaptureState
    response_window: timedelta  # fixed when the cancellation starts (R4), by policy (R19)
    timeout_policy: TimeoutPolicy
    # The seller's deadline as the ledger recorded it when the request path opened (R19);
    # None on the instant path (and in histories recorded before it).
    seller_deadline: datetime | None = None
    # This opening created the cancellation in the ledger (False: a later run of one it had).
    opened_now: bool = True
    # How the refund is driven, from the worker's configuration when the cancellation opened;
    # recorded in history so a replay sees the same values.
    refund_policy: RefundPolicy
    # Where the ledger says the cancellation stands: a later run of an ended cancellation (a
    # reversed refund reopens it) resumes there instead of asking the seller again.
    ledger_status: CancellationStatus | None = None
    refund: RefundView | None = None
    # The coupon outcome of a cancellation the ledger has as completed (a later run reports it).
    coupon: CouponOutcome | None = None


class CarriedState(Record):
    """What a run hands the next one when it continues as new (a history kept short, R20):
    where it waits (`phase`: `seller`, `parked`, `settle`, `coupon`) and all it knows. Only a
    run that Temporal started by continue-as-new reads it; a client's second argument is
    ignored."""

    phase: str
    status: CancellationStatus
    opened: OpenCancellationResult
    deadline: datetime | None = None
    decision: Decision | None = None
    decided_by: str = ""
    decision_reason: str = ""
    withdrawal: WithdrawRequest | None = None
    refund: RefundView | None = None
    coupon: CouponOutcome | None = None
    coupon_waiting: list[str] = Field(default_factory=list)
    last_error: str | None = None
    reversal: PaymentEvent | None = None
    audit: list[AuditEntry] = Field(default_factory=list)
    refused: int = 0
    seq: int = 1


class TransitionInput(Record):
    """A state change recorded in one ledger transaction together with its audit row (R12)."""

    cancellation_id: str
    status: CancellationStatus
    actor: str
    kind: str
    detail: str = ""
    # Deterministic per transition so an activity retry writes the audit row once.
    event_key: str
    # Approval cancels the sub-order in the same transaction.
    cancel_sub_order: bool = False


class EventInput(Record):
    """An audit row with no state change (e.g. a refused signal)."""

    cancellation_id: str
    actor: str
    kind: str
    detail: str = ""
    event_key: str


class RefundRequestInput(Record):
    cancellation_id: str
    event_key: str


class RefundStepInput(Record):
    cancellation_id: str
    idempotency_key: str
    event_key: str


class RefundFailureInput(Record):
    cancellation_id: str
    idempotency_key: str
    error: str
    attempts: int
    event_key: str
    # The provider refused for good: the refund is dead under its key (stage `declined`).
    final: bool = False


class CouponInput(Record):
    cancellation_id: str
    event_key: str
    # Read the decision again (a sibling may have restored the coupon): decide nothing.
    again: bool = False

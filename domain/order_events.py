"""What the order system tells the ledger after checkout (R13, R14): the event a client posts,
what applying it did, and the signal that tells a waiting request its sub-order has shipped.

Events arrive at least once and in any order. Each has an id (applying it twice has no further
effect) and a time; the state follows cause and effect, not arrival order: captured implies
validated, shipped implies accepted, and a late fact that is already implied changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import model_validator

from domain.errors import CaptureExceedsAuthorisation, LedgerError
from domain.models import (
    CaptureState,
    Identifier,
    MinorUnits,
    PaymentValidation,
    ProviderToken,
    Record,
    Strict,
    SubOrderStatus,
)

# The one sender of `order_shipped` (the order-events service, for the `order-system` key).
ORDER_SYSTEM = "order-system"
# R14: the seller's answer a shipment gives to a request still waiting for it.
SHIPPED_REASON = "shipped"


class CaptureAmountMismatch(CaptureExceedsAuthorisation):
    """`payment_captured` with an amount other than what is left of the authorisation
    (authorised less released, R15): a capture takes all of it. Changes nothing."""

    error_type = "CaptureAmountMismatch"


class NothingToCapture(LedgerError):
    """`payment_captured` when every share was released by a cancellation (R15)."""

    error_type = "NothingToCapture"


class OrderEventType(StrEnum):
    PAYMENT_VALIDATED = "payment_validated"
    PAYMENT_CAPTURED = "payment_captured"  # amount: authorised less released, exactly (R15)
    SELLER_ACCEPTED = "seller_accepted"  # per sub-order: seller_id
    SUB_ORDER_SHIPPED = "sub_order_shipped"  # per sub-order: seller_id

    @property
    def per_sub_order(self) -> bool:
        return self in (OrderEventType.SELLER_ACCEPTED, OrderEventType.SUB_ORDER_SHIPPED)


class OrderEventIn(Strict):
    """Body of POST /v1/orders/{order_id}/events (and of `ordercancel orders event`)."""

    event_id: ProviderToken
    type: OrderEventType
    seller_id: Identifier | None = None
    amount_minor: MinorUnits | None = None
    occurred_at: datetime

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> OrderEventIn:
        if self.type.per_sub_order and self.seller_id is None:
            raise ValueError(f"seller_id: required for {self.type.value}")
        if not self.type.per_sub_order and self.seller_id is not None:
            raise ValueError(f"seller_id: not allowed for {self.type.value} (the whole order)")
        if self.amount_minor is not None and self.type is not OrderEventType.PAYMENT_CAPTURED:
            raise ValueError(f"amount_minor: only payment_captured has one, not {self.type.value}")
        return self


class EventOutcome(StrEnum):
    APPLIED = "applied"  # the state changed
    UNCHANGED = "unchanged"  # already implied by what came before (late or repeated fact)
    # seller_accepted / sub_order_shipped for a sub-order cancelled before: recorded, and the
    # sub-order stays cancelled (nothing is resurrected)
    SUB_ORDER_CANCELLED = "sub_order_cancelled"
    # sub_order_shipped while a request waited for the seller: the request ends rejected (R14)
    REQUEST_REJECTED = "request_rejected"


class SubOrderState(Record):
    seller_id: str
    status: SubOrderStatus
    seller_accepted: bool
    shipped: bool
    cancellation_id: str | None = None


class PaymentState(Record):
    validation: PaymentValidation
    capture: CaptureState
    amount_minor: int
    captured_minor: int
    currency: str


class OrderEventResult(Record):
    """What the event did, and the order's state after it. A redelivery of the same event id
    gets the same answer, with `duplicate: true` (the state is read again)."""

    event_id: str
    order_id: str
    type: OrderEventType
    seller_id: str | None = None
    outcome: EventOutcome
    detail: str
    duplicate: bool = False
    # R14: the request the shipment ended (`request_rejected`), and whether its workflow has been
    # told; for `sub_order_cancelled`, the cancellation that came first (no notification).
    cancellation_id: str | None = None
    workflow_notified: bool | None = None
    payment: PaymentState
    sub_orders: list[SubOrderState]


class OrderAccepted(Record):
    """Answer to POST /v1/orders."""

    order_id: str
    created: bool  # False: the same document was posted before, nothing changed
    payment: PaymentState
    sub_orders: list[SubOrderState]


class OrderShipped(Strict):
    """Payload of signal `order_shipped`: the sub-order shipped while its request waited for the
    seller; the request ends rejected, reason "shipped" (R14). Sent only by the order-events
    service after the ledger recorded the shipment (`sent_by` says so; the workflow refuses any
    other sender)."""

    event_id: ProviderToken
    seller_id: Identifier
    occurred_at: datetime
    sent_by: Literal["order-system"]

"""Messages sent to a cancellation (signals and updates), read defensively.

They arrive as plain JSON from any client (the API, another SDK, the `temporal` CLI), so a
handler never trusts their shape: a malformed one becomes a `DecisionRefused` naming the fields
at fault (R20), never an exception that fails the workflow task and blocks the cancellation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio.exceptions import ApplicationError

from domain import rules
from domain.errors import DecisionRefused, RefusalCode, UndecodablePayload
from domain.models import (
    CancellationPath,
    CancellationStatus,
    MessageRequest,
    OperatorDecision,
    PaymentEvent,
    RefundView,
    RetryRefundRequest,
    SellerDecision,
    WithdrawRequest,
)
from domain.order_events import OrderShipped

M = TypeVar("M", bound=BaseModel)
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # domain.models.Identifier


def one(args: tuple[Any, ...]) -> Any:
    """Handlers take `*args` so that a message with no argument or several (any client, the
    `temporal` CLI with two --input flags) is refused like any malformed payload instead of
    raising TypeError, which would fail every workflow task from then on."""
    if len(args) != 1:
        raise DecisionRefused(
            RefusalCode.INVALID_PAYLOAD,
            f"invalid payload: expected exactly one JSON object, got {len(args)} arguments",
        )
    return args[0]


def parse(model: type[M], payload: Any) -> M:
    """The payload as `model`, or a refusal with the fields at fault (or saying that it was
    not even decodable: infra/converter.py)."""
    if isinstance(payload, UndecodablePayload):
        raise DecisionRefused(
            RefusalCode.INVALID_PAYLOAD,
            rules.safe_text(
                f"invalid payload: not decodable as {payload.encoding}: {payload.error}", 300
            ),
        )
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        # The field names are the client's (an unknown field is named as sent): escaped and
        # bounded, like everything of a refused message that is written down.
        fields = "; ".join(
            f"{rules.safe_text('.'.join(str(p) for p in e['loc']), 80) or 'payload'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        raise DecisionRefused(
            RefusalCode.INVALID_PAYLOAD, rules.safe_text(f"invalid payload: {fields}")
        ) from err


def parse_one(model: type[M], args: tuple[Any, ...]) -> M:
    """The handler's single argument as `model`, or a refusal."""
    return parse(model, one(args))


def claimed(args: tuple[Any, ...], field: str) -> str:
    """Who a refused signal says it comes from, for the audit row: the `field` of its payload
    if it is a well-formed identifier, `?` otherwise (a refusal is recorded even for a payload
    that is garbage, and garbage is never written down as an actor)."""
    payload = args[0] if len(args) == 1 else None
    value = payload.get(field) if isinstance(payload, dict) else None
    return value if isinstance(value, str) and _IDENTIFIER.fullmatch(value) else "?"


def seller_decision(
    payload: Any, *, status: CancellationStatus, seller_id: str, answered: bool
) -> SellerDecision:
    """R3: only the sub-order's seller, only while the request waits, only once. `answered`:
    already decided or withdrawn (a withdrawal accepted earlier in the same task came first)."""
    decision = parse(SellerDecision, payload)
    rules.check_seller_decision(
        status=status,
        expected_seller=seller_id,
        seller_id=decision.seller_id,
        already_decided=answered,
    )
    return decision


def withdrawal(
    payload: Any, *, status: CancellationStatus, buyer_id: str, answered: bool
) -> WithdrawRequest:
    """R5: the buyer who asked withdraws a request that still waits for its answer."""
    request = parse(WithdrawRequest, payload)
    rules.check_withdrawal(status=status, expected_buyer=buyer_id, buyer_id=request.buyer_id)
    if answered:
        raise DecisionRefused(
            RefusalCode.ALREADY_DECIDED, "the request was already decided or withdrawn"
        )
    return request


def message(
    payload: Any,
    *,
    status: CancellationStatus,
    answered: bool,
    buyer_id: str,
    seller_id: str,
    count: int,
) -> MessageRequest:
    """R18: a message from the cancellation's buyer or seller while the request waits for the
    seller; the text as it will be recorded (trimmed)."""
    request = parse(MessageRequest, payload)
    text = rules.check_message(
        status=status,
        answered=answered,
        author=request.author,
        author_id=request.author_id,
        buyer_id=buyer_id,
        seller_id=seller_id,
        text=request.text,
        count=count,
    )
    return request.model_copy(update={"text": text})


OPERATOR_DECIDES = (CancellationStatus.AWAITING_SELLER, CancellationStatus.ESCALATED)


def operator_decision(
    payload: Any, *, status: CancellationStatus, answered: bool
) -> OperatorDecision:
    """R4: an operator decides a request escalated by the seller's silence, once; or one still
    waiting for its seller (a stuck request, issue 20), in the seller's place: whichever of the
    seller and the operator decides first stands."""
    decision = parse(OperatorDecision, payload)
    if status not in OPERATOR_DECIDES or answered:
        raise DecisionRefused(
            RefusalCode.NOT_ESCALATED,
            "only a request escalated or waiting for its seller takes an operator decision"
            f" (status: {status.value})",
        )
    return decision


def retry_request(
    payload: Any, *, status: CancellationStatus, scheduled: bool
) -> RetryRefundRequest:
    """R10: an operator retries a refund parked in refund_failed, once per parking."""
    request = parse(RetryRefundRequest, payload)
    if status is not CancellationStatus.REFUND_FAILED or scheduled:
        raise DecisionRefused(
            RefusalCode.NOT_REFUND_FAILED,
            f"only a cancellation in refund_failed can be retried (status: {status.value})",
        )
    return request


def payment_event(payload: Any, refund: RefundView | None) -> PaymentEvent:
    """R7: the provider's webhook, for this cancellation's refund (by reference or key)."""
    event = parse(PaymentEvent, payload)
    ours = refund is not None and (
        (event.provider_ref is not None and event.provider_ref == refund.provider_ref)
        or (event.refund_key is not None and event.refund_key == refund.idempotency_key)
    )
    if not ours:
        raise DecisionRefused(
            RefusalCode.UNKNOWN_REFUND,
            f"event {event.event_id} names no refund of this cancellation",
        )
    return event


# A shipment ends a request that has not been answered yet: opening (the ledger has it waiting
# already), waiting for the seller, or escalated.
SHIPMENT_ENDS = (
    CancellationStatus.OPENING,
    CancellationStatus.AWAITING_SELLER,
    CancellationStatus.ESCALATED,
)


def order_shipped(
    payload: Any, *, status: CancellationStatus, seller_id: str, path: CancellationPath | None
) -> OrderShipped:
    """R14: the order-events service tells a request waiting for its seller that the sub-order
    shipped. `sent_by` must name that service (issue 18: not a door for anyone else), the
    seller must be this sub-order's, and the request must still wait for an answer."""
    shipped = parse(OrderShipped, payload)
    if shipped.seller_id != seller_id:
        raise DecisionRefused(
            RefusalCode.WRONG_SELLER,
            f"seller {shipped.seller_id} did not receive this sub-order ({seller_id} did)",
        )
    if path is not CancellationPath.REQUEST or status not in SHIPMENT_ENDS:
        raise DecisionRefused(
            RefusalCode.NOT_PENDING,
            f"only a request waiting for its seller ends when it ships (status: {status.value})",
        )
    return shipped


def refuse_unless(check: Callable[[Any], object], args: tuple[Any, ...]) -> None:
    """An update validator: the caller gets the refusal's code as the failure type."""
    try:
        check(one(args))
    except DecisionRefused as err:
        raise ApplicationError(err.message, type=err.code.value, non_retryable=True) from None

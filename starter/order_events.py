"""The order system's events, applied to the ledger and told to the cancellation they end (R13,
R14). Used by the API (`POST /v1/orders/{order_id}/events`) and the CLI (`ordercancel orders
event`).

The ledger is the truth and is written first, in one transaction (ledger.order_events). A
shipment that ends a request waiting for its seller is then told to that request's workflow at
once, by signal `order_shipped`; the ledger records when it was told. If telling it fails, the
caller gets `NotTold` (the API answers 503) and a redelivery of the same event id tells it again:
the ledger part is not repeated, and the workflow ignores an event it was already told.

An event the ledger refuses raises `OrderRefused`, with the one code (and HTTP status) the API
answers and the CLI prints for it.
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client
from temporalio.service import RPCError

from domain.errors import (
    CaptureExceedsAuthorisation,
    LedgerError,
    OrderConflict,
    OrderEventConflict,
    OrderNotFound,
    SubOrderNotFound,
)
from domain.order_events import (
    ORDER_SYSTEM,
    CaptureAmountMismatch,
    EventOutcome,
    NothingToCapture,
    OrderEventIn,
    OrderEventResult,
    OrderShipped,
)
from ledger.order_events import apply_order_event, mark_notified
from workflows.order_cancellation import OrderCancellation

__all__ = ["REFUSALS", "NotTold", "OrderRefused", "deliver_order_event", "refusal_of"]

# What the ledger refuses about an order or its events, as the API's status and code (and the
# CLI's `error: <code>: ...`). The first matching class wins: subclasses first.
REFUSALS: tuple[tuple[type[LedgerError], int, str], ...] = (
    (OrderNotFound, 404, "order_not_found"),
    (SubOrderNotFound, 404, "sub_order_not_found"),
    (OrderEventConflict, 409, "event_conflict"),
    (OrderConflict, 409, "order_conflict"),
    (CaptureAmountMismatch, 422, "capture_amount_mismatch"),
    (CaptureExceedsAuthorisation, 422, "amount_exceeds_authorisation"),
    (NothingToCapture, 422, "nothing_to_capture"),
)


class OrderRefused(LedgerError):
    """The ledger refused an order or an event; nothing was written."""

    error_type = "OrderRefused"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def refusal_of(err: LedgerError) -> OrderRefused | None:
    """The refusal `err` is (see REFUSALS), or None when it is no refusal of an order's."""
    if isinstance(err, OrderRefused):
        return err
    for kind, status, code in REFUSALS:
        if isinstance(err, kind):
            return OrderRefused(status, code, str(err))
    return None


class NotTold(Exception):
    """The event is in the ledger, but the workflow it concerns could not be told yet."""

    def __init__(self, result: OrderEventResult, reason: str) -> None:
        super().__init__(
            f"event {result.event_id} is recorded ({result.detail}), but cancellation"
            f" {result.cancellation_id} could not be told ({reason}); deliver the same event"
            " again"
        )
        self.result = result


async def deliver_order_event(
    client: Client, pool: asyncpg.Pool, order_id: str, event: OrderEventIn
) -> OrderEventResult:
    """Apply the event (once), then tell the request it ends, if any and not told yet. A refused
    event raises `OrderRefused`."""
    try:
        result = await apply_order_event(pool, order_id, event)
    except LedgerError as err:
        refused = refusal_of(err)
        if refused is None:
            raise
        raise refused from err
    if (
        result.outcome is not EventOutcome.REQUEST_REJECTED
        or result.cancellation_id is None
        or result.workflow_notified
    ):
        return result
    assert event.seller_id is not None  # a shipment names its sub-order
    shipped = OrderShipped(
        event_id=event.event_id,
        seller_id=event.seller_id,
        occurred_at=event.occurred_at,
        sent_by=ORDER_SYSTEM,
    )
    try:
        await client.get_workflow_handle(result.cancellation_id).signal(
            OrderCancellation.order_shipped, shipped
        )
    except RPCError as err:
        raise NotTold(
            result, f"{err.status.name if err.status else 'error'}: {err.message}"
        ) from err
    await mark_notified(pool, event.event_id)
    return result.model_copy(update={"workflow_notified": True})

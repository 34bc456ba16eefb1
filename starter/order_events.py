"""The order system's events, applied to the ledger and told to the cancellation they end (R13,
R14). Used by the API (`POST /v1/orders/{order_id}/events`) and the CLI (`ordercancel orders
event`).

The ledger is the truth and is written first, in one transaction (ledger.order_events). A
shipment that ends a request waiting for its seller is then told to that request's workflow at
once, by signal `order_shipped`; the ledger records when it was told. If telling it fails, the
caller gets `NotTold` (the API answers 503) and a redelivery of the same event id tells it again:
the ledger part is not repeated, and the workflow ignores an event it was already told.
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client
from temporalio.service import RPCError

from domain.order_events import ORDER_SYSTEM, OrderEventIn, OrderEventResult, OrderShipped
from ledger.order_events import apply_order_event, mark_notified
from workflows.order_cancellation import OrderCancellation

__all__ = ["NotTold", "deliver_order_event"]


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
    """Apply the event (once), then tell the request it ends, if any and not told yet."""
    result = await apply_order_event(pool, order_id, event)
    if result.cancellation_id is None or result.workflow_notified:
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

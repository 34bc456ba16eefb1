"""Stripe's webhook events, as Stripe sends them, onto the product's payment events.

The route (`POST /v1/providers/stripe/webhook`) has verified the `Stripe-Signature` with the
Stripe SDK before anything here runs. Each Stripe event that matters becomes one
`PaymentEvent` per refund it reports (the event id is Stripe's, or `<evt id>:<refund id>` when a
charge reports several refunds), forwarded like any provider's (`starter.payment_events`): so
a redelivered event is answered from the ledger, once, by its id. Other types are acknowledged
and ignored (Stripe stops retrying on a 2xx).

* `refund.created` / `refund.updated` with status `succeeded`: `refund_confirmed`;
* `refund.updated` with status `failed` / `canceled`, `refund.failed`: `refund_failed`, or
  `refund_reversed` when the ledger has that refund confirmed (R7);
* `charge.refunded`: `refund_confirmed` for each refund of ours listed on the charge;
* `payment_intent.canceled`: `refund_confirmed` of the void (its reference is the intent);
* `payment_intent.succeeded` (captured): `refund_failed` / `refund_reversed` of a void recorded
  on that intent, whose money was taken after all.

Each only wakes the workflow, which asks Stripe itself (a stale event changes nothing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from temporalio.client import Client

from domain.models import PaymentEvent, PaymentEventType, Record, RefundStage
from infra.settings import TASK_QUEUE
from ledger.repository import Ledger
from starter.payment_events import ForwardResult, forward_payment_event

# Our idempotency key in a Stripe object's metadata (payments.stripe_provider.METADATA_KEY;
# starter does not import the adapter).
METADATA_KEY = "refund_id"

HANDLED_TYPES = (
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refunded",
    "payment_intent.canceled",
    "payment_intent.succeeded",
)


class StripeWebhookResult(Record):
    """What was done with one Stripe event: `handled` false for a type that is ignored."""

    stripe_event_id: str
    type: str
    handled: bool
    forwarded: list[ForwardResult] = Field(default_factory=list)


async def forward_stripe_event(
    client: Client, ledger: Ledger, event: dict[str, Any], *, task_queue: str = TASK_QUEUE
) -> StripeWebhookResult:
    """`event`: the verified Stripe Event, as a plain dict."""
    event_id = str(event.get("id") or "")
    kind = str(event.get("type") or "")
    obj = (event.get("data") or {}).get("object") or {}
    if kind not in HANDLED_TYPES or not isinstance(obj, dict):
        return StripeWebhookResult(stripe_event_id=event_id, type=kind, handled=False)
    occurred_at = _created(event)
    mapped = [
        PaymentEvent(
            event_id=mapped_id,
            type=await _failure_kind(ledger, ref, key) if kind_ is None else kind_,
            provider_ref=ref,
            refund_key=key,
            failure_code=failure,
            occurred_at=occurred_at,
        )
        for mapped_id, kind_, ref, key, failure in _mapped(event_id, kind, obj)
    ]
    forwarded = [
        await forward_payment_event(client, ledger, one, task_queue=task_queue) for one in mapped
    ]
    return StripeWebhookResult(
        stripe_event_id=event_id, type=kind, handled=True, forwarded=forwarded
    )


# (product event id, type or None for "a failure, reversal if confirmed", provider ref, our
# key, failure code)
_Mapped = tuple[str, PaymentEventType | None, str | None, str | None, str | None]


def _mapped(event_id: str, kind: str, obj: dict[str, Any]) -> list[_Mapped]:
    key = _metadata_key(obj)
    if kind.startswith("refund."):
        status = obj.get("status")
        if kind == "refund.failed" or status in ("failed", "canceled"):
            failure = obj.get("failure_reason") or status or "failed"
            return [(event_id, None, obj.get("id"), key, str(failure))]
        if status == "succeeded":
            return [(event_id, PaymentEventType.REFUND_CONFIRMED, obj.get("id"), key, None)]
        return []
    if kind == "charge.refunded":
        refunds = (obj.get("refunds") or {}).get("data") or []
        return [
            (
                f"{event_id}:{refund.get('id')}",
                PaymentEventType.REFUND_CONFIRMED,
                refund.get("id"),
                _metadata_key(refund),
                None,
            )
            for refund in refunds
            if isinstance(refund, dict)
            and refund.get("status") == "succeeded"
            and _metadata_key(refund) is not None
        ]
    if kind == "payment_intent.canceled":
        return [(event_id, PaymentEventType.REFUND_CONFIRMED, obj.get("id"), key, None)]
    # payment_intent.succeeded: captured. Only news for a void of ours on this intent.
    return [(event_id, None, obj.get("id"), key, "payment_intent_captured")]


async def _failure_kind(
    ledger: Ledger, provider_ref: str | None, refund_key: str | None
) -> PaymentEventType:
    """A failure of a refund the ledger has confirmed is a reversal (R7); before, a failure."""
    owner = await ledger.find_refund_owner(provider_ref=provider_ref, refund_key=refund_key)
    if owner is None:
        return PaymentEventType.REFUND_FAILED
    record = await ledger.get_refund(cancellation_id=owner)
    if record.view.stage is RefundStage.CONFIRMED:
        return PaymentEventType.REFUND_REVERSED
    return PaymentEventType.REFUND_FAILED


def _metadata_key(obj: dict[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get(METADATA_KEY)
    return value if isinstance(value, str) and value else None


def _created(event: dict[str, Any]) -> datetime | None:
    created = event.get("created")
    return datetime.fromtimestamp(created, UTC) if isinstance(created, int) else None

"""R13/R14 in the ledger: orders posted one by one and the order system's events, on the real
PostgreSQL. Idempotent by id, causal whatever the arrival order, nothing half-applied, and an
event racing an instant cancellation of the same sub-order (R1): exactly one wins."""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.orders import one_seller_order

from api.keys import KeyStore, Principal, Role
from devstack.demo import DEMO_FILE
from devstack.dev_api import DEV_PRINCIPALS, dev_credentials
from domain.errors import (
    CaptureExceedsAuthorisation,
    OrderConflict,
    OrderEventConflict,
    OrderNotFound,
    SubOrderAlreadyShipped,
    SubOrderNotFound,
)
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CaptureState,
    PaymentValidation,
    RequestCancellationInput,
    SubOrderStatus,
)
from domain.order_events import (
    CaptureAmountMismatch,
    EventOutcome,
    OrderEventIn,
    OrderEventType,
)
from domain.orders import CheckoutOrderIn
from domain.rules import cancellation_id
from ledger.order_events import apply_order_event, post_order
from ledger.repository import Ledger

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


def order(order_id: str, *sellers: str, validated: bool = False) -> CheckoutOrderIn:
    """An order of `sellers` (default one, S-7) by buyer B-1: unvalidated and only authorised
    (the instant path) unless `validated`."""
    document: dict[str, Any] = one_seller_order(
        order_id, buyer_id="B-1", seller_id="S-7", validated=validated
    )
    template = document["sub_orders"][0]
    document["sub_orders"] = [{**template, "seller_id": s} for s in (sellers or ("S-7",))]
    return CheckoutOrderIn.model_validate(document)


def event(
    event_id: str,
    type_: OrderEventType,
    *,
    seller_id: str | None = None,
    amount_minor: int | None = None,
    minutes: int = 0,
) -> OrderEventIn:
    return OrderEventIn(
        event_id=event_id,
        type=type_,
        seller_id=seller_id,
        amount_minor=amount_minor,
        occurred_at=T0 + timedelta(minutes=minutes),
    )


def cancel(order_id: str, seller_id: str = "S-7") -> RequestCancellationInput:
    return RequestCancellationInput(
        order_id=order_id,
        seller_id=seller_id,
        buyer_id="B-1",
        reason=CancellationReason.ORDERED_BY_MISTAKE,
    )


async def sub_status(pool: asyncpg.Pool, order_id: str, seller_id: str = "S-7") -> str:
    status: str = await pool.fetchval(
        "SELECT status FROM sub_orders WHERE order_id = $1 AND seller_id = $2", order_id, seller_id
    )
    return status


async def test_an_order_posted_twice_is_one_order_and_another_document_is_refused(
    pool: asyncpg.Pool,
) -> None:
    first = await post_order(pool, order("O-P1"))
    again = await post_order(pool, order("O-P1"))

    assert first.created and not again.created
    assert first.payment == again.payment
    assert first.payment.validation is PaymentValidation.UNVALIDATED
    assert [s.status for s in first.sub_orders] == [SubOrderStatus.UNVALIDATED]
    with pytest.raises(OrderConflict):
        await post_order(pool, order("O-P1", "S-7", "S-8"))
    assert await pool.fetchval("SELECT count(*) FROM sub_orders WHERE order_id = 'O-P1'") == 1


async def test_payment_validated_takes_the_order_off_the_instant_path(pool: asyncpg.Pool) -> None:
    await post_order(pool, order("O-V1", "S-7", "S-8"))

    result = await apply_order_event(pool, "O-V1", event("E-V1", OrderEventType.PAYMENT_VALIDATED))

    assert result.outcome is EventOutcome.APPLIED
    assert result.payment.validation is PaymentValidation.VALIDATED
    assert result.payment.capture is CaptureState.AUTHORIZED
    assert [s.status for s in result.sub_orders] == [SubOrderStatus.ACCEPTED] * 2
    opened = await Ledger(pool).open_cancellation(
        cancellation_id=cancellation_id("O-V1", "S-8"), request=cancel("O-V1", "S-8")
    )
    assert opened.path is CancellationPath.REQUEST


async def test_an_event_delivered_again_is_answered_the_same_and_changes_nothing(
    pool: asyncpg.Pool,
) -> None:
    await post_order(pool, order("O-D1"))
    captured = event("E-D1", OrderEventType.PAYMENT_CAPTURED, amount_minor=2800)
    first = await apply_order_event(pool, "O-D1", captured)
    again = await apply_order_event(pool, "O-D1", captured)

    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.model_dump(exclude={"duplicate"}) == first.model_dump(exclude={"duplicate"})
    assert await pool.fetchval("SELECT count(*) FROM order_events WHERE order_id = 'O-D1'") == 1

    # The same id with another document is another event under a used id: refused.
    with pytest.raises(OrderEventConflict):
        await apply_order_event(
            pool, "O-D1", event("E-D1", OrderEventType.PAYMENT_CAPTURED, amount_minor=999)
        )
    assert await pool.fetchval("SELECT captured_minor FROM payments WHERE order_id = 'O-D1'") == (
        2800
    )


async def test_causal_order_whatever_the_arrival_order(pool: asyncpg.Pool) -> None:
    """R13: captured implies validated, shipped implies accepted; a late fact already implied
    changes nothing."""
    await post_order(pool, order("O-C1", "S-7", "S-8"))

    captured = await apply_order_event(
        pool, "O-C1", event("E-C1", OrderEventType.PAYMENT_CAPTURED, minutes=5)
    )
    late = await apply_order_event(
        pool, "O-C1", event("E-C2", OrderEventType.PAYMENT_VALIDATED, minutes=1)
    )
    shipped = await apply_order_event(
        pool, "O-C1", event("E-C3", OrderEventType.SUB_ORDER_SHIPPED, seller_id="S-7", minutes=9)
    )
    accepted_late = await apply_order_event(
        pool, "O-C1", event("E-C4", OrderEventType.SELLER_ACCEPTED, seller_id="S-7", minutes=2)
    )

    assert captured.outcome is EventOutcome.APPLIED
    assert captured.payment.validation is PaymentValidation.VALIDATED
    assert captured.payment.capture is CaptureState.CAPTURED
    # Default capture: all that was authorised.
    assert captured.payment.captured_minor == captured.payment.amount_minor
    assert late.outcome is EventOutcome.UNCHANGED
    assert late.payment == captured.payment
    assert shipped.outcome is EventOutcome.APPLIED
    s7 = next(s for s in shipped.sub_orders if s.seller_id == "S-7")
    assert (s7.shipped, s7.seller_accepted) == (True, True)
    assert accepted_late.outcome is EventOutcome.UNCHANGED
    # All four are kept, with when they happened and when they arrived.
    rows = await pool.fetch(
        "SELECT type, occurred_at, received_at FROM order_events WHERE order_id = 'O-C1'"
        " ORDER BY occurred_at"
    )
    assert [r["type"] for r in rows] == [
        "payment_validated",
        "seller_accepted",
        "payment_captured",
        "sub_order_shipped",
    ]
    assert all(r["received_at"] is not None for r in rows)


async def test_bad_events_are_refused_and_write_nothing(pool: asyncpg.Pool) -> None:
    await post_order(pool, order("O-B1"))

    with pytest.raises(OrderNotFound):
        await apply_order_event(pool, "O-NONE", event("E-B1", OrderEventType.PAYMENT_VALIDATED))
    with pytest.raises(SubOrderNotFound):
        await apply_order_event(
            pool, "O-B1", event("E-B2", OrderEventType.SELLER_ACCEPTED, seller_id="S-99")
        )
    with pytest.raises(CaptureExceedsAuthorisation):
        await apply_order_event(
            pool, "O-B1", event("E-B3", OrderEventType.PAYMENT_CAPTURED, amount_minor=10**9)
        )

    # R15: a capture takes all that is left of the authorisation (2800 here); less, or 0,
    # would leave a share neither captured nor released.
    for amount in (1000, 0):
        with pytest.raises(CaptureAmountMismatch, match="authorised 2800, released 0, capturable"):
            await apply_order_event(
                pool,
                "O-B1",
                event(f"E-B4-{amount}", OrderEventType.PAYMENT_CAPTURED, amount_minor=amount),
            )

    assert await pool.fetchval("SELECT count(*) FROM order_events") == 0
    row = await pool.fetchrow("SELECT validation, capture, captured_minor FROM payments")
    assert dict(row) == {"validation": "unvalidated", "capture": "authorized", "captured_minor": 0}
    assert await sub_status(pool, "O-B1") == "unvalidated"


def test_the_fields_of_an_event_follow_its_type() -> None:
    with pytest.raises(ValueError, match="seller_id: required"):
        event("E-F1", OrderEventType.SUB_ORDER_SHIPPED)
    with pytest.raises(ValueError, match="seller_id: not allowed"):
        event("E-F2", OrderEventType.PAYMENT_VALIDATED, seller_id="S-7")
    with pytest.raises(ValueError, match="amount_minor: only payment_captured"):
        event("E-F3", OrderEventType.SELLER_ACCEPTED, seller_id="S-7", amount_minor=1)


async def test_a_shipped_sub_order_cannot_be_cancelled(pool: asyncpg.Pool) -> None:
    """R14: the opening itself refuses it (whatever checks the API made before)."""
    await post_order(pool, order("O-S1", validated=True))
    await apply_order_event(
        pool, "O-S1", event("E-S1", OrderEventType.SUB_ORDER_SHIPPED, seller_id="S-7")
    )

    with pytest.raises(SubOrderAlreadyShipped):
        await Ledger(pool).open_cancellation(
            cancellation_id=cancellation_id("O-S1", "S-7"), request=cancel("O-S1")
        )
    assert await pool.fetchval("SELECT count(*) FROM cancellations") == 0


async def test_shipment_of_a_waiting_request_names_the_request(pool: asyncpg.Pool) -> None:
    await post_order(pool, order("O-W1", validated=True))
    cid = cancellation_id("O-W1", "S-7")
    await Ledger(pool).open_cancellation(cancellation_id=cid, request=cancel("O-W1"))

    shipped = await apply_order_event(
        pool, "O-W1", event("E-W1", OrderEventType.SUB_ORDER_SHIPPED, seller_id="S-7")
    )

    assert shipped.outcome is EventOutcome.REQUEST_REJECTED
    assert (shipped.cancellation_id, shipped.workflow_notified) == (cid, False)


@pytest.mark.parametrize(
    "kind", [OrderEventType.PAYMENT_VALIDATED, OrderEventType.SELLER_ACCEPTED], ids=str
)
async def test_an_event_racing_an_instant_cancellation_exactly_one_wins(
    pool: asyncpg.Pool, kind: OrderEventType
) -> None:
    """R1: the cancellation takes the instant path on the state before the event, or the
    request path on the state after it; the event is applied either way, and an acceptance
    that comes second is recorded without resurrecting the cancelled sub-order."""
    rounds = 50
    ledger = Ledger(pool)
    orders = [f"RACE-{kind.value}-{n}" for n in range(rounds)]
    for order_id in orders:
        await post_order(pool, order(order_id))
    wins = {"cancellation": 0, "event": 0}
    for n, order_id in enumerate(orders):
        cid = cancellation_id(order_id, "S-7")
        opening = ledger.open_cancellation(cancellation_id=cid, request=cancel(order_id))
        news = apply_order_event(
            pool,
            order_id,
            event(
                f"E-{order_id}",
                kind,
                seller_id="S-7" if kind is OrderEventType.SELLER_ACCEPTED else None,
            ),
        )
        if n % 2:
            opened, applied = await asyncio.gather(opening, news)
        else:
            applied, opened = await asyncio.gather(news, opening)

        status = await sub_status(pool, order_id)
        recorded = await pool.fetchval(
            "SELECT count(*) FROM order_events WHERE order_id = $1", order_id
        )
        assert recorded == 1, f"round {n}: the event is recorded either way"
        if opened.path is CancellationPath.INSTANT:
            wins["cancellation"] += 1
            assert status == "cancelled", f"round {n}"
            assert opened.status is CancellationStatus.APPROVED
            expected = (
                EventOutcome.APPLIED  # the payment is validated all the same
                if kind is OrderEventType.PAYMENT_VALIDATED
                else EventOutcome.SUB_ORDER_CANCELLED
            )
            assert applied.outcome is expected, f"round {n}: {applied.detail}"
            assert "cancelled" in applied.detail
        else:
            wins["event"] += 1
            assert opened.path is CancellationPath.REQUEST
            assert opened.status is CancellationStatus.AWAITING_SELLER
            assert status == "accepted", f"round {n}"
            assert applied.outcome is EventOutcome.APPLIED, f"round {n}: {applied.detail}"
            assert "waits for the seller" in applied.detail
    # Both sides won some rounds, so both orders of commit were checked.
    assert wins["cancellation"] > 0 and wins["event"] > 0, wins


def test_a_dev_keys_file_made_before_the_order_system_gets_its_key(tmp_path: Path) -> None:
    """`.data/dev-api-keys.json` made by an earlier `make run` keeps its keys and gains the
    order-system's, still private."""
    made = dev_credentials(tmp_path)
    document = json.loads(made.path.read_text())
    del document["keys"]["order-system"]
    made.path.write_text(json.dumps(document))

    upgraded = dev_credentials(tmp_path)

    assert set(upgraded.keys) == set(DEV_PRINCIPALS)
    assert {p: k for p, k in upgraded.keys.items() if p != "order-system"} == document["keys"]
    assert upgraded.webhook_secret == made.webhook_secret
    assert stat.S_IMODE(upgraded.path.stat().st_mode) == 0o600
    assert dev_credentials(tmp_path) == upgraded
    store = KeyStore.from_keys(upgraded.keys)
    assert store.authenticate(upgraded.keys["order-system"]) == Principal(Role.ORDER_SYSTEM)


@pytest.mark.parametrize("name", ["order-by-api.json", "order-by-events.json"])
async def test_the_posted_demo_orders_are_orders_as_posted(pool: asyncpg.Pool, name: str) -> None:
    """The README's `POST /v1/orders` body and the demo's posted order: valid, unvalidated, so
    a payment_validated event is what puts them on the request path."""
    document = (Path(DEMO_FILE).parent / name).read_text()
    posted = await post_order(pool, CheckoutOrderIn.model_validate_json(document))
    assert posted.created
    assert posted.payment.validation is PaymentValidation.UNVALIDATED
    assert {s.status for s in posted.sub_orders} == {SubOrderStatus.UNVALIDATED}

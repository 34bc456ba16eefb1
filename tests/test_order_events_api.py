"""R13/R14 through the API and the CLI, over a real Temporal dev server, a real PostgreSQL and the
product's worker: an order posted by the order system, its payment validated by an event, a
cancellation that therefore waits for the seller, and a shipment that ends it rejected. Every
response is checked against the app's OpenAPI document."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from helpers.api import Api, request_body
from helpers.openapi import check_every_response
from helpers.orders import one_seller_order, unique
from helpers.stacks import api_stack, run_command
from helpers.wait import eventually
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.service import CancellationService
from cli.cancellations import _failure as failure_line
from domain.models import CancellationStatus
from domain.rules import cancellation_id as workflow_id_of
from infra.settings import Settings
from ledger.repository import Ledger
from starter.requests import start_cancellation

pytestmark = pytest.mark.e2e

SECRET = "whsec_test_" + "o" * 32
SELLER = "S-61"
BUYER = "B-610"
PRINCIPALS = ("order-system", "buyer-service", f"seller:{SELLER}", "sre", "payment-provider")
ORDERCANCEL = str(Path(sys.executable).with_name("ordercancel"))


async def request_cancellation(api: Api, order_id: str) -> httpx.Response:
    """BUYER's request to cancel SELLER's sub-order, through the API."""
    body = request_body(order_id, SELLER, BUYER, reason="ordered_by_mistake")
    return await api.call("POST", "/v1/cancellations", "buyer-service", json=body)


@pytest.fixture(scope="module")
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    settings = Settings(
        task_queue=f"orders-{uuid.uuid4().hex[:8]}",
        api_instant_wait=timedelta(seconds=10),
        # The seller's window outlasts every test here: only the shipment ends a request.
        seller_response_window=timedelta(hours=48),
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=PRINCIPALS,
        webhook_secret=SECRET,
    ) as stack:
        check_every_response(stack.http, stack.app.openapi())
        yield Api(stack, settings)


def unvalidated_order() -> dict[str, Any]:
    return one_seller_order(unique("O"), buyer_id=BUYER, seller_id=SELLER, validated=False)


async def test_an_order_arrives_by_api_once(api: Api) -> None:
    document = unvalidated_order()

    first = await api.post_order(document)
    again = await api.post_order(document)
    other = await api.post_order({**document, "buyer_id": "B-999"})
    as_buyer = await api.call("POST", "/v1/orders", "buyer-service", json=document)

    assert first.status_code == 200, first.text
    assert first.json()["created"] is True
    assert again.status_code == 200
    assert again.json() == {**first.json(), "created": False}
    assert (other.status_code, other.json()["code"]) == (409, "order_conflict")
    assert (as_buyer.status_code, as_buyer.json()["code"]) == (403, "forbidden")
    buyer = await api.stack.pool.fetchval(
        "SELECT buyer_id FROM checkout_orders WHERE order_id = $1", document["order_id"]
    )
    assert buyer == BUYER


async def test_bad_events_get_a_code_and_change_nothing(api: Api) -> None:
    document = unvalidated_order()
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200

    unknown_order = await api.event("O-NOPE", type="payment_validated")
    unknown_sub = await api.event(order_id, type="seller_accepted", seller_id="S-NOPE")
    no_seller = await api.event(order_id, type="sub_order_shipped")
    too_much = await api.event(order_id, type="payment_captured", amount_minor=10**9)
    as_seller = await api.call(
        "POST",
        f"/v1/orders/{order_id}/events",
        f"seller:{SELLER}",
        json={"event_id": "E-x", "type": "payment_validated", "occurred_at": "2026-05-01T12:00Z"},
    )

    assert (unknown_order.status_code, unknown_order.json()["code"]) == (404, "order_not_found")
    assert (unknown_sub.status_code, unknown_sub.json()["code"]) == (404, "sub_order_not_found")
    assert (no_seller.status_code, no_seller.json()["code"]) == (422, "invalid_payload")
    assert (too_much.status_code, too_much.json()["code"]) == (
        422,
        "amount_exceeds_authorisation",
    )
    assert (as_seller.status_code, as_seller.json()["code"]) == (403, "forbidden")
    assert (
        await api.stack.pool.fetchval(
            "SELECT count(*) FROM order_events WHERE order_id = $1", order_id
        )
        == 0
    )

    # The same event again is the same answer; another document under its id is refused.
    first = await api.event(order_id, event_id="E-dup-" + order_id, type="payment_validated")
    again = await api.event(order_id, event_id="E-dup-" + order_id, type="payment_validated")
    other = await api.event(
        order_id, event_id="E-dup-" + order_id, type="payment_captured", amount_minor=1
    )
    assert first.status_code == again.status_code == 200
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert (other.status_code, other.json()["code"]) == (409, "event_conflict")
    assert (
        await api.stack.pool.fetchval("SELECT capture FROM payments WHERE order_id = $1", order_id)
        == "authorized"
    )


async def test_validated_by_an_event_a_request_waits_and_a_shipment_rejects_it(api: Api) -> None:
    """R13 then R14 on the real stack: no refund, the audit says shipped, and a new request for
    the shipped sub-order is refused."""
    document = unvalidated_order()
    order_id = document["order_id"]
    cancellation_id = workflow_id_of(order_id, SELLER)
    assert (await api.post_order(document)).status_code == 200

    validated = await api.event(order_id, type="payment_validated")
    assert validated.status_code == 200, validated.text
    assert validated.json()["outcome"] == "applied"

    requested = await request_cancellation(api, order_id)
    assert requested.status_code == 202, requested.text
    assert (requested.json()["path"], requested.json()["status"]) == ("request", "awaiting_seller")

    shipped = await api.event(order_id, type="sub_order_shipped", seller_id=SELLER)
    assert shipped.status_code == 200, shipped.text
    body = shipped.json()
    assert (body["outcome"], body["cancellation_id"], body["workflow_notified"]) == (
        "request_rejected",
        cancellation_id,
        True,
    )

    async def rejected() -> dict[str, Any]:
        view = await api.view(cancellation_id)
        assert view["status"] == "rejected", view["status"]
        assert not view["running"]
        return view

    view = await eventually(rejected)
    assert view["refund"] is None
    assert ("order-system", "rejected", "shipped") in [
        (e["actor"], e["kind"], e["detail"]) for e in view["audit"]
    ]
    assert (
        await api.stack.pool.fetchval(
            "SELECT count(*) FROM refunds WHERE cancellation_id = $1", cancellation_id
        )
        == 0
    )
    assert (
        await api.stack.pool.fetchval("SELECT status FROM sub_orders WHERE order_id = $1", order_id)
        == "accepted"
    )

    # R14: the sub-order has shipped; a request for it now is refused (here: a sibling order's
    # sub-order, shipped before anyone asked).
    other = unvalidated_order()
    assert (await api.post_order(other)).status_code == 200
    await api.event(other["order_id"], type="sub_order_shipped", seller_id=SELLER)
    refused = await request_cancellation(api, other["order_id"])
    assert (refused.status_code, refused.json()["code"]) == (409, "already_shipped")


async def test_a_shipment_the_workflow_could_not_hear_is_told_again_on_redelivery(
    api: Api,
) -> None:
    """The ledger has the request waiting but its workflow is not there yet (the failure is
    Temporal's answer): 503, the event is kept; delivered again once the workflow runs, the
    same event id tells it, and it ends rejected."""
    document = one_seller_order(unique("O"), buyer_id=BUYER, seller_id=SELLER, validated=True)
    order_id = document["order_id"]
    cancellation_id = workflow_id_of(order_id, SELLER)
    assert (await api.post_order(document)).status_code == 200
    ledger = Ledger(api.stack.pool)
    from domain.models import CancellationReason, RequestCancellationInput

    request = RequestCancellationInput(
        order_id=order_id, seller_id=SELLER, buyer_id=BUYER, reason=CancellationReason.OUT_OF_STOCK
    )
    await ledger.open_cancellation(cancellation_id=cancellation_id, request=request)

    shipment = {"event_id": unique("E-ship"), "type": "sub_order_shipped", "seller_id": SELLER}
    unheard = await api.event(order_id, **shipment)
    assert (unheard.status_code, unheard.json()["code"]) == (503, "workflow_unavailable")
    assert await api.stack.pool.fetchval(
        "SELECT notified_at IS NULL FROM order_events WHERE event_id = $1", shipment["event_id"]
    )

    handle = await start_cancellation(api.stack.client, request, task_queue=api.settings.task_queue)
    told = await api.event(order_id, **shipment)
    assert told.status_code == 200, told.text
    assert (told.json()["duplicate"], told.json()["workflow_notified"]) == (True, True)
    result = await handle.result()
    assert result.status is CancellationStatus.REJECTED
    assert result.refund is None


async def test_the_cli_sends_an_event_and_exits_non_zero_on_a_refusal(
    api: Api, temporal_address: str, e2e_database_url: str
) -> None:
    document = unvalidated_order()
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    env = {
        "DATABASE_URL": e2e_database_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "ORDERCANCEL_TASK_QUEUE": api.settings.task_queue,
    }

    accepted = ("orders", "event", order_id, "seller_accepted", "--seller", SELLER)
    same = ("--event-id", f"E-cli-{order_id}", "--at", "2026-11-20T10:05:00Z")
    ran = await run_command(ORDERCANCEL, *accepted, *same, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "applied" in ran.stdout
    again = await run_command(ORDERCANCEL, *accepted, *same, env=env)
    assert again.returncode == 0, again.stderr
    assert "(delivered before)" in again.stdout
    other_time = await run_command(
        ORDERCANCEL, *accepted, "--event-id", f"E-cli-{order_id}", "--at", "2026-11-21", env=env
    )
    assert other_time.returncode == 1
    assert "error: event_conflict: " in other_time.stderr
    assert "already recorded with another document" in other_time.stderr
    unknown = await run_command(
        ORDERCANCEL, "orders", "event", order_id, "sub_order_shipped", "--seller", "S-X", env=env
    )
    assert unknown.returncode == 1
    assert "error: sub_order_not_found: order" in unknown.stderr
    assert "no sub-order of seller S-X" in unknown.stderr
    no_order = await run_command(
        ORDERCANCEL, "orders", "event", "O-NOPE", "payment_validated", env=env
    )
    assert (no_order.returncode, no_order.stderr.strip()) == (
        1,
        "error: order_not_found: no order O-NOPE",
    )
    partial = await run_command(
        ORDERCANCEL, "orders", "event", order_id, "payment_captured", "--amount", "1000", env=env
    )
    assert partial.returncode == 1
    assert "error: capture_amount_mismatch: amount_minor 1000" in partial.stderr
    assert (
        await api.stack.pool.fetchval("SELECT capture FROM payments WHERE order_id = $1", order_id)
        == "authorized"
    )

    # `request` refuses as the API does (404 sub_order_not_found), before any workflow exists.
    def request(order: str, buyer: str) -> tuple[str, ...]:
        return (
            ORDERCANCEL,
            "request",
            order,
            SELLER,
            "--buyer",
            buyer,
            "--reason",
            "ordered_by_mistake",
        )

    for order, buyer in ((order_id, "B-WRONG"), ("O-NOPE", BUYER)):
        refused = await run_command(*request(order, buyer), "--wait", env=env)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.strip() == (
            f"error: sub_order_not_found: order {order} has no sub-order of seller {SELLER}"
            f" for buyer {buyer}"
        )
        assert "started" not in refused.stdout
        with pytest.raises(RPCError):
            await api.stack.client.get_workflow_handle(workflow_id_of(order, SELLER)).describe()

    await api.event(order_id, type="sub_order_shipped", seller_id=SELLER)
    refused = await run_command(
        ORDERCANCEL,
        "request",
        order_id,
        SELLER,
        "--buyer",
        BUYER,
        "--reason",
        "ordered_by_mistake",
        env=env,
    )
    assert refused.returncode == 1
    assert "error: already_shipped: " in refused.stderr


async def test_order_shipped_from_anyone_else_is_refused_and_changes_nothing(api: Api) -> None:
    """Issue 18: `order_shipped` is the order-events service's; sent straight to Temporal by
    another sender, or for another seller, it is recorded as refused and the request waits on."""
    document = one_seller_order(unique("O"), buyer_id=BUYER, seller_id=SELLER, validated=True)
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    requested = await request_cancellation(api, order_id)
    assert requested.status_code == 202, requested.text
    handle = api.stack.client.get_workflow_handle(requested.json()["cancellation_id"])
    base = {"event_id": "E-forged", "occurred_at": "2026-05-01T12:00:00Z"}

    await handle.signal("order_shipped", {**base, "seller_id": SELLER, "sent_by": "buyer"})
    await handle.signal(
        "order_shipped", {**base, "seller_id": "S-OTHER", "sent_by": "order-system"}
    )

    async def refused_twice() -> dict[str, Any]:
        view = await api.view(handle.id)
        kinds = [e["kind"] for e in view["audit"]]
        assert kinds.count("order_shipped_refused") == 2, kinds
        return view

    view = await eventually(refused_twice)
    assert view["status"] == "awaiting_seller"
    details = [e["detail"] for e in view["audit"] if e["kind"] == "order_shipped_refused"]
    assert details[0].startswith("invalid_payload") and "sent_by" in details[0]
    assert details[1].startswith("wrong_seller")


async def test_a_workflow_started_for_a_shipped_sub_order_fails_and_writes_nothing(
    api: Api,
) -> None:
    """R14 holds for any client that starts the workflow itself, past the API's check: the
    opening refuses the shipped sub-order under its lock."""
    document = one_seller_order(unique("O"), buyer_id=BUYER, seller_id=SELLER, validated=True)
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    await api.event(order_id, type="sub_order_shipped", seller_id=SELLER)
    from domain.models import CancellationReason, RequestCancellationInput

    handle = await start_cancellation(
        api.stack.client,
        RequestCancellationInput(
            order_id=order_id,
            seller_id=SELLER,
            buyer_id=BUYER,
            reason=CancellationReason.OUT_OF_STOCK,
        ),
        task_queue=api.settings.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    cause = failed.value.cause
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ApplicationError) and cause.type == "SubOrderAlreadyShipped"
    # What `ordercancel request --wait` prints of such a failure: its code and message, no
    # traceback.
    assert failure_line(handle.id, failed.value) == (
        f"SubOrderAlreadyShipped: cancellation {handle.id} failed: {cause.message}"
    )
    assert (
        await api.stack.pool.fetchval(
            "SELECT count(*) FROM cancellations WHERE order_id = $1", order_id
        )
        == 0
    )


async def test_a_shipment_between_the_check_and_the_opening_is_still_already_shipped(
    api: Api,
) -> None:
    """The API checks before it starts the workflow; a shipment landing in between is refused
    by the opening, and the caller still gets 409 `already_shipped`."""
    document = one_seller_order(unique("O"), buyer_id=BUYER, seller_id=SELLER, validated=True)
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    check = CancellationService.check_cancellable

    async def check_then_ship(self: CancellationService, request: Any) -> None:
        await check(self, request)
        shipped = await api.event(order_id, type="sub_order_shipped", seller_id=SELLER)
        assert shipped.status_code == 200, shipped.text

    with mock.patch.object(CancellationService, "check_cancellable", check_then_ship):
        refused = await request_cancellation(api, order_id)

    assert (refused.status_code, refused.json()["code"]) == (409, "already_shipped")
    assert (
        await api.stack.pool.fetchval(
            "SELECT count(*) FROM cancellations WHERE order_id = $1", order_id
        )
        == 0
    )


async def test_a_capture_takes_all_that_is_left_of_the_authorisation(api: Api) -> None:
    """R15: `payment_captured` takes authorised less released, exactly. Less (or 0) would leave
    a share neither captured nor released, and a later cancellation could not refund it: refused
    422 with a code, changing nothing. With every share released, there is nothing to capture."""
    document = unvalidated_order()  # 2 x 12.50 + 3.00 = 28.00, authorised only
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200

    partial = await api.event(order_id, type="payment_captured", amount_minor=1000)
    zero = await api.event(order_id, type="payment_captured", amount_minor=0)
    for refused in (partial, zero):
        assert (refused.status_code, refused.json()["code"]) == (422, "capture_amount_mismatch")
        assert "authorised 2800, released 0, capturable 2800" in refused.json()["detail"]
    row = await api.stack.pool.fetchrow(
        "SELECT validation, capture, captured_minor FROM payments WHERE order_id = $1", order_id
    )
    assert dict(row) == {"validation": "unvalidated", "capture": "authorized", "captured_minor": 0}
    assert (
        await api.stack.pool.fetchval(
            "SELECT count(*) FROM order_events WHERE order_id = $1", order_id
        )
        == 0
    )

    exact = await api.event(order_id, type="payment_captured", amount_minor=2800)
    assert exact.status_code == 200, exact.text
    assert (exact.json()["outcome"], exact.json()["payment"]["captured_minor"]) == ("applied", 2800)
    again_less = await api.event(order_id, type="payment_captured", amount_minor=1000)
    again = await api.event(order_id, type="payment_captured")
    assert (again_less.status_code, again_less.json()["code"]) == (422, "capture_amount_mismatch")
    assert (again.status_code, again.json()["outcome"]) == (200, "unchanged")
    # After the capture the sub-order is on the request path: `accepted`, though its seller has
    # not said so (docs/api.md, the sub-order's status).
    sub = exact.json()["sub_orders"][0]
    assert (sub["status"], sub["seller_accepted"]) == ("accepted", False)


async def test_nothing_to_capture_once_all_is_released_and_a_late_event_names_the_cancellation(
    api: Api,
) -> None:
    document = unvalidated_order()
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    requested = await request_cancellation(api, order_id)  # the instant path: voided at once
    assert requested.status_code == 200, requested.text
    assert (requested.json()["path"], requested.json()["status"]) == ("instant", "completed")
    cancellation_id = requested.json()["cancellation_id"]

    capture = await api.event(order_id, type="payment_captured")
    assert (capture.status_code, capture.json()["code"]) == (422, "nothing_to_capture")
    assert "authorised 2800, released 2800, capturable 0" in capture.json()["detail"]
    assert (
        await api.stack.pool.fetchval(
            "SELECT captured_minor FROM payments WHERE order_id = $1", order_id
        )
        == 0
    )

    late = await api.event(order_id, type="seller_accepted", seller_id=SELLER)
    assert late.status_code == 200, late.text
    body = late.json()
    assert (body["outcome"], body["cancellation_id"], body["workflow_notified"]) == (
        "sub_order_cancelled",
        cancellation_id,
        None,
    )
    assert cancellation_id in body["detail"]
    again = await api.event(
        order_id, event_id=body["event_id"], type="seller_accepted", seller_id=SELLER
    )
    assert (again.json()["duplicate"], again.json()["cancellation_id"]) == (True, cancellation_id)


async def test_an_order_posted_again_after_its_events_points_to_the_events(api: Api) -> None:
    document = unvalidated_order()
    order_id = document["order_id"]
    assert (await api.post_order(document)).status_code == 200
    assert (await api.event(order_id, type="payment_validated")).status_code == 200

    validated = {
        **document,
        "payment": {**document["payment"], "validation": "validated"},
    }
    refused = await api.post_order(validated)
    assert (refused.status_code, refused.json()["code"]) == (409, "order_conflict")
    assert f"POST /v1/orders/{order_id}/events" in refused.json()["detail"]

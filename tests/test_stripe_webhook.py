"""Stripe's webhooks as Stripe sends them (issue 16 item 6), through the real app on the real
stack (Temporal dev server, PostgreSQL, the worker with the provider simulator).

Every payload is signed exactly as Stripe signs it: `Stripe-Signature: t=<unix>,v1=<hex
HMAC-SHA256(endpoint secret, f"{t}.{raw body}")>`. No API key is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock

import pytest
import structlog
from helpers.openapi import OpenApiCheck
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.stacks import ApiStack, api_stack
from helpers.wait import eventually, wait_for_status
from pydantic import SecretStr
from typer.testing import CliRunner

from api.app import borrowed, create_app
from api.keys import KeyStore
from cli.main import app as cli
from domain.models import CancellationReason, CancellationStatus, RequestCancellationInput
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.requests import start_cancellation
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

# A well-formed API keys line (`ordercancel api` refuses to start without one).
GOOD_KEYS = "sre 0123456789abcdef sha256$" + "1" * 32 + "$" + "2" * 64
ENDPOINT_SECRET = "whsec_" + "test0rdercancel" * 2
ROUTE = "/v1/providers/stripe/webhook"


@pytest.fixture
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[ApiStack]:
    settings = fast_refund_settings(
        task_queue=f"stripe-webhook-{uuid.uuid4()}",
        stripe_webhook_secret=SecretStr(ENDPOINT_SECRET),
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=("payment-provider",),
        webhook_secret="a-shared-secret-of-the-neutral-webhook",
    ) as stack:
        yield stack


def stripe_event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "type": kind,
        "data": {"object": obj},
    }


def signed(body: bytes, *, secret: str = ENDPOINT_SECRET, at: int | None = None) -> str:
    t = at if at is not None else int(time.time())
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={v1}"


async def post(
    api: ApiStack, event: dict[str, Any], *, signature: str | None = None
) -> tuple[int, dict[str, Any]]:
    body = json.dumps(event).encode()
    headers = {"Content-Type": "application/json"}
    headers["Stripe-Signature"] = signature if signature is not None else signed(body)
    response = await api.http.post(ROUTE, content=body, headers=headers)
    # Every answer is the one docs/openapi.json documents.
    OpenApiCheck(api.app.openapi())(response)
    return response.status_code, response.json()


async def events_recorded(api: ApiStack, prefix: str) -> int:
    count: int = await api.pool.fetchval(
        "SELECT count(*) FROM payment_events WHERE event_id LIKE $1", prefix + "%"
    )
    return count


async def completed_cancellation(api: ApiStack, *, validated: bool, faults: SimulatorFaults) -> str:
    order_id = unique("O-whk")
    await load_orders(
        api.pool,
        parse_orders_file(
            orders_file(
                one_seller_order(order_id, buyer_id="B-9", seller_id="S-9", validated=validated)
            )
        ),
    )
    await SimulatedProvider(api.pool).set_faults(f"P-{order_id}", faults)
    handle = await start_cancellation(
        api.client,
        RequestCancellationInput(
            order_id=order_id,
            seller_id="S-9",
            buyer_id="B-9",
            reason=CancellationReason.CANNOT_SHIP,
        ),
        task_queue=api.app.state.ctx.settings.task_queue,
    )
    if validated:
        await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide, {"seller_id": "S-9", "decision": "accept"}
        )
    assert (await handle.result()).status is CancellationStatus.COMPLETED
    return handle.id


async def test_a_bad_signature_is_refused_and_changes_nothing(api: ApiStack) -> None:
    event = stripe_event(
        "refund.failed", {"id": "re_x", "object": "refund", "status": "failed"}, "evt_badsig"
    )
    body = json.dumps(event).encode()
    for signature, code in (
        (signed(body, secret="whsec_someone_else_entirely"), "invalid_signature"),
        (signed(body, at=int(time.time()) - 3600), "invalid_signature"),  # a replayed old one
        (signed(b"{}"), "invalid_signature"),  # signed for another body
        ("v1=deadbeef", "invalid_signature"),
        ("", "missing_signature"),
    ):
        status, problem = await post(api, event, signature=signature)
        assert (status, problem["code"]) == (400, code), signature
        assert ENDPOINT_SECRET not in json.dumps(problem)
    assert await events_recorded(api, "evt_badsig") == 0
    # No API key is needed, and one is no substitute for the signature.
    response = await api.http.post(
        ROUTE,
        content=body,
        headers={"Authorization": f"Bearer {api.keys['payment-provider']}"},
    )
    assert response.status_code == 400 and response.json()["code"] == "missing_signature"


async def test_a_timestamp_too_far_in_the_future_is_refused_like_one_too_old(
    api: ApiStack,
) -> None:
    # The SDK checks only the past; a signature dated ahead (a clock far off, or one made to be
    # replayed later) is refused as /v1/payment-events refuses it, in either direction.
    event = stripe_event(
        "refund.failed", {"id": "re_x", "object": "refund", "status": "failed"}, "evt_future"
    )
    body = json.dumps(event).encode()
    status, problem = await post(api, event, signature=signed(body, at=int(time.time()) + 600))
    assert (status, problem["code"]) == (400, "invalid_signature")
    assert "future" in problem["detail"]
    assert await events_recorded(api, "evt_future") == 0
    # Within the tolerance (5 min) ahead, it is accepted: clocks are never quite in step.
    ignored = stripe_event("customer.created", {"id": "cus_2", "object": "customer"})
    ahead = json.dumps(ignored).encode()
    status, answer = await post(api, ignored, signature=signed(ahead, at=int(time.time()) + 60))
    assert status == 200 and answer["handled"] is False


async def test_the_api_ready_line_says_which_webhooks_are_configured(api: ApiStack) -> None:
    cases = (
        (fast_refund_settings(stripe_webhook_secret=SecretStr(ENDPOINT_SECRET)), None),
        (fast_refund_settings(), "a-shared-secret-of-the-neutral-webhook"),
    )
    for settings, secret in cases:
        app = create_app(
            settings,
            resources=borrowed(api.pool, api.client),
            keys=KeyStore.from_keys({}),
            webhook_secret=secret,
        )
        with structlog.testing.capture_logs() as logs:
            async with app.router.lifespan_context(app):
                pass
        (ready,) = [entry for entry in logs if entry["event"] == "api_ready"]
        assert ready["webhooks_configured"] == {
            "payment_events": secret is not None,
            "stripe": settings.stripe_webhook_secret is not None,
        }


@pytest.mark.parametrize(
    "value, says",
    [
        ("whsec_example", "placeholder"),  # docs/api.md's own placeholder
        ("short", "shorter than"),
        ("whsec_...", "placeholder"),
        ("  ", "empty"),
    ],
)
def test_the_api_refuses_to_start_on_a_placeholder_stripe_secret(
    value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERCANCEL_API_KEYS", GOOD_KEYS)
    monkeypatch.delenv("ORDERCANCEL_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("ORDERCANCEL_STRIPE_WEBHOOK_SECRET", value)
    with mock.patch("uvicorn.Server.run", side_effect=AssertionError("must not serve")):
        result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 1, result.output
    assert "ORDERCANCEL_STRIPE_WEBHOOK_SECRET" in result.output and says in result.output


def test_the_api_starts_with_a_real_looking_stripe_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERCANCEL_API_KEYS", GOOD_KEYS)
    monkeypatch.delenv("ORDERCANCEL_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("ORDERCANCEL_STRIPE_WEBHOOK_SECRET", ENDPOINT_SECRET)
    with mock.patch("uvicorn.Server.run") as run:
        result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 0, result.output
    assert run.called


async def test_other_event_types_are_acknowledged_and_ignored(api: ApiStack) -> None:
    event = stripe_event("customer.created", {"id": "cus_1", "object": "customer"})
    status, answer = await post(api, event)
    assert status == 200
    assert answer == {
        "stripe_event_id": event["id"],
        "type": "customer.created",
        "handled": False,
        "forwarded": [],
    }
    assert await events_recorded(api, event["id"]) == 0


async def test_a_refund_failed_after_success_reopens_and_a_redelivery_is_answered_once(
    api: ApiStack,
) -> None:
    cancellation_id = await completed_cancellation(
        api, validated=True, faults=SimulatorFaults(fail_after_success=True)
    )
    refund = await Ledger(api.pool).get_refund(cancellation_id=cancellation_id)
    event = stripe_event(
        "refund.failed",
        {
            "id": refund.view.provider_ref,
            "object": "refund",
            "amount": refund.view.amount.amount_minor,
            "currency": "eur",
            "status": "failed",
            "failure_reason": "expired_or_canceled_card",
            "metadata": {"refund_id": refund.view.idempotency_key},
        },
    )
    status, answer = await post(api, event)
    assert status == 200 and answer["handled"] is True
    (forwarded,) = answer["forwarded"]
    assert forwarded["outcome"] == "reopened"
    assert forwarded["cancellation_id"] == cancellation_id

    async def parked() -> None:
        row = await api.pool.fetchrow(
            "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
            " WHERE c.cancellation_id = $1 AND r.generation = 1",
            cancellation_id,
        )
        assert row is not None and (row["status"], row["stage"]) == ("refund_failed", "reversed")

    await eventually(parked, timeout=30)
    recorded = await api.pool.fetchrow(
        "SELECT type, outcome FROM payment_events WHERE event_id = $1", event["id"]
    )
    assert dict(recorded) == {"type": "refund_reversed", "outcome": "reopened"}

    # Stripe delivers it again (it does, at least once): the first answer, nothing done twice.
    status, again = await post(api, event)
    assert status == 200
    assert again["forwarded"][0]["duplicate"] is True
    assert again["forwarded"][0]["outcome"] == "reopened"
    assert await events_recorded(api, event["id"]) == 1
    runs = [w async for w in api.client.list_workflows(f'WorkflowId = "{cancellation_id}"')]
    assert len(runs) == 2  # the first run and the one reopened, no third


async def test_a_canceled_payment_intent_is_the_void_confirmed(api: ApiStack) -> None:
    # An instant cancellation of an authorised payment: a void (R2), completed.
    cancellation_id = await completed_cancellation(api, validated=False, faults=SimulatorFaults())
    refund = await Ledger(api.pool).get_refund(cancellation_id=cancellation_id)
    event = stripe_event(
        "payment_intent.canceled",
        {
            "id": "pi_not_ours_by_ref",
            "object": "payment_intent",
            "status": "canceled",
            "metadata": {"refund_id": refund.view.idempotency_key},
        },
    )
    status, answer = await post(api, event)
    assert status == 200
    (forwarded,) = answer["forwarded"]
    # Found by our key; the cancellation has ended and a confirmation changes nothing.
    assert (forwarded["cancellation_id"], forwarded["outcome"]) == (cancellation_id, "ignored")
    recorded = await api.pool.fetchval(
        "SELECT type FROM payment_events WHERE event_id = $1", event["id"]
    )
    assert recorded == "refund_confirmed"


async def test_a_charge_refunded_event_reports_each_refund_of_ours(api: ApiStack) -> None:
    cancellation_id = await completed_cancellation(api, validated=True, faults=SimulatorFaults())
    refund = await Ledger(api.pool).get_refund(cancellation_id=cancellation_id)
    event = stripe_event(
        "charge.refunded",
        {
            "id": "ch_1",
            "object": "charge",
            "refunds": {
                "object": "list",
                "data": [
                    {
                        "id": refund.view.provider_ref,
                        "object": "refund",
                        "status": "succeeded",
                        "metadata": {"refund_id": refund.view.idempotency_key},
                    },
                    {"id": "re_someone_elses", "object": "refund", "status": "succeeded"},
                ],
            },
        },
    )
    status, answer = await post(api, event)
    assert status == 200
    (forwarded,) = answer["forwarded"]
    assert forwarded["event_id"] == f"{event['id']}:{refund.view.provider_ref}"
    assert forwarded["cancellation_id"] == cancellation_id


async def test_a_signed_event_with_an_id_no_event_may_carry_is_a_422_and_changes_nothing(
    api: ApiStack,
) -> None:
    event = stripe_event(
        "refund.updated",
        {"id": "re_\x00nul", "object": "refund", "status": "succeeded"},
        "evt_control_char",
    )
    status, problem = await post(api, event)
    assert (status, problem["code"]) == (422, "invalid_event")
    assert await events_recorded(api, "evt_control_char") == 0

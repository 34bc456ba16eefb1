"""A cancellation started through the HTTP API is described in the Temporal Web UI as one
started from the CLI is: its static summary names the money at stake and how it was paid. On a
real Temporal dev server and a real PostgreSQL, with the product's worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from helpers.api import assert_problem, bearer, load_order, request_body
from helpers.stacks import ApiStack, api_stack
from temporalio.service import RPCError

from api.errors import ApiError
from domain.models import RequestCancellationInput
from domain.rules import cancellation_id
from infra.settings import Settings

pytestmark = pytest.mark.e2e

SELLER, BUYER = "S-51", "B-510"
SECRET = "whsec_test_" + "s" * 32


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[ApiStack]:
    settings = Settings(task_queue=f"summary-{uuid.uuid4().hex[:8]}")
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=("buyer-service",),
        webhook_secret=SECRET,
    ) as running:
        yield running


async def test_an_api_cancellation_summary_names_the_amount_and_method(stack: ApiStack) -> None:
    # 2 x 12.50 EUR + 3.00 EUR shipping, paid by card, captured: the request path.
    order_id = await load_order(stack.pool, "SUM", buyer=BUYER, seller=SELLER)
    response = await stack.http.post(
        "/v1/cancellations",
        json=request_body(order_id, SELLER, BUYER),
        headers=bearer(stack.keys, "buyer-service"),
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "awaiting_seller"

    handle = stack.client.get_workflow_handle(cancellation_id(order_id, SELLER))
    description = await handle.describe()
    assert await description.static_summary() == (
        f"Cancel order {order_id} / seller {SELLER}: 28.00 EUR, card (out_of_stock, seller fault)"
    )


async def test_shipped_after_the_check_is_refused_before_any_workflow(stack: ApiStack) -> None:
    """R14 checked again when the cancellation starts (the ledger is at hand for the summary):
    a sub-order shipped between the route's check and the start is the same 409, and no
    workflow is started for it."""
    order_id = await load_order(stack.pool, "SHP", buyer=BUYER, seller=SELLER)
    await stack.pool.execute(
        "UPDATE sub_orders SET shipped_at = now() WHERE order_id = $1 AND seller_id = $2",
        order_id,
        SELLER,
    )
    request = RequestCancellationInput.model_validate(request_body(order_id, SELLER, BUYER))
    with pytest.raises(ApiError) as refused:
        await stack.app.state.ctx.service.request(request)  # past the route's own check
    assert (refused.value.status, refused.value.code) == (409, "already_shipped")
    assert "has shipped" in refused.value.detail
    with pytest.raises(RPCError):
        await stack.client.get_workflow_handle(cancellation_id(order_id, SELLER)).describe()
    # Through the route, the same answer.
    response = await stack.http.post(
        "/v1/cancellations",
        json=request_body(order_id, SELLER, BUYER),
        headers=bearer(stack.keys, "buyer-service"),
    )
    assert_problem(response, 409, "already_shipped")

"""The HTTP API end to end: its ASGI app (with its lifespan) over a real Temporal dev server, a
real PostgreSQL and the product's own worker, called with httpx.

Every response any test here receives is checked against the app's own OpenAPI document (the
status must be documented for the operation, the body must match its schema).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
import structlog
from helpers.api import GARBAGE_KEY, NO_KEY, UNKNOWN_KEY, Api, assert_problem, load_order
from helpers.api import request_body as api_request_body
from helpers.openapi import check_every_response
from helpers.stacks import api_stack
from helpers.wait import eventually
from temporalio import workflow
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from api.keys import generate_key
from api.signing import SIGNATURE_HEADER, signature_header
from domain.rules import cancellation_id as workflow_id_of
from infra.settings import Settings
from payments.provider import SimulatorFaults

pytestmark = pytest.mark.e2e

SECRET = "whsec_test_" + "k" * 32
OWN, OTHER = "S-41", "S-42"
BUYER = "B-410"
PRINCIPALS = ("buyer-service", f"seller:{OWN}", f"seller:{OTHER}", "sre", "payment-provider")
# Long enough that a refund confirmed within a few seconds was woken by the webhook.
POLL_INTERVAL = timedelta(seconds=30)


# --- the stack ---------------------------------------------------------------------------------


@asynccontextmanager
async def api_for_tests(
    temporal_address: str, database_url: str, interceptors: Sequence[Interceptor] = ()
) -> AsyncIterator[Api]:
    """The worker on a task queue of its own, and the app with its lifespan, over the same
    pool and client; keys of every principal, made for this module. Every response is checked
    against the app's own OpenAPI document."""
    settings = Settings(
        task_queue=f"api-{uuid.uuid4().hex[:8]}",
        refund_poll_interval=POLL_INTERVAL,
        refund_poll_max_interval=POLL_INTERVAL,
        refund_submit_initial_interval=timedelta(milliseconds=100),
        refund_submit_max_interval=timedelta(seconds=1),
        api_instant_wait=timedelta(seconds=10),
    )
    async with api_stack(
        temporal_address,
        database_url,
        settings,
        principals=PRINCIPALS,
        webhook_secret=SECRET,
        interceptors=interceptors,
    ) as stack:
        check_every_response(stack.http, stack.app.openapi())
        yield Api(stack, settings)


@pytest.fixture(scope="module")
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    async with api_for_tests(temporal_address, e2e_database_url) as stack:
        yield stack


class CloseLate(Interceptor):
    """Keeps every workflow open for `CLOSE_DELAY` after its run has returned: the status
    query then tells a final status while the workflow still runs."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _CloseLateInbound


class _CloseLateInbound(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        result = await super().execute_workflow(input)
        await workflow.sleep(CLOSE_DELAY)
        return result


CLOSE_DELAY = timedelta(seconds=2)


@pytest.fixture
async def late_closing_api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    async with api_for_tests(temporal_address, e2e_database_url, [CloseLate()]) as stack:
        yield stack


# --- helpers -----------------------------------------------------------------------------------


async def new_order(
    api: Api, *, validated: bool = True, sellers: tuple[str, ...] = (OWN,), coupon: bool = False
) -> str:
    """Load an order of `sellers` for BUYER. Validated: captured, accepted by the sellers
    (request path). Not validated: only authorised (instant path, a void)."""
    return await load_order(
        api.pool, "API", buyer=BUYER, sellers=sellers, paid=validated, coupon=coupon
    )


def request_body(order_id: str, seller: str = OWN, **extra: Any) -> dict[str, Any]:
    return api_request_body(order_id, seller, BUYER, **extra)


async def pending(api: Api, seller: str = OWN) -> str:
    """A cancellation awaiting its seller, requested through the API."""
    order_id = await new_order(api, sellers=(seller,))
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id, seller)
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "awaiting_seller"
    cancellation_id: str = response.json()["cancellation_id"]
    return cancellation_id


async def parked(api: Api) -> str:
    """A cancellation whose refund the provider refuses for good: parked in refund_failed."""
    order_id = await new_order(api)
    await api.provider.set_faults(f"P-{order_id}", SimulatorFaults(final_failure="card_closed"))
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id)
    )
    cancellation_id: str = response.json()["cancellation_id"]
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{OWN}",
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert decided.status_code == 200, decided.text

    async def is_parked() -> None:
        assert (await api.view(cancellation_id, "buyer-service"))["status"] == "refund_failed"

    await eventually(is_parked)
    return cancellation_id


async def audit_length(api: Api, cancellation_id: str) -> int:
    count: int = await api.pool.fetchval(
        "SELECT count(*) FROM cancellation_events WHERE cancellation_id = $1", cancellation_id
    )
    return count


def signed(body: bytes, *, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    return {
        SIGNATURE_HEADER: signature_header(
            secret, int(at if at is not None else time.time()), body
        ),
        "Content-Type": "application/json",
    }


def event_body(**fields: Any) -> bytes:
    return json.dumps({"event_id": f"evt-{uuid.uuid4().hex[:12]}", **fields}).encode()


async def post_event(api: Api, body: bytes, principal: str = "payment-provider") -> httpx.Response:
    return await api.call(
        "POST", "/v1/payment-events", principal, content=body, headers=signed(body)
    )


# --- health ------------------------------------------------------------------------------------


async def test_health_and_readiness(api: Api) -> None:
    assert (await api.call("GET", "/healthz", None)).json() == {"status": "ok"}
    ready = await api.call("GET", "/readyz", None)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"postgres": "ok", "temporal": "ok"}}


# --- requesting and reading --------------------------------------------------------------------


async def test_instant_path_answers_with_the_final_outcome(api: Api) -> None:
    order_id = await new_order(api, validated=False)
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    cancellation_id = workflow_id_of(order_id, OWN)
    assert body["cancellation_id"] == cancellation_id
    assert response.headers["location"] == f"/v1/cancellations/{cancellation_id}"
    assert (body["status"], body["path"], body["final"]) == ("completed", "instant", True)
    outcome = body["outcome"]
    assert outcome["refund"]["kind"] == "void" and outcome["refund"]["stage"] == "confirmed"
    assert outcome["coupon"]["outcome"] == "no_coupon"

    # Once finished, read from the ledger: the three dots, coupon, audit trail. The money is
    # back: the last dot has no ETA any more; the refund keeps the estimate it was given.
    view = await api.view(cancellation_id, "buyer-service")
    assert (view["running"], view["source"], view["status"]) == (False, "ledger", "completed")
    assert [(d["label"], d["done"]) for d in view["dots"]] == [
        ("Dispute finished", True),
        ("Refund in progress", True),
        ("Refund completed", True),
    ]
    assert view["dots"][2]["eta"] is None and view["refund"]["eta"] is not None
    assert view["coupon"] == {
        "outcome": "no_coupon",
        "reason": "no coupon paid for this sub-order",
        "redemption_id": None,
        "active_sub_orders": [],
    }
    kinds = [entry["kind"] for entry in view["audit"]]
    assert kinds[:2] == ["requested", "cancelled_instantly"] and kinds[-1] == "completed"


async def test_a_final_answer_is_followed_by_the_ledger_even_while_the_workflow_closes(
    late_closing_api: Api,
) -> None:
    """The outcome is known before the workflow has closed (here two seconds later): the API
    answers once it has, so that what the caller reads next is the ledger's finished record."""
    api = late_closing_api
    order_id = await new_order(api, validated=False)
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["final"]) == ("completed", True)
    view = await api.view(body["cancellation_id"], "buyer-service")
    assert (view["running"], view["source"], view["status"]) == (False, "ledger", "completed")
    assert view["audit"][-1]["kind"] == "completed"


async def test_request_path_is_read_from_the_running_workflow(api: Api) -> None:
    cancellation_id = await pending(api)
    view = await api.view(cancellation_id, "buyer-service")
    assert (view["running"], view["source"]) == (True, "workflow")
    assert (view["status"], view["path"]) == ("awaiting_seller", "request")
    assert view["seller_deadline"] is not None
    assert [d["done"] for d in view["dots"]] == [False, False, False]
    assert [e["kind"] for e in view["audit"]] == ["requested", "awaiting_seller"]


async def test_coupon_given_back_by_the_last_sibling_shows_on_both(api: Api) -> None:
    """The ledger decides the coupon; a sibling that decided `partial_refund` first is shown
    the restoration that came after (Ledger.coupon_outcome)."""
    order_id = await new_order(api, validated=False, sellers=(OWN, OTHER), coupon=True)
    responses = await asyncio.gather(
        *(
            api.call("POST", "/v1/cancellations", "buyer-service", json=request_body(order_id, s))
            for s in (OWN, OTHER)
        )
    )
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    for seller in (OWN, OTHER):
        coupon = (await api.view(workflow_id_of(order_id, seller), "buyer-service"))["coupon"]
        assert coupon["outcome"] == "restored", coupon
        assert coupon["redemption_id"] == f"R-{order_id}"


async def test_the_same_request_twice_is_one_cancellation(api: Api) -> None:
    order_id = await new_order(api)
    first = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id)
    )
    handle = api.client.get_workflow_handle(first.json()["cancellation_id"])
    run_id = (await handle.describe()).run_id
    again = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id)
    )
    assert again.status_code == first.status_code == 202
    assert again.json() == first.json()
    assert (await handle.describe()).run_id == run_id


async def test_idempotency_key_replays_and_refuses_reuse(api: Api) -> None:
    order_id = await new_order(api, sellers=(OWN, OTHER))
    key = {"Idempotency-Key": f"order-service-{uuid.uuid4()}"}
    first = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=request_body(order_id), headers=key
    )
    assert first.status_code == 202, first.text
    # The same request, other bytes (key order, spacing): the same answer.
    same = json.dumps(dict(reversed(list(request_body(order_id).items()))), indent=3).encode()
    replay = await api.call(
        "POST",
        "/v1/cancellations",
        "buyer-service",
        content=same,
        headers={**key, "Content-Type": "application/json"},
    )
    assert replay.status_code == 202 and replay.json() == first.json()
    # Another request under the same key: refused, and nothing is started for it.
    other = await api.call(
        "POST",
        "/v1/cancellations",
        "buyer-service",
        json=request_body(order_id, OTHER),
        headers=key,
    )
    problem = assert_problem(other, 422, "idempotency_key_reused")
    assert first.json()["cancellation_id"] in problem["detail"]
    missing = await api.call(
        "GET", f"/v1/cancellations/{workflow_id_of(order_id, OTHER)}", "buyer-service"
    )
    assert_problem(missing, 404, "not_found")
    bad = await api.call(
        "POST",
        "/v1/cancellations",
        "buyer-service",
        json=request_body(order_id),
        headers={"Idempotency-Key": "has spaces"},
    )
    assert_problem(bad, 400, "invalid_idempotency_key")


async def test_a_request_that_cannot_succeed_starts_nothing(api: Api) -> None:
    order_id = await new_order(api)
    for body in (
        request_body("NO-SUCH-ORDER"),
        request_body(order_id, "S-999"),
        {**request_body(order_id), "buyer_id": "B-someone-else"},
    ):
        response = await api.call("POST", "/v1/cancellations", "buyer-service", json=body)
        assert_problem(response, 404, "sub_order_not_found")
    assert_problem(
        await api.call(
            "GET", f"/v1/cancellations/{workflow_id_of(order_id, OWN)}", "buyer-service"
        ),
        404,
        "not_found",
    )


# --- who may do what ---------------------------------------------------------------------------

ALLOWED = {
    "request": {"buyer-service"},
    "read": {"buyer-service", f"seller:{OWN}", "sre"},
    "decide": {f"seller:{OWN}"},
    "withdraw": {"buyer-service"},
    "retry_refund": {"sre"},
    "payment_event": {"payment-provider"},
}


async def _target(api: Api, endpoint: str) -> tuple[str, Callable[[str], Any], str | None]:
    """(method and path, body for a principal, the cancellation whose state must not move)."""
    if endpoint == "request":
        order_id = await new_order(api)
        return "POST /v1/cancellations", lambda _: request_body(order_id), None
    if endpoint == "payment_event":
        return (
            "POST /v1/payment-events",
            lambda _: (
                {"event_id": f"evt-{uuid.uuid4().hex}", "type": "refund_confirmed"}
                | {"provider_ref": "pr-nobody"}
            ),
            None,
        )
    cancellation_id = await (parked(api) if endpoint == "retry_refund" else pending(api))
    base = f"/v1/cancellations/{cancellation_id}"
    if endpoint == "read":
        return f"GET {base}", lambda _: None, cancellation_id
    if endpoint == "decide":

        def decision(principal: str) -> dict[str, Any]:
            seller = principal.removeprefix("seller:") if principal.startswith("seller:") else OWN
            return {"seller_id": seller, "decision": "accept", "reason": "out of stock"}

        return f"POST {base}/seller-decision", decision, cancellation_id
    if endpoint == "withdraw":
        return f"POST {base}/withdraw", lambda _: {"buyer_id": BUYER}, cancellation_id
    return (
        f"POST {base}/retry-refund",
        lambda _: {"reason": "card replaced"},
        cancellation_id,
    )


@pytest.mark.parametrize("endpoint", sorted(ALLOWED))
async def test_authorization_matrix(api: Api, endpoint: str) -> None:
    """Every principal (and no key, an unknown key, a malformed one) on every endpoint: 401
    without a valid key, 403 for a principal that may not, and nothing changes; the allowed
    principal goes last and succeeds."""
    route, body_for, cancellation_id = await _target(api, endpoint)
    method, path = route.split(" ", 1)
    allowed = ALLOWED[endpoint]
    before = await api.view(cancellation_id, "buyer-service") if cancellation_id else None
    callers = [NO_KEY, UNKNOWN_KEY, GARBAGE_KEY, *(p for p in PRINCIPALS if p not in allowed)]
    for principal in [*callers, *sorted(allowed)]:
        body = body_for(principal)
        if endpoint == "payment_event":
            raw = json.dumps(body).encode()
            response = await api.call(method, path, principal, content=raw, headers=signed(raw))
        else:
            response = await api.call(method, path, principal, json=body)
        if principal in (NO_KEY, UNKNOWN_KEY, GARBAGE_KEY):
            code = "unauthenticated" if principal == NO_KEY else "invalid_api_key"
            assert_problem(response, 401, code)
            assert response.headers["www-authenticate"] == "Bearer"
        elif principal not in allowed:
            # Another seller's cancellation is answered as if it did not exist (issue 18).
            if principal == f"seller:{OTHER}" and endpoint in ("read", "decide"):
                assert_problem(response, 404, "not_found")
            else:
                assert_problem(response, 403, "forbidden")
        else:
            assert 200 <= response.status_code < 300, (principal, response.text)
        if cancellation_id and principal not in allowed:
            after = await api.view(cancellation_id, "buyer-service")
            assert (after["status"], after["audit"]) == (before["status"], before["audit"])  # type: ignore[index]
        if endpoint == "request" and principal not in allowed:
            missing = await api.call(
                "GET", f"/v1/cancellations/{workflow_id_of(body['order_id'], OWN)}", "sre"
            )
            assert missing.status_code == 404
        if endpoint == "payment_event" and principal not in allowed:
            seen = await api.pool.fetchval(
                "SELECT count(*) FROM payment_events WHERE event_id = $1", body["event_id"]
            )
            assert seen == 0


# --- decisions ---------------------------------------------------------------------------------


async def test_seller_decision_is_answered_at_once(api: Api) -> None:
    cancellation_id = await pending(api)
    path = f"/v1/cancellations/{cancellation_id}/seller-decision"
    seller = f"seller:{OWN}"
    accepted = await api.call(
        "POST", path, seller, json={"seller_id": OWN, "decision": "accept", "reason": "sorry"}
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {
        "cancellation_id": cancellation_id,
        "accepted": True,
        "status": "approved",
        "message": "accept recorded",
    }
    trail = await audit_length(api, cancellation_id)
    again = await api.call("POST", path, seller, json={"seller_id": OWN, "decision": "reject"})
    assert_problem(again, 409, "already_decided")
    view = await api.view(cancellation_id, "buyer-service")
    assert [e["kind"] for e in view["audit"]].count("decision_accept") == 1
    assert "decision_reject" not in [e["kind"] for e in view["audit"]]
    assert await audit_length(api, cancellation_id) >= trail  # the refund goes on, nothing else


async def test_decisions_not_allowed_now_are_409_and_change_nothing(api: Api) -> None:
    seller = f"seller:{OWN}"
    # An instant-path cancellation never waits for the seller.
    order_id = await new_order(api, validated=False)
    done = await api.call("POST", "/v1/cancellations", "buyer-service", json=request_body(order_id))
    instant = done.json()["cancellation_id"]
    response = await api.call(
        "POST",
        f"/v1/cancellations/{instant}/seller-decision",
        seller,
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert_problem(response, 409, "not_pending")
    # Withdrawn: the request has ended; a late decision is refused.
    cancellation_id = await pending(api)
    withdrawn = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/withdraw",
        "buyer-service",
        json={"buyer_id": BUYER, "reason": "found it elsewhere"},
    )
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["applied"] is True and withdrawn.json()["status"] == "withdrawn"
    trail = await audit_length(api, cancellation_id)
    late = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        seller,
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert_problem(late, 409, "not_pending")
    again = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/withdraw",
        "buyer-service",
        json={"buyer_id": BUYER},
    )
    assert_problem(again, 409, "not_pending")
    assert await audit_length(api, cancellation_id) == trail
    assert (await api.view(cancellation_id, "buyer-service"))["status"] == "withdrawn"
    # A seller key speaks only for its own seller id.
    other = await pending(api)
    mismatch = await api.call(
        "POST",
        f"/v1/cancellations/{other}/seller-decision",
        seller,
        json={"seller_id": OTHER, "decision": "accept"},
    )
    assert_problem(mismatch, 403, "seller_mismatch")
    assert (await api.view(other, "buyer-service"))["status"] == "awaiting_seller"


async def test_withdraw_and_retry_refusals(api: Api) -> None:
    cancellation_id = await pending(api)
    base = f"/v1/cancellations/{cancellation_id}"
    wrong = await api.call(
        "POST", f"{base}/withdraw", "buyer-service", json={"buyer_id": "B-not-the-buyer"}
    )
    assert_problem(wrong, 409, "wrong_buyer")
    retry = await api.call("POST", f"{base}/retry-refund", "sre", json={})
    assert_problem(retry, 409, "not_refund_failed")
    view = await api.view(cancellation_id, "buyer-service")
    assert view["status"] == "awaiting_seller"
    assert [e["kind"] for e in view["audit"]] == ["requested", "awaiting_seller"]
    # Parked refunds are retried by an operator, once per parking.
    parked_id = await parked(api)
    path = f"/v1/cancellations/{parked_id}/retry-refund"
    first = await api.call("POST", path, "sre", json={"reason": "retry"})
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "refund_requested"


# --- malformed input ---------------------------------------------------------------------------

MALFORMED = [
    # (what, body bytes, status, code, location of the first error)
    ("not JSON", b'{"seller_id": ', 400, "malformed_json", None),
    ("empty", b"", 400, "malformed_json", None),
    ("a list", b"[]", 422, "invalid_payload", ["body"]),
    ("wrong type", b'{"seller_id": 7, "decision": "accept"}', 422, "invalid_payload",
     ["body", "seller_id"]),
    ("unknown decision", b'{"seller_id": "S-41", "decision": "maybe"}', 422, "invalid_payload",
     ["body", "decision"]),
    ("unknown field", b'{"seller_id": "S-41", "decision": "accept", "urgent": true}', 422,
     "invalid_payload", ["body", "urgent"]),
    ("oversized text", json.dumps({"seller_id": "S-41", "decision": "accept",
     "reason": "x" * 2001}).encode(), 422, "invalid_payload", ["body", "reason"]),
    ("missing field", b'{"decision": "accept"}', 422, "invalid_payload", ["body", "seller_id"]),
    ("bad identifier", b'{"seller_id": "S 41", "decision": "accept"}', 422, "invalid_payload",
     ["body", "seller_id"]),
]  # fmt: skip


async def test_malformed_input_is_refused_field_by_field(api: Api) -> None:
    cancellation_id = await pending(api)
    path = f"/v1/cancellations/{cancellation_id}/seller-decision"
    for what, body, status, code, loc in MALFORMED:
        response = await api.call(
            "POST",
            path,
            f"seller:{OWN}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        problem = assert_problem(response, status, code)
        if loc is not None:
            assert problem["errors"][0]["loc"] == loc, (what, problem)
    not_json = await api.call(
        "POST", path, f"seller:{OWN}", content=b"accept", headers={"Content-Type": "text/plain"}
    )
    assert_problem(not_json, 415, "unsupported_media_type")
    # The workflow saw none of it, and still takes a good decision.
    view = await api.view(cancellation_id, "buyer-service")
    assert [e["kind"] for e in view["audit"]] == ["requested", "awaiting_seller"]
    good = await api.call(
        "POST", path, f"seller:{OWN}", json={"seller_id": OWN, "decision": "reject"}
    )
    assert good.status_code == 200 and good.json()["status"] == "rejected"


async def test_request_fields_are_validated(api: Api) -> None:
    order_id = await new_order(api)
    cases = [
        ({**request_body(order_id), "reason": "bored"}, ["body", "reason"]),
        ({**request_body(order_id), "reason_text": "y" * 2001}, ["body", "reason_text"]),
        ({**request_body(order_id), "coupon": "FREE"}, ["body", "coupon"]),
    ]
    for body, loc in cases:
        response = await api.call("POST", "/v1/cancellations", "buyer-service", json=body)
        problem = assert_problem(response, 422, "invalid_payload")
        assert problem["errors"][0]["loc"] == loc, problem
    # R19: the window is the seller's policy; a request naming one, whatever its value, is
    # refused with a code of its own.
    for window in ("forever", 0, "PT1S", None):
        body = {**request_body(order_id), "response_window": window}
        response = await api.call("POST", "/v1/cancellations", "buyer-service", json=body)
        assert_problem(response, 422, "window_not_allowed")
    missing = await api.call(
        "GET", f"/v1/cancellations/{workflow_id_of(order_id, OWN)}", "buyer-service"
    )
    assert missing.status_code == 404


async def test_oversized_bodies_are_413(api: Api) -> None:
    big = json.dumps({"seller_id": OWN, "decision": "accept", "reason": "x" * 70_000}).encode()
    path = "/v1/cancellations/cancel-X-1~S-41/seller-decision"
    declared = await api.call(
        "POST", path, f"seller:{OWN}", content=big, headers={"Content-Type": "application/json"}
    )
    assert_problem(declared, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = await api.http.post(
        path,
        content=chunks(),
        headers={**api.headers(f"seller:{OWN}"), "Content-Type": "application/json"},
    )
    assert_problem(streamed, 413, "payload_too_large")


async def test_unknown_cancellations_and_routes(api: Api) -> None:
    for cancellation_id in (
        "cancel-O-404~S-404",
        "cancel-O-404-S-404",
        "not-a-cancellation",
        "cancel-" + "x" * 300,
    ):
        response = await api.call("GET", f"/v1/cancellations/{cancellation_id}", "sre")
        assert_problem(response, 404, "not_found")
    decision = await api.call(
        "POST",
        "/v1/cancellations/cancel-O-404~S-41/seller-decision",
        f"seller:{OWN}",
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert_problem(decision, 404, "not_found")
    assert_problem(await api.call("GET", "/v1/nothing", "sre"), 404, "not_found")
    assert_problem(await api.call("DELETE", "/v1/cancellations", "sre"), 405, "method_not_allowed")


async def test_no_malformed_request_gets_a_5xx(api: Api) -> None:
    """A bounded fuzz: random and hostile bodies, ids and headers on every endpoint, by the
    principal allowed there. Nothing answers 5xx, and the pending cancellation still works."""
    rng = random.Random(4)
    cancellation_id = await pending(api)
    base = f"/v1/cancellations/{cancellation_id}"
    routes = [
        ("POST", "/v1/cancellations", "buyer-service"),
        ("POST", f"{base}/seller-decision", f"seller:{OWN}"),
        ("POST", f"{base}/withdraw", "buyer-service"),
        ("POST", f"{base}/retry-refund", "sre"),
        ("POST", f"{base}/escalation-decision", "sre"),
        ("POST", "/v1/payment-events", "payment-provider"),
    ]
    hostile: list[bytes] = [
        b"null", b"0", b'"x"', b"{}", b"[[[[[[[[[[]]]]]]]]]]", b'{"a":' * 500 + b"1" + b"}" * 500,
        b'{"seller_id": null, "decision": null}', b'{"order_id": "\\u0000"}', b"\xff\xfe\x00",
        b'{"buyer_id": "' + "\u00e9".encode() * 100 + b'"}', b'{"response_window": 1e400}',
        b'{"response_window": "-P1D"}', b'{"order_id": {"$gt": ""}}',
        json.dumps({"seller_id": OWN, "decision": "accept", "reason": ["a"]}).encode(),
        json.dumps({"event_id": "", "type": "refund_confirmed"}).encode(),
        json.dumps({"event_id": "e" * 300, "type": "refund_confirmed"}).encode(),
    ]  # fmt: skip
    hostile += [rng.randbytes(rng.randint(1, 200)) for _ in range(8)]
    for method, path, principal in routes:
        for body in hostile:
            headers = signed(body) if path.endswith("payment-events") else {}
            response = await api.call(
                method,
                path,
                principal,
                content=body,
                headers={"Content-Type": "application/json", **headers},
            )
            assert response.status_code < 500, (path, body[:80], response.text)
    for weird in ("cancel-%00-x", "cancel-O-1-S-1%2F..", "%ff", "cancel-" + "9" * 64 + "-S-1"):
        response = await api.call("GET", f"/v1/cancellations/{weird}", "sre")
        assert response.status_code < 500, (weird, response.text)
    for header in (
        {b"Authorization": "Bearer é".encode("latin-1")},
        {b"Authorization": b"Basic eDp5"},
    ):
        response = await api.http.get(f"{base}", headers=header)
        assert response.status_code == 401
    view = await api.view(cancellation_id, "buyer-service")
    assert view["status"] == "awaiting_seller"
    assert [e["kind"] for e in view["audit"]] == ["requested", "awaiting_seller"]


# --- the payment provider's webhook ------------------------------------------------------------


async def test_signed_event_wakes_a_pending_refund(api: Api) -> None:
    cancellation_id = await pending(api)
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{OWN}",
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert decided.status_code == 200

    async def submitted() -> dict[str, Any]:
        view = await api.view(cancellation_id, "buyer-service")
        assert view["status"] == "refund_submitted", view["status"]
        return view

    # The provider said "pending" at the first poll; the next one is POLL_INTERVAL away.
    refund = (await eventually(submitted))["refund"]
    body = event_body(type="refund_confirmed", provider_ref=refund["provider_ref"])
    sent_at = time.monotonic()
    response = await post_event(api, body)
    assert response.status_code == 200, response.text
    first = response.json()
    assert first == {
        "event_id": json.loads(body)["event_id"],
        "outcome": "delivered",
        "cancellation_id": cancellation_id,
        "duplicate": False,
    }

    async def completed() -> None:
        assert (await api.view(cancellation_id, "buyer-service"))["status"] == "completed"

    await eventually(completed, timeout=POLL_INTERVAL.total_seconds() / 3)
    assert time.monotonic() - sent_at < POLL_INTERVAL.total_seconds()
    view = await api.view(cancellation_id, "buyer-service")
    assert view["refund"]["stage"] == "confirmed"
    recorded = await api.pool.fetchrow(
        "SELECT cancellation_id, outcome FROM payment_events WHERE event_id = $1",
        first["event_id"],
    )
    assert dict(recorded) == {"cancellation_id": cancellation_id, "outcome": "delivered"}

    # The provider delivers again (at least once): the first answer, marked duplicate.
    # (forward_payment_event answers a duplicate from the event's recorded outcome alone, so
    # without the cancellation id.)
    replay = (await post_event(api, body)).json()
    assert (replay["event_id"], replay["outcome"], replay["duplicate"]) == (
        first["event_id"],
        "delivered",
        True,
    )
    # Out of order: a stale failure notice after the confirmation changes nothing (the
    # workflow has ended; the provider's own answer was the truth).
    late = await post_event(
        api,
        event_body(
            type="refund_failed",
            refund_key=refund["idempotency_key"],
            occurred_at="2020-01-01T00:00:00Z",
        ),
    )
    assert late.status_code == 200
    assert late.json()["outcome"] == "ignored" and late.json()["duplicate"] is False
    after = await api.view(cancellation_id, "buyer-service")
    assert (after["status"], after["refund"]["stage"]) == ("completed", "confirmed")


async def test_event_for_no_refund_of_ours(api: Api) -> None:
    response = await post_event(
        api, event_body(type="refund_confirmed", provider_ref="pr-unknown", refund_key="k-none")
    )
    assert response.status_code == 200
    assert response.json()["outcome"] == "unknown_refund"
    assert response.json()["cancellation_id"] is None


async def test_bad_and_stale_signatures_are_refused(api: Api) -> None:
    body = event_body(type="refund_confirmed", provider_ref="pr-any")
    event_id = json.loads(body)["event_id"]
    now = time.time()
    cases = [
        ({}, 401, "missing_signature"),
        ({SIGNATURE_HEADER: "sha256=abc"}, 400, "malformed_signature"),
        ({SIGNATURE_HEADER: f"t={int(now)}"}, 400, "malformed_signature"),
        (signed(body, secret="whsec_someone_else"), 401, "bad_signature"),
        (signed(body + b" "), 401, "bad_signature"),  # the body was altered
        # Older than the 5 min tolerance, and from the future. 10 s past it: the header's
        # whole seconds can drop up to a second, and the server reads its clock later.
        (signed(body, at=now - 310), 401, "stale_signature"),
        (signed(body, at=now + 310), 401, "stale_signature"),
    ]
    for headers, status, code in cases:
        response = await api.call(
            "POST",
            "/v1/payment-events",
            "payment-provider",
            content=body,
            headers={"Content-Type": "application/json", **headers},
        )
        assert_problem(response, status, code)
    assert (
        await api.pool.fetchval("SELECT count(*) FROM payment_events WHERE event_id = $1", event_id)
        == 0
    )
    # A good signature over a body that is not a payment event: 422, field by field.
    bad = json.dumps({"event_id": "e-1", "type": "refund_lost"}).encode()
    problem = assert_problem(await post_event(api, bad), 422, "invalid_payload")
    assert problem["errors"][0]["loc"] == ["body", "type"]


# --- logging -----------------------------------------------------------------------------------


async def test_refusals_are_logged_with_the_principal_never_the_key(api: Api) -> None:
    cancellation_id = await pending(api)
    wrong_key = generate_key()
    with structlog.testing.capture_logs() as logs:
        await api.http.get(
            f"/v1/cancellations/{cancellation_id}",
            headers={"Authorization": f"Bearer {wrong_key}"},
        )
        await api.call("GET", f"/v1/cancellations/{cancellation_id}", "payment-provider")
        await api.call(
            "POST",
            f"/v1/cancellations/{cancellation_id}/seller-decision",
            f"seller:{OTHER}",
            json={"seller_id": OTHER, "decision": "accept"},
        )
    refusals = [e for e in logs if e["event"] == "api_request_refused"]
    assert [(e["status"], e["code"], e["principal"]) for e in refusals] == [
        (401, "invalid_api_key", "anonymous"),
        (403, "forbidden", "payment-provider"),
        (404, "not_found", f"seller:{OTHER}"),
    ]
    assert all(e["reason"] and e["path"] for e in refusals)
    text = repr(logs)
    for key in [wrong_key, *api.keys.values()]:
        assert key not in text
        assert key.split("_", 2)[2] not in text

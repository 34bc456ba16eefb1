"""Hostile clients (issue 18) on the real servers: a Temporal dev server, a real PostgreSQL, the
product's own worker and the HTTP API in-process, the `temporal` CLI as a subprocess.

Each test is one defect class (docs/reliability.md, "Hostile clients"):

- control characters in any free text or identifier are refused where they enter (the API's
  422, the update validator's `invalid_payload`, a refused signal recorded), never handed to
  PostgreSQL, which would refuse them for ever; the cancellation then ends as the contract
  says, refund included;
- (more classes below, one section each).
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.stacks import ApiStack, api_stack, run_command
from helpers.wait import eventually, wait_for_status
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ActivityError
from temporalio.service import RPCError

from devstack.embedded import temporal_binary
from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    RefundStage,
    RequestCancellationInput,
)
from domain.rules import cancellation_id
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from starter.requests import start_cancellation
from tools.chaos.checks import workflow_task_failures
from workflows import search_attributes as sa

pytestmark = pytest.mark.e2e

SELLER, BUYER = "S-H1", "B-H1"
SECRET = "whsec_test_" + "h" * 32
PRINCIPALS = ("buyer-service", f"seller:{SELLER}", "sre", "payment-provider")


@dataclass
class Env:
    stack: ApiStack
    address: str
    task_queue: str

    @property
    def pool(self) -> asyncpg.Pool:
        return self.stack.pool

    def headers(self, principal: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stack.keys[principal]}"}


@pytest.fixture(scope="module")
async def env(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Env]:
    settings = fast_refund_settings(
        task_queue=f"hostile-clients-{uuid.uuid4().hex[:8]}",
        api_instant_wait=timedelta(seconds=10),
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=PRINCIPALS,
        webhook_secret=SECRET,
    ) as stack:
        yield Env(stack, temporal_address, settings.task_queue)


# --- helpers ---------------------------------------------------------------------------------


async def new_order(env: Env, *, validated: bool = True, coupon: bool = False) -> str:
    order_id = unique("H")
    order = one_seller_order(
        order_id, buyer_id=BUYER, seller_id=SELLER, validated=validated, coupon=coupon
    )
    report = await load_orders(env.pool, parse_orders_file(orders_file(order)))
    assert report.loaded == [order_id]
    return order_id


def request_for(order_id: str, *, buyer: str = BUYER, text: str = "") -> RequestCancellationInput:
    return RequestCancellationInput(
        order_id=order_id,
        seller_id=SELLER,
        buyer_id=buyer,
        reason=CancellationReason.OUT_OF_STOCK,
        reason_text=text,
    )


async def pending(env: Env) -> WorkflowHandle[Any, Any]:
    """A cancellation awaiting its seller, started as the API and the CLI start one."""
    order_id = await new_order(env)
    handle = await start_cancellation(
        env.stack.client, request_for(order_id), task_queue=env.task_queue
    )
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    return handle


async def cli(env: Env, *args: str) -> tuple[int, str]:
    ran = await run_command(
        temporal_binary(), *args, "--address", env.address, "--namespace", "default", timeout=60
    )
    return ran.returncode, ran.stdout + ran.stderr


async def cli_signal(env: Env, workflow_id: str, name: str, payload: Any) -> None:
    code, out = await cli(
        env, "workflow", "signal", "-w", workflow_id, "--name", name, "--input", json.dumps(payload)
    )
    assert code == 0, out


async def ledger_status(env: Env, cid: str) -> str | None:
    status: str | None = await env.pool.fetchval(
        "SELECT status FROM cancellations WHERE cancellation_id = $1", cid
    )
    return status


async def audit_kinds(env: Env, cid: str) -> list[tuple[str, str]]:
    trail = await Ledger(env.pool).audit_trail(cancellation_id=cid)
    return [(e.kind, e.detail) for e in trail]


async def provider_refunds(env: Env, cid: str) -> int:
    count: int = await env.pool.fetchval(
        "SELECT count(*) FROM provider_sim.refunds WHERE idempotency_key LIKE $1 || ':%'"
        " AND status = 'succeeded'",
        cid,
    )
    return count


async def assert_completed_with_one_refund(env: Env, handle: WorkflowHandle[Any, Any]) -> None:
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status is CancellationStatus.COMPLETED, result
    assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
    assert await ledger_status(env, handle.id) == "completed"
    assert await provider_refunds(env, handle.id) == 1
    failures = workflow_task_failures(await handle.fetch_history())
    assert not failures, failures


# --- 1. control characters never reach PostgreSQL ---------------------------------------------

# A NUL (PostgreSQL refuses it in text), another C0 control, a C1 control, a lone surrogate
# (not encodable as UTF-8 at all).
CONTROL = ["\x00", "\x1b[31m", "\x85", "\ud800"]


@pytest.mark.parametrize("bad", CONTROL, ids=["nul", "escape", "c1", "surrogate"])
async def test_control_characters_through_the_api_are_422_and_change_nothing(
    env: Env, bad: str
) -> None:
    http = env.stack.http
    order_id = await new_order(env)
    body = request_for(order_id).model_dump(mode="json")
    refused = await http.post(
        "/v1/cancellations",
        content=json.dumps({**body, "reason_text": f"broken{bad}"}),
        headers={**env.headers("buyer-service"), "Content-Type": "application/json"},
    )
    # A lone surrogate cannot even be decoded: the body is refused as malformed JSON.
    status, code = (400, "malformed_json") if bad == "\ud800" else (422, "invalid_payload")
    assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text
    assert status == 400 or "reason_text" in refused.text
    assert await ledger_status(env, cancellation_id(order_id, SELLER)) is None

    started = await http.post("/v1/cancellations", json=body, headers=env.headers("buyer-service"))
    assert started.status_code == 202, started.text
    cid = started.json()["cancellation_id"]
    handle = env.stack.client.get_workflow_handle(cid, result_type=CancellationResult)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    decision = {"seller_id": SELLER, "decision": "accept", "reason": f"ok{bad}"}
    refused = await http.post(
        f"/v1/cancellations/{cid}/seller-decision",
        content=json.dumps(decision),
        headers={**env.headers(f"seller:{SELLER}"), "Content-Type": "application/json"},
    )
    assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text
    assert await ledger_status(env, cid) == "awaiting_seller"

    accepted = await http.post(
        f"/v1/cancellations/{cid}/seller-decision",
        json={**decision, "reason": "out of stock\n\tsorry"},
        headers=env.headers(f"seller:{SELLER}"),
    )
    assert accepted.status_code == 200, accepted.text
    await assert_completed_with_one_refund(env, handle)


async def test_control_characters_in_any_field_of_a_plain_signal_are_refused_and_recorded(
    env: Env,
) -> None:
    """Through `temporal workflow signal`: each message below is refused (recorded in the
    ledger's audit trail with `invalid_payload`, or `wrong_*` for an identity that cannot be
    ours), the cancellation still waits for its seller in the workflow and in the ledger, and
    the seller's valid decision, sent the same way, completes it with its refund."""
    handle = await pending(env)
    cid = handle.id
    hostile = [
        ("seller_decision", {"seller_id": SELLER, "decision": "accept", "reason": "ok\x00"}),
        ("seller_decision", {"seller_id": SELLER + "\x00", "decision": "accept"}),
        ("seller_decision", {"seller_id": SELLER, "decision": "accept", "\x00": "x"}),
        ("withdraw", {"buyer_id": BUYER, "reason": "changed my mind\x00"}),
        ("withdraw", {"buyer_id": BUYER + "\x00"}),
        (
            "payment_event",
            {"event_id": "evt\x00", "type": "refund_confirmed", "provider_ref": "re_x"},
        ),
        (
            "payment_event",
            {"event_id": "evt-1", "type": "refund_confirmed", "provider_ref": "re\x00"},
        ),
    ]
    for name, payload in hostile:
        await cli_signal(env, cid, name, payload)

    async def all_refusals_recorded() -> None:
        refused = [(k, d) for k, d in await audit_kinds(env, cid) if k.endswith("_refused")]
        assert len(refused) == len(hostile), refused
        assert all(d.split(":", 1)[0] == "invalid_payload" for _, d in refused), refused

    await eventually(all_refusals_recorded, timeout=30)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    assert await ledger_status(env, cid) == "awaiting_seller"

    await cli_signal(
        env, cid, "seller_decision", {"seller_id": SELLER, "decision": "accept", "reason": "ok"}
    )
    await assert_completed_with_one_refund(env, handle)


async def test_control_characters_in_an_update_are_refused_by_its_validator(env: Env) -> None:
    handle = await pending(env)
    code, out = await cli(
        env,
        "workflow",
        "update",
        "execute",
        "-w",
        handle.id,
        "--name",
        "decide",
        "--input",
        json.dumps({"seller_id": SELLER, "decision": "accept", "reason": "ok\x00"}),
    )
    assert code != 0 and "invalid_payload" in out, out
    assert await ledger_status(env, handle.id) == "awaiting_seller"
    code, out = await cli(
        env,
        "workflow",
        "update",
        "execute",
        "-w",
        handle.id,
        "--name",
        "decide",
        "--input",
        json.dumps({"seller_id": SELLER, "decision": "accept", "reason": "ok"}),
    )
    assert code == 0, out
    await assert_completed_with_one_refund(env, handle)


# Raw payloads no JSON decoder takes as text: a lone surrogate escaped in the JSON (valid JSON
# syntax, but no UTF-8 text holds it), bytes that are not UTF-8, and an encoding nobody knows.
SURROGATE_DECISION = b'{"seller_id": "%s", "decision": "accept", "reason": "\\ud800"}' % (
    SELLER.encode()
)
UNDECODABLE = [
    (b"json/plain", SURROGATE_DECISION),
    (b"json/plain", b'{"seller_id": "\xff\xfe", "decision": "accept"}'),
    (b"binary/secret-sauce", b"\x00\x01"),
]


def raw_payloads(encoding: bytes, data: bytes) -> Any:
    from temporalio.api.common.v1 import Payload, Payloads

    return Payloads(payloads=[Payload(metadata={"encoding": encoding}, data=data)])


async def raw_signal(env: Env, workflow_id: str, name: str, encoding: bytes, data: bytes) -> None:
    """A signal as another SDK sends one: the bytes of its payload as they are."""
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.api.workflowservice.v1 import SignalWorkflowExecutionRequest

    client = env.stack.client
    await client.workflow_service.signal_workflow_execution(
        SignalWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id),
            signal_name=name,
            input=raw_payloads(encoding, data),
            identity="raw-client",
            request_id=str(uuid.uuid4()),
        )
    )


async def raw_update(
    env: Env, workflow_id: str, name: str, encoding: bytes, data: bytes
) -> tuple[str, str]:
    """An update as another SDK sends one, waited for: (failure type, message), or ("", "")
    when it was accepted."""
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.api.enums.v1 import UpdateWorkflowExecutionLifecycleStage
    from temporalio.api.update.v1 import Input, Meta, Request, WaitPolicy
    from temporalio.api.workflowservice.v1 import UpdateWorkflowExecutionRequest

    client = env.stack.client
    response = await client.workflow_service.update_workflow_execution(
        UpdateWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id),
            wait_policy=WaitPolicy(
                lifecycle_stage=UpdateWorkflowExecutionLifecycleStage.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_COMPLETED
            ),
            request=Request(
                meta=Meta(update_id=str(uuid.uuid4()), identity="raw-client"),
                input=Input(name=name, args=raw_payloads(encoding, data)),
            ),
        )
    )
    failure = response.outcome.failure
    if not response.outcome.HasField("failure"):
        return "", ""
    return failure.application_failure_info.type, failure.message


@pytest.mark.parametrize(
    ("encoding", "data"), UNDECODABLE, ids=["lone-surrogate", "not-utf8", "unknown-encoding"]
)
async def test_an_undecodable_update_is_refused_by_its_validator_as_invalid_payload(
    env: Env, encoding: bytes, data: bytes
) -> None:
    """Not by the SDK's decoder ("Failed decoding arguments"): by our validator, with the
    contract's code; and nothing changes."""
    handle = await pending(env)
    for name in ("decide", "resolve_escalation", "retry_refund"):
        kind, message = await raw_update(env, handle.id, name, encoding, data)
        assert kind == "invalid_payload", (name, kind, message)
        assert "not decodable" in message and "Failed decoding" not in message, message
    assert await ledger_status(env, handle.id) == "awaiting_seller"
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await cli_signal(env, handle.id, "seller_decision", {"seller_id": SELLER, "decision": "accept"})
    await assert_completed_with_one_refund(env, handle)


async def test_undecodable_signals_are_refused_counted_and_recorded(env: Env) -> None:
    """Each undecodable signal is a refusal the workflow counts and records (R20), not a
    message the SDK drops; the seller's valid decision then completes the cancellation."""
    handle = await pending(env)
    sent = 0
    for name in ("seller_decision", "withdraw", "payment_event"):
        for encoding, data in UNDECODABLE:
            await raw_signal(env, handle.id, name, encoding, data)
            sent += 1

    async def all_refused() -> list[tuple[str, str]]:
        refused = [(k, d) for k, d in await audit_kinds(env, handle.id) if k.endswith("_refused")]
        assert len(refused) == sent, refused
        return refused

    refused = await eventually(all_refused, timeout=30)
    assert all(d.startswith("invalid_payload: invalid payload: not decodable") for _, d in refused)
    assert all("\ud800" not in d for _, d in refused)  # escaped, never stored as it came
    assert await ledger_status(env, handle.id) == "awaiting_seller"
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await raw_signal(
        env,
        handle.id,
        "seller_decision",
        b"json/plain",
        json.dumps({"seller_id": SELLER, "decision": "accept"}).encode(),
    )
    await assert_completed_with_one_refund(env, handle)


async def test_an_undecodable_start_fails_its_run_as_invalid_payload_and_writes_nothing(
    env: Env,
) -> None:
    """A start whose input holds a lone surrogate (raw, as another SDK sends it) ends its run
    at once with `invalid_payload`, instead of failing its workflow task for ever; nothing
    reaches the ledger."""
    from temporalio.api.common.v1 import WorkflowType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import StartWorkflowExecutionRequest

    order_id = await new_order(env)
    cid = cancellation_id(order_id, SELLER)
    text = request_for(order_id).model_dump_json()
    data = (text[:-1] + ', "reason_text": "\\ud800"}').encode()
    client = env.stack.client
    await client.workflow_service.start_workflow_execution(
        StartWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_id=cid,
            workflow_type=WorkflowType(name="OrderCancellation"),
            task_queue=TaskQueue(name=env.task_queue),
            input=raw_payloads(b"json/plain", data),
            identity="raw-client",
            request_id=str(uuid.uuid4()),
        )
    )
    handle = client.get_workflow_handle(cid)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 30)
    cause = failed.value.cause
    assert getattr(cause, "type", None) == "invalid_payload", cause
    assert "not decodable" in str(cause), cause
    assert not workflow_task_failures(await handle.fetch_history())
    assert await ledger_status(env, cid) is None


async def test_a_ledger_write_postgresql_refuses_for_its_data_is_final_not_retried(
    env: Env,
) -> None:
    """Defence in depth: should text PostgreSQL refuses ever reach a ledger activity, the
    activity fails for good with a typed error (no retry for ever), and nothing is written."""
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.ledger_activities import LEDGER_DATA_REFUSED, LedgerActivities
    from domain.models import EventInput, RefundPolicy, TimeoutPolicy, TransitionInput

    handle = await pending(env)
    activities = LedgerActivities(
        Ledger(env.pool),
        response_window=timedelta(hours=1),
        timeout_policy=TimeoutPolicy.AUTO_APPROVE,
        refund_policy=RefundPolicy(),
    )
    calls: list[tuple[Callable[[Any], Awaitable[Any]], Any]] = [
        (
            activities.record_transition,
            TransitionInput(
                cancellation_id=handle.id,
                status=CancellationStatus.APPROVED,
                actor="seller:x",
                kind="approved",
                detail="nul\x00",
                event_key="t-1",
                cancel_sub_order=True,
            ),
        ),
        (
            activities.record_event,
            EventInput(
                cancellation_id=handle.id, actor="a\ud800", kind="k", detail="", event_key="t-2"
            ),
        ),
    ]
    for call, arg in calls:
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(call, arg)
        assert caught.value.type == LEDGER_DATA_REFUSED and caught.value.non_retryable
    assert await ledger_status(env, handle.id) == "awaiting_seller"
    assert [k for k, _ in await audit_kinds(env, handle.id)] == ["requested", "awaiting_seller"]
    await handle.signal("seller_decision", {"seller_id": SELLER, "decision": "reject"})
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.REJECTED


# --- 2. workflow ids are one-to-one -------------------------------------------------------------


def test_the_workflow_id_is_one_to_one_and_reads_back() -> None:
    from domain.rules import parse_cancellation_id

    assert cancellation_id("A-B", "C") != cancellation_id("A", "B-C")
    assert cancellation_id("O-1002", "S-7") == "cancel-O-1002~S-7"
    for order, seller in [("A-B", "C"), ("A", "B-C"), ("O.1:2", "S_7"), ("x", "y")]:
        assert parse_cancellation_id(cancellation_id(order, seller)) == (order, seller)
    for other in [
        "cancel-O-1-S-1",
        "cancel-~S",
        "cancel-O~",
        "cancel-O~S~T",
        "O~S",
        "cancel-O\x00~S",
    ]:
        assert parse_cancellation_id(other) is None, other


async def test_two_sub_orders_whose_ids_concatenate_alike_are_two_cancellations(env: Env) -> None:
    """Order `U-A` of seller `B` and order `U` of seller `A-B`, two buyers: each buyer gets a
    cancellation of their own (the old `cancel-{order}-{seller}` joined the second buyer to
    the first buyer's cancellation)."""
    base = unique("U")
    orders = [
        one_seller_order(f"{base}-A", buyer_id="B-first", seller_id="B"),
        one_seller_order(base, buyer_id="B-second", seller_id="A-B"),
    ]
    await load_orders(env.pool, parse_orders_file(orders_file(*orders)))
    handles = []
    for order, seller, buyer in [(f"{base}-A", "B", "B-first"), (base, "A-B", "B-second")]:
        request = RequestCancellationInput(
            order_id=order, seller_id=seller, buyer_id=buyer, reason=CancellationReason.OTHER
        )
        handles.append(
            await start_cancellation(env.stack.client, request, task_queue=env.task_queue)
        )
    assert handles[0].id != handles[1].id
    for handle, buyer in zip(handles, ["B-first", "B-second"], strict=True):
        view = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
        assert view.buyer_id == buyer
        row = await env.pool.fetchrow(
            "SELECT buyer_id FROM cancellations WHERE cancellation_id = $1", handle.id
        )
        assert row is not None and row["buyer_id"] == buyer
        await handle.signal("seller_decision", {"seller_id": view.seller_id, "decision": "reject"})
        assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.REJECTED


async def test_a_start_whose_workflow_id_names_another_sub_order_is_refused(env: Env) -> None:
    """Any client can pick a workflow id: one that is not the request's own sub-order's fails
    at once, and nothing is written."""
    order_id = await new_order(env)
    request = request_for(order_id).model_dump(mode="json")
    wrong_id = cancellation_id(order_id + "-X", SELLER)
    code, out = await cli(
        env,
        "workflow",
        "start",
        "--type",
        "OrderCancellation",
        "--task-queue",
        env.task_queue,
        "--workflow-id",
        wrong_id,
        "--input",
        json.dumps(request),
    )
    assert code == 0, out
    handle = env.stack.client.get_workflow_handle(wrong_id)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 30)
    cause = failed.value.cause
    assert getattr(cause, "type", None) == "CancellationIdMismatch", cause
    assert await ledger_status(env, wrong_id) is None
    assert await ledger_status(env, cancellation_id(order_id, SELLER)) is None


# --- 3. the contract holds for every client ----------------------------------------------------


async def ledger_footprint(env: Env, cid: str) -> tuple[Any, ...]:
    """Everything a cancellation left in the ledger: its row, audit trail, refunds, coupon
    decisions and the provider's refunds."""
    row = await env.pool.fetchrow(
        "SELECT buyer_id, status, path FROM cancellations WHERE cancellation_id = $1", cid
    )
    audit = await audit_kinds(env, cid)
    refunds = await env.pool.fetch(
        "SELECT idempotency_key, stage, generation FROM refunds WHERE cancellation_id = $1"
        " ORDER BY generation",
        cid,
    )
    coupons = await env.pool.fetch(
        "SELECT outcome, round, performed_restore, superseded_at FROM coupon_decisions"
        " WHERE cancellation_id = $1 ORDER BY decision_id",
        cid,
    )
    return (
        tuple(row) if row else None,
        audit,
        [tuple(r) for r in refunds],
        [tuple(c) for c in coupons],
        await provider_refunds(env, cid),
    )


async def cli_start(env: Env, workflow_id: str, request: dict[str, Any]) -> tuple[int, str]:
    return await cli(
        env,
        "workflow",
        "start",
        "--type",
        "OrderCancellation",
        "--task-queue",
        env.task_queue,
        "--workflow-id",
        workflow_id,
        "--input",
        json.dumps(request),
    )


async def test_a_second_start_of_an_ended_cancellation_changes_nothing(env: Env) -> None:
    """`temporal workflow start` of a completed cancellation's id (its own request, then
    another buyer's): no refund, no coupon decision, no audit row, the buyer unchanged."""
    order_id = await new_order(env, coupon=True)
    handle = await start_cancellation(
        env.stack.client, request_for(order_id), task_queue=env.task_queue
    )
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.signal("seller_decision", {"seller_id": SELLER, "decision": "accept"})
    await assert_completed_with_one_refund(env, handle)
    before = await ledger_footprint(env, handle.id)
    assert before[3] and before[3][0][0] == "restored"

    for buyer in (BUYER, "B-intruder"):
        code, out = await cli_start(
            env, handle.id, request_for(order_id, buyer=buyer).model_dump(mode="json")
        )
        assert code == 0, out
        run = env.stack.client.get_workflow_handle(handle.id)
        try:
            await asyncio.wait_for(run.result(), 30)
        except WorkflowFailureError as err:  # another buyer's run fails as "not found"
            assert buyer != BUYER, err
            assert isinstance(err.cause, ActivityError), err.cause
            assert getattr(err.cause.cause, "type", None) == "SubOrderNotFound", err.cause
        assert await ledger_footprint(env, handle.id) == before, buyer
        history = await run.fetch_history()
        assert not workflow_task_failures(history)
        # The new run asks the ledger where the cancellation stands, and nothing else: no
        # coupon decided again, no transition written.
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert scheduled == ["open_cancellation"], (buyer, scheduled)
        # Whatever the intruder's run shows, it never names the intruder as the buyer.
        attrs = (await run.describe()).typed_search_attributes
        assert attrs.get(sa.BUYER_ID) in (None, BUYER), buyer
    # Asked again as the API and `ordercancel request` ask: the same cancellation, as it ended.
    again = await start_cancellation(
        env.stack.client, request_for(order_id), task_queue=env.task_queue
    )
    assert (await asyncio.wait_for(again.result(), 30)).status is CancellationStatus.COMPLETED
    assert await ledger_footprint(env, handle.id) == before


async def test_another_buyer_cannot_adopt_a_running_cancellation(env: Env) -> None:
    handle = await pending(env)
    view = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    intruder = request_for(view.order_id, buyer="B-intruder")
    from domain.errors import SubOrderNotFound

    with pytest.raises(SubOrderNotFound):
        await start_cancellation(env.stack.client, intruder, task_queue=env.task_queue)
    # The CLI is refused, or handed the running cancellation (its input dropped).
    code, out = await cli_start(env, handle.id, intruder.model_dump(mode="json"))
    assert code != 0 or (handle.result_run_id or "") in out, out
    assert (await handle.describe()).run_id == handle.result_run_id
    view = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    assert view.buyer_id == BUYER
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(sa.BUYER_ID) == BUYER
    await handle.signal("seller_decision", {"seller_id": SELLER, "decision": "reject"})
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.REJECTED


# --- 6. hostile volume ---------------------------------------------------------------------------

FLOOD = 10_000
BATCH = 1_000
HISTORY_LIMIT = 51_200  # Temporal terminates a run whose history reaches this many events


async def test_ten_thousand_refused_signals_neither_end_nor_block_a_cancellation(
    env: Env,
) -> None:
    """10,000 refused signals (another seller's decisions) against one cancellation, sent
    concurrently; then the seller's valid decision completes it with one refund. Every run's
    history stays far below Temporal's limit, and the audit trail records the first refusals
    and how many there were, not every one."""
    handle = await pending(env)
    gate = asyncio.Semaphore(32)
    noise = {"seller_id": "S-intruder", "decision": "accept", "reason": "x" * 200}
    retried = 0
    pushed_back: list[int] = []

    async def one() -> None:
        nonlocal retried
        async with gate:
            for attempt in range(30):
                try:
                    await handle.signal("seller_decision", noise, rpc_timeout=timedelta(seconds=30))
                    return
                except RPCError as err:
                    # Temporal's backpressure: while a run continues as new it refuses
                    # signals (not delivered); or a loaded machine timed the call out (it
                    # may have landed). Either way the sender tries again, later.
                    if "limit for signal events" in str(err):
                        pushed_back.append(1)
                    else:
                        retried += 1
                    await asyncio.sleep(min(0.2 * (attempt + 1), 2))
            raise AssertionError("signal not delivered")

    async def taken(sent: int) -> None:
        """The workflow has handled `sent` signals (a burst, then the next one)."""
        view = await handle.query("status", result_type=dict)
        assert view["refused_messages"] >= sent, (view["refused_messages"], sent)

    loop = asyncio.get_running_loop()
    started = loop.time()
    # In batches of 1,000 concurrent signals: a run continues as new between two batches
    # (under an unbroken flood Temporal refuses to close a run that has unhandled signals, and
    # its per-run signal limit then bounds the history instead).
    for batch in range(1, FLOOD // BATCH + 1):
        await asyncio.gather(*(one() for _ in range(BATCH)))
        await eventually(functools.partial(taken, batch * BATCH), timeout=120, interval=0.5)
    sent_in = loop.time() - started

    async def counted() -> int:
        view = await handle.query("status", result_type=dict)
        refused: int = view["refused_messages"]
        assert FLOOD <= refused <= FLOOD + retried, refused
        return refused

    total = await eventually(counted, timeout=120, interval=1)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    noise = {"seller_id": SELLER, "decision": "accept"}
    await one()  # the seller's own decision, sent as any sender sends (pushed back: again)
    await assert_completed_with_one_refund(env, handle)

    runs = [wf.run_id async for wf in env.stack.client.list_workflows(f'WorkflowId="{handle.id}"')]
    lengths = []
    for run_id in runs:
        history = await env.stack.client.get_workflow_handle(
            handle.id, run_id=run_id
        ).fetch_history()
        lengths.append(len(history.events))
        # A continue-as-new that met new signals is failed by the server and tried again
        # (FORCE_CLOSE_COMMAND, UNHANDLED_COMMAND): Temporal's, not the workflow's.
        failures = [f for f in workflow_task_failures(history) if "FORCE_CLOSE_COMMAND" not in f]
        assert not failures, failures
    print(
        f"\n{FLOOD} refused signals sent in {sent_in:.0f}s:"
        f" {len(runs)} runs, history lengths {sorted(lengths)};"
        f" {len(pushed_back)} pushed back by the server, {retried} retried after a timeout"
    )
    assert max(lengths) < HISTORY_LIMIT // 4, lengths
    refused = [k for k, _ in await audit_kinds(env, handle.id) if k.endswith("_refused")]
    assert 0 < len(refused) <= 20, len(refused)
    counts = [d for k, d in await audit_kinds(env, handle.id) if k == "refusals_counted"]
    assert counts and counts[-1].startswith(f"{total} messages were refused"), counts

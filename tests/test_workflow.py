"""`OrderCancellation` on the time-skipping server, with named fake activities that record calls.

Every path of the rule book (R1-R5, R10) and every refused decision. The 48 h window is skipped,
not waited.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from helpers.workflow_fakes import (
    FakeActivities,
    Harness,
    accept,
    refused,
    reject,
    start_fake_worker,
    status_of,
    wait_for_status,
)
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    EventInput,
    Money,
    RefundStage,
    RequestCancellationInput,
    TimeoutPolicy,
)
from domain.rules import cancellation_id, refund_idempotency_key
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation

AMOUNT = Money(amount_minor=2540, currency="EUR")


@pytest.fixture(params=[1000, 0], ids=["cached", "replay-every-task"])
def cache_size(request: pytest.FixtureRequest) -> int:
    """Each test also runs with no workflow cache: every task replays the history."""
    return int(request.param)


@pytest.fixture
async def harness(
    time_skipping_env: WorkflowEnvironment, cache_size: int
) -> AsyncIterator[Callable[[FakeActivities], Awaitable[Harness]]]:
    workers: list[Worker] = []

    async def make(fakes: FakeActivities) -> Harness:
        worker, harness = start_fake_worker(time_skipping_env, fakes, cache_size=cache_size)
        workers.append(worker)
        return harness

    yield make
    for worker in workers:
        await worker.shutdown()


async def timers(handle: WorkflowHandle[Any, Any]) -> list[tuple[timedelta, str]]:
    """The durable timers a workflow started, read from its history: (duration, how it ended).

    The time-skipping server's clock jumps arbitrarily far while a test awaits a result, so the
    history, not the clock, says how long a workflow waited."""
    started: dict[int, timedelta] = {}
    ended: dict[int, str] = {}
    async for event in handle.fetch_history_events():
        kind = event.WhichOneof("attributes")
        if kind == "timer_started_event_attributes":
            started[event.event_id] = (
                event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
            )
        elif kind == "timer_fired_event_attributes":
            ended[event.timer_fired_event_attributes.started_event_id] = "fired"
        elif kind == "timer_canceled_event_attributes":
            ended[event.timer_canceled_event_attributes.started_event_id] = "canceled"
    return [(duration, ended.get(event_id, "pending")) for event_id, duration in started.items()]


REFUND_STEPS = ["request_refund", "submit_refund", "confirm_refund", "restore_coupon"]


async def upserts(handle: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    """The search-attribute upserts of a workflow (commands, each a billable action), read from
    its history, without the SDK's own `TemporalChangeVersion` upsert that goes with each patch."""
    found = []
    async for event in handle.fetch_history_events():
        if event.WhichOneof("attributes") == "upsert_workflow_search_attributes_event_attributes":
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
            values = {k: json.loads(v.data) for k, v in fields.indexed_fields.items()}
            if "TemporalChangeVersion" not in values:
                found.append(values)
    return found


async def test_instant_path_refunds_without_the_seller(harness: Any) -> None:
    h = await harness(FakeActivities(path=CancellationPath.INSTANT))
    handle = await h.start()
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert result.path is CancellationPath.INSTANT
    assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
    assert h.fakes.names() == ["open_cancellation", *REFUND_STEPS, "record_transition"]
    # R9: the idempotency key is derived from the cancellation id, the same for every step.
    keys = {
        a.idempotency_key for a in h.fakes.args("submit_refund") + h.fakes.args("confirm_refund")
    }
    assert keys == {refund_idempotency_key(handle.id)}
    view = await status_of(handle)
    assert [d.done for d in view.dots] == [True, True, True]
    kinds = [e.kind for e in view.audit]
    assert kinds[:2] == ["requested", "cancelled_instantly"]
    assert kinds[-1] == "completed"
    attrs = (await handle.describe()).typed_search_attributes
    assert attrs.get(sa.CANCELLATION_STATUS) == "completed"
    assert attrs.get(sa.REFUND_STAGE) == 3
    assert attrs.get(sa.ORDER_ID) == view.order_id


async def test_seller_accepts_through_the_update(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    pending = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    assert pending.seller_deadline is not None
    attrs = (await handle.describe()).typed_search_attributes
    assert attrs.get(sa.CANCELLATION_STATUS) == "awaiting_seller"
    assert attrs.get(sa.SELLER_DEADLINE) == pending.seller_deadline

    receipt = await handle.execute_update(OrderCancellation.decide, accept(reason="sorry"))
    assert receipt.accepted and receipt.status is CancellationStatus.APPROVED
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    approved = h.fakes.args("record_transition")[0]
    assert approved.status is CancellationStatus.APPROVED
    assert approved.actor == "seller:S-7" and approved.detail == "sorry"
    assert approved.cancel_sub_order is True
    assert h.fakes.names()[2:] == [*REFUND_STEPS, "record_transition"]


async def test_seller_accepts_through_the_signal(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.signal(OrderCancellation.seller_decision, accept())
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert h.fakes.args("record_transition")[0].actor == "seller:S-7"


async def test_seller_rejects_and_nothing_is_refunded(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    receipt = await handle.execute_update(OrderCancellation.decide, reject())
    assert receipt.status is CancellationStatus.REJECTED
    result = await handle.result()
    assert result.status is CancellationStatus.REJECTED and result.refund is None
    assert "request_refund" not in h.fakes.names()
    transition = h.fakes.args("record_transition")[0]
    assert transition.status is CancellationStatus.REJECTED
    assert transition.cancel_sub_order is False
    assert transition.detail == "already shipped"


async def test_silent_seller_is_auto_approved_after_48h(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    approved = h.fakes.args("record_transition")[0]
    assert approved.status is CancellationStatus.APPROVED and approved.actor == "timer"
    # One durable timer of the whole window, and it fired (skipped, not waited).
    assert await timers(handle) == [(timedelta(hours=48), "fired")]


async def test_the_seller_policys_window_is_the_timer(harness: Any) -> None:
    h = await harness(FakeActivities(response_window=timedelta(seconds=5)))
    handle = await h.start()
    view = await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    assert view.seller_deadline is not None
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert await timers(handle) == [(timedelta(seconds=5), "fired")]


async def test_silent_seller_auto_rejected_under_that_policy(harness: Any) -> None:
    h = await harness(FakeActivities(timeout_policy=TimeoutPolicy.AUTO_REJECT))
    handle = await h.start()
    result = await handle.result()
    assert result.status is CancellationStatus.REJECTED
    assert h.fakes.args("record_transition")[0].actor == "timer"
    assert "request_refund" not in h.fakes.names()


async def test_escalation_waits_for_an_operator(harness: Any) -> None:
    h = await harness(
        FakeActivities(timeout_policy=TimeoutPolicy.ESCALATE, response_window=timedelta(seconds=2))
    )
    handle = await h.start()
    # Let the window pass, then the request waits for an operator.
    await h.env.sleep(timedelta(seconds=3))
    await wait_for_status(handle, CancellationStatus.ESCALATED)
    # The seller is too late now.
    late = await refused(handle, OrderCancellation.decide, accept())
    assert late.type == "not_pending"
    receipt = await handle.execute_update(
        OrderCancellation.resolve_escalation,
        {"operator_id": "ops-1", "decision": "accept", "reason": "buyer protection"},
    )
    assert receipt.status is CancellationStatus.APPROVED
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    transitions = h.fakes.args("record_transition")
    assert [t.status for t in transitions[:2]] == [
        CancellationStatus.ESCALATED,
        CancellationStatus.APPROVED,
    ]
    assert transitions[1].actor == "operator:ops-1"


async def test_an_operator_decides_a_request_still_waiting_for_its_seller(harness: Any) -> None:
    """Issue 20: a stuck request need not wait out the window; the operator decides in the
    seller's place, recorded as themselves, and the seller's late answer is refused."""
    h = await harness(FakeActivities())
    handle = await h.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    receipt = await handle.execute_update(
        OrderCancellation.resolve_escalation,
        {"operator_id": "ops-1", "decision": "reject", "reason": "seller closed shop"},
    )
    assert receipt.status is CancellationStatus.REJECTED
    # The seller's late answer and a second operator are refused, by the workflow's validator,
    # or by Temporal when the rejected request has closed meanwhile: either way nothing changes.
    for update, payload, codes in (
        (OrderCancellation.decide, accept(), ("already_decided", "not_pending")),
        (
            OrderCancellation.resolve_escalation,
            {"operator_id": "o", "decision": "accept"},
            ("not_escalated",),
        ),
    ):
        try:
            late = await refused(handle, update, payload)
        except RPCError as err:
            assert err.status is RPCStatusCode.NOT_FOUND, err
        else:
            assert late.type in codes
    result = await handle.result()
    assert result.status is CancellationStatus.REJECTED
    rejected = h.fakes.args("record_transition")[0]
    assert rejected.actor == "operator:ops-1" and rejected.detail == "seller closed shop"
    assert "request_refund" not in h.fakes.names()


async def test_refused_decisions_are_specific_and_change_nothing(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    # Before the request is open, nothing is pending.
    first = await refused(handle, OrderCancellation.decide, accept())
    assert first.type in ("not_pending",)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)

    wrong = await refused(handle, OrderCancellation.decide, accept(seller="S-99"))
    assert wrong.type == "wrong_seller" and "S-99" in wrong.message
    bad = await refused(handle, OrderCancellation.decide, {"seller_id": "S-7", "decision": "maybe"})
    assert bad.type == "invalid_payload" and "decision" in bad.message
    missing = await refused(handle, OrderCancellation.decide, {"decision": "accept"})
    assert missing.type == "invalid_payload" and "seller_id" in missing.message
    extra = await refused(handle, OrderCancellation.decide, {**accept(), "amount": 1})
    assert extra.type == "invalid_payload" and "amount" in extra.message
    not_json_object = await refused(handle, OrderCancellation.decide, "accept")
    assert not_json_object.type == "invalid_payload"
    retry = await refused(handle, OrderCancellation.retry_refund, {"operator_id": "ops-1"})
    assert retry.type == "not_refund_failed"
    # None of that moved the request.
    assert (await status_of(handle)).status is CancellationStatus.AWAITING_SELLER
    assert "record_transition" not in h.fakes.names()

    await handle.execute_update(OrderCancellation.decide, reject())
    second = await refused(handle, OrderCancellation.decide, accept())
    assert second.type == "already_decided"
    result = await handle.result()
    assert result.status is CancellationStatus.REJECTED


async def test_refused_signals_are_recorded_and_ignored(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.signal(OrderCancellation.seller_decision, accept(seller="S-99"))
    await handle.signal(OrderCancellation.seller_decision, {"decision": 42})
    await handle.signal(OrderCancellation.withdraw, {"buyer_id": "B-other"})

    async def refusals() -> list[EventInput]:
        return h.fakes.args("record_event")

    deadline = asyncio.get_running_loop().time() + 10
    while len(await refusals()) < 3:
        assert asyncio.get_running_loop().time() < deadline, h.fakes.names()
        await asyncio.sleep(0.05)
    # The three audit writes run concurrently; their keys keep the order the signals arrived in.
    events = sorted(await refusals(), key=lambda e: e.event_key)
    assert [e.kind for e in events] == [
        "seller_decision_refused",
        "seller_decision_refused",
        "withdraw_refused",
    ]
    assert events[0].detail.startswith("wrong_seller") and events[0].actor == "seller:S-99"
    assert events[1].detail.startswith("invalid_payload")
    assert events[2].detail.startswith("wrong_buyer")
    assert len({e.event_key for e in events}) == 3
    # Still waiting for the real seller, who can still decide.
    assert (await status_of(handle)).status is CancellationStatus.AWAITING_SELLER
    await handle.signal(OrderCancellation.seller_decision, accept())
    assert (await handle.result()).status is CancellationStatus.COMPLETED


async def test_buyer_withdraws_a_pending_request(harness: Any) -> None:
    h = await harness(FakeActivities())
    handle = await h.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.signal(OrderCancellation.withdraw, {"buyer_id": "B-1", "reason": "found it"})
    result = await handle.result()
    assert result.status is CancellationStatus.WITHDRAWN
    transition = h.fakes.args("record_transition")[0]
    assert transition.status is CancellationStatus.WITHDRAWN
    assert transition.actor == "buyer:B-1"
    assert "request_refund" not in h.fakes.names()
    # The request has ended: a decision now is refused by the server (workflow closed).
    with pytest.raises(RPCError) as ended:
        await handle.execute_update(OrderCancellation.decide, accept())
    assert ended.value.status is RPCStatusCode.NOT_FOUND


async def test_final_refund_failure_parks_and_an_operator_retry_resumes(harness: Any) -> None:
    fakes = FakeActivities(
        path=CancellationPath.INSTANT,
        submit_failures=[
            ApplicationError("card closed", type="RefundRejected", non_retryable=True)
        ],
    )
    h = await harness(fakes)
    handle = await h.start()
    parked = await wait_for_status(handle, CancellationStatus.REFUND_FAILED)
    assert parked.last_error is not None and "RefundRejected" in parked.last_error
    attrs = (await handle.describe()).typed_search_attributes
    assert attrs.get(sa.CANCELLATION_STATUS) == "refund_failed"
    # The workflow waits; it has not failed.
    assert (await handle.describe()).status is not None
    bad = await refused(handle, OrderCancellation.retry_refund, {"operator": "x"})
    assert bad.type == "invalid_payload"

    receipt = await handle.execute_update(
        OrderCancellation.retry_refund, {"operator_id": "sre-1", "reason": "provider back"}
    )
    assert receipt.accepted
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    # Refused for good: the refund was declined, and the retry asked for a new one (the ledger
    # gives it the next generation's key) before submitting again.
    assert [f.final for f in fakes.args("record_refund_failed")] == [True]
    assert fakes.names().count("request_refund") == 2
    names = fakes.names()
    retry_at = names.index("record_refund_failed")
    assert names[retry_at + 1 : retry_at + 4] == [
        "record_transition",
        "request_refund",
        "submit_refund",
    ]
    submits = fakes.args("submit_refund")
    assert len(submits) == 2
    assert len({s.event_key for s in submits}) == 2
    retry = [t for t in fakes.args("record_transition") if t.kind == "refund_retry"]
    assert retry and retry[0].actor == "operator:sre-1"


async def test_transient_failures_exhausting_retries_also_park(harness: Any) -> None:
    fakes = FakeActivities(
        path=CancellationPath.INSTANT,
        submit_failures=[
            ApplicationError("503", type="ProviderUnavailable"),
            ApplicationError("503", type="ProviderUnavailable"),
        ],
    )
    h = await harness(fakes)
    handle = await h.start()
    parked = await wait_for_status(handle, CancellationStatus.REFUND_FAILED)
    assert parked.last_error is not None and "ProviderUnavailable" in parked.last_error
    # submit_max_attempts=2 in the fake's policy; not final: the same refund, same key, later.
    assert fakes.names().count("submit_refund") == 2
    assert [f.final for f in fakes.args("record_refund_failed")] == [False]
    await handle.execute_update(OrderCancellation.retry_refund, {"operator_id": "sre-1"})
    assert (await handle.result()).status is CancellationStatus.COMPLETED


async def test_starting_twice_returns_the_existing_cancellation(harness: Any) -> None:
    from starter.requests import start_cancellation

    h = await harness(FakeActivities())
    request = RequestCancellationInput(
        order_id=f"O-{uuid.uuid4().hex[:8]}",
        seller_id="S-7",
        buyer_id="B-1",
        reason=CancellationReason.CANNOT_SHIP,
    )
    first = await start_cancellation(h.env.client, request, task_queue=h.task_queue)
    second = await start_cancellation(h.env.client, request, task_queue=h.task_queue)
    assert first.id == second.id == cancellation_id(request.order_id, request.seller_id)
    assert first.result_run_id == second.result_run_id
    await wait_for_status(first, CancellationStatus.AWAITING_SELLER)
    await first.execute_update(OrderCancellation.decide, reject())
    await first.result()
    # Once it has ended, asking again still returns it, not a second workflow.
    third = await start_cancellation(h.env.client, request, task_queue=h.task_queue)
    assert (await third.describe()).run_id == first.result_run_id
    assert h.fakes.names().count("open_cancellation") == 1


async def test_pending_refund_is_asked_again_on_a_growing_durable_timer(harness: Any) -> None:
    fakes = FakeActivities(
        path=CancellationPath.INSTANT, pending_confirms=3, poll_interval=timedelta(minutes=10)
    )
    h = await harness(fakes)
    handle = await h.start()
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert fakes.names().count("confirm_refund") == 4
    # Asked again after 10, then 15, then 22.5 minutes, on durable timers (skipped, not slept).
    assert await timers(handle) == [
        (timedelta(minutes=10), "fired"),
        (timedelta(minutes=15), "fired"),
        (timedelta(minutes=22, seconds=30), "fired"),
    ]


async def test_payment_event_wakes_the_refund_check_early(harness: Any) -> None:
    fakes = FakeActivities(
        path=CancellationPath.INSTANT, pending_confirms=1, poll_interval=timedelta(hours=1)
    )
    h = await harness(fakes)
    handle = await h.start()
    submitted = await wait_for_status(handle, CancellationStatus.REFUND_SUBMITTED)
    assert submitted.refund is not None
    # News about someone else's refund is refused, recorded, and wakes nothing.
    await handle.signal(
        OrderCancellation.payment_event,
        {"event_id": "evt_other", "type": "refund_confirmed", "provider_ref": "re_other"},
    )
    await handle.signal(
        OrderCancellation.payment_event,
        {
            "event_id": "evt_1",
            "type": "refund_confirmed",
            "refund_key": submitted.refund.idempotency_key,
        },
    )
    # The workflow asks the provider at once instead of after the hour. (The real-time bound
    # only ends a hung test; once failed at 10 s in a fresh-clone CI run on 2 loaded cores,
    # never reproduced: the history in the message says where the workflow was.)
    deadline = asyncio.get_running_loop().time() + 30
    while fakes.names().count("confirm_refund") < 2:
        if asyncio.get_running_loop().time() > deadline:
            events = [e.event_type for e in (await handle.fetch_history()).events]
            pytest.fail(f"no second confirm_refund: calls {fakes.names()}, history {events}")
        await asyncio.sleep(0.05)
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    # The hour-long wait was cut short by the event, not waited out.
    assert await timers(handle) == [(timedelta(hours=1), "canceled")]
    refused = [e for e in fakes.args("record_event") if e.kind == "payment_event_refused"]
    assert len(refused) == 1 and refused[0].detail.startswith("unknown_refund")
    kinds = [e.kind for e in (await status_of(handle)).audit]
    assert "payment_event" in kinds


@pytest.mark.parametrize("with_attributes", [True, False], ids=["product-starter", "bare-start"])
@pytest.mark.parametrize("pending", [0, 1], ids=["confirmed-at-once", "pending-once"])
async def test_one_upsert_per_stage_waited_in_and_every_attribute_right(
    harness: Any, with_attributes: bool, pending: int
) -> None:
    """Operators filter on the search attributes at every stage (tests/test_observability.py);
    each upsert is a billable action, so each stage a cancellation waits in costs one and no
    more (the lean shape, issue 19): awaiting the seller (with the deadline), the refund
    requested (while the provider is asked), submitted only while the provider says
    "pending" (before the poll's timer), completed (with the coupon outcome). A stage passed
    within one step (approved, confirmed) is in the details and goes with the next upsert; what
    the starter set is not set again (docs/performance.md, actions)."""
    h = await harness(FakeActivities(pending_confirms=pending))
    order_id = f"O-{uuid.uuid4().hex[:8]}"
    handle = await h.start(with_attributes=with_attributes, order_id=order_id)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.execute_update(OrderCancellation.decide, accept())
    assert (await handle.result()).status is CancellationStatus.COMPLETED
    done = await upserts(handle)
    if not with_attributes:
        # Started bare: the workflow sets what the starter would have, once.
        assert done.pop(0) == {
            "OrderId": order_id,
            "SellerId": "S-7",
            "BuyerId": "B-1",
            "CancellationStatus": "opening",
            "RefundStage": 0,
        }
    submitted = ["refund_submitted"] if pending else []
    assert [u["CancellationStatus"] for u in done] == [
        "awaiting_seller",
        "refund_requested",
        *submitted,
        "completed",
    ]
    assert [u["RefundStage"] for u in done] == [0, 1, *([2] if pending else []), 3]
    assert "SellerDeadline" in done[0] and done[-1]["CouponOutcome"] == "no_coupon"
    assert all(set(u) <= {"CancellationStatus", "RefundStage"} for u in done[1:-1])
    described = (await handle.describe()).typed_search_attributes
    assert described.get(sa.ORDER_ID) == order_id
    assert described.get(sa.BUYER_ID) == "B-1"
    assert described.get(sa.CANCELLATION_STATUS) == "completed"
    assert described.get(sa.REFUND_STAGE) == 3
    assert described.get(sa.COUPON_OUTCOME) == "no_coupon"
    assert described.get(sa.SELLER_DEADLINE) is not None


async def test_a_provider_that_answers_at_once_confirms_at_submit(harness: Any) -> None:
    """The lean shape (issue 19): the provider's synchronous answer confirms the refund in the
    submit step, with no separate confirmation; every stage is still in the audit trail."""
    h = await harness(FakeActivities(answers_at_once=True))
    handle = await h.start(with_attributes=True)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    await handle.execute_update(OrderCancellation.decide, accept())
    result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
    assert "confirm_refund" not in h.fakes.names()
    assert "confirmed_at_submit" in h.fakes.names()
    kinds = [e.kind for e in (await status_of(handle)).audit]
    for kind in ("approved", "refund_requested", "refund_submitted", "refund_confirmed"):
        assert kind in kinds
    assert [u["CancellationStatus"] for u in await upserts(handle)] == [
        "awaiting_seller",
        "refund_requested",
        "completed",
    ]

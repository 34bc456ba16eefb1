"""End to end on the real Temporal dev server and the real PostgreSQL: the demo scenarios, seen
from three sides (the workflow results, the ledger, Temporal visibility), and the command-line
contracts (`temporal workflow signal|update`, `ordercancel decide|status`) other teams rely on.

The dev server is started headless for this module (or `TEMPORAL_ADDRESS` is used; that server
must not already hold the demo's workflow ids, since those are business keys). The ledger is a
fresh copy of the migrated template database, so the demo's order ids clash with nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.orders import one_seller_order, orders_file
from helpers.stacks import run_command

# Shared with the other end-to-end modules (fixtures: `e2e_database_url`, `temporal_address`).
from helpers.wait import assert_listed, eventually
from rich.console import Console
from temporalio.client import Client, WorkflowHandle

from devstack.demo import Outcome, run_demo
from devstack.dev import DEV_WINDOW_FLOOR
from devstack.embedded import temporal_binary
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    CancellationView,
    CouponOutcomeKind,
    Decision,
    RefundKind,
    RefundStage,
    RequestCancellationInput,
    SellerDecision,
)
from domain.rules import cancellation_id
from infra.client import connect
from infra.settings import Settings
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from outbound.store import OutboxStore
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

ORDERCANCEL = str(Path(sys.executable).parent / "ordercancel")

# The demo's cancellations by workflow id, and what each must end as.
INSTANT = cancellation_id("O-1001", "S-7")
ACCEPTED = cancellation_id("O-1002", "S-7")
REJECTED = cancellation_id("O-1003", "S-8")
SILENT = cancellation_id("O-1004", "S-9")
COUPON_S7 = cancellation_id("O-2001", "S-7")
COUPON_S8 = cancellation_id("O-2001", "S-8")
PARTIAL = cancellation_id("O-2002", "S-7")
FLAKY_PROVIDER = cancellation_id("O-1005", "S-10")
# Posted as by the order system, validated by an event, ended by its shipment (R13, R14).
SHIPPED = cancellation_id("O-1006", "S-7")
DEMO_IDS = {
    INSTANT,
    ACCEPTED,
    REJECTED,
    SILENT,
    COUPON_S7,
    COUPON_S8,
    PARTIAL,
    FLAKY_PROVIDER,
    SHIPPED,
}
APPROVED_IDS = DEMO_IDS - {REJECTED, SHIPPED}
DEMO_ORDERS = ("O-1001", "O-1002", "O-1003", "O-1004", "O-1005", "O-2001", "O-2002")


# --- fixtures --------------------------------------------------------------------------------


@dataclass
class Stack:
    address: str
    client: Client
    pool: asyncpg.Pool
    database_url: str
    task_queue: str


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Stack]:
    """The product's own worker (`build_worker`) on a task queue of its own, with refund
    timings short enough for a test."""
    client = await connect(temporal_address)
    pool = await create_pool(e2e_database_url, min_size=1, max_size=10)
    settings = Settings(
        refund_poll_interval=timedelta(milliseconds=200),
        refund_poll_max_interval=timedelta(seconds=1),
        refund_submit_initial_interval=timedelta(milliseconds=100),
        refund_submit_max_interval=timedelta(seconds=1),
        # The demo's silent seller has a 5 s policy (R19): the dev stack's floor, not 1 h.
        seller_response_window_floor=DEV_WINDOW_FLOOR,
    )
    task_queue = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        async with build_worker(client, pool, settings, task_queue=task_queue):
            yield Stack(temporal_address, client, pool, e2e_database_url, task_queue)
    finally:
        await pool.close()


@pytest.fixture(scope="module")
async def demo(stack: Stack) -> dict[str, Outcome]:
    """`run_demo` once; its outcomes by workflow id."""
    outcomes = await run_demo(
        stack.client,
        stack.pool,
        task_queue=stack.task_queue,
        console=Console(file=io.StringIO(), width=200),
    )
    by_id = {o.handle.id: o for o in outcomes}
    assert set(by_id) == DEMO_IDS
    errors = {o.handle.id: o.error for o in outcomes if o.error}
    assert not errors, errors
    return by_id


def result(demo: dict[str, Outcome], workflow_id: str) -> CancellationResult:
    outcome = demo[workflow_id]
    assert outcome.result is not None, outcome.error
    return outcome.result


# Small extra orders for the command-line tests: one seller, validated and captured, so a
# cancellation waits for the seller.
_order_numbers = iter(range(1, 1000))


async def pending_cancellation(stack: Stack) -> tuple[WorkflowHandle[Any, CancellationResult], str]:
    """A fresh cancellation awaiting its seller; returns the handle and the seller id."""
    order_id = f"E2E-{next(_order_numbers)}-{uuid.uuid4().hex[:6]}"
    seller, buyer = "S-77", "B-900"
    text = orders_file(one_seller_order(order_id, buyer_id=buyer, seller_id=seller))
    report = await load_orders(stack.pool, parse_orders_file(text))
    assert report.loaded == [order_id]
    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=order_id,
            seller_id=seller,
            buyer_id=buyer,
            reason=CancellationReason.OUT_OF_STOCK,
        ),
        task_queue=stack.task_queue,
    )
    await eventually(lambda: _assert_status(handle, CancellationStatus.AWAITING_SELLER))
    return handle, seller


async def _status(handle: WorkflowHandle[Any, Any]) -> CancellationView:
    view: CancellationView = await handle.query(OrderCancellation.status)
    return view


async def _assert_status(handle: WorkflowHandle[Any, Any], status: CancellationStatus) -> None:
    assert (await _status(handle)).status is status


def cli_env(stack: Stack) -> dict[str, str]:
    return {
        "TEMPORAL_ADDRESS": stack.address,
        "DATABASE_URL": stack.database_url,
        "ORDERCANCEL_TASK_QUEUE": stack.task_queue,
    }


# --- the demo: workflow results --------------------------------------------------------------


async def test_instant_cancel_voids_the_authorisation(demo: dict[str, Outcome]) -> None:
    r = result(demo, INSTANT)
    assert r.status is CancellationStatus.COMPLETED
    assert r.path is CancellationPath.INSTANT
    assert r.refund is not None
    assert r.refund.kind is RefundKind.VOID
    assert r.refund.stage is RefundStage.CONFIRMED
    assert r.coupon is not None and r.coupon.outcome is CouponOutcomeKind.NO_COUPON


async def test_seller_accepts_and_the_capture_is_refunded(demo: dict[str, Outcome]) -> None:
    r = result(demo, ACCEPTED)
    assert r.status is CancellationStatus.COMPLETED
    assert r.path is CancellationPath.REQUEST
    assert r.refund is not None
    assert r.refund.kind is RefundKind.REFUND
    assert r.refund.stage is RefundStage.CONFIRMED
    # Operators read the money at stake in the list and the memo without opening anything.
    description = await demo[ACCEPTED].handle.describe()
    assert await description.static_summary() == (
        f"Cancel order O-1002 / seller S-7: {r.refund.amount}, card (out_of_stock, seller fault)"
    )
    memo = await description.memo()
    assert (memo["amount_minor"], memo["currency"], memo["payment_method"]) == (
        r.refund.amount.amount_minor,
        "EUR",
        "card",
    )


async def test_seller_rejects_and_nothing_is_refunded(demo: dict[str, Outcome]) -> None:
    r = result(demo, REJECTED)
    assert r.status is CancellationStatus.REJECTED
    assert r.path is CancellationPath.REQUEST
    assert r.refund is None
    assert r.coupon is None


async def test_an_order_moved_on_by_events_ends_rejected_when_it_ships(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    """R13, R14: posted unvalidated, validated by an event (so the request path), and the
    shipment is the seller's answer: rejected, reason "shipped", nothing refunded."""
    r = result(demo, SHIPPED)
    assert (r.status, r.path, r.refund) == (
        CancellationStatus.REJECTED,
        CancellationPath.REQUEST,
        None,
    )
    events = await stack.pool.fetch(
        "SELECT event_id, outcome, notified_at IS NOT NULL AS told FROM order_events"
        " WHERE order_id = 'O-1006' ORDER BY occurred_at"
    )
    assert [tuple(e) for e in events] == [
        ("E-1006-validated", "applied", False),
        ("E-1006-shipped", "request_rejected", True),
    ]
    detail = await stack.pool.fetchval(
        "SELECT detail FROM cancellation_events WHERE cancellation_id = $1 AND kind = 'rejected'",
        SHIPPED,
    )
    assert detail == "shipped"


async def test_silent_seller_is_approved_by_the_timer(demo: dict[str, Outcome]) -> None:
    r = result(demo, SILENT)
    assert r.status is CancellationStatus.COMPLETED
    assert r.refund is not None and r.refund.stage is RefundStage.CONFIRMED
    view = await _status(demo[SILENT].handle)
    approvals = [(e.actor, e.kind) for e in view.audit if e.kind == "approved"]
    assert approvals == [("timer", "approved")]


async def test_both_sellers_cancelled_give_the_coupon_back(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    """R11 decides at each sibling's end: the sibling that finishes while the other's refund is
    still in flight sees `partial_refund` (naming the other); the one that finishes last always
    sees the whole footprint refunded and restores the coupon. Which one is last, and whether
    both see `restored` (they finished together), depends on timing; the invariant does not."""
    performer = await stack.pool.fetchval(
        "SELECT restored_by FROM coupon_redemptions WHERE redemption_id = 'R-2001'"
    )
    assert performer in (COUPON_S7, COUPON_S8)
    for wid, sibling in ((COUPON_S7, "S-8"), (COUPON_S8, "S-7")):
        r = result(demo, wid)
        assert r.status is CancellationStatus.COMPLETED
        assert r.refund is not None and r.refund.stage is RefundStage.CONFIRMED
        assert r.coupon is not None and r.coupon.redemption_id == "R-2001"
        if wid == performer:
            assert r.coupon.outcome is CouponOutcomeKind.RESTORED
        elif r.coupon.outcome is CouponOutcomeKind.PARTIAL_REFUND:
            assert r.coupon.active_sub_orders == [sibling]
        else:
            assert r.coupon.outcome is CouponOutcomeKind.RESTORED
            assert performer in r.coupon.reason  # "given back when <performer> finished"


async def test_one_of_two_sellers_keeps_the_coupon(demo: dict[str, Outcome]) -> None:
    r = result(demo, PARTIAL)
    assert r.status is CancellationStatus.COMPLETED
    assert r.coupon is not None
    assert r.coupon.outcome is CouponOutcomeKind.PARTIAL_REFUND
    assert r.coupon.redemption_id == "R-2002"
    assert r.coupon.active_sub_orders == ["S-8"]
    assert "S-8" in r.coupon.reason


async def test_transient_provider_failures_still_complete(demo: dict[str, Outcome]) -> None:
    r = result(demo, FLAKY_PROVIDER)
    assert r.status is CancellationStatus.COMPLETED
    assert r.refund is not None and r.refund.stage is RefundStage.CONFIRMED


# --- the demo: the ledger --------------------------------------------------------------------


async def test_ledger_has_exactly_one_confirmed_refund_per_approved_cancellation(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    rows = await stack.pool.fetch(
        """
        SELECT c.cancellation_id, r.stage, r.amount_minor, s.cash_minor, r.idempotency_key
        FROM cancellations c
        JOIN sub_orders s ON s.order_id = c.order_id AND s.seller_id = c.seller_id
        LEFT JOIN refunds r ON r.cancellation_id = c.cancellation_id
        WHERE c.cancellation_id = ANY($1::text[])
        """,
        sorted(DEMO_IDS),
    )
    by_id: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_id.setdefault(row["cancellation_id"], []).append(row)
    assert set(by_id) == DEMO_IDS
    for wid in APPROVED_IDS:
        (refund,) = by_id[wid]
        assert refund["stage"] == "confirmed", wid
        assert refund["amount_minor"] == refund["cash_minor"], wid
        assert refund["idempotency_key"] == result(demo, wid).refund.idempotency_key  # type: ignore[union-attr]
    for wid in (REJECTED, SHIPPED):
        (rejected,) = by_id[wid]
        assert rejected["idempotency_key"] is None, wid  # no refund row at all


async def test_payments_never_refund_more_than_was_paid(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    rows = await stack.pool.fetch(
        """
        SELECT p.payment_id, p.amount_minor, p.refunded_minor,
               coalesce((SELECT sum(r.amount_minor) FROM refunds r
                         WHERE r.payment_id = p.payment_id), 0) AS refunds_total
        FROM payments p WHERE p.order_id = ANY($1::text[])
        """,
        list(DEMO_ORDERS),
    )
    assert len(rows) == len(DEMO_ORDERS)
    for row in rows:
        assert row["refunded_minor"] == row["refunds_total"], row["payment_id"]
        assert row["refunded_minor"] <= row["amount_minor"], row["payment_id"]
    by_payment = {r["payment_id"]: r for r in rows}
    assert by_payment["P-1003"]["refunded_minor"] == 0  # rejected
    # Both sub-orders of O-2001 refunded: the whole payment, to the minor unit.
    assert by_payment["P-2001"]["refunded_minor"] == by_payment["P-2001"]["amount_minor"]
    assert 0 < by_payment["P-2002"]["refunded_minor"] < by_payment["P-2002"]["amount_minor"]


async def test_coupon_restored_exactly_once_and_only_when_whole(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    redemptions = {
        r["redemption_id"]: r
        for r in await stack.pool.fetch(
            "SELECT redemption_id, restored_at, restored_by FROM coupon_redemptions"
            " WHERE redemption_id IN ('R-2001', 'R-2002')"
        )
    }
    assert redemptions["R-2001"]["restored_at"] is not None
    assert redemptions["R-2001"]["restored_by"] in (COUPON_S7, COUPON_S8)
    assert redemptions["R-2002"]["restored_at"] is None
    decisions = await stack.pool.fetch(
        "SELECT cancellation_id, outcome, performed_restore, active_sub_orders"
        " FROM coupon_decisions WHERE redemption_id = ANY($1::text[])",
        ["R-2001", "R-2002"],
    )
    performed = [d["cancellation_id"] for d in decisions if d["performed_restore"]]
    assert performed == [redemptions["R-2001"]["restored_by"]]
    partial = [d for d in decisions if d["cancellation_id"] == PARTIAL]
    assert [(d["outcome"], list(d["active_sub_orders"])) for d in partial] == [
        ("partial_refund", ["S-8"])
    ]
    # Whichever O-2001 sibling decided first, the buyer now sees the coupon back on both.
    ledger = Ledger(stack.pool)
    for wid in (COUPON_S7, COUPON_S8):
        seen = await ledger.coupon_outcome(cancellation_id=wid)
        assert seen is not None and seen.outcome is CouponOutcomeKind.RESTORED, wid
    still_partial = await ledger.coupon_outcome(cancellation_id=PARTIAL)
    assert still_partial is not None
    assert still_partial.outcome is CouponOutcomeKind.PARTIAL_REFUND


async def test_audit_trail_tells_each_story_in_order(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    rows = await stack.pool.fetch(
        "SELECT cancellation_id, actor, kind FROM cancellation_events"
        " WHERE cancellation_id = ANY($1::text[]) ORDER BY event_id",
        sorted(DEMO_IDS),
    )
    kinds: dict[str, list[str]] = {}
    actors: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        kinds.setdefault(row["cancellation_id"], []).append(row["kind"])
        actors.setdefault(row["cancellation_id"], []).append((row["actor"], row["kind"]))
    assert set(kinds) == DEMO_IDS
    refund = ["refund_requested", "refund_submitted", "refund_confirmed"]
    assert kinds[INSTANT] == [
        "requested",
        "cancelled_instantly",
        *refund,
        "coupon_no_coupon",
        "completed",
    ]
    assert kinds[REJECTED] == ["requested", "awaiting_seller", "rejected"]
    assert kinds[SHIPPED] == ["requested", "awaiting_seller", "rejected"]
    for wid in APPROVED_IDS - {INSTANT}:
        story = kinds[wid]
        assert story[:3] == ["requested", "awaiting_seller", "approved"], wid
        assert story[3:6] == refund, wid
        assert story[6].startswith("coupon_"), wid
        if wid in (COUPON_S7, COUPON_S8) and story[6] == "coupon_partial_refund":
            # The sibling that decided first is told when the other one restores the coupon,
            # which may land just before or just after its own "completed".
            assert sorted(story[7:]) == ["completed", "coupon_restored"], wid
        else:
            assert story[7:] == ["completed"], wid
    assert ("timer", "approved") in actors[SILENT]
    assert ("seller:S-7", "approved") in actors[ACCEPTED]
    assert ("seller:S-8", "rejected") in actors[REJECTED]
    assert ("order-system", "rejected") in actors[SHIPPED]
    statuses = dict(
        await stack.pool.fetch(
            "SELECT cancellation_id, status FROM cancellations"
            " WHERE cancellation_id = ANY($1::text[])",
            sorted(DEMO_IDS),
        )
    )
    assert statuses == {
        wid: ("rejected" if wid in (REJECTED, SHIPPED) else "completed") for wid in DEMO_IDS
    }


async def test_provider_made_each_refund_once(demo: dict[str, Outcome], stack: Stack) -> None:
    ledger = await stack.pool.fetch(
        "SELECT idempotency_key, provider_ref, amount_minor, kind FROM refunds"
        " WHERE cancellation_id = ANY($1::text[])",
        sorted(DEMO_IDS),
    )
    provider = await stack.pool.fetch(
        "SELECT idempotency_key, provider_ref, amount_minor, kind, status FROM provider_sim.refunds"
        " WHERE idempotency_key = ANY($1::text[])",
        [r["idempotency_key"] for r in ledger],
    )
    assert len(ledger) == len(APPROVED_IDS)
    assert sorted(p["idempotency_key"] for p in provider) == sorted(
        r["idempotency_key"] for r in ledger
    )
    made = {p["idempotency_key"]: p for p in provider}
    for row in ledger:
        at_provider = made[row["idempotency_key"]]
        assert at_provider["provider_ref"] == row["provider_ref"]
        assert at_provider["amount_minor"] == row["amount_minor"]
        assert at_provider["kind"] == row["kind"]
        assert at_provider["status"] == "succeeded"


async def test_lost_provider_response_is_found_not_repeated(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    key = result(demo, FLAKY_PROVIDER).refund.idempotency_key  # type: ignore[union-attr]
    calls = await stack.pool.fetch(
        "SELECT idempotency_key, outcome FROM provider_sim.calls"
        " WHERE payment_id = 'P-1005' AND operation = 'create_refund' ORDER BY call_id"
    )
    # Two transient failures, then the refund is made but its response lost, then the retry
    # with the same key gets the same refund back.
    assert [c["outcome"] for c in calls] == ["transient", "transient", "created", "replayed"]
    assert {c["idempotency_key"] for c in calls} == {key}
    count = await stack.pool.fetchval(
        "SELECT count(*) FROM provider_sim.refunds WHERE payment_id = 'P-1005'"
    )
    assert count == 1


# --- the demo: Temporal visibility -----------------------------------------------------------


async def test_visibility_finds_cancellations_by_business_attributes(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    client = stack.client
    demo_orders = ", ".join(f'"{o}"' for o in DEMO_ORDERS)
    await assert_listed(client, 'CancellationStatus="rejected" AND OrderId="O-1003"', {REJECTED})
    coupons = {wid: result(demo, wid).coupon for wid in APPROVED_IDS}
    restored = {w for w, c in coupons.items() if c and c.outcome is CouponOutcomeKind.RESTORED}
    partial = {w for w, c in coupons.items() if c and c.outcome is CouponOutcomeKind.PARTIAL_REFUND}
    # The last O-2001 sibling to finish always restores (see the coupon test above).
    assert restored & {COUPON_S7, COUPON_S8}
    assert restored | partial >= {COUPON_S7, COUPON_S8, PARTIAL}
    await assert_listed(client, 'CouponOutcome="restored"', restored)
    await assert_listed(
        client, f'CouponOutcome="partial_refund" AND OrderId IN ({demo_orders})', partial
    )
    await assert_listed(client, f"RefundStage=3 AND OrderId IN ({demo_orders})", APPROVED_IDS)
    await assert_listed(client, f"RefundStage=0 AND OrderId IN ({demo_orders})", {REJECTED})
    await assert_listed(
        client, f'CancellationStatus="completed" AND OrderId IN ({demo_orders})', APPROVED_IDS
    )
    await assert_listed(
        client,
        f'SellerId="S-7" AND TaskQueue="{stack.task_queue}" AND OrderId IN ({demo_orders})',
        {INSTANT, ACCEPTED, COUPON_S7, PARTIAL},
    )
    await assert_listed(client, 'BuyerId="B-505"', {FLAKY_PROVIDER})


# --- command-line contracts ------------------------------------------------------------------


async def test_temporal_cli_signal_decides_a_pending_cancellation(stack: Stack) -> None:
    handle, seller = await pending_cancellation(stack)
    ran = await run_command(
        temporal_binary(),
        "workflow",
        "signal",
        "--address",
        stack.address,
        "--workflow-id",
        handle.id,
        "--name",
        "seller_decision",
        "--input",
        json.dumps({"seller_id": seller, "decision": "accept", "reason": "out of stock, sorry"}),
    )
    assert ran.returncode == 0, ran.stderr
    r = await asyncio.wait_for(handle.result(), 30)
    assert r.status is CancellationStatus.COMPLETED
    assert r.refund is not None and r.refund.stage is RefundStage.CONFIRMED
    view = await _status(handle)
    assert (f"seller:{seller}", "approved") in [(e.actor, e.kind) for e in view.audit]


async def test_temporal_cli_update_from_the_wrong_seller_is_refused(stack: Stack) -> None:
    handle, seller = await pending_cancellation(stack)
    ran = await run_command(
        temporal_binary(),
        "workflow",
        "update",
        "execute",
        "--address",
        stack.address,
        "--workflow-id",
        handle.id,
        "--name",
        "decide",
        "--input",
        json.dumps({"seller_id": "S-WRONG", "decision": "accept", "reason": "not mine"}),
    )
    assert ran.returncode != 0
    assert "wrong_seller" in ran.stderr, ran
    view = await _status(handle)
    assert view.status is CancellationStatus.AWAITING_SELLER
    assert not [e for e in view.audit if e.kind.startswith("decision_")]
    # Nothing changed: the right seller can still decide.
    receipt = await handle.execute_update(
        OrderCancellation.decide,
        SellerDecision(seller_id=seller, decision=Decision.REJECT, reason="shipped already"),
    )
    assert receipt.accepted
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.REJECTED


async def test_ordercancel_decide_from_the_wrong_seller_exits_1(stack: Stack) -> None:
    handle, seller = await pending_cancellation(stack)
    ran = await run_command(
        ORDERCANCEL, "decide", handle.id, "accept", "--seller", "S-WRONG", env=cli_env(stack)
    )
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    assert "refused (wrong_seller)" in ran.stderr
    assert (await _status(handle)).status is CancellationStatus.AWAITING_SELLER

    ran = await run_command(
        ORDERCANCEL, "decide", handle.id, "reject", "--seller", seller, env=cli_env(stack)
    )
    assert ran.returncode == 0, ran.stderr
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.REJECTED


async def test_ordercancel_status_json(stack: Stack, demo: dict[str, Outcome]) -> None:
    handle, seller = await pending_cancellation(stack)
    ran = await run_command(ORDERCANCEL, "status", handle.id, "--json", env=cli_env(stack))
    assert ran.returncode == 0, ran.stderr
    view = CancellationView.model_validate(json.loads(ran.stdout))
    assert view.cancellation_id == handle.id
    assert view.status is CancellationStatus.AWAITING_SELLER
    assert view.seller_deadline is not None

    ran = await run_command(ORDERCANCEL, "status", ACCEPTED, "--json", env=cli_env(stack))
    assert ran.returncode == 0, ran.stderr
    done = json.loads(ran.stdout)
    assert done["status"] == "completed"
    assert [d["done"] for d in done["dots"]] == [True, True, True]

    await handle.execute_update(
        OrderCancellation.decide,
        SellerDecision(seller_id=seller, decision=Decision.REJECT, reason="test over"),
    )
    await asyncio.wait_for(handle.result(), 30)


async def test_starting_the_same_cancellation_twice_makes_one_run(stack: Stack) -> None:
    first, seller = await pending_cancellation(stack)
    request = RequestCancellationInput(
        order_id=(await _status(first)).order_id,
        seller_id=seller,
        buyer_id="B-900",
        reason=CancellationReason.OUT_OF_STOCK,
    )
    second = await start_cancellation(stack.client, request, task_queue=stack.task_queue)
    assert second.id == first.id
    assert second.result_run_id == first.result_run_id
    await assert_listed(stack.client, f'WorkflowId="{first.id}"', {first.id})

    await second.execute_update(
        OrderCancellation.decide,
        SellerDecision(seller_id=seller, decision=Decision.REJECT, reason="already packed"),
    )
    assert (await asyncio.wait_for(first.result(), 30)).status is CancellationStatus.REJECTED
    # Once ended, asking again returns the same cancellation instead of opening another.
    again = await start_cancellation(stack.client, request, task_queue=stack.task_queue)
    assert (await again.result()).status is CancellationStatus.REJECTED
    await assert_listed(stack.client, f'WorkflowId="{first.id}"', {first.id})


async def test_every_story_is_in_the_outbound_stream_in_order(
    demo: dict[str, Outcome], stack: Stack
) -> None:
    """R16 end to end: the workflows' ledger writes put each change's event in the outbox, in
    the order of the audit trail, with positions once sequenced."""
    await OutboxStore(stack.pool).sequence()
    audit = await stack.pool.fetch(
        "SELECT e.cancellation_id, e.event_id, outbox_type(e.kind) AS type, o.position"
        " FROM cancellation_events e LEFT JOIN outbox o ON o.audit_event_id = e.event_id"
        " WHERE e.cancellation_id = ANY($1::text[]) ORDER BY e.event_id",
        sorted(DEMO_IDS),
    )
    types: dict[str, list[str]] = {}
    for row in audit:
        # Every audit row of an event type has its event, with a position; none other has one.
        assert (row["type"] is None) == (row["position"] is None), row
        if row["type"] is not None:
            types.setdefault(row["cancellation_id"], []).append(row["type"])
    for wid in DEMO_IDS:
        positions = [r["position"] for r in audit if r["cancellation_id"] == wid and r["type"]]
        assert positions == sorted(positions), wid
    refund = ["refund.stage_changed"] * 3
    assert types[INSTANT] == [
        "cancellation.requested",
        "cancellation.approved",
        *refund,
        "coupon.decided",
    ]
    assert types[REJECTED] == ["cancellation.requested", "cancellation.rejected"]
    assert types[ACCEPTED][:2] == ["cancellation.requested", "cancellation.approved"]
    requested = await stack.pool.fetchval(
        "SELECT data->>'seller_deadline' FROM outbox"
        " WHERE cancellation_id = $1 AND type = 'cancellation.requested'",
        ACCEPTED,
    )
    assert requested is not None

"""The demo scenarios (`ordercancel demo`, run by `make run`): every path of the rule book on
the real stack, with a table of what happened to each."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table
from temporalio.client import Client, WorkflowHandle

from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    CouponOutcome,
    Decision,
    RequestCancellationInput,
    SellerDecision,
)
from domain.order_events import OrderEventIn, OrderEventType
from domain.orders import CheckoutOrderIn
from ledger.order_events import post_order
from ledger.orders import load_orders, parse_orders_file
from ledger.policies import set_policy
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.order_events import deliver_order_event
from starter.requests import start_cancellation
from workflows.order_cancellation import OrderCancellation

DEMO_FILE = Path(__file__).resolve().parent / "demo-data" / "orders.json"
# The order the demo posts as the order system would (POST /v1/orders), then moves on by events.
EVENTS_ORDER_FILE = DEMO_FILE.with_name("order-by-events.json")
EVENTS_SCENARIO = "by events: validated, then shipped"
# The demo's seller S-9 has a short window by policy (R19), for its "seller silent" scenario
# (the dev stack lowers the floor below it: devstack.dev).
DEMO_WINDOW = timedelta(seconds=5)


@dataclass
class Outcome:
    scenario: str
    handle: WorkflowHandle[Any, CancellationResult]
    result: CancellationResult | None = None
    error: str | None = None
    # Where the coupon stands now: a sibling may have restored it after this one decided.
    coupon_now: CouponOutcome | None = None


def demo_orders_text() -> str:
    return DEMO_FILE.read_text()


async def _wait_pending(handle: WorkflowHandle[Any, Any], timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        view = await handle.query(OrderCancellation.status)
        if view.status is CancellationStatus.AWAITING_SELLER:
            return
        if view.status.is_terminal:
            raise RuntimeError(f"{handle.id} ended before the seller could decide")
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{handle.id} never started waiting for the seller")


async def _decide(
    handle: WorkflowHandle[Any, Any], seller: str, decision: Decision, reason: str
) -> None:
    await _wait_pending(handle)
    await handle.execute_update(
        OrderCancellation.decide,
        SellerDecision(seller_id=seller, decision=decision, reason=reason),
    )


async def run_demo(
    client: Client,
    pool: asyncpg.Pool,
    *,
    task_queue: str,
    console: Console | None = None,
    ui_base: str | None = None,
) -> list[Outcome]:
    """Load the demo orders, run every scenario side by side, wait for them, print a table."""
    console = console or Console()
    orders = parse_orders_file(demo_orders_text())
    buyers = {order.order_id: order.buyer_id for order in orders.orders}

    def _request(
        order: str, seller: str, reason: CancellationReason, **kw: Any
    ) -> RequestCancellationInput:
        return RequestCancellationInput(
            order_id=order, seller_id=seller, buyer_id=buyers[order], reason=reason, **kw
        )

    report = await load_orders(pool, orders)
    ledger = Ledger(pool)
    await set_policy(pool, seller_id="S-9", response_window=DEMO_WINDOW, floor=DEMO_WINDOW)
    console.print(f"orders: {len(report.loaded)} loaded, {len(report.unchanged)} already there")
    # The transient-failure scenario: the provider fails twice, then loses one response after
    # recording the refund; the refund must still happen exactly once.
    await SimulatedProvider(pool).set_faults(
        "P-1005", SimulatorFaults(transient_failures=2, lose_response=True)
    )

    # R13/R14, driven by events: the order arrives unvalidated (instant path), its payment is
    # validated by an event, so the cancellation waits for the seller (request path); the
    # sub-order then ships, which is the seller's answer: rejected, reason "shipped".
    by_events = CheckoutOrderIn.model_validate_json(EVENTS_ORDER_FILE.read_text())
    buyers[by_events.order_id] = by_events.buyer_id
    await post_order(pool, by_events)
    validated = await deliver_order_event(
        client,
        pool,
        by_events.order_id,
        OrderEventIn(
            event_id="E-1006-validated",
            type=OrderEventType.PAYMENT_VALIDATED,
            occurred_at=by_events.placed_at + timedelta(minutes=5),
        ),
    )
    console.print(f"order {by_events.order_id} posted; payment_validated: {validated.detail}")

    async def start(name: str, request: RequestCancellationInput) -> Outcome:
        return Outcome(
            name,
            await start_cancellation(client, request, task_queue=task_queue, ledger=ledger),
        )

    outcomes = [
        await start(
            "instant cancel (payment unvalidated)",
            _request("O-1001", "S-7", CancellationReason.ORDERED_BY_MISTAKE),
        ),
        await start("seller accepts", _request("O-1002", "S-7", CancellationReason.OUT_OF_STOCK)),
        await start(
            "seller rejects", _request("O-1003", "S-8", CancellationReason.DUPLICATE_ORDER)
        ),
        await start(
            "seller silent -> auto-approved",
            _request("O-1004", "S-9", CancellationReason.SELLER_UNREACHABLE),
        ),
        await start(
            "two sellers + coupon: S-7",
            _request("O-2001", "S-7", CancellationReason.ORDERED_BY_MISTAKE),
        ),
        await start(
            "two sellers + coupon: S-8",
            _request("O-2001", "S-8", CancellationReason.ORDERED_BY_MISTAKE),
        ),
        await start(
            "one of two sellers (coupon stays)",
            _request("O-2002", "S-7", CancellationReason.CANNOT_SHIP),
        ),
        await start(
            "provider fails transiently",
            _request("O-1005", "S-10", CancellationReason.OUT_OF_STOCK),
        ),
        await start(
            EVENTS_SCENARIO,
            _request(by_events.order_id, "S-7", CancellationReason.ORDERED_BY_MISTAKE),
        ),
    ]
    by_name = {o.scenario: o for o in outcomes}
    decisions = [
        _decide(by_name["seller accepts"].handle, "S-7", Decision.ACCEPT, "sorry, out of stock"),
        _decide(by_name["seller rejects"].handle, "S-8", Decision.REJECT, "already shipped"),
        _decide(by_name["two sellers + coupon: S-7"].handle, "S-7", Decision.ACCEPT, "ok"),
        _decide(by_name["two sellers + coupon: S-8"].handle, "S-8", Decision.ACCEPT, "ok"),
        _decide(by_name["one of two sellers (coupon stays)"].handle, "S-7", Decision.ACCEPT, "ok"),
        _decide(by_name["provider fails transiently"].handle, "S-10", Decision.ACCEPT, "ok"),
    ]

    async def ships() -> None:
        await _wait_pending(by_name[EVENTS_SCENARIO].handle)
        await deliver_order_event(
            client,
            pool,
            by_events.order_id,
            OrderEventIn(
                event_id="E-1006-shipped",
                type=OrderEventType.SUB_ORDER_SHIPPED,
                seller_id="S-7",
                occurred_at=by_events.placed_at + timedelta(hours=2),
            ),
        )

    await asyncio.gather(*decisions, ships(), return_exceptions=True)

    async def finish(outcome: Outcome) -> None:
        try:
            outcome.result = await asyncio.wait_for(outcome.handle.result(), timeout=120)
            outcome.coupon_now = await ledger.coupon_outcome(cancellation_id=outcome.handle.id)
        except Exception as err:  # shown in the table; the demo never hides a failure
            outcome.error = f"{type(err).__name__}: {err}"

    await asyncio.gather(*(finish(o) for o in outcomes))
    console.print(outcome_table(outcomes, ui_base, client.namespace))
    if not report.loaded:
        console.print(
            "[dim]These cancellations ran in an earlier start and were only looked up (one"
            " cancellation per sub-order). Remove .data/ to run the demo afresh.[/dim]"
        )
    return outcomes


def outcome_table(outcomes: list[Outcome], ui_base: str | None, namespace: str) -> Table:
    table = Table(title="Demo cancellations", show_lines=False)
    for column in ("scenario", "path", "status", "refund", "coupon", "workflow id"):
        table.add_column(column)
    if ui_base:
        table.add_column("UI")
    for o in outcomes:
        r = o.result
        refund = (
            f"{r.refund.kind.value} {r.refund.amount} "
            + "●" * r.refund.stage.dots
            + "○" * (3 - r.refund.stage.dots)
            if r and r.refund
            else "-"
        )
        coupon = o.coupon_now.outcome.value if o.coupon_now else "-"
        if r and r.coupon and o.coupon_now and r.coupon.outcome != o.coupon_now.outcome:
            coupon += f" (was {r.coupon.outcome.value} when it finished)"
        row = [
            o.scenario,
            r.path.value if r else "-",
            r.status.value if r else f"[red]{o.error}[/red]",
            refund,
            coupon,
            o.handle.id,
        ]
        if ui_base:
            row.append(f"{ui_base}/namespaces/{namespace}/workflows/{o.handle.id}")
        table.add_row(*row)
    return table

"""Game day (docs/runbook.md): the runbook's incident procedures run end to end on the real dev
server, PostgreSQL and the product's worker, driven only by the documented commands: make the
provider fail (`ordercancel provider ...`), find what parked (`refunds failed`), bring the
provider back, retry, and reconcile clean (exit 0)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from helpers.orders import one_seller_order, orders_file, unique
from helpers.policies import seller_window
from helpers.refunds import (
    BUYER,
    ORDERCANCEL,
    RefundStack,
    cancellations,
    refund_stack,
    succeeded_at_provider,
)
from helpers.stacks import Ran, run_command
from helpers.wait import wait_for_status

from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    RequestCancellationInput,
)
from domain.rules import cancellation_id
from ledger.orders import load_orders, parse_orders_file
from starter.requests import start_cancellation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[RefundStack]:
    async with refund_stack(temporal_address, e2e_database_url) as stack:
        yield stack


async def cli(stack: RefundStack, *args: str) -> Ran:
    return await run_command(ORDERCANCEL, *args, env=stack.cli_env(), timeout=60)


async def test_game_day_a_payment_failing_then_back(stack: RefundStack) -> None:
    seller = unique("S")
    (c,) = await cancellations(stack, 1, seller=seller, window=timedelta(hours=1))
    await wait_for_status(c.handle, CancellationStatus.AWAITING_SELLER)

    # Break the provider for this cancellation's payment, by its cancellation id.
    ran = await cli(stack, "provider", "fault", c.id, "--transient", "1000", "--slow", "50ms")
    assert ran.returncode == 0, ran.stderr
    assert c.payment_id in ran.stdout
    ran = await cli(stack, "provider", "show")
    assert f"{c.payment_id}: " in ran.stdout and "'transient_failures': 1000" in ran.stdout

    ran = await cli(stack, "decide", c.id, "accept", "--seller", seller, "--reason", "sorry")
    assert ran.returncode == 0, ran.stderr
    await wait_for_status(c.handle, CancellationStatus.REFUND_FAILED, timeout=30)

    # Find it, as the runbook says.
    ran = await cli(stack, "refunds", "failed", "--seller", seller, "--json")
    assert ran.returncode == 0, ran.stderr
    (row,) = json.loads(ran.stdout)
    assert row["cancellation_id"] == c.id and "ProviderUnavailable" in row["last_error"]

    # The provider is back: clear, retry, and the books agree.
    ran = await cli(stack, "provider", "clear", c.payment_id)
    assert ran.returncode == 0 and "cleared the faults of 1 payment(s)" in ran.stdout
    ran = await cli(stack, "refunds", "retry", c.id, "--reason", "provider back")
    assert ran.returncode == 0, ran.stderr
    assert (await asyncio.wait_for(c.handle.result(), 30)).status is CancellationStatus.COMPLETED
    assert await succeeded_at_provider(stack.pool, c.payment_id) == 1
    ran = await cli(stack, "reconcile")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ledger and provider agree" in ran.stdout


async def test_game_day_a_provider_wide_outage_without_a_restart(stack: RefundStack) -> None:
    """`provider global` reaches the running worker (no restart): every call fails, the next
    refund parks; `provider clear --all` ends the outage."""
    ran = await cli(stack, "provider", "global", "--transient-rate", "1.0")
    assert ran.returncode == 0, ran.stderr
    try:
        await asyncio.sleep(1.2)  # the workers read the setting at most once a second
        seller = unique("S")
        (c,) = await cancellations(stack, 1, seller=seller)
        view = await wait_for_status(c.handle, CancellationStatus.REFUND_FAILED, timeout=30)
        assert view.last_error is not None and "timeout" in view.last_error
    finally:
        ran = await cli(stack, "provider", "clear", "--all")
        assert ran.returncode == 0 and "and the global" in ran.stdout
    await asyncio.sleep(1.2)
    ran = await cli(stack, "refunds", "retry", c.id)
    assert ran.returncode == 0, ran.stderr
    assert (await asyncio.wait_for(c.handle.result(), 30)).status is CancellationStatus.COMPLETED


async def test_rehearsal_commands_refuse_what_they_cannot_do(stack: RefundStack) -> None:
    ran = await cli(stack, "provider", "fault", "cancel-NOPE-S-0", "--transient", "1")
    assert ran.returncode == 1 and "no payment or cancellation cancel-NOPE-S-0" in ran.stderr
    ran = await cli(stack, "provider", "clear")
    assert ran.returncode == 2
    ran = await run_command(
        ORDERCANCEL,
        "provider",
        "show",
        env={**stack.cli_env(), "ORDERCANCEL_PROVIDER": "stripe"},
    )
    assert ran.returncode == 2 and "only be injected into the simulator" in ran.stderr
    ran = await cli(stack, "db", "--url")
    assert ran.returncode == 0 and ran.stdout.strip() == stack.database_url


async def test_game_day_the_reversal_drill_with_the_documented_commands(stack: RefundStack) -> None:
    """The runbook's reversal drill, by its commands only: a fault set by cancellation id before
    the request exists, the refund confirmed, `reconcile` finding the reversal on the provider's
    current status (exit 1), `--fix` reopening the cancellation (a run as readable in the Web
    UI as the first), the bulk retry holding the reversed refund back (the dry run naming the
    key it would use) until `--include-reversed` says otherwise."""
    seller = unique("S")
    order = one_seller_order(unique("RV"), buyer_id=BUYER, seller_id=seller, coupon=True)
    await load_orders(stack.pool, parse_orders_file(orders_file(order)))
    await seller_window(stack.pool, seller, timedelta(seconds=1))
    cid = cancellation_id(order["order_id"], seller)
    payment = order["payment"]["payment_id"]

    # Named by a cancellation id that has no request yet: its order's payment.
    ran = await cli(stack, "provider", "fault", cid, "--fail-after-success")
    assert ran.returncode == 0, ran.stderr
    assert f"faults of {payment}: {{'fail_after_success': True}}" in ran.stdout

    handle = await start_cancellation(
        stack.client,
        RequestCancellationInput(
            order_id=order["order_id"],
            seller_id=seller,
            buyer_id=BUYER,
            reason=CancellationReason.OUT_OF_STOCK,
        ),
        task_queue=stack.task_queue,
    )
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.COMPLETED

    # The workflow stopped asking after the confirmation; reconcile asks the provider.
    key = f"{cid}:refund-submit"
    ran = await cli(stack, "reconcile", "--json")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    report = json.loads(ran.stdout)
    mine = [f for f in report["findings"] if f["idempotency_key"] == key]
    assert [(f["kind"], f["fix_event"]) for f in mine] == [("status_mismatch", "refund_reversed")]
    ran = await cli(stack, "reconcile", "--fix", "--json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    fixed = [f for f in json.loads(ran.stdout)["findings"] if f["idempotency_key"] == key]
    assert [f["fix_outcome"] for f in fixed] == ["reopened"]

    reopened = stack.client.get_workflow_handle(cid, result_type=CancellationResult)
    await wait_for_status(reopened, CancellationStatus.REFUND_FAILED, timeout=30)
    description = await reopened.describe()
    assert description.run_id != handle.result_run_id  # a new run of the same id
    line = await description.static_summary()
    assert line is not None and line.startswith(
        f"Cancel order {order['order_id']} / seller {seller}: "
    ), line
    assert line.endswith(" EUR, card (out_of_stock, seller fault); reopened by refund_reversed")
    details = await description.static_details()
    assert details is not None and f"**Order** {order['order_id']}" in details
    assert f"**Buyer** {BUYER}" in details

    # Listed apart; held back from a bulk retry; the dry run names the key it would use.
    ran = await cli(stack, "refunds", "failed", "--seller", seller)
    assert ran.returncode == 0, ran.stderr
    head, _, apart = ran.stdout.partition("reversed by the provider after it confirmed")
    assert cid not in head and cid in apart and "reversed" in apart
    query = f'SellerId="{seller}"'
    ran = await cli(stack, "refunds", "retry", "--all-failed", "--query", query, "--dry-run")
    assert ran.returncode == 0, ran.stderr
    assert "would retry 0, would skip 1 (1 held back: declined or reversed)" in ran.stdout
    ran = await cli(
        stack, "refunds", "retry", "--all-failed", "--query", query, "--dry-run", "--json"
    )
    (held,) = json.loads(ran.stdout)["results"]
    assert held["outcome"] == "would_skip" and held["held_back"] is True
    assert held["detail"].startswith("stage reversed (") and "--include-reversed" in held["detail"]
    ran = await cli(stack, "refunds", "retry", "--all-failed", "--query", query)
    assert ran.returncode == 0, ran.stderr
    assert (
        "retried 0, skipped 1 (1 held back: declined or reversed, still in refund_failed)"
        in ran.stdout
    )
    ran = await cli(
        stack,
        "refunds",
        "retry",
        "--all-failed",
        "--query",
        query,
        "--include-reversed",
        "--dry-run",
        "--json",
    )
    (plan,) = json.loads(ran.stdout)["results"]
    assert plan["outcome"] == "would_retry", plan
    assert plan["detail"] == (
        "parked in refund_failed; the retry would use a new refund (generation 2) under"
        f" idempotency key {cid}:refund-submit-2; {key} was reversed"
    )

    # Finance found a way: the fault cleared, the bulk retry asked to include it.
    ran = await cli(stack, "provider", "clear", cid)
    assert ran.returncode == 0, ran.stderr
    ran = await cli(
        stack, "refunds", "retry", "--all-failed", "--query", query, "--include-reversed"
    )
    assert ran.returncode == 0, ran.stderr
    assert "retried 1, skipped 0" in ran.stdout
    done = await asyncio.wait_for(reopened.result(), 30)
    assert done.status is CancellationStatus.COMPLETED
    assert done.refund is not None and done.refund.idempotency_key == f"{cid}:refund-submit-2"
    ran = await cli(stack, "reconcile")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "checked for their current status at the provider" in ran.stdout


async def test_a_fault_named_by_cancellation_id_says_it_is_the_whole_payments(
    stack: RefundStack,
) -> None:
    """The simulator's faults are per payment: named by one seller's cancellation id of a
    two-seller order, the output says both sellers' refunds get it; an id whose order has no
    sub-order of that seller injects nothing."""
    first, second = unique("S"), unique("S")
    order = one_seller_order(unique("TW"), buyer_id=BUYER, seller_id=first)
    order["sub_orders"].append({**order["sub_orders"][0], "seller_id": second})
    await load_orders(stack.pool, parse_orders_file(orders_file(order)))
    mine, sibling = (cancellation_id(order["order_id"], s) for s in (first, second))

    ran = await cli(stack, "provider", "fault", mine, "--decline", "card_closed")
    assert ran.returncode == 0, ran.stderr
    assert f"faults of {order['payment']['payment_id']}: " in ran.stdout
    said = " ".join(ran.stdout.split())
    assert "the whole payment's" in said and mine in said and sibling in said, said

    stranger = cancellation_id(order["order_id"], unique("S"))
    ran = await cli(stack, "provider", "fault", stranger, "--transient", "1")
    assert ran.returncode == 1
    said = " ".join(ran.stderr.split())  # however the terminal wrapped it
    assert f"no order {order['order_id']} with a sub-order of seller" in said, said
    ran = await cli(stack, "provider", "clear", mine)
    assert ran.returncode == 0 and "cleared the faults of 1 payment(s)" in ran.stdout

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
from helpers.orders import unique
from helpers.refunds import (
    ORDERCANCEL,
    RefundStack,
    cancellations,
    refund_stack,
    succeeded_at_provider,
)
from helpers.stacks import Ran, run_command
from helpers.wait import wait_for_status

from domain.models import CancellationStatus

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

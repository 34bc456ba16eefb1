"""Reconciliation on the real dev server, PostgreSQL and the product's worker: a mismatch of each
kind is planted directly in the provider simulator's tables, the report finds each one, and
`--fix` repairs the status mismatches through the workflows (never by writing the ledger): the
reversal nobody told us about reopens its cancellation into refund_failed, the lost "succeeded"
webhook completes its cancellation, the lost "failed" webhook parks its cancellation.
"""

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
    all_results,
    cancellations,
    refund_stack,
)

# Shared end-to-end fixtures (`e2e_database_url`, `temporal_address`) for this module.
from helpers.stacks import run_command
from helpers.wait import wait_for_status

from domain.models import CancellationStatus, PaymentEventType, RefundKind, RefundStage
from domain.rules import refund_idempotency_key
from ledger.reports import LedgerRefund
from payments.provider import ProviderRefundStatus, SimulatorFaults
from starter.reconcile import Finding, FindingKind, compare, fix_event_id, reconcile

pytestmark = pytest.mark.e2e

GHOST_KEY = "cancel-GHOST-S-0:refund-submit"


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[RefundStack]:
    # A pending refund waits 10 minutes for its next look: only a webhook (or reconciliation
    # standing in for a lost one) wakes it within the test.
    async with refund_stack(
        temporal_address,
        e2e_database_url,
        refund_poll_interval=timedelta(minutes=10),
        refund_poll_max_interval=timedelta(hours=1),
    ) as s:
        yield s


def by_key(findings: list[Finding], keys: set[str]) -> dict[str, list[tuple[FindingKind, str]]]:
    found: dict[str, list[tuple[FindingKind, str]]] = {}
    for f in findings:
        if f.idempotency_key in keys:
            found.setdefault(f.idempotency_key, []).append(
                (f.kind, f.fix_event.value if f.fix_event else "-")
            )
    return found


async def test_each_planted_mismatch_is_found_and_status_ones_repaired_through_workflows(
    stack: RefundStack,
) -> None:
    seller = unique("S")
    missing, amount, reversed_, *_ = done = await cancellations(stack, 3, seller=seller)
    assert all(r.status is CancellationStatus.COMPLETED for r in await all_results(done))
    # Two refunds the provider keeps pending: the workflows wait in refund_submitted.
    lost_ok, lost_failed = waiting = await cancellations(
        stack, 2, seller=seller, faults=SimulatorFaults(confirm_after_polls=1000)
    )
    for c in waiting:
        await wait_for_status(c.handle, CancellationStatus.REFUND_SUBMITTED)
    key = {c.id: refund_idempotency_key(c.id) for c in (*done, *waiting)}

    # Plant one mismatch of each kind at the provider.
    pool = stack.pool
    await pool.execute("DELETE FROM provider_sim.refunds WHERE payment_id = $1", missing.payment_id)
    await pool.execute(
        "UPDATE provider_sim.refunds SET amount_minor = amount_minor - 100 WHERE payment_id = $1",
        amount.payment_id,
    )
    await pool.execute(
        "INSERT INTO provider_sim.refunds (provider_ref, idempotency_key, payment_id, kind,"
        " amount_minor, currency, status) VALUES ('re_ghost', $1, 'P-GHOST', 'refund', 999,"
        " 'EUR', 'succeeded')",
        GHOST_KEY,
    )
    await pool.execute(
        "UPDATE provider_sim.refunds SET status = 'failed', failure_code = 'card_closed'"
        " WHERE payment_id = $1",
        reversed_.payment_id,
    )
    await pool.execute(
        "UPDATE provider_sim.refunds SET status = 'succeeded' WHERE payment_id = $1",
        lost_ok.payment_id,
    )
    await pool.execute(
        "UPDATE provider_sim.refunds SET status = 'failed', failure_code = 'refund_rejected'"
        " WHERE payment_id = $1",
        lost_failed.payment_id,
    )
    ledger_before = await pool.fetch("SELECT * FROM refunds ORDER BY idempotency_key")

    report = await reconcile(pool, stack.provider)
    expected = {
        key[missing.id]: [(FindingKind.MISSING_AT_PROVIDER, "-")],
        key[amount.id]: [(FindingKind.AMOUNT_MISMATCH, "-")],
        GHOST_KEY: [(FindingKind.UNKNOWN_TO_LEDGER, "-")],
        key[reversed_.id]: [(FindingKind.STATUS_MISMATCH, PaymentEventType.REFUND_REVERSED.value)],
        key[lost_ok.id]: [(FindingKind.STATUS_MISMATCH, PaymentEventType.REFUND_CONFIRMED.value)],
        key[lost_failed.id]: [(FindingKind.STATUS_MISMATCH, PaymentEventType.REFUND_FAILED.value)],
    }
    assert by_key(report.findings, set(key.values()) | {GHOST_KEY}) == expected
    assert {f.idempotency_key for f in report.findings} == set(expected)  # nothing else
    totals = report.totals()
    assert totals["repairable"] == 3 and totals["for_finance"] == 3
    assert not report.fix and all(f.fix_outcome is None for f in report.findings)

    # Finance's tooling reads the same through the CLI.
    ran = await run_command(ORDERCANCEL, "reconcile", "--json", env=stack.cli_env())
    # Mismatches found: a scheduled run must be able to alert on the exit code.
    assert ran.returncode == 1, ran.stderr
    cli = json.loads(ran.stdout)
    assert {f["idempotency_key"]: f["kind"] for f in cli["findings"]} == {
        k: v[0][0].value for k, v in expected.items()
    }
    assert cli["totals"]["status_mismatch"] == 3
    # The report changed nothing.
    assert await pool.fetch("SELECT * FROM refunds ORDER BY idempotency_key") == ledger_before

    # --fix: the three status mismatches go to their workflows as payment events.
    fixed = await reconcile(
        pool, stack.provider, client=stack.client, fix=True, task_queue=stack.task_queue
    )
    outcomes = {f.idempotency_key: f.fix_outcome for f in fixed.findings if f.fix_outcome}
    assert outcomes == {
        key[reversed_.id]: "reopened",  # it had completed: a new run handles it
        key[lost_ok.id]: "delivered",
        key[lost_failed.id]: "delivered",
    }
    events = await pool.fetch("SELECT event_id, outcome FROM payment_events ORDER BY event_id")
    assert {e["event_id"] for e in events} == {
        fix_event_id(key[reversed_.id], ProviderRefundStatus.FAILED),
        fix_event_id(key[lost_ok.id], ProviderRefundStatus.SUCCEEDED),
        fix_event_id(key[lost_failed.id], ProviderRefundStatus.FAILED),
    }

    # The lost "succeeded" webhook: the workflow asks the provider and completes.
    assert (await asyncio.wait_for(lost_ok.handle.result(), 20)).status is (
        CancellationStatus.COMPLETED
    )
    # The lost "failed" webhook: parked for an operator.
    await wait_for_status(lost_failed.handle, CancellationStatus.REFUND_FAILED)
    # The reversal nobody told us about: reopened, reversed in the ledger, parked; its coupon
    # taken back.
    latest = stack.client.get_workflow_handle(reversed_.id)
    view = await wait_for_status(latest, CancellationStatus.REFUND_FAILED)
    assert view.last_error is not None and "card_closed" in view.last_error
    stage = await pool.fetchval(
        "SELECT stage FROM refunds WHERE idempotency_key = $1", key[reversed_.id]
    )
    assert stage == RefundStage.REVERSED.value
    assert (
        await pool.fetchval(
            "SELECT restored_at FROM coupon_redemptions WHERE redemption_id = $1",
            reversed_.redemption_id,
        )
        is None
    )

    # Running --fix again sends nothing new: the workflows have caught up (nothing left to
    # repair), and an event sent before would be a duplicate anyway.
    again = await reconcile(
        pool, stack.provider, client=stack.client, fix=True, task_queue=stack.task_queue
    )
    assert all(f.fix_duplicate in (None, True) for f in again.findings)
    assert {f.idempotency_key for f in again.findings if f.fix_event} == set()
    assert await pool.fetchval("SELECT count(*) FROM payment_events") == 3
    assert {f.idempotency_key for f in again.findings} == {
        key[missing.id],
        key[amount.id],
        GHOST_KEY,
    }
    ran = await run_command(ORDERCANCEL, "reconcile", env=stack.cli_env())
    assert ran.returncode == 1, ran.stderr
    assert "3 finding(s) over" in ran.stdout
    assert "missing_at_provider 1, unknown_to_ledger 1, amount_mismatch 1" in ran.stdout
    assert "unresolved 3" in ran.stdout

    # Clean up the parked ones (they would wait for an operator forever).
    await stack.provider.set_faults(lost_failed.payment_id, SimulatorFaults())
    for handle in (latest, lost_failed.handle):
        await handle.terminate("test over")


def test_compare_is_pure_and_reports_in_flight_refunds_as_nothing() -> None:
    from domain.models import Money
    from payments.provider import ProviderRefund

    eur = Money(amount_minor=2300, currency="EUR")

    def ledger(key: str, stage: RefundStage) -> LedgerRefund:
        return LedgerRefund(
            idempotency_key=key,
            cancellation_id=key.split(":")[0],
            generation=1,
            payment_id="P-1",
            kind=RefundKind.REFUND,
            amount=eur,
            stage=stage,
        )

    def theirs(key: str, status: ProviderRefundStatus) -> ProviderRefund:
        return ProviderRefund(
            provider_ref="re_" + key[-4:],
            idempotency_key=key,
            payment_id="P-1",
            kind=RefundKind.REFUND,
            amount=eur,
            status=status,
        )

    findings = compare(
        [
            ledger("c-1:k", RefundStage.REQUESTED),  # in flight, provider has nothing yet
            ledger("c-2:k", RefundStage.FAILED),  # refused before the provider recorded it
            ledger("c-3:k", RefundStage.CONFIRMED),
            ledger("c-4:k", RefundStage.FAILED),  # parked after a lost response
            ledger("c-5:k", RefundStage.REVERSED),
        ],
        [
            theirs("c-3:k", ProviderRefundStatus.SUCCEEDED),
            theirs("c-4:k", ProviderRefundStatus.SUCCEEDED),
            theirs("c-5:k", ProviderRefundStatus.FAILED),
        ],
    )
    assert [(f.idempotency_key, f.kind, f.fix_event) for f in findings] == [
        ("c-4:k", FindingKind.STATUS_MISMATCH, None)
    ]
    assert "refunds retry" in findings[0].action

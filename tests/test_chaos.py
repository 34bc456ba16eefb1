"""The reliability run (`python -m tools.chaos`, docs/reliability.md) in a CI-sized version, and
what it taught us.

- The CI-sized chaos run: 300 cancellations of every path on a real Temporal dev server and a real
  PostgreSQL, `ordercancel worker` subprocesses SIGKILLed (also during provider calls) and
  SIGTERMed, PostgreSQL and Temporal restarted, the provider failing in every way it can; then
  0 violations, and every kind of fault really happened.
- The plan is reproducible from its seed and covers every path; its hostile share (control
  characters, oversized text, wrong ids, malformed payloads, `temporal` CLI starts and duplicate
  decisions) too, and it leaves the rest of the plan as it was.
- Regressions found by the chaos run: reconcile took a refund the provider declined outright for
  a missing one; a reopened cancellation reused audit keys of its first run, losing audit rows.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest
from helpers.orders import one_seller_order, orders_file
from temporalio.testing import WorkflowEnvironment

from domain.models import (
    CancellationReason,
    CancellationStatus,
    Money,
    PaymentEvent,
    PaymentEventType,
    RefundKind,
    RefundStage,
    RequestCancellationInput,
)
from infra.settings import Settings
from ledger.orders import load_orders, parse_orders_file
from ledger.reports import LedgerRefund
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.payment_events import forward_payment_event
from starter.reconcile import FindingKind, compare
from starter.requests import start_cancellation
from tools.chaos.faults import FaultKind
from tools.chaos.plan import HOSTILE_SCENARIOS, OTHER, OWN, Probe, Scenario, make_plan
from tools.chaos.run import ChaosConfig, run_chaos
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation

# --- the bounded chaos run -------------------------------------------------------------------

CI_SEED = 20260601


@pytest.mark.e2e
@pytest.mark.timeout(600)
async def test_the_ci_sized_chaos_run_keeps_every_invariant() -> None:
    """`python -m tools.chaos` as it runs by default (300 cancellations), on a fixed seed."""
    lines: list[str] = []
    report = await run_chaos(ChaosConfig(seed=CI_SEED), say=lines.append)
    assert report.ok, "\n".join([*lines[-30:], "VIOLATIONS:", *report.violations[:30]])
    counts = report.fault_counts()
    missing = [kind.value for kind in FaultKind if counts.get(kind.value, 0) == 0]
    assert not missing, f"fault kinds never injected: {missing}\n" + "\n".join(lines)
    paths = {row.path: row for row in report.paths}
    assert {s.value for s in Scenario} <= set(paths), sorted(paths)
    assert all(row.other == 0 for row in report.paths)
    checked = {row.name: row.checked for row in report.invariants}
    assert checked["none lost"] >= 300 and checked["refunded exactly once"] >= 300
    # Hostile input went through the real stack, every kind of it, and was checked.
    hostile = {row.kind: row.count for row in report.hostile}
    assert hostile and all(hostile.values()), report.hostile
    assert checked["hostile input refused"] >= 10, checked
    assert checked["one workflow per sub-order"] >= 300, checked
    assert checked["starting again changes nothing"] >= 2, checked
    assert checked["no control character in the audit"] >= 1000, checked


def test_the_drivers_retry_outages_and_take_answers_as_answers() -> None:
    """Callers keep trying through outages (a server restarting, a database down, a timeout) and
    take any other error as the answer. Found by the 5,000-cancellation run: a database or
    timeout error made the check itself raise TypeError."""
    from temporalio.service import RPCError, RPCStatusCode

    from tools.chaos.driver import transient

    assert transient(RPCError("down", RPCStatusCode.UNAVAILABLE, b""))
    assert not transient(RPCError("no", RPCStatusCode.NOT_FOUND, b""))
    assert transient(TimeoutError())
    assert transient(ConnectionRefusedError())
    assert transient(asyncpg.CannotConnectNowError("starting up"))
    assert not transient(ValueError("an answer"))


# --- the plan -----------------------------------------------------------------------------------


def test_the_plan_is_reproducible_and_covers_every_path() -> None:
    first = make_plan(300, seed=7, tag="t", start_window=100)
    again = make_plan(300, seed=7, tag="t", start_window=100)
    assert [o.document for o in first.orders] == [o.document for o in again.orders]
    assert [c.workflow_id for c in first.cancellations()] == [
        c.workflow_id for c in again.cancellations()
    ]
    assert len(first.cancellations()) == 300
    assert {c.scenario for c in first.cancellations()} == set(Scenario) - {Scenario.PROBE}
    assert {c.scenario for o in first.probes for c in o.cancellations} == {Scenario.PROBE}
    starts = [o.start_at for o in first.orders]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] < 100
    # Siblings of an order decide together; an order's coupons are expected back only when
    # every sub-order of their footprint ends refunded.
    for order in first.orders:
        assert len({c.delay for c in order.cancellations}) == 1
        refunded = {c.seller_id for c in order.cancellations if c.approved}
        for coupon in order.coupons:
            assert coupon.expect_restored == (
                not coupon.expired and set(coupon.footprint) <= refunded
            )
        if order.faults is not None and order.faults.final_failure:
            assert not any(c.reverse for c in order.cancellations)
    assert make_plan(300, seed=8, tag="t", start_window=100).orders[0].document != (
        first.orders[0].document
    )


def test_the_hostile_share_is_seeded_reproducible_and_covers_every_kind() -> None:
    def hostile_of(seed: int, share: float = 0.35) -> list[tuple[str, object]]:
        plan = make_plan(300, seed=seed, tag="t", start_window=100, hostile_share=share)
        return [(c.workflow_id, c.hostile) for c in plan.cancellations() if c.hostile]

    first = hostile_of(7)
    assert first == hostile_of(7)
    assert first != hostile_of(8)
    plan = make_plan(300, seed=7, tag="t", start_window=100, hostile_share=0.35)
    hostile = [c for c in plan.cancellations() if c.hostile is not None]
    eligible = [c for c in plan.cancellations() if c.scenario in HOSTILE_SCENARIOS]
    # A share that matters, cheap enough for the CI-sized run.
    assert 10 <= len(hostile) <= len(eligible) // 2, (len(hostile), len(eligible))
    assert all(c.scenario in HOSTILE_SCENARIOS for c in hostile)
    plans = [c.hostile for c in hostile if c.hostile is not None]
    assert {p for h in plans for p in h.signals} == set(Probe)
    assert {p for h in plans for p in h.updates} == set(Probe)
    assert any(h.cli_signal for h in plans) and any(h.cli_duplicate_decision for h in plans)
    assert {h.cli_start_running for h in plans} >= {OWN, OTHER}
    assert {h.cli_start_ended for h in plans} >= {OWN, OTHER}
    # Hostile input is drawn apart: the rest of a seed's plan is the same with or without it.
    plain = make_plan(300, seed=7, tag="t", start_window=100)
    assert not any(c.hostile for c in plain.cancellations())
    assert [o.document for o in plain.orders] == [o.document for o in plan.orders]
    assert [c.action for c in plain.cancellations()] == [c.action for c in plan.cancellations()]


def test_hostile_payloads_are_what_they_claim() -> None:
    """Each probe really carries its defect: controls, a lone surrogate in raw JSON, text over
    the 2,000-character bound (R20), an intruder's id, a payload of the wrong shape."""
    from tools.chaos.hostile import signal_probe, update_probe

    plan = make_plan(300, seed=7, tag="t", start_window=100, hostile_share=0.35)
    c = next(c for c in plan.cancellations() if c.hostile is not None)
    for make in (signal_probe, update_probe):
        sent = {p: make(p, c) for p in Probe}
        payloads = {p: v[1] if isinstance(v, tuple) else v for p, v in sent.items()}

        def texts(value: object) -> str:
            if isinstance(value, dict):
                return "".join(texts(k) + texts(v) for k, v in value.items())
            if isinstance(value, list):
                return "".join(texts(v) for v in value)
            return value if isinstance(value, str) else ""

        assert "\x00" in texts(payloads[Probe.NUL])
        assert "\x1b" in texts(payloads[Probe.ESCAPE])
        assert b'"\\ud' in payloads[Probe.SURROGATE].payload.data
        assert len(texts(payloads[Probe.OVERSIZED])) > 2_000
        assert "intruder" in texts(payloads[Probe.WRONG_ID])
        assert (
            not isinstance(payloads[Probe.MALFORMED], dict) or "extra" in payloads[Probe.MALFORMED]
        )


# --- regressions the chaos run found ----------------------------------------------------------


def test_reconcile_does_not_count_a_refund_declined_at_submission_as_missing() -> None:
    """The provider refused it for good and recorded nothing: nothing is missing there (the
    chaos run reported every declined refund as `missing_at_provider`)."""

    def row(stage: RefundStage) -> LedgerRefund:
        return LedgerRefund(
            idempotency_key=f"cancel-O-1-S-1:refund-submit-{stage.value}",
            cancellation_id="cancel-O-1-S-1",
            generation=1,
            payment_id="P-1",
            kind=RefundKind.REFUND,
            amount=Money(amount_minor=100, currency="EUR"),
            stage=stage,
        )

    findings = compare([row(RefundStage.DECLINED), row(RefundStage.FAILED)], [])
    assert findings == []
    missing = compare([row(RefundStage.CONFIRMED), row(RefundStage.REVERSED)], [])
    assert [f.kind for f in missing] == [FindingKind.MISSING_AT_PROVIDER] * 2


async def test_a_reopened_cancellation_keeps_its_whole_audit_trail(
    time_skipping_env: WorkflowEnvironment, pool: asyncpg.Pool
) -> None:
    from helpers.wait import wait_for_status

    order_id = f"AK-{uuid.uuid4().hex[:6]}"
    order = one_seller_order(order_id, buyer_id="B-1", seller_id="S-1")
    await load_orders(pool, parse_orders_file(orders_file(order)))
    provider = SimulatedProvider(pool, confirm_after_polls=0)
    # Two "pending" answers before success: the first run's keys reach 007-009, exactly where
    # the reopened run's land after its reversal and retry.
    await provider.set_faults(
        f"P-{order_id}", SimulatorFaults(fail_after_success=True, confirm_after_polls=2)
    )
    task_queue = f"audit-keys-{uuid.uuid4()}"
    settings = Settings(
        refund_poll_interval=timedelta(seconds=1),
        refund_submit_initial_interval=timedelta(milliseconds=100),
    )
    client = time_skipping_env.client
    async with build_worker(client, pool, settings, provider=provider, task_queue=task_queue):
        handle = await start_cancellation(
            client,
            RequestCancellationInput(
                order_id=order_id,
                seller_id="S-1",
                buyer_id="B-1",
                reason=CancellationReason.CANNOT_SHIP,
            ),
            task_queue=task_queue,
        )
        await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide, {"seller_id": "S-1", "decision": "accept"}
        )
        assert (await handle.result()).status is CancellationStatus.COMPLETED
        provider_ref = await pool.fetchval(
            "SELECT provider_ref FROM refunds WHERE cancellation_id = $1", handle.id
        )
        await forward_payment_event(
            client,
            Ledger(pool),
            PaymentEvent(
                event_id=f"evt-{order_id}",
                type=PaymentEventType.REFUND_REVERSED,
                provider_ref=provider_ref,
            ),
            task_queue=task_queue,
        )
        reopened = client.get_workflow_handle_for(OrderCancellation.run, handle.id)
        await wait_for_status(reopened, CancellationStatus.REFUND_FAILED)
        await provider.set_faults(f"P-{order_id}", SimulatorFaults())
        await reopened.execute_update(OrderCancellation.retry_refund, {"operator_id": "sre-1"})
        assert (await reopened.result()).status is CancellationStatus.COMPLETED

    trail = await pool.fetch(
        "SELECT event_key, kind FROM cancellation_events WHERE cancellation_id = $1"
        " ORDER BY event_id",
        handle.id,
    )
    kinds = [r["kind"] for r in trail]
    # Two refunds, each submitted and confirmed, two coupon decisions, two completions.
    for kind in ("refund_requested", "refund_submitted", "refund_confirmed", "completed"):
        assert kinds.count(kind) == 2, (kind, [tuple(r) for r in trail])
    assert sum(k.startswith("coupon_") for k in kinds) == 2, [tuple(r) for r in trail]

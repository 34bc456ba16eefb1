"""What the ledger costs per stage, and that the cheaper form keeps its guarantees (issue 7).

Real PostgreSQL, every statement counted with the bench's counter (`bench.sql_counter`, the
product's pool with a query logger). Pinned here: each stage transition is one statement (one
round trip, one transaction with its audit row), the pool sends no reset on release and no
session state survives a release, the business metrics make no reads of their own, and a
repeated or refused transition writes its audit row once or not at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.exceptions import ApplicationError

from activities.ledger_activities import ApproveInput, CompleteInput, LedgerActivities
from activities.refund_activities import RefundActivities, SubmitRefundInput
from devstack.demo import DEMO_FILE
from domain.errors import CancellationNotFound, ProviderFinalError, ProviderTransientError
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CouponInput,
    CouponOutcomeKind,
    EtaRange,
    Money,
    PaymentMethod,
    RefundKind,
    RefundPolicy,
    RefundRequestInput,
    RefundStage,
    RefundStepInput,
    RequestCancellationInput,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import (
    DEFAULT_ETA_TABLE,
    cancellation_id,
    refund_eta,
    refund_idempotency_key,
)
from infra.metrics import BusinessMetrics
from ledger.db import create_pool, migrate, migration_files
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorSettings
from tools.bench.sql_counter import SqlCounter, counting_pool

CID = cancellation_id("O-1002", "S-7")  # payment validated: the request path


class RecordedMetrics(BusinessMetrics):
    """Enabled metrics that remember what they were given."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def seller_decided(self, **labels: Any) -> None:
        self.seen.append(("seller_decided", labels))

    def refund_stage_reached(self, **labels: Any) -> None:
        self.seen.append(("refund_stage_reached", labels))


class Counted:
    def __init__(self, pool: asyncpg.Pool, counter: SqlCounter, queries: list[str]) -> None:
        self.pool = pool
        self.counter = counter
        self.queries = queries
        self.ledger = Ledger(pool)

    def reset(self) -> None:
        self.counter.reset()
        self.queries.clear()

    async def ledger_totals(self) -> tuple[int, int]:
        """(statements, transactions) on the ledger since the last reset, once the pool has
        released every connection (releases are where a reset query would run)."""
        await asyncio.sleep(0.05)
        totals = self.counter.snapshot()
        return totals.get("ledger.statements", 0), totals.get("ledger.transactions", 0)


@pytest.fixture
async def counted(database_url: str) -> AsyncIterator[Counted]:
    counter = SqlCounter()
    queries: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(counter.logger_for(conn))
        conn.add_query_logger(lambda record: queries.append(record.query))

    pool = await create_pool(database_url, min_size=1, max_size=4, init=init)
    try:
        await load_orders(pool, parse_orders_file(DEMO_FILE.read_text()))
        yield Counted(pool, counter, queries)
    finally:
        await pool.close()


def transition(status: CancellationStatus, key: str, *, cancel: bool = False) -> TransitionInput:
    return TransitionInput(
        cancellation_id=CID,
        status=status,
        actor="seller:S-7",
        kind=status.value,
        event_key=key,
        cancel_sub_order=cancel,
    )


# A validated order's sub-order: the seller decides (the request path).
REQUEST = RequestCancellationInput(
    order_id="O-1002", seller_id="S-7", buyer_id="B-502", reason=CancellationReason.OUT_OF_STOCK
)


async def open_request(ledger: Ledger) -> None:
    opened = await ledger.open_cancellation(cancellation_id=CID, request=REQUEST)
    assert opened.path is CancellationPath.REQUEST


async def audit(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT event_key, kind FROM cancellation_events WHERE cancellation_id = $1"
        " ORDER BY event_id",
        CID,
    )
    return [(r["event_key"], r["kind"]) for r in rows]


async def test_each_stage_is_one_round_trip_and_metrics_read_nothing(counted: Counted) -> None:
    metrics = RecordedMetrics()
    ledger_acts = LedgerActivities(
        counted.ledger,
        response_window=timedelta(hours=48),
        timeout_policy=TimeoutPolicy.AUTO_APPROVE,
        refund_policy=RefundPolicy(),
        metrics=metrics,
    )
    refund_acts = RefundActivities(
        counted.ledger, SimulatedProvider(counted.pool, confirm_after_polls=0), metrics=metrics
    )
    await open_request(counted.ledger)
    step = RefundStepInput(
        cancellation_id=CID, idempotency_key=refund_idempotency_key(CID), event_key="submitted"
    )

    # (activity, ledger statements, ledger transactions): before issue 7 these were 7 + 2
    # (metric read), 10, 2 + 7 + 2, 2 + 7 + 2 and 6 statements, pool resets included.
    counted.reset()
    await ledger_acts.record_transition(transition(CancellationStatus.APPROVED, "a", cancel=True))
    assert await counted.ledger_totals() == (1, 1)

    counted.reset()
    await ledger_acts.request_refund(RefundRequestInput(cancellation_id=CID, event_key="r"))
    # One call of `ledger_request_refund` (migration 014; 5 round trips before issue 19:
    # BEGIN, payment locked, live refund looked up under that lock, the intent, COMMIT).
    assert await counted.ledger_totals() == (1, 1)

    counted.reset()
    await refund_acts.submit_refund(step)
    assert await counted.ledger_totals() == (2, 2)  # the refund read, the record

    counted.reset()
    confirmed = await refund_acts.confirm_refund(step.model_copy(update={"event_key": "c"}))
    assert confirmed.stage is RefundStage.CONFIRMED
    assert await counted.ledger_totals() == (2, 2)

    counted.reset()
    await ledger_acts.record_transition(transition(CancellationStatus.COMPLETED, "done"))
    assert await counted.ledger_totals() == (1, 1)

    assert counted.counter.snapshot().get("ledger.resets", 0) == 0
    assert not any("pg_advisory_unlock_all" in q.lower() for q in counted.queries)
    # The metrics got their durations from the writes' own timestamps.
    kinds = [name for name, _ in metrics.seen]
    assert kinds == ["seller_decided", "refund_stage_reached", "refund_stage_reached"]
    assert all(labels["seconds"] >= 0 for _, labels in metrics.seen)
    assert [labels.get("stage") for _, labels in metrics.seen[1:]] == ["submitted", "confirmed"]


def ledger_activities(counted: Counted, metrics: BusinessMetrics | None = None) -> LedgerActivities:
    return LedgerActivities(
        counted.ledger,
        response_window=timedelta(hours=48),
        timeout_policy=TimeoutPolicy.AUTO_APPROVE,
        refund_policy=RefundPolicy(),
        metrics=metrics or BusinessMetrics(),
    )


APPROVAL = ApproveInput(
    transition=transition(CancellationStatus.APPROVED, "approved", cancel=True),
    refund=RefundRequestInput(cancellation_id=CID, event_key="refund-requested"),
)


async def test_the_approval_and_its_refund_are_one_round_trip_written_once(
    counted: Counted,
) -> None:
    """`approve_and_request_refund`: the approval and the refund's intent in one call of
    `ledger_request_refund` (migration 014; 1 + 5 round trips before issue 19), written in the
    order they were before (the approval's audit row first); a retried attempt writes nothing
    again and returns the same refund."""
    metrics = RecordedMetrics()
    acts = ledger_activities(counted, metrics)
    await open_request(counted.ledger)
    counted.reset()
    first = await acts.approve_and_request_refund(APPROVAL)
    assert await counted.ledger_totals() == (1, 1)
    assert first is not None and first.stage is RefundStage.REQUESTED
    assert first.idempotency_key == refund_idempotency_key(CID)
    paid = Money(amount_minor=6589, currency="EUR")
    assert first.amount == paid
    assert [name for name, _ in metrics.seen] == ["seller_decided"]
    detail = await counted.pool.fetchval(
        "SELECT detail FROM cancellation_events WHERE cancellation_id = $1 AND event_key = $2",
        CID,
        "refund-requested",
    )
    assert detail == f"refund of {paid} requested"  # the text Ledger.request_refund wrote
    row = await counted.pool.fetchrow(
        "SELECT c.status, s.status AS sub, p.refunded_minor,"
        " (SELECT count(*) FROM refunds r WHERE r.cancellation_id = c.cancellation_id) AS refunds"
        " FROM cancellations c JOIN sub_orders s USING (order_id, seller_id)"
        " JOIN payments p USING (order_id) WHERE cancellation_id = $1",
        CID,
    )
    assert dict(row) == {
        "status": "refund_requested",
        "sub": "cancelled",
        "refunded_minor": 6589,
        "refunds": 1,
    }

    again = await acts.approve_and_request_refund(APPROVAL)
    assert again == first
    assert await audit(counted.pool) == [
        ("000-requested", "requested"),
        ("001-path", "awaiting_seller"),
        ("approved", "approved"),
        ("refund-requested", "refund_requested"),
    ]
    assert await counted.pool.fetchval("SELECT count(*) FROM refunds") == 1
    assert (
        await counted.pool.fetchval(
            "SELECT refunded_minor FROM payments WHERE payment_id = 'P-1002'"
        )
        == 6589
    )


async def test_the_refund_gets_the_kind_key_and_eta_the_rules_give(counted: Counted) -> None:
    """`ledger_request_refund` picks the refund's kind (R2), key (R9) and ETA (R8) in SQL from
    what Python computed or would compute: the same values, to the microsecond."""
    at = datetime(2026, 12, 4, 17, 30, 12, 345678, tzinfo=UTC)  # a Friday
    instant = cancellation_id("O-1001", "S-7")  # authorised: a void
    await counted.ledger.open_cancellation(
        cancellation_id=instant,
        request=REQUEST.model_copy(update={"order_id": "O-1001", "buyer_id": "B-501"}),
    )
    await open_request(counted.ledger)
    await counted.ledger.record_transition(transition(CancellationStatus.APPROVED, "a"))
    for cid, method, kind in (
        (instant, PaymentMethod.CARD, RefundKind.VOID),
        (CID, PaymentMethod.CARD, RefundKind.REFUND),
    ):
        record = await counted.ledger.request_refund(
            cancellation_id=cid, event_key="r", now=at, eta_table=DEFAULT_ETA_TABLE
        )
        assert record.view.kind is kind
        assert record.view.idempotency_key == refund_idempotency_key(cid)
        assert record.view.eta == refund_eta(method, kind, at, DEFAULT_ETA_TABLE)


async def test_an_approval_whose_refund_is_refused_is_recorded_without_it(
    counted: Counted,
) -> None:
    """The ledger refuses the refund (more than is left of the payment): the approval is
    recorded all the same and nothing of the refund is; `request_refund` then says why, with the
    error type and text the workflow parks with."""
    acts = ledger_activities(counted)
    await open_request(counted.ledger)
    await counted.pool.execute(
        "UPDATE payments SET refunded_minor = amount_minor - 6588 WHERE payment_id = 'P-1002'"
    )
    assert await acts.approve_and_request_refund(APPROVAL) is None
    assert await audit(counted.pool) == [
        ("000-requested", "requested"),
        ("001-path", "awaiting_seller"),
        ("approved", "approved"),
    ]
    with pytest.raises(ApplicationError) as refused:
        await acts.request_refund(APPROVAL.refund)
    assert refused.value.type == "RefundLimitExceeded"
    assert refused.value.non_retryable
    assert str(refused.value) == (
        "RefundLimitExceeded: refunding 65.89 EUR would exceed payment P-1002"
    )
    row = await counted.pool.fetchrow(
        "SELECT c.status, s.status AS sub, p.refunded_minor, p.amount_minor,"
        " (SELECT count(*) FROM refunds r WHERE r.cancellation_id = c.cancellation_id) AS refunds"
        " FROM cancellations c JOIN sub_orders s USING (order_id, seller_id)"
        " JOIN payments p USING (order_id) WHERE cancellation_id = $1",
        CID,
    )
    assert (row["status"], row["sub"], row["refunds"]) == ("approved", "cancelled", 0)
    assert row["refunded_minor"] == row["amount_minor"] - 6588


async def test_an_approval_of_an_unknown_cancellation_fails_and_writes_nothing(
    counted: Counted,
) -> None:
    acts = ledger_activities(counted)
    unknown = "cancel-nope"
    before = await counted.pool.fetchval("SELECT count(*) FROM cancellation_events")
    with pytest.raises(ApplicationError) as refused:
        await acts.approve_and_request_refund(
            ApproveInput(
                transition=APPROVAL.transition.model_copy(update={"cancellation_id": unknown}),
                refund=RefundRequestInput(cancellation_id=unknown, event_key="r"),
            )
        )
    assert (refused.value.type, str(refused.value)) == (
        "CancellationNotFound",
        f"CancellationNotFound: {unknown}",
    )
    assert await counted.pool.fetchval("SELECT count(*) FROM cancellation_events") == before


async def test_a_refund_settled_at_once_is_submitted_and_confirmed_in_one_round_trip(
    counted: Counted,
) -> None:
    """`submit_refund_and_confirm` with a provider that answers synchronously with success:
    the refund's read, the provider's call, then dot 2 and dot 3 in one call of
    `ledger_refund_submitted_and_confirmed` (migration 015; two round trips before issue 19).
    Each stage keeps its audit row (once per its event key), its outbound event (dot 2 while the
    refund stood submitted, then dot 3), its timestamp and its duration metric; a retried attempt
    writes nothing again."""
    metrics = RecordedMetrics()
    acts = ledger_activities(counted, metrics)
    provider = SimulatedProvider(counted.pool, settle_at_once=True)
    refunds = RefundActivities(counted.ledger, provider, metrics=metrics)
    await open_request(counted.ledger)
    await acts.approve_and_request_refund(APPROVAL)
    step = SubmitRefundInput(
        cancellation_id=CID,
        idempotency_key=refund_idempotency_key(CID),
        event_key="refund-submitted",
        confirm_event_key="refund-confirmed",
    )
    counted.reset()
    metrics.seen.clear()
    confirmed = await refunds.submit_refund_and_confirm(step)
    assert await counted.ledger_totals() == (2, 2)  # the refund read, both stages
    assert confirmed.stage is RefundStage.CONFIRMED
    assert confirmed.provider_ref is not None and confirmed.eta is not None
    assert [labels["stage"] for _, labels in metrics.seen] == ["submitted", "confirmed"]
    assert all(labels["seconds"] >= 0 for _, labels in metrics.seen)

    again = await refunds.submit_refund_and_confirm(step)
    assert again == confirmed
    assert (await audit(counted.pool))[-3:] == [
        ("refund-requested", "refund_requested"),
        ("refund-submitted", "refund_submitted"),
        ("refund-confirmed", "refund_confirmed"),
    ]
    row = await counted.pool.fetchrow(
        "SELECT c.status, r.stage, r.attempts, r.provider_ref,"
        " r.requested_at <= r.submitted_at AND r.submitted_at <= r.confirmed_at AS in_order"
        " FROM cancellations c JOIN refunds r USING (cancellation_id)"
        " WHERE cancellation_id = $1",
        CID,
    )
    assert dict(row) == {
        "status": "refund_confirmed",
        "stage": "confirmed",
        "attempts": 1,
        "provider_ref": confirmed.provider_ref,
        "in_order": True,
    }
    events = await counted.pool.fetch(
        "SELECT o.type, o.data->>'stage' AS stage, o.data->>'status' AS status"
        " FROM outbox o WHERE o.cancellation_id = $1 AND o.type = 'refund.stage_changed'"
        " ORDER BY o.id",
        CID,
    )
    assert [(e["stage"], e["status"]) for e in events] == [
        ("requested", "refund_requested"),
        ("submitted", "refund_submitted"),
        ("confirmed", "refund_confirmed"),
    ]


async def test_opening_is_one_round_trip_and_reopening_three(counted: Counted) -> None:
    """One call of `ledger_open_cancellation` (migration 005): the sub-order locked, the
    cancellation looked up under that lock, the cancellation and both opening audit rows, in one
    transaction (11 round trips before issue 7, then 6). A retried or later run gets the stored
    status from it, checks the buyer is the cancellation's own (issue 18: no other buyer adopts
    it) and reads the refund instead of writing."""
    counted.reset()
    await open_request(counted.ledger)
    assert await counted.ledger_totals() == (1, 1)
    assert await audit(counted.pool) == [
        ("000-requested", "requested"),
        ("001-path", "awaiting_seller"),
    ]

    await counted.ledger.record_transition(
        transition(CancellationStatus.APPROVED, "a", cancel=True)
    )
    counted.reset()
    again = await counted.ledger.open_cancellation(cancellation_id=CID, request=REQUEST)
    assert await counted.ledger_totals() == (3, 3)
    assert (again.path, again.status, again.refund) == (
        CancellationPath.REQUEST,
        CancellationStatus.APPROVED,
        None,
    )
    assert len(await audit(counted.pool)) == 3  # nothing written again


async def test_the_coupon_decision_is_six_round_trips_and_decided_once(counted: Counted) -> None:
    """BEGIN, the cancellation locked, the round and any decision already made, the coupon's
    redemption (none here), the decision with its audit row, COMMIT (10 before issue 7). A
    retried attempt reads the decision made instead of deciding again."""
    await open_request(counted.ledger)
    counted.reset()
    first = await counted.ledger.decide_coupon(cancellation_id=CID, event_key="coupon")
    assert await counted.ledger_totals() == (6, 1)
    assert first.outcome is CouponOutcomeKind.NO_COUPON
    counted.reset()
    again = await counted.ledger.decide_coupon(cancellation_id=CID, event_key="coupon")
    assert again == first
    assert await counted.ledger_totals() == (4, 1)  # BEGIN, lock, the decision read, COMMIT
    assert [kind for key, kind in await audit(counted.pool) if key == "coupon"] == [
        "coupon_no_coupon"
    ]
    decisions = await counted.pool.fetchval(
        "SELECT count(*) FROM coupon_decisions WHERE cancellation_id = $1", CID
    )
    assert decisions == 1


def completion(cid: str) -> CompleteInput:
    return CompleteInput(
        coupon=CouponInput(cancellation_id=cid, event_key="coupon"),
        transition=TransitionInput(
            cancellation_id=cid,
            status=CancellationStatus.COMPLETED,
            actor="system",
            kind="completed",
            event_key="completed",
        ),
    )


async def settled(
    acts: LedgerActivities, counted: Counted, order_id: str, seller_id: str, buyer_id: str
) -> str:
    """A validated sub-order's cancellation approved, its refund requested and confirmed."""
    cid = cancellation_id(order_id, seller_id)
    opened = await counted.ledger.open_cancellation(
        cancellation_id=cid,
        request=REQUEST.model_copy(
            update={"order_id": order_id, "seller_id": seller_id, "buyer_id": buyer_id}
        ),
    )
    assert opened.path is CancellationPath.REQUEST
    approval = ApproveInput(
        transition=transition(CancellationStatus.APPROVED, "approved", cancel=True).model_copy(
            update={"cancellation_id": cid}
        ),
        refund=RefundRequestInput(cancellation_id=cid, event_key="refund-requested"),
    )
    assert await acts.approve_and_request_refund(approval) is not None
    refunds = RefundActivities(counted.ledger, SimulatedProvider(counted.pool, settle_at_once=True))
    confirmed = await refunds.submit_refund_and_confirm(
        SubmitRefundInput(
            cancellation_id=cid,
            idempotency_key=refund_idempotency_key(cid),
            event_key="refund-submitted",
            confirm_event_key="refund-confirmed",
        )
    )
    assert confirmed.stage is RefundStage.CONFIRMED
    return cid


async def test_without_a_coupon_the_decision_and_the_completion_are_one_round_trip(
    counted: Counted,
) -> None:
    """`complete_with_coupon` of a sub-order no coupon paid for: one call of
    `ledger_decide_coupon` (migration 016; 6 + 1 round trips before issue 19): the decision with
    its audit row, then the completion with its own; a retried attempt decides nothing again
    and writes no row twice."""
    acts = ledger_activities(counted)
    await settled(acts, counted, "O-1002", "S-7", "B-502")
    counted.reset()
    first = await acts.complete_with_coupon(completion(CID))
    assert await counted.ledger_totals() == (1, 1)
    assert first.outcome.outcome is CouponOutcomeKind.NO_COUPON
    assert first.outcome.reason == "no coupon paid for this sub-order"
    assert (first.waiting_on, first.notify) == ([], [])

    again = await acts.complete_with_coupon(completion(CID))
    assert again == first
    assert (await audit(counted.pool))[-2:] == [
        ("coupon", "coupon_no_coupon"),
        ("completed", "completed"),
    ]
    row = await counted.pool.fetchrow(
        "SELECT c.status, (SELECT count(*) FROM coupon_decisions d"
        " WHERE d.cancellation_id = c.cancellation_id) AS decisions"
        " FROM cancellations c WHERE cancellation_id = $1",
        CID,
    )
    assert (row["status"], row["decisions"]) == ("completed", 1)
    # The decision's event was written while the cancellation stood where the refund left it.
    event = await counted.pool.fetchrow(
        "SELECT data->>'outcome' AS outcome, data->>'status' AS status FROM outbox"
        " WHERE cancellation_id = $1 AND type = 'coupon.decided'",
        CID,
    )
    assert (event["outcome"], event["status"]) == ("no_coupon", "refund_confirmed")


async def test_with_a_coupon_the_completion_decides_as_before_and_restores_it_once(
    counted: Counted,
) -> None:
    """O-2001: both sub-orders a coupon paid for are fully refunded, then complete together:
    the coupon is decided under the redemption's lock as before (R11), given back exactly once,
    and each completion follows its decision."""
    acts = ledger_activities(counted)
    first_id = await settled(acts, counted, "O-2001", "S-7", "B-601")
    second_id = await settled(acts, counted, "O-2001", "S-8", "B-601")
    decisions = await asyncio.gather(
        acts.complete_with_coupon(completion(first_id)),
        acts.complete_with_coupon(completion(second_id)),
    )
    assert [d.outcome.outcome for d in decisions] == [CouponOutcomeKind.RESTORED] * 2
    assert [d.outcome.redemption_id for d in decisions] == ["R-2001"] * 2
    restored = await counted.pool.fetch(
        "SELECT cancellation_id FROM coupon_decisions WHERE performed_restore"
    )
    assert len(restored) == 1
    restored_by = await counted.pool.fetchval(
        "SELECT restored_by FROM coupon_redemptions WHERE redemption_id = 'R-2001'"
    )
    assert restored_by == restored[0]["cancellation_id"]
    for cid in (first_id, second_id):
        rows = await counted.pool.fetch(
            "SELECT event_key, kind FROM cancellation_events WHERE cancellation_id = $1"
            " AND event_key IN ('coupon', 'completed') ORDER BY event_id",
            cid,
        )
        assert [(r["event_key"], r["kind"]) for r in rows] == [
            ("coupon", "coupon_restored"),
            ("completed", "completed"),
        ]
        status = await counted.pool.fetchval(
            "SELECT status FROM cancellations WHERE cancellation_id = $1", cid
        )
        assert status == "completed"


async def provider_totals(counted: Counted) -> tuple[int, int]:
    await asyncio.sleep(0.05)
    totals = counted.counter.snapshot()
    return totals.get("provider_sim.statements", 0), totals.get("provider_sim.transactions", 0)


async def test_a_void_at_the_simulator_is_one_round_trip_released_once(counted: Counted) -> None:
    """The simulator's void of a payment without faults: one call of `provider_sim.create_refund`
    (migration 017; ten round trips before issue 19). It releases the share once (R15), a
    repeated call with the key returns the same refund, concurrent first calls with the same key
    make one refund and one release, and a release the authorisation cannot give is refused."""
    provider = SimulatedProvider(counted.pool)
    share = Money(amount_minor=2041 + 499, currency="EUR")
    # A first call reads the settings: the calls within a second after it need no read.
    await provider.create_refund(
        idempotency_key="k-0", payment_id="P-1002", kind=RefundKind.REFUND, amount=share
    )
    counted.reset()
    made = await asyncio.gather(
        *(
            provider.create_refund(
                idempotency_key="k-1", payment_id="P-1001", kind=RefundKind.VOID, amount=share
            )
            for _ in range(3)
        )
    )
    assert await provider_totals(counted) == (3, 3)  # one statement each
    assert len({m.provider_ref for m in made}) == 1
    assert {m.status.value for m in made} == {"succeeded"}
    held = await provider.authorisation("P-1001")
    assert held is not None
    assert (held["released_minor"], held["status"]) == (share.amount_minor, "voided")
    calls = await counted.pool.fetch(
        "SELECT outcome FROM provider_sim.calls WHERE idempotency_key = 'k-1' ORDER BY call_id"
    )
    assert [c["outcome"] for c in calls] == ["created", "replayed", "replayed"]

    with pytest.raises(ProviderFinalError) as refused:
        await provider.create_refund(
            idempotency_key="k-2", payment_id="P-1001", kind=RefundKind.VOID, amount=share
        )
    assert refused.value.code == "release_exceeds_authorisation"
    with pytest.raises(ProviderFinalError) as reused:
        await provider.create_refund(
            idempotency_key="k-1", payment_id="P-1001", kind=RefundKind.REFUND, amount=share
        )
    assert reused.value.code == "idempotency_key_reused"
    outcomes = await counted.pool.fetch(
        "SELECT outcome FROM provider_sim.calls WHERE idempotency_key IN ('k-1', 'k-2')"
        " ORDER BY call_id DESC LIMIT 2"
    )
    assert [c["outcome"] for c in outcomes] == ["mismatch", "refused"]
    held = await provider.authorisation("P-1001")
    assert held is not None and held["released_minor"] == share.amount_minor


async def test_settings_changed_elsewhere_apply_from_the_call_after_the_next(
    counted: Counted,
) -> None:
    """Each refund call reads the provider-wide settings with its own statement: a change
    another process makes (`ordercancel provider settings`) applies from the call after the
    first one that saw it (and within a second in any case, as before), with no statement of
    its own while calls come in."""
    worker = SimulatedProvider(counted.pool)
    operator = SimulatedProvider(counted.pool)
    money = Money(amount_minor=100, currency="EUR")

    async def refund(key: str) -> None:
        await worker.create_refund(
            idempotency_key=key, payment_id="P-1002", kind=RefundKind.REFUND, amount=money
        )

    await refund("s-1")
    await operator.set_settings(SimulatorSettings(transient_rate=1.0))
    counted.reset()
    await refund("s-2")  # its network went by what the first call read; its statement read anew
    assert await provider_totals(counted) == (1, 1)
    counted.reset()
    with pytest.raises(ProviderTransientError):
        await refund("s-3")
    assert await provider_totals(counted) == (0, 0)  # failed before reaching the provider
    assert await worker.find_refund(idempotency_key="s-3") is None


async def test_a_repeated_transition_writes_one_audit_row(counted: Counted) -> None:
    await open_request(counted.ledger)
    approved = transition(CancellationStatus.APPROVED, "approved", cancel=True)
    first = await counted.ledger.record_transition(approved)
    again = await counted.ledger.record_transition(approved)
    assert first == again  # the cancellation's creation time, for the decision metric
    assert [kind for key, kind in await audit(counted.pool) if key == "approved"] == ["approved"]
    row = await counted.pool.fetchrow(
        "SELECT c.status, s.status AS sub FROM cancellations c"
        " JOIN sub_orders s USING (order_id, seller_id) WHERE cancellation_id = $1",
        CID,
    )
    assert (row["status"], row["sub"]) == ("approved", "cancelled")


async def test_transitions_of_an_unknown_cancellation_or_refund_write_nothing(
    counted: Counted,
) -> None:
    before = await counted.pool.fetchval("SELECT count(*) FROM cancellation_events")
    with pytest.raises(CancellationNotFound, match="cancel-nope"):
        await counted.ledger.record_transition(
            transition(CancellationStatus.APPROVED, "x").model_copy(
                update={"cancellation_id": "cancel-nope"}
            )
        )
    # A cancellation without a refund yet: no refund stage, no status, no audit row.
    await open_request(counted.ledger)
    opened = await audit(counted.pool)
    for call in (
        counted.ledger.record_refund_confirmed(cancellation_id=CID, event_key="c"),
        counted.ledger.record_refund_failed(cancellation_id=CID, error="e", event_key="f"),
        counted.ledger.record_refund_failed(
            cancellation_id=CID, error="e", event_key="f", final=True
        ),
    ):
        with pytest.raises(CancellationNotFound, match=f"no refund for {CID}"):
            await call
    assert await audit(counted.pool) == opened
    assert len(opened) == before + 2  # requested + awaiting_seller
    status = await counted.pool.fetchval(
        "SELECT status FROM cancellations WHERE cancellation_id = $1", CID
    )
    assert status == "awaiting_seller"


async def test_no_session_state_survives_a_release(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)  # takes the migration lock (transaction-scoped)
            await conn.execute("BEGIN")  # left open, as a cancelled task would
            await conn.execute(
                "INSERT INTO checkout_orders VALUES ('O-x', 'B-x', 'EUR', 'h', now(), now())"
            )
        async with pool.acquire() as conn:  # the same connection (pool of one)
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM checkout_orders") == 0
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()"
            )
            assert held == 0
    finally:
        await pool.close()


async def test_concurrent_migrations_apply_each_version_once(postgres_url: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    name = "m_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(postgres_url)._replace(path="/" + name))
    conns = [await asyncpg.connect(url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        versions = [v for v, _, _ in migration_files()]
        assert sorted(v for run in applied for v in run) == versions
        for conn in conns:
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()"
            )
            assert held == 0
    finally:
        for conn in conns:
            await conn.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_the_bench_can_still_count_the_old_pool_reset(database_url: str) -> None:
    counter = SqlCounter()
    pool = await counting_pool(database_url, counter, min_size=1, max_size=1, pool_reset=True)
    try:
        await pool.fetchval("SELECT 1")
        await asyncio.sleep(0.05)
        assert counter.snapshot().get("ledger.resets") == 1
    finally:
        await pool.close()


async def test_a_transition_that_waited_for_a_concurrent_one_reports_the_refund_as_it_is_now(
    counted: Counted, database_url: str
) -> None:
    """A late failure report that had to wait for the confirmation of the same refund (an
    overlapping attempt) leaves it confirmed and returns it confirmed, not as it was when the
    statement started."""
    ledger = counted.ledger
    await open_request(ledger)
    await ledger.record_transition(transition(CancellationStatus.APPROVED, "a", cancel=True))
    await ledger.request_refund(
        cancellation_id=CID, event_key="r", now=datetime.now(UTC), eta_table=DEFAULT_ETA_TABLE
    )
    now = datetime.now(UTC)
    await ledger.record_refund_submitted(
        cancellation_id=CID,
        provider_ref="re_1",
        eta=EtaRange(earliest=now, latest=now + timedelta(days=3)),
        event_key="s",
    )
    other = await asyncpg.connect(database_url)
    try:
        confirming = other.transaction()
        await confirming.start()
        await other.execute(
            "UPDATE refunds SET stage = 'confirmed', confirmed_at = clock_timestamp()"
            " WHERE cancellation_id = $1",
            CID,
        )
        late = asyncio.create_task(
            ledger.record_refund_failed(cancellation_id=CID, error="late", event_key="late")
        )
        for _ in range(100):  # until the late report waits for the refund's row lock
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE refunds%'"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "the late report did not wait for the confirmation's lock"
        await confirming.commit()
        record = await late
    finally:
        await other.close()
    assert record.view.stage is RefundStage.CONFIRMED
    row = await counted.pool.fetchrow(
        "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
        " WHERE cancellation_id = $1",
        CID,
    )
    # The other transaction changed only the refund: the late report did not park the
    # cancellation (it was not refund_failed-able any more).
    assert (row["status"], row["stage"]) == ("refund_submitted", "confirmed")

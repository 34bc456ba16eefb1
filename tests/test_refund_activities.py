"""The refund activities against a real PostgreSQL ledger and the provider simulator (R7-R10).

The activity methods are called directly (they are plain async methods). What a buyer and an
operator rely on: one refund at the provider per cancellation whatever fails and is retried,
retryable failures marked retryable, final ones not, and the ledger's stage matching reality.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from temporalio.exceptions import ApplicationError

from activities.ledger_activities import LedgerActivities
from activities.refund_activities import (
    PROVIDER_UNAVAILABLE,
    REFUND_REJECTED,
    REFUND_STATUS_UNREADABLE,
    RefundActivities,
)
from devstack.demo import DEMO_FILE
from domain.errors import ProviderFinalError, ProviderReadError
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    Money,
    OpenCancellationInput,
    RefundFailureInput,
    RefundKind,
    RefundPolicy,
    RefundRequestInput,
    RefundStage,
    RefundStepInput,
    RefundView,
    RequestCancellationInput,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import add_business_days, cancellation_id, refund_idempotency_key
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import (
    ProviderRefund,
    ProviderRefundStatus,
    SimulatedProvider,
    SimulatorFaults,
)

BUYERS = {"O-1001": "B-501", "O-1002": "B-502", "O-1003": "B-503", "O-1005": "B-505"}


class Harness:
    def __init__(self, pool: asyncpg.Pool, provider: SimulatedProvider) -> None:
        self.pool = pool
        self.ledger = Ledger(pool)
        self.provider = provider
        self.ledger_acts = LedgerActivities(
            self.ledger,
            response_window=timedelta(hours=48),
            timeout_policy=TimeoutPolicy.AUTO_APPROVE,
            refund_policy=RefundPolicy(),
        )
        self.refund_acts = RefundActivities(self.ledger, provider)

    async def approved_refund(self, order_id: str, seller_id: str) -> RefundView:
        """A cancellation opened, approved (at once or by the seller) and its refund recorded."""
        cid = cancellation_id(order_id, seller_id)
        opened = await self.ledger_acts.open_cancellation(
            OpenCancellationInput(
                cancellation_id=cid,
                request=RequestCancellationInput(
                    order_id=order_id,
                    seller_id=seller_id,
                    buyer_id=BUYERS[order_id],
                    reason=CancellationReason.DUPLICATE_ORDER,
                ),
            )
        )
        if opened.path is CancellationPath.REQUEST:
            await self.ledger_acts.record_transition(
                TransitionInput(
                    cancellation_id=cid,
                    status=CancellationStatus.APPROVED,
                    actor="seller:" + seller_id,
                    kind="approved",
                    event_key="approved",
                    cancel_sub_order=True,
                )
            )
        return await self.ledger_acts.request_refund(
            RefundRequestInput(cancellation_id=cid, event_key="refund_requested")
        )

    async def submit(self, cid: str) -> RefundView:
        return await self.refund_acts.submit_refund(
            RefundStepInput(
                cancellation_id=cid,
                idempotency_key=refund_idempotency_key(cid),
                event_key="refund_submitted",
            )
        )

    async def confirm(self, cid: str) -> RefundView:
        return await self.refund_acts.confirm_refund(
            RefundStepInput(
                cancellation_id=cid,
                idempotency_key=refund_idempotency_key(cid),
                event_key="refund_confirmed",
            )
        )

    async def stage(self, cid: str) -> RefundStage:
        return (await self.ledger.get_refund(cancellation_id=cid)).view.stage

    async def calls(self, key: str) -> list[tuple[str, str]]:
        rows = await self.pool.fetch(
            "SELECT operation, outcome FROM provider_sim.calls WHERE idempotency_key = $1"
            " ORDER BY call_id",
            key,
        )
        return [(r["operation"], r["outcome"]) for r in rows]

    async def provider_refunds(self, key: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT * FROM provider_sim.refunds WHERE idempotency_key = $1", key
        )


async def make_harness(pool: asyncpg.Pool, confirm_after_polls: int = 0) -> Harness:
    await load_orders(pool, parse_orders_file(DEMO_FILE.read_text()))
    return Harness(pool, SimulatedProvider(pool, confirm_after_polls=confirm_after_polls))


@pytest.fixture
async def h(pool: asyncpg.Pool) -> Harness:
    return await make_harness(pool)


CID_1002 = cancellation_id("O-1002", "S-7")
KEY_1002 = refund_idempotency_key(CID_1002)
CASH_1002 = 4999 + 1590


async def test_happy_path_refunds_once_and_confirms(h: Harness) -> None:
    requested = await h.approved_refund("O-1002", "S-7")
    assert requested.stage is RefundStage.REQUESTED
    assert requested.idempotency_key == KEY_1002
    before_submit = datetime.now(UTC)

    submitted = await h.submit(CID_1002)

    assert submitted.stage is RefundStage.SUBMITTED
    assert submitted.provider_ref is not None
    assert submitted.attempts == 1
    # R8: a card refund lands 3-20 business days after submission.
    assert submitted.eta is not None
    assert add_business_days(before_submit, 3) <= submitted.eta.earliest
    assert submitted.eta.latest <= add_business_days(datetime.now(UTC), 20)

    confirmed = await h.confirm(CID_1002)

    assert confirmed.stage is RefundStage.CONFIRMED
    assert confirmed.provider_ref == submitted.provider_ref
    assert await h.stage(CID_1002) is RefundStage.CONFIRMED
    view = await h.ledger.view(cancellation_id=CID_1002)
    assert view.status is CancellationStatus.REFUND_CONFIRMED
    assert [e.kind for e in view.audit][-3:] == [
        "refund_requested",
        "refund_submitted",
        "refund_confirmed",
    ]
    at_provider = await h.provider_refunds(KEY_1002)
    assert len(at_provider) == 1
    assert at_provider[0]["provider_ref"] == submitted.provider_ref
    assert (at_provider[0]["amount_minor"], at_provider[0]["currency"]) == (CASH_1002, "EUR")
    assert (at_provider[0]["kind"], at_provider[0]["payment_id"]) == ("refund", "P-1002")
    assert at_provider[0]["status"] == "succeeded"


async def test_lost_response_is_retried_and_finds_the_same_refund(h: Harness) -> None:
    await h.approved_refund("O-1002", "S-7")
    await h.provider.set_faults("P-1002", SimulatorFaults(lose_response=True))

    with pytest.raises(ApplicationError) as lost:
        await h.submit(CID_1002)

    assert lost.value.type == PROVIDER_UNAVAILABLE
    assert lost.value.non_retryable is False
    assert await h.stage(CID_1002) is RefundStage.REQUESTED
    # The provider made the refund; only its answer was lost.
    made = await h.provider_refunds(KEY_1002)
    assert len(made) == 1

    retried = await h.submit(CID_1002)

    assert retried.stage is RefundStage.SUBMITTED
    assert retried.provider_ref == made[0]["provider_ref"]
    assert len(await h.provider_refunds(KEY_1002)) == 1
    assert await h.calls(KEY_1002) == [
        ("create_refund", "created"),
        ("create_refund", "replayed"),
    ]
    assert (await h.confirm(CID_1002)).stage is RefundStage.CONFIRMED
    assert len(await h.provider_refunds(KEY_1002)) == 1


async def test_transient_failures_are_retryable_then_one_refund(h: Harness) -> None:
    await h.approved_refund("O-1002", "S-7")
    await h.provider.set_faults("P-1002", SimulatorFaults(transient_failures=2))

    for _ in range(2):
        with pytest.raises(ApplicationError) as unavailable:
            await h.submit(CID_1002)
        assert unavailable.value.type == PROVIDER_UNAVAILABLE
        assert unavailable.value.non_retryable is False
        assert await h.stage(CID_1002) is RefundStage.REQUESTED
        assert await h.provider_refunds(KEY_1002) == []

    submitted = await h.submit(CID_1002)

    assert submitted.stage is RefundStage.SUBMITTED
    assert len(await h.provider_refunds(KEY_1002)) == 1
    assert await h.calls(KEY_1002) == [
        ("create_refund", "transient"),
        ("create_refund", "transient"),
        ("create_refund", "created"),
    ]


async def test_final_failure_is_not_retryable_and_nothing_is_refunded(h: Harness) -> None:
    await h.approved_refund("O-1002", "S-7")
    await h.provider.set_faults("P-1002", SimulatorFaults(final_failure="card_closed"))

    with pytest.raises(ApplicationError) as rejected:
        await h.submit(CID_1002)

    assert rejected.value.type == REFUND_REJECTED
    assert rejected.value.non_retryable is True
    assert "card_closed" in str(rejected.value)
    assert await h.provider_refunds(KEY_1002) == []
    assert await h.stage(CID_1002) is RefundStage.REQUESTED
    assert await h.calls(KEY_1002) == [("create_refund", "final")]

    # The workflow parks it (R10): visible, money still reserved, nothing lost.
    parked = await h.ledger_acts.record_refund_failed(
        RefundFailureInput(
            cancellation_id=CID_1002,
            idempotency_key=KEY_1002,
            error=str(rejected.value),
            attempts=1,
            event_key="refund_failed",
        )
    )
    assert parked.stage is RefundStage.FAILED
    assert parked.last_error is not None and "card_closed" in parked.last_error
    assert (
        await h.pool.fetchval("SELECT refunded_minor FROM payments WHERE payment_id = 'P-1002'")
        == CASH_1002
    )


async def test_pending_refund_is_polled_until_it_succeeds(pool: asyncpg.Pool) -> None:
    h = await make_harness(pool, confirm_after_polls=2)
    await h.approved_refund("O-1002", "S-7")
    await h.submit(CID_1002)

    for _ in range(2):
        # Pending is an answer, not an error: the workflow asks again later.
        pending = await h.confirm(CID_1002)
        assert pending.stage is RefundStage.SUBMITTED
        assert await h.stage(CID_1002) is RefundStage.SUBMITTED

    confirmed = await h.confirm(CID_1002)

    assert confirmed.stage is RefundStage.CONFIRMED
    assert [c for c in await h.calls(KEY_1002) if c[0] == "get_refund"] == [
        ("get_refund", "pending"),
        ("get_refund", "pending"),
        ("get_refund", "succeeded"),
    ]


async def test_refund_that_fails_after_success_is_reported_by_the_provider(h: Harness) -> None:
    """Documents the simulator for reconciliation: the ledger confirmed the refund, and a
    later look at the provider says it failed (R7: `failed` can follow `confirmed`)."""
    await h.approved_refund("O-1002", "S-7")
    await h.provider.set_faults("P-1002", SimulatorFaults(fail_after_success=True))
    submitted = await h.submit(CID_1002)

    confirmed = await h.confirm(CID_1002)

    assert confirmed.stage is RefundStage.CONFIRMED
    assert submitted.provider_ref is not None
    later = await h.provider.get_refund(provider_ref=submitted.provider_ref)
    assert later.status is ProviderRefundStatus.FAILED
    assert later.failure_code == "card_closed_after_refund"
    # The confirm activity does not look again once the ledger says confirmed: finding these
    # is reconciliation's job.
    assert (await h.confirm(CID_1002)).stage is RefundStage.CONFIRMED


async def test_a_refused_read_of_the_status_is_not_a_decline(h: Harness) -> None:
    """Issue 18: a 4xx while *reading* a refund says nothing about the refund. The activity
    says so with its own type (not RefundFailedAtProvider, which parks as declined), the
    ledger keeps the refund submitted and reserved, and asking again under the same key
    confirms the one refund the provider made."""
    await h.approved_refund("O-1002", "S-7")
    submitted = await h.submit(CID_1002)
    await h.provider.set_faults("P-1002", SimulatorFaults(read_errors=1))

    with pytest.raises(ApplicationError) as unreadable:
        await h.confirm(CID_1002)

    assert unreadable.value.type == REFUND_STATUS_UNREADABLE
    assert unreadable.value.non_retryable is True
    assert await h.stage(CID_1002) is RefundStage.SUBMITTED
    assert (
        await h.pool.fetchval("SELECT refunded_minor FROM payments WHERE payment_id = 'P-1002'")
        == CASH_1002
    )
    assert (await h.calls(KEY_1002))[-1] == ("get_refund", "read_error")

    confirmed = await h.confirm(CID_1002)

    assert confirmed.stage is RefundStage.CONFIRMED
    assert confirmed.idempotency_key == KEY_1002
    assert confirmed.provider_ref == submitted.provider_ref
    assert len(await h.provider_refunds(KEY_1002)) == 1


async def test_an_unknown_refund_at_the_provider_is_unreadable_not_declined(h: Harness) -> None:
    await h.approved_refund("O-1002", "S-7")
    await h.submit(CID_1002)
    await h.pool.execute(
        "UPDATE refunds SET provider_ref = 're_gone' WHERE idempotency_key = $1", KEY_1002
    )

    with pytest.raises(ApplicationError) as unreadable:
        await h.confirm(CID_1002)

    assert unreadable.value.type == REFUND_STATUS_UNREADABLE
    assert "resource_missing" in str(unreadable.value)
    assert await h.stage(CID_1002) is RefundStage.SUBMITTED


async def test_verify_reversal_ends_on_a_refused_read_instead_of_retrying_forever(
    h: Harness,
) -> None:
    await h.approved_refund("O-1002", "S-7")
    await h.submit(CID_1002)
    await h.confirm(CID_1002)
    await h.provider.set_faults("P-1002", SimulatorFaults(read_errors=1))

    with pytest.raises(ApplicationError) as unreadable:
        await h.refund_acts.verify_reversal(
            RefundStepInput(
                cancellation_id=CID_1002, idempotency_key=KEY_1002, event_key="refund_reversed"
            )
        )

    assert unreadable.value.type == REFUND_STATUS_UNREADABLE
    assert unreadable.value.non_retryable is True
    assert await h.stage(CID_1002) is RefundStage.CONFIRMED


async def test_steps_after_success_change_nothing_and_do_not_call_the_provider(
    h: Harness,
) -> None:
    await h.approved_refund("O-1002", "S-7")
    submitted = await h.submit(CID_1002)
    confirmed = await h.confirm(CID_1002)
    calls = await h.calls(KEY_1002)
    refund_row = await h.pool.fetchrow("SELECT * FROM refunds WHERE idempotency_key = $1", KEY_1002)
    audit = await h.ledger.audit_trail(cancellation_id=CID_1002)

    again_submitted = await h.submit(CID_1002)
    again_confirmed = await h.confirm(CID_1002)

    assert again_submitted == again_confirmed == confirmed
    assert again_submitted.provider_ref == submitted.provider_ref
    assert await h.calls(KEY_1002) == calls
    assert (
        await h.pool.fetchrow("SELECT * FROM refunds WHERE idempotency_key = $1", KEY_1002)
        == refund_row
    )
    assert await h.ledger.audit_trail(cancellation_id=CID_1002) == audit
    assert len(await h.provider_refunds(KEY_1002)) == 1


class LogRecorder:
    """Stands in for an activity module's structlog logger: (event, fields) per info line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, **fields: object) -> None:
        self.lines.append((event, fields))


async def test_each_stage_is_logged_with_its_status_even_when_a_retry_finds_it_recorded(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import activities.ledger_activities as ledger_module
    import activities.refund_activities as refund_module

    ledger_log, refund_log = LogRecorder(), LogRecorder()
    monkeypatch.setattr(ledger_module, "log", ledger_log)
    monkeypatch.setattr(refund_module, "log", refund_log)

    requested = await h.approved_refund("O-1002", "S-7")
    submitted = await h.submit(CID_1002)
    confirmed = await h.confirm(CID_1002)
    # Retries of attempts whose response (and line) was lost: the stage is found recorded.
    await h.submit(CID_1002)
    await h.confirm(CID_1002)

    assert (
        "refund_requested",
        {
            "status": "refund_requested",
            "kind": requested.kind.value,
            "amount_minor": CASH_1002,
            "currency": requested.amount.currency,
        },
    ) in ledger_log.lines
    assert [(event, fields["status"]) for event, fields in refund_log.lines] == [
        ("refund_submitted", "refund_submitted"),
        ("refund_confirmed", "refund_confirmed"),
        ("refund_submitted", "refund_submitted"),
        ("refund_confirmed", "refund_confirmed"),
    ]
    assert (
        {fields["provider_ref"] for _, fields in refund_log.lines}
        == {submitted.provider_ref}
        == {confirmed.provider_ref}
    )


async def test_submitting_twice_before_confirmation_calls_the_provider_once(h: Harness) -> None:
    await h.approved_refund("O-1002", "S-7")
    first = await h.submit(CID_1002)

    second = await h.submit(CID_1002)

    assert second == first
    assert await h.calls(KEY_1002) == [("create_refund", "created")]


async def test_void_of_an_authorisation_is_confirmed_at_once(h: Harness) -> None:
    cid = cancellation_id("O-1001", "S-7")
    key = refund_idempotency_key(cid)
    requested = await h.approved_refund("O-1001", "S-7")
    assert requested.kind is RefundKind.VOID

    submitted = await h.submit(cid)
    confirmed = await h.confirm(cid)

    assert submitted.kind is RefundKind.VOID
    # R8: a void releases the authorisation within a day.
    assert submitted.eta is not None
    assert submitted.eta.latest - submitted.eta.earliest == timedelta(days=1)
    assert confirmed.stage is RefundStage.CONFIRMED
    made = await h.provider_refunds(key)
    assert [(r["kind"], r["amount_minor"], r["status"]) for r in made] == [
        ("void", 2041 + 499, "succeeded")
    ]
    assert await h.calls(key) == [("create_refund", "created"), ("get_refund", "succeeded")]


async def test_provider_refuses_a_key_reused_with_other_parameters_and_logs_it(
    h: Harness,
) -> None:
    """The simulator's idempotency is real: the same key with another amount is an error, not
    a second refund, and the call is on record for reconciliation."""
    amount = Money(amount_minor=100, currency="EUR")
    made = await h.provider.create_refund(
        idempotency_key="k-1", payment_id="P-1005", kind=RefundKind.REFUND, amount=amount
    )
    replay = await h.provider.create_refund(
        idempotency_key="k-1", payment_id="P-1005", kind=RefundKind.REFUND, amount=amount
    )
    assert replay == made

    with pytest.raises(ProviderFinalError) as reused:
        await h.provider.create_refund(
            idempotency_key="k-1",
            payment_id="P-1005",
            kind=RefundKind.REFUND,
            amount=Money(amount_minor=101, currency="EUR"),
        )

    assert reused.value.code == "idempotency_key_reused"
    assert len(await h.provider_refunds("k-1")) == 1
    assert await h.calls("k-1") == [
        ("create_refund", "created"),
        ("create_refund", "replayed"),
        ("create_refund", "mismatch"),
    ]


async def test_concurrent_calls_with_one_key_make_one_refund_and_log_every_call(
    h: Harness,
) -> None:
    """Retries racing each other (a lost response retried while the first call still runs):
    one refund at the provider, the same refund returned to every caller, every call logged."""
    amount = Money(amount_minor=250, currency="EUR")

    async def call() -> ProviderRefund:
        return await h.provider.create_refund(
            idempotency_key="k-race", payment_id="P-1005", kind=RefundKind.REFUND, amount=amount
        )

    answers = await asyncio.gather(*(call() for _ in range(8)))

    assert len({a.provider_ref for a in answers}) == 1
    assert len(await h.provider_refunds("k-race")) == 1
    outcomes = sorted(outcome for _, outcome in await h.calls("k-race"))
    assert outcomes == ["created"] + ["replayed"] * 7


async def test_status_polls_follow_the_settlement_rules_and_are_logged(pool: asyncpg.Pool) -> None:
    """A pending refund succeeds on the poll after `confirm_after_polls`; one marked to fail
    after success reports failed (with its code) on the next poll; an unknown ref is final."""
    h = await make_harness(pool)
    await h.provider.set_faults(
        "P-1005", SimulatorFaults(confirm_after_polls=1, fail_after_success=True)
    )
    made = await h.provider.create_refund(
        idempotency_key="k-poll",
        payment_id="P-1005",
        kind=RefundKind.REFUND,
        amount=Money(amount_minor=300, currency="EUR"),
    )
    assert made.status is ProviderRefundStatus.PENDING

    seen = [await h.provider.get_refund(provider_ref=made.provider_ref) for _ in range(4)]

    assert [(r.status, r.failure_code) for r in seen] == [
        (ProviderRefundStatus.PENDING, None),
        (ProviderRefundStatus.SUCCEEDED, None),
        (ProviderRefundStatus.FAILED, "card_closed_after_refund"),
        (ProviderRefundStatus.FAILED, "card_closed_after_refund"),
    ]
    assert await h.calls("k-poll") == [
        ("create_refund", "created"),
        ("get_refund", "pending"),
        ("get_refund", "succeeded"),
        ("get_refund", "failed"),
        ("get_refund", "failed"),
    ]
    # An unknown reference is an error reading, not a refund that failed (issue 18).
    with pytest.raises(ProviderReadError) as unknown:
        await h.provider.get_refund(provider_ref="re_nope")
    assert unknown.value.code == "resource_missing"


async def test_a_retry_that_would_repeat_a_refusal_of_the_request_says_why_instead(
    h: Harness,
) -> None:
    """Issue 18: the provider refuses the refund *as asked* (Stripe cannot void part of an
    authorisation). The operator's retry must not send the same void again under a new key
    forever: the next generation is refused by the ledger with a reason an operator can act
    on, without calling the provider; once the payment is captured, it is a refund (R2)."""
    cid = cancellation_id("O-1001", "S-7")
    first = await h.approved_refund("O-1001", "S-7")
    assert first.kind is RefundKind.VOID
    await h.provider.set_faults("P-1001", SimulatorFaults(final_failure="partial_void_unsupported"))
    step = RefundStepInput(
        cancellation_id=cid, idempotency_key=first.idempotency_key, event_key="refund_submitted"
    )
    with pytest.raises(ApplicationError) as refused:
        await h.refund_acts.submit_refund(step)
    await h.ledger_acts.record_refund_failed(
        RefundFailureInput(
            cancellation_id=cid,
            idempotency_key=first.idempotency_key,
            error=f"{refused.value.type}: {refused.value.message}",
            attempts=1,
            event_key="refund_declined",
            final=True,
        )
    )
    calls_before = await h.pool.fetchval("SELECT count(*) FROM provider_sim.calls")

    with pytest.raises(ApplicationError) as repeat:
        await h.ledger_acts.request_refund(
            RefundRequestInput(cancellation_id=cid, event_key="refund_requested-2")
        )

    assert repeat.value.type == "RefundWouldRepeatRefusal"
    assert repeat.value.non_retryable is True
    assert "partial_void_unsupported" in repeat.value.message
    assert "capture the payment" in repeat.value.message.lower()
    assert await h.pool.fetchval("SELECT count(*) FROM provider_sim.calls") == calls_before
    assert (
        await h.pool.fetchval("SELECT count(*) FROM refunds WHERE cancellation_id = $1", cid) == 1
    )

    # The payment is captured since: the next generation changes kind and goes through.
    await h.pool.execute(
        "UPDATE payments SET capture = 'captured', captured_minor = amount_minor - released_minor"
        " WHERE payment_id = 'P-1001'"
    )
    await h.provider.set_faults("P-1001", SimulatorFaults())
    second = await h.ledger_acts.request_refund(
        RefundRequestInput(cancellation_id=cid, event_key="refund_requested-3")
    )
    assert (second.generation, second.kind) == (2, RefundKind.REFUND)

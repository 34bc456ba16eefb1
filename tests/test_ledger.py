"""The ledger (`ledger.repository.Ledger`) against a real PostgreSQL: no SQL is mocked.

Each test gets a fresh migrated database (fixture `pool`). The rules under test are R1 (instant
path, atomic against the seller's acceptance), R2 (void vs refund), R7 (stages), R9 (exactly one
refund, never more than was paid), R11 (coupon restoration, once, never missed) and R12 (audit).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from helpers.ledger_steps import (
    FUTURE,
    approve,
    ask_refund,
    cancel_and_request_refund,
    cash,
    confirm,
    decide,
    events,
    fresh_order,
    fully_refund,
    load_demo,
    refunded,
    request,
    snapshot,
    some_eta,
)

from domain.errors import (
    CancellationConflict,
    RefundLimitExceeded,
    SubOrderAlreadyCancelled,
    SubOrderNotFound,
)
from domain.models import (
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CaptureState,
    CouponOutcome,
    CouponOutcomeKind,
    RefundKind,
    RefundStage,
)
from domain.orders import (
    OrdersFile,
)
from domain.rules import cancellation_id, refund_idempotency_key
from ledger.orders import load_orders
from ledger.repository import Ledger


async def test_unvalidated_sub_order_is_cancelled_instantly_and_reopening_changes_nothing(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1001", "S-7")

    opened = await ledger.open_cancellation(cancellation_id=cid, request=request("O-1001", "S-7"))

    assert opened.path is CancellationPath.INSTANT
    assert opened.amount.amount_minor == 2041 + 499
    assert opened.amount.currency == "EUR"
    assert opened.capture is CaptureState.AUTHORIZED
    assert (
        await pool.fetchval(
            "SELECT status FROM sub_orders WHERE order_id = 'O-1001' AND seller_id = 'S-7'"
        )
        == "cancelled"
    )
    row = await pool.fetchrow("SELECT * FROM cancellations WHERE cancellation_id = $1", cid)
    assert row["status"] == CancellationStatus.APPROVED.value
    assert row["path"] == "instant"
    assert (row["reason"], row["fault"]) == ("ordered_by_mistake", "buyer")
    assert await events(pool, cid) == ["requested", "cancelled_instantly"]
    actors = await pool.fetch(
        "SELECT actor FROM cancellation_events WHERE cancellation_id = $1 ORDER BY event_id", cid
    )
    assert [a["actor"] for a in actors] == ["buyer:B-501", "system"]

    before = await snapshot(pool)
    again = await ledger.open_cancellation(cancellation_id=cid, request=request("O-1001", "S-7"))
    # The same cancellation, as it was opened; only the first call created it.
    assert opened.opened_now and not again.opened_now
    assert again.model_copy(update={"opened_now": True}) == opened
    assert await snapshot(pool) == before


async def test_accepted_sub_order_takes_the_request_path(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")

    opened = await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))

    assert opened.path is CancellationPath.REQUEST
    assert opened.capture is CaptureState.CAPTURED
    assert (
        await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
        == CancellationStatus.AWAITING_SELLER.value
    )
    # The seller has not decided yet: the sub-order goes on.
    assert (
        await pool.fetchval(
            "SELECT status FROM sub_orders WHERE order_id = 'O-1002' AND seller_id = 'S-7'"
        )
        == "accepted"
    )
    assert await events(pool, cid) == ["requested", "awaiting_seller"]


async def accept_after(ledger: Ledger, order_id: str, *, delay: float) -> bool:
    await asyncio.sleep(delay)
    return await ledger.accept_sub_order(order_id=order_id, seller_id="S-7")


async def test_cancel_and_seller_acceptance_racing_exactly_one_wins(pool: asyncpg.Pool) -> None:
    """R1: the switch from unvalidated is atomic; the first to commit wins, the loser takes the
    other path. Never both, never neither."""
    rounds = 30
    await load_orders(
        pool,
        OrdersFile(orders=[fresh_order(f"RACE-{n}", unvalidated=True) for n in range(rounds)]),
    )
    ledger = Ledger(pool)
    outcomes = []
    for n in range(rounds):
        order_id = f"RACE-{n}"
        cancel = ledger.open_cancellation(
            cancellation_id=cancellation_id(order_id, "S-7"),
            request=request(order_id, "S-7", "B-1"),
        )
        # The acceptance is one statement and the cancellation a short transaction, so
        # without a nudge the seller nearly always wins: stagger the acceptance by 0-0.4 ms
        # (landing before, inside and after the cancellation's transaction) and alternate who
        # is scheduled first, so both winners and the lock wait are exercised.
        accept = accept_after(ledger, order_id, delay=(n % 5) / 10_000)
        if n % 2:
            opened, accepted = await asyncio.gather(cancel, accept)
        else:
            accepted, opened = await asyncio.gather(accept, cancel)
        instant = opened.path is CancellationPath.INSTANT
        assert instant != accepted, f"round {n}: instant={instant} accepted={accepted}"
        status = await pool.fetchval(
            "SELECT status FROM sub_orders WHERE order_id = $1 AND seller_id = 'S-7'", order_id
        )
        cancellation_status = await pool.fetchval(
            "SELECT status FROM cancellations WHERE order_id = $1", order_id
        )
        if instant:
            assert (status, cancellation_status) == ("cancelled", "approved")
        else:
            assert (status, cancellation_status) == ("accepted", "awaiting_seller")
        outcomes.append(instant)
    assert len(outcomes) == rounds
    # Every sub-order ended in exactly one of the two states, matching its cancellation.
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM sub_orders s JOIN cancellations c USING (order_id, seller_id)"
            " WHERE (s.status = 'cancelled') = (c.path = 'instant')"
        )
        == rounds
    )


async def test_concurrent_openings_of_one_sub_order_make_one_cancellation(
    pool: asyncpg.Pool,
) -> None:
    """Attempts of one cancellation and of another one racing for the same sub-order: the lock
    serialises them and each looks up after it, so exactly one cancellation is written with
    its two audit rows; calls with its id get it back, the others a CancellationConflict (a
    stale look-up would end in a unique violation instead)."""
    rounds = 20
    await load_orders(
        pool,
        OrdersFile(
            orders=[fresh_order(f"OPEN-{n}", unvalidated=n % 2 == 0) for n in range(rounds)]
        ),
    )
    ledger = Ledger(pool)
    for n in range(rounds):
        order_id = f"OPEN-{n}"
        ids = [cancellation_id(order_id, "S-7")] * 3 + [f"other-{n}-a", f"other-{n}-b"]

        async def attempt(cid: str, order_id: str = order_id) -> str:
            try:
                await ledger.open_cancellation(
                    cancellation_id=cid, request=request(order_id, "S-7", "B-1")
                )
            except CancellationConflict:
                return "conflict"
            return cid

        results = await asyncio.gather(*(attempt(cid) for cid in ids[n % 5 :] + ids[: n % 5]))
        rows = await pool.fetch(
            "SELECT cancellation_id FROM cancellations WHERE order_id = $1", order_id
        )
        assert len(rows) == 1, f"round {n}: {rows}"
        winner = rows[0]["cancellation_id"]
        assert sorted(results) == sorted(cid if cid == winner else "conflict" for cid in ids), (
            f"round {n}"
        )
        events = await pool.fetchval(
            "SELECT count(*) FROM cancellation_events WHERE cancellation_id = $1", winner
        )
        assert events == 2


async def test_unknown_sub_order_and_wrong_buyer_are_not_found_and_write_nothing(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    before = await snapshot(pool)

    with pytest.raises(SubOrderNotFound):
        await ledger.open_cancellation(
            cancellation_id="cancel-O-1001~S-99", request=request("O-1001", "S-99", "B-501")
        )
    with pytest.raises(SubOrderNotFound):
        await ledger.open_cancellation(
            cancellation_id="cancel-O-9999~S-7", request=request("O-9999", "S-7", "B-501")
        )
    # Another buyer's order: not found, and the unvalidated sub-order is not cancelled.
    with pytest.raises(SubOrderNotFound) as refused:
        await ledger.open_cancellation(
            cancellation_id=cancellation_id("O-1001", "S-7"),
            request=request("O-1001", "S-7", "B-666"),
        )
    assert "B-501" not in str(refused.value)

    assert await snapshot(pool) == before


async def test_sub_order_cancelled_by_another_cancellation_is_refused(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    # Instant path under another id, and a request approved under another id.
    await ledger.open_cancellation(cancellation_id="other-1", request=request("O-1001", "S-7"))
    await ledger.open_cancellation(cancellation_id="other-2", request=request("O-1002", "S-7"))
    await approve(ledger, "other-2")
    before = await snapshot(pool)

    for order_id, other in (("O-1001", "other-1"), ("O-1002", "other-2")):
        with pytest.raises(CancellationConflict, match=other):
            await ledger.open_cancellation(
                cancellation_id=cancellation_id(order_id, "S-7"),
                request=request(order_id, "S-7"),
            )

    assert await snapshot(pool) == before


async def test_sub_order_cancelled_outside_this_service_is_refused(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    await pool.execute(
        "UPDATE sub_orders SET status = 'cancelled' WHERE order_id = 'O-1002' AND seller_id = 'S-7'"
    )
    before = await snapshot(pool)
    with pytest.raises(SubOrderAlreadyCancelled):
        await ledger.open_cancellation(
            cancellation_id=cancellation_id("O-1002", "S-7"), request=request("O-1002", "S-7")
        )
    assert await snapshot(pool) == before


# --- R2, R9: exactly one refund ----------------------------------------------------------------


async def test_request_refund_repeated_records_one_refund(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
    await approve(ledger, cid)
    amount = await cash(pool, "O-1002", "S-7")
    assert amount == 4999 + 1590

    sequential = [await ask_refund(ledger, cid) for _ in range(5)]
    concurrent = await asyncio.gather(*(ask_refund(ledger, cid) for _ in range(5)))

    for record in [*sequential, *concurrent]:
        assert record.view.idempotency_key == refund_idempotency_key(cid)
        assert record.view == sequential[0].view
    view = sequential[0].view
    assert view.kind is RefundKind.REFUND  # captured money is refunded (R2)
    assert view.stage is RefundStage.REQUESTED
    assert view.amount.amount_minor == amount
    assert view.eta is not None
    assert view.eta.earliest < view.eta.latest
    assert await pool.fetchval("SELECT count(*) FROM refunds WHERE cancellation_id = $1", cid) == 1
    assert await refunded(pool, "P-1002") == amount
    # The buyer's story states the money in major units, as everywhere else.
    detail = await pool.fetchval(
        "SELECT detail FROM cancellation_events WHERE cancellation_id = $1"
        " AND kind = 'refund_requested'",
        cid,
    )
    assert detail == "refund of 65.89 EUR requested"
    assert await events(pool, cid) == [
        "requested",
        "awaiting_seller",
        "approved",
        "refund_requested",
    ]
    assert (
        await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
        == CancellationStatus.REFUND_REQUESTED.value
    )


async def test_concurrent_first_refund_requests_record_one_refund(pool: asyncpg.Pool) -> None:
    """Two activity attempts for the same cancellation may overlap (a timed-out attempt is
    still running when the retry starts): both get the one refund, neither fails."""
    orders = [fresh_order(f"DUP-{n}") for n in range(10)]
    await load_orders(pool, OrdersFile(orders=orders))
    ledger = Ledger(pool)
    for order in orders:
        cid = cancellation_id(order.order_id, "S-7")
        await ledger.open_cancellation(
            cancellation_id=cid, request=request(order.order_id, "S-7", "B-1")
        )
        await approve(ledger, cid)

        records = await asyncio.gather(*(ask_refund(ledger, cid) for _ in range(5)))

        assert {r.view.idempotency_key for r in records} == {refund_idempotency_key(cid)}
        amount = await cash(pool, order.order_id, "S-7")
        assert await refunded(pool, order.payment.payment_id) == amount
        assert await events(pool, cid) == [
            "requested",
            "awaiting_seller",
            "approved",
            "refund_requested",
        ]


async def test_authorized_money_is_voided(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1001", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1001", "S-7"))

    record = await ask_refund(ledger, cid)

    assert record.view.kind is RefundKind.VOID
    assert record.view.amount.amount_minor == 2041 + 499
    assert record.payment_id == "P-1001"
    assert record.view.eta is not None
    assert record.view.eta.earliest < record.view.eta.latest
    assert await refunded(pool, "P-1001") == 2041 + 499


async def test_refund_above_what_was_paid_is_refused_and_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-2001", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-2001", "S-7"))
    await approve(ledger, cid)
    amount = await cash(pool, "O-2001", "S-7")
    # Something else already took back all but one unit less than this refund needs.
    await pool.execute(
        "UPDATE payments SET refunded_minor = amount_minor - $1 + 1 WHERE payment_id = 'P-2001'",
        amount,
    )
    before = await snapshot(pool)

    with pytest.raises(RefundLimitExceeded):
        await ask_refund(ledger, cid)

    assert await snapshot(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM refunds") == 0

    # One unit more room and it fits exactly.
    await pool.execute(
        "UPDATE payments SET refunded_minor = refunded_minor - 1 WHERE payment_id = 'P-2001'"
    )
    await ask_refund(ledger, cid)
    assert await pool.fetchval(
        "SELECT refunded_minor = amount_minor FROM payments WHERE payment_id = 'P-2001'"
    )


async def test_database_refuses_a_second_refund_for_a_cancellation(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = await cancel_and_request_refund(ledger, "O-1002", "S-7")

    # Even as a later generation, a second live refund beside the first one is refused.
    with pytest.raises(asyncpg.UniqueViolationError) as err:
        await pool.execute(
            """
            INSERT INTO refunds (idempotency_key, cancellation_id, payment_id, kind,
                amount_minor, currency, stage, generation)
            VALUES ('another-key', $1, 'P-1002', 'refund', 1, 'EUR', 'requested', 2)
            """,
            cid,
        )
    assert err.value.constraint_name == "refunds_one_live"
    # And the payments CHECK refuses a total above what was paid, whatever the code does.
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE payments SET refunded_minor = amount_minor + 1 WHERE payment_id = 'P-1002'"
        )


# --- R7: stages ------------------------------------------------------------------------------


async def test_submitted_then_confirmed_with_timestamps_idempotently(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = await cancel_and_request_refund(ledger, "O-1002", "S-7")
    eta = some_eta()

    first = await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_1", eta=eta, event_key="submitted"
    )
    second = await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_1", eta=eta, event_key="submitted"
    )
    assert first == second
    assert first.view.stage is RefundStage.SUBMITTED
    assert first.view.provider_ref == "re_1"
    assert first.view.eta == eta
    assert first.view.attempts == 1
    assert (
        await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
        == CancellationStatus.REFUND_SUBMITTED.value
    )

    done = await ledger.record_refund_confirmed(cancellation_id=cid, event_key="confirmed")
    again = await ledger.record_refund_confirmed(cancellation_id=cid, event_key="confirmed")
    assert done == again
    assert done.view.stage is RefundStage.CONFIRMED
    row = await pool.fetchrow("SELECT * FROM refunds WHERE cancellation_id = $1", cid)
    assert row["requested_at"] <= row["submitted_at"] <= row["confirmed_at"]
    assert row["failed_at"] is None
    assert (
        await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
        == CancellationStatus.REFUND_CONFIRMED.value
    )
    assert await events(pool, cid) == [
        "requested",
        "awaiting_seller",
        "approved",
        "refund_requested",
        "refund_submitted",
        "refund_confirmed",
    ]
    assert await refunded(pool, "P-1002") == await cash(pool, "O-1002", "S-7")


async def test_failed_refund_keeps_the_money_reserved_and_says_why(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = await cancel_and_request_refund(ledger, "O-1003", "S-8")
    await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_2", eta=some_eta(), event_key="submitted"
    )
    reserved = await refunded(pool, "P-1003")

    for _ in range(2):
        record = await ledger.record_refund_failed(
            cancellation_id=cid, error="card_closed: refund refused", event_key="failed-1"
        )
        assert record.view.stage is RefundStage.FAILED
        assert record.view.last_error == "card_closed: refund refused"

    assert await refunded(pool, "P-1003") == reserved == await cash(pool, "O-1003", "S-8")
    assert await pool.fetchval(
        "SELECT failed_at IS NOT NULL FROM refunds WHERE cancellation_id = $1", cid
    )
    assert (
        await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
        == CancellationStatus.REFUND_FAILED.value
    )
    assert (await events(pool, cid)).count("refund_failed") == 1
    assert (await ledger.view(cancellation_id=cid)).last_error == "card_closed: refund refused"

    # An operator's retry resumes the same refund: submitted again, error cleared, no new money.
    retried = await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_2", eta=some_eta(), event_key="submitted-2"
    )
    assert retried.view.stage is RefundStage.SUBMITTED
    assert retried.view.last_error is None
    assert retried.view.attempts == 2
    assert retried.view.idempotency_key == refund_idempotency_key(cid)
    assert await refunded(pool, "P-1003") == reserved
    assert await pool.fetchval("SELECT count(*) FROM refunds") == 1


# --- R11: coupons ----------------------------------------------------------------------------


async def test_coupon_partial_then_restored_when_the_last_sub_order_is_refunded(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    s7 = await fully_refund(ledger, "O-2001", "S-7")

    first = await decide(ledger, s7)

    assert first.outcome is CouponOutcomeKind.PARTIAL_REFUND
    assert first.redemption_id == "R-2001"
    assert first.active_sub_orders == ["S-8"]
    assert "S-8" in first.reason
    restored = await pool.fetchrow(
        "SELECT restored_at, restored_by FROM coupon_redemptions WHERE redemption_id = 'R-2001'"
    )
    assert tuple(restored) == (None, None)

    s8 = await fully_refund(ledger, "O-2001", "S-8")
    last = await decide(ledger, s8)

    assert last.outcome is CouponOutcomeKind.RESTORED
    assert last.active_sub_orders == []
    restored = await pool.fetchrow(
        "SELECT restored_at, restored_by FROM coupon_redemptions WHERE redemption_id = 'R-2001'"
    )
    assert restored["restored_at"] is not None
    assert restored["restored_by"] == s8
    rows = await pool.fetch(
        "SELECT cancellation_id, outcome, performed_restore FROM coupon_decisions ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [
        (s7, "partial_refund", False),
        (s8, "restored", True),
    ]
    # S-7's story gets the ending: its audit trail says the coupon came back, and its view
    # shows the coupon as restored now, naming who restored it (its decision row stays).
    assert (await events(pool, s7))[-1] == "coupon_restored"
    now_seen = await ledger.coupon_outcome(cancellation_id=s7)
    assert now_seen is not None and now_seen.outcome is CouponOutcomeKind.RESTORED
    assert s8 in now_seen.reason and "S-8" in now_seen.reason
    assert (await ledger.view(cancellation_id=s7)).coupon == now_seen
    # The restorer's own trail has its decision once, no extra row.
    assert (await events(pool, s8)).count("coupon_restored") == 1
    # The other order's coupon is untouched.
    assert (
        await pool.fetchval(
            "SELECT restored_at FROM coupon_redemptions WHERE redemption_id = 'R-2002'"
        )
        is None
    )


async def test_retried_coupon_decision_returns_the_first_one(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    s7 = await fully_refund(ledger, "O-2002", "S-7")
    first = await decide(ledger, s7)
    assert first.outcome is CouponOutcomeKind.PARTIAL_REFUND
    # Even after the sibling finished, S-7's decision stays what it was when it was made.
    await fully_refund(ledger, "O-2002", "S-8")

    again = await decide(ledger, s7)

    assert again == first
    assert (
        await pool.fetchval("SELECT count(*) FROM coupon_decisions WHERE cancellation_id = $1", s7)
        == 1
    )
    assert (await events(pool, s7)).count("coupon_partial_refund") == 1


async def test_siblings_deciding_together_restore_the_coupon_exactly_once(
    pool: asyncpg.Pool,
) -> None:
    rounds = 20
    orders = [
        fresh_order(f"TWIN-{n}", sellers=("S-7", "S-8"), coupon_expires=FUTURE)
        for n in range(rounds)
    ]
    await load_orders(pool, OrdersFile(orders=orders))
    ledger = Ledger(pool)
    for order in orders:
        a = await fully_refund(ledger, order.order_id, "S-7", "B-1")
        b = await fully_refund(ledger, order.order_id, "S-8", "B-1")

        outcomes = await asyncio.gather(decide(ledger, a), decide(ledger, b))

        assert [o.outcome for o in outcomes] == [CouponOutcomeKind.RESTORED] * 2
        redemption = "R" + order.order_id
        performed = await pool.fetch(
            "SELECT cancellation_id FROM coupon_decisions"
            " WHERE redemption_id = $1 AND performed_restore",
            redemption,
        )
        assert len(performed) == 1
        restored = await pool.fetchrow(
            "SELECT restored_at, restored_by FROM coupon_redemptions WHERE redemption_id = $1",
            redemption,
        )
        assert restored["restored_at"] is not None
        assert restored["restored_by"] == performed[0]["cancellation_id"]


async def test_siblings_finishing_together_never_miss_the_last_one(pool: asyncpg.Pool) -> None:
    """Each sub-order decides right after its own confirmation, both at once: whichever
    decides last sees both refunds confirmed."""
    rounds = 20
    orders = [
        fresh_order(f"PAIR-{n}", sellers=("S-7", "S-8"), coupon_expires=FUTURE)
        for n in range(rounds)
    ]
    await load_orders(pool, OrdersFile(orders=orders))
    ledger = Ledger(pool)

    async def finish(cid: str) -> CouponOutcome:
        await confirm(ledger, cid)
        return await decide(ledger, cid)

    for order in orders:
        a = await cancel_and_request_refund(ledger, order.order_id, "S-7", "B-1")
        b = await cancel_and_request_refund(ledger, order.order_id, "S-8", "B-1")

        outcomes = await asyncio.gather(finish(a), finish(b))

        kinds = [o.outcome for o in outcomes]
        assert CouponOutcomeKind.RESTORED in kinds, kinds
        assert set(kinds) <= {CouponOutcomeKind.RESTORED, CouponOutcomeKind.PARTIAL_REFUND}
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM coupon_decisions"
                " WHERE redemption_id = $1 AND performed_restore",
                "R" + order.order_id,
            )
            == 1
        )
        assert await pool.fetchval(
            "SELECT restored_at IS NOT NULL FROM coupon_redemptions WHERE redemption_id = $1",
            "R" + order.order_id,
        )


async def test_expired_coupon_is_not_restored(pool: asyncpg.Pool) -> None:
    order = fresh_order("OLD-1", sellers=("S-7",), coupon_expires=datetime(2020, 1, 1, tzinfo=UTC))
    await load_orders(pool, OrdersFile(orders=[order]))
    ledger = Ledger(pool)
    cid = await fully_refund(ledger, "OLD-1", "S-7", "B-1")

    outcome = await decide(ledger, cid)

    assert outcome.outcome is CouponOutcomeKind.EXPIRED
    assert outcome.redemption_id == "ROLD-1"
    assert (
        await pool.fetchval(
            "SELECT restored_at FROM coupon_redemptions WHERE redemption_id = 'ROLD-1'"
        )
        is None
    )
    assert await pool.fetchval("SELECT outcome FROM coupon_decisions") == "expired"


async def test_no_coupon_is_recorded_as_such(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = await fully_refund(ledger, "O-1002", "S-7")

    outcome = await decide(ledger, cid)
    again = await decide(ledger, cid)

    assert outcome.outcome is CouponOutcomeKind.NO_COUPON
    assert outcome.redemption_id is None
    assert again == outcome
    assert await pool.fetchval("SELECT count(*) FROM coupon_decisions") == 1
    assert (await events(pool, cid))[-1] == "coupon_no_coupon"


async def test_a_partial_refund_does_not_count_as_fully_refunded(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    s7 = await fully_refund(ledger, "O-2001", "S-7")
    s8 = await fully_refund(ledger, "O-2001", "S-8")
    # S-8's refund returned one cent less than the cash paid for it.
    await pool.execute(
        "UPDATE refunds SET amount_minor = amount_minor - 1 WHERE cancellation_id = $1", s8
    )

    outcome = await decide(ledger, s7)

    assert outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
    assert outcome.active_sub_orders == ["S-8"]
    assert (
        await pool.fetchval(
            "SELECT restored_at FROM coupon_redemptions WHERE redemption_id = 'R-2001'"
        )
        is None
    )


async def test_an_unconfirmed_refund_does_not_count_as_fully_refunded(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    await cancel_and_request_refund(ledger, "O-2001", "S-8")  # dot 1 only
    s7 = await fully_refund(ledger, "O-2001", "S-7")

    outcome = await decide(ledger, s7)

    assert outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
    assert outcome.active_sub_orders == ["S-8"]


# --- R12: the story ---------------------------------------------------------------------------


async def test_view_tells_the_full_story_in_order(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = await fully_refund(ledger, "O-2001", "S-7")
    outcome = await decide(ledger, cid)

    view = await ledger.view(cancellation_id=cid)

    assert (view.order_id, view.seller_id, view.buyer_id) == ("O-2001", "S-7", "B-601")
    assert view.reason is CancellationReason.ORDERED_BY_MISTAKE
    assert view.path is CancellationPath.REQUEST
    assert view.status is CancellationStatus.REFUND_CONFIRMED
    assert [e.kind for e in view.audit] == [
        "requested",
        "awaiting_seller",
        "approved",
        "refund_requested",
        "refund_submitted",
        "refund_confirmed",
        "coupon_partial_refund",
    ]
    assert view.audit[0].actor == "buyer:B-601"
    assert "bought the wrong colour" in view.audit[0].detail
    ats = [e.at for e in view.audit]
    assert ats == sorted(ats)
    assert view.audit == await ledger.audit_trail(cancellation_id=cid)
    assert view.refund is not None
    assert view.refund.stage is RefundStage.CONFIRMED
    assert view.refund.idempotency_key == refund_idempotency_key(cid)
    assert view.refund.amount.amount_minor == await cash(pool, "O-2001", "S-7")
    assert view.coupon == outcome
    assert view.last_error is None


async def test_audit_trail_is_append_only(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1001", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1001", "S-7"))

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("UPDATE cancellation_events SET detail = 'edited'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM cancellation_events")
    assert await events(pool, cid) == ["requested", "cancelled_instantly"]


async def test_overlapping_attempts_of_one_coupon_decision_agree(pool: asyncpg.Pool) -> None:
    """A timed-out attempt still running when its retry starts: both get the one decision."""
    ledger = await load_demo(pool)
    for order_id, sellers in (("O-1002", ("S-7",)), ("O-2002", ("S-7",))):
        cid = await fully_refund(ledger, order_id, sellers[0])
        outcomes = await asyncio.gather(*(decide(ledger, cid) for _ in range(4)))
        assert len({o.model_dump_json() for o in outcomes}) == 1
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM coupon_decisions WHERE cancellation_id = $1", cid
            )
            == 1
        )


async def test_a_late_failure_report_does_not_contradict_a_confirmed_refund(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    cid = await fully_refund(ledger, "O-1002", "S-7")
    await ledger.record_refund_failed(cancellation_id=cid, error="late", event_key="late-failure")
    row = await pool.fetchrow(
        "SELECT c.status, r.stage FROM cancellations c JOIN refunds r USING (cancellation_id)"
        " WHERE cancellation_id = $1",
        cid,
    )
    assert (row["status"], row["stage"]) == ("refund_confirmed", "confirmed")


async def test_a_declined_refund_releases_its_money_and_the_next_is_a_new_generation(
    pool: asyncpg.Pool,
) -> None:
    ledger = await load_demo(pool)
    cid = await cancel_and_request_refund(ledger, "O-1002", "S-7")
    amount = await cash(pool, "O-1002", "S-7")
    declined = await ledger.record_refund_failed(
        cancellation_id=cid, error="card_closed", event_key="declined", final=True
    )
    assert declined.view.stage is RefundStage.DECLINED
    assert await refunded(pool, "P-1002") == 0
    assert (await events(pool, cid))[-1] == "refund_declined"
    # Asking again (the operator's retry) makes generation 2 under a key of its own.
    second = await ask_refund(ledger, cid)
    assert second.view.generation == 2
    assert second.view.idempotency_key == refund_idempotency_key(cid, 2)
    assert second.view.stage is RefundStage.REQUESTED
    assert await refunded(pool, "P-1002") == amount
    # And asking once more returns that one, not a third.
    assert (await ask_refund(ledger, cid)).view.idempotency_key == second.view.idempotency_key


# --- locks: a coupon decision and a reversal's revocation together (issue 18) -----------------


async def _waiting_on_locks(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return count


async def _until_waiting(pool: asyncpg.Pool, count: int) -> None:
    for _ in range(500):
        if await _waiting_on_locks(pool) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never saw {count} sessions waiting on a lock")


async def _coupon_restored_by_the_first_sibling(ledger: Ledger, order_id: str) -> tuple[str, str]:
    """Both sub-orders refunded; the first one decided (restored), the second not yet: the
    moment a reversal of the first and the second's own decision can meet."""
    a = await fully_refund(ledger, order_id, "S-7", "B-1")
    b = await fully_refund(ledger, order_id, "S-8", "B-1")
    assert (await decide(ledger, a)).outcome is CouponOutcomeKind.RESTORED
    return a, b


async def test_a_reversal_and_a_sibling_coupon_decision_queued_on_the_coupon_never_deadlock(
    pool: asyncpg.Pool,
) -> None:
    """The interleaving that deadlocked: the sibling's decision holds its cancellation and waits
    for the redemption; the reversal gets the redemption first and then writes the sibling's
    `coupon_revoked` row, whose foreign key needs the sibling's cancellation. Made certain by
    holding the redemption while both queue on it, the reversal first."""
    order = fresh_order("LOCK-0", sellers=("S-7", "S-8"), coupon_expires=FUTURE)
    await load_orders(pool, OrdersFile(orders=[order]))
    ledger = Ledger(pool)
    a, b = await _coupon_restored_by_the_first_sibling(ledger, order.order_id)

    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM coupon_redemptions WHERE redemption_id = $1 FOR UPDATE",
            "R" + order.order_id,
        )
        reversal = asyncio.create_task(
            ledger.reverse_refund(cancellation_id=a, failure="card_closed", event_key="rev")
        )
        await _until_waiting(pool, 1)
        decision = asyncio.create_task(decide(ledger, b))
        await _until_waiting(pool, 2)
        await tx.commit()
        results = await asyncio.gather(reversal, decision, return_exceptions=True)

    assert not [r for r in results if isinstance(r, BaseException)], results
    assert await pool.fetchval(
        "SELECT restored_at IS NULL FROM coupon_redemptions WHERE redemption_id = $1",
        "R" + order.order_id,
    )
    assert (await ledger.get_refund(cancellation_id=a)).view.stage is RefundStage.REVERSED


async def test_reversals_and_sibling_coupon_decisions_run_together_many_times(
    pool: asyncpg.Pool,
) -> None:
    """The same two writes at the same moment, 30 times: no deadlock error, and the coupon is
    never left given back on a refund that was reversed, whichever went first."""
    rounds = 30
    orders = [
        fresh_order(f"LOCKS-{n}", sellers=("S-7", "S-8"), coupon_expires=FUTURE)
        for n in range(rounds)
    ]
    await load_orders(pool, OrdersFile(orders=orders))
    ledger = Ledger(pool)
    for order in orders:
        a, b = await _coupon_restored_by_the_first_sibling(ledger, order.order_id)

        results = await asyncio.gather(
            ledger.reverse_refund(cancellation_id=a, failure="card_closed", event_key="rev"),
            decide(ledger, b),
            return_exceptions=True,
        )

        assert not [r for r in results if isinstance(r, BaseException)], results
        assert await pool.fetchval(
            "SELECT restored_at IS NULL FROM coupon_redemptions WHERE redemption_id = $1",
            "R" + order.order_id,
        )
        live = await pool.fetchval(
            "SELECT count(*) FROM coupon_decisions WHERE redemption_id = $1"
            " AND outcome = 'restored' AND superseded_at IS NULL",
            "R" + order.order_id,
        )
        assert live == 0

"""Failed refunds, end to end on the real dev server (visibility), PostgreSQL and the product's
worker: a provider outage parks a batch in refund_failed, the SRE lists them, dry-runs, and
retries them in bulk once the provider is back; every one completes, refunded exactly once
(counted on the provider's side), coupons given back. A retry of a cancellation that is not
parked is refused; an interrupted bulk retry, run again, finishes the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from helpers.orders import unique
from helpers.refunds import (
    ORDERCANCEL,
    OUTAGE,
    Cancellation,
    RefundStack,
    all_results,
    cancellations,
    refund_stack,
    succeeded_at_provider,
)
from helpers.stacks import run_command

# Shared end-to-end fixtures (`e2e_database_url`, `temporal_address`) for this module.
from helpers.wait import eventually, wait_for_status

from domain.models import (
    CancellationStatus,
    CouponOutcomeKind,
    RefundStage,
    RetryRefundRequest,
)
from payments.provider import SimulatorFaults
from starter.refunds import (
    RetryOutcome,
    RetryResult,
    TokenBucket,
    failed_query,
    find_failed_ids,
    list_failed,
    parse_rate,
    parse_since,
    retry_one,
    retry_refunds,
)
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

SRE = RetryRefundRequest(operator_id="sre-test", reason="provider is back")


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[RefundStack]:
    async with refund_stack(temporal_address, e2e_database_url) as s:
        yield s


async def park(stack: RefundStack, count: int, seller: str) -> list[Cancellation]:
    """`count` cancellations parked in refund_failed by a provider outage, seen by visibility."""
    made = await cancellations(stack, count, seller=seller, faults=OUTAGE)
    await assert_listed_for(stack, seller, {c.id for c in made})
    return made


async def assert_listed_for(stack: RefundStack, seller: str, expected: set[str]) -> None:
    async def check() -> None:
        assert set(await find_failed_ids(stack.client, failed_query(seller=seller))) == expected

    await eventually(check, timeout=30)


async def provider_recovers(stack: RefundStack, made: list[Cancellation]) -> None:
    for c in made:
        await stack.provider.set_faults(c.payment_id, SimulatorFaults())


async def assert_refunded_once_with_coupon(stack: RefundStack, made: list[Cancellation]) -> None:
    results = await all_results(made)
    for c, result in zip(made, results, strict=True):
        assert result.status is CancellationStatus.COMPLETED, c.id
        assert result.refund is not None and result.refund.stage is RefundStage.CONFIRMED
        assert result.coupon is not None, c.id
        assert result.coupon.outcome is CouponOutcomeKind.RESTORED, c.id
        assert await succeeded_at_provider(stack.pool, c.payment_id) == 1, c.id
        made_calls = await stack.pool.fetchval(
            "SELECT count(*) FROM provider_sim.calls WHERE payment_id = $1"
            " AND operation = 'create_refund' AND outcome = 'created'",
            c.payment_id,
        )
        assert made_calls == 1, c.id
        restored = await stack.pool.fetchrow(
            "SELECT restored_at, restored_by FROM coupon_redemptions WHERE redemption_id = $1",
            c.redemption_id,
        )
        assert restored["restored_at"] is not None and restored["restored_by"] == c.id
        paid, refunded = await stack.pool.fetchrow(
            "SELECT p.amount_minor, p.refunded_minor FROM payments p WHERE payment_id = $1",
            c.payment_id,
        )
        assert refunded == paid, c.id  # one seller: the whole payment, once


async def create_calls(stack: RefundStack, cancellation_id: str) -> int:
    """Calls to create a refund of this cancellation, as the simulated provider recorded them."""
    count: int = await stack.pool.fetchval(
        "SELECT count(*) FROM provider_sim.calls WHERE operation = 'create_refund'"
        " AND idempotency_key LIKE $1 || ':%'",
        cancellation_id,
    )
    return count


async def ledger_snapshot(stack: RefundStack, made: list[Cancellation]) -> tuple[object, ...]:
    ids = [c.id for c in made]
    payments = [c.payment_id for c in made]
    return (
        await stack.pool.fetchval(
            "SELECT count(*) FROM cancellation_events WHERE cancellation_id = ANY($1::text[])", ids
        ),
        tuple(
            await stack.pool.fetch(
                "SELECT cancellation_id, status FROM cancellations"
                " WHERE cancellation_id = ANY($1::text[]) ORDER BY 1",
                ids,
            )
        ),
        await stack.pool.fetchval(
            "SELECT count(*) FROM provider_sim.calls WHERE payment_id = ANY($1::text[])", payments
        ),
    )


# --- the outage ------------------------------------------------------------------------------


async def test_outage_parks_a_batch_then_a_bulk_retry_refunds_each_once(
    stack: RefundStack,
) -> None:
    seller = unique("S")
    made = await park(stack, 10, seller)
    ids = {c.id for c in made}

    # What the SRE sees: the parked cancellations with amount, last error, passes, provider
    # calls, since. One pass of 2 provider calls each (refund_stack): the numbers agree with
    # the provider's own record of calls and with the last error's "(pass N)".
    rows = await list_failed(stack.client, stack.pool, seller=seller)
    assert {r.cancellation_id for r in rows} == ids
    for row in rows:
        assert row.seller_id == seller and row.order_id is not None
        assert row.refund_stage == "failed" and row.passes == 1
        assert row.provider_calls == 2 == await create_calls(stack, row.cancellation_id)
        assert row.amount is not None and row.amount.amount_minor == 2300
        assert row.last_error is not None and "ProviderUnavailable" in row.last_error
        assert row.last_error.endswith("(pass 1)"), row.last_error
        assert row.failed_since is not None
    hour = timedelta(hours=1)
    assert await list_failed(stack.client, stack.pool, seller=seller, since=parse_since("1h")) == (
        rows
    )
    later = datetime.now(UTC) + hour
    assert await list_failed(stack.client, stack.pool, seller=seller, since=later) == []

    ran = await run_command(
        ORDERCANCEL, "refunds", "failed", "--seller", seller, "--json", env=stack.cli_env()
    )
    assert ran.returncode == 0, ran.stderr
    assert {r["cancellation_id"] for r in json.loads(ran.stdout)} == ids

    # A dry run while the provider is still down changes nothing.
    before = await ledger_snapshot(stack, made)
    dry = await retry_refunds(stack.client, sorted(ids), request=SRE, dry_run=True)
    assert dry.count(RetryOutcome.WOULD_RETRY) == 10 and dry.retried == 0
    assert await ledger_snapshot(stack, made) == before
    await assert_listed_for(stack, seller, ids)

    # The provider recovers; one bulk retry through the CLI.
    await provider_recovers(stack, made)
    ran = await run_command(
        ORDERCANCEL,
        "refunds",
        "retry",
        "--all-failed",
        "--query",
        f'SellerId="{seller}"',
        "--concurrency",
        "4",
        "--rate",
        "50/s",
        "--operator",
        "sre-test",
        "--reason",
        "provider is back",
        "--json",
        env=stack.cli_env(),
    )
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    summary = json.loads(ran.stdout)
    assert summary["totals"] == {"retried": 10}, summary
    assert {r["cancellation_id"] for r in summary["results"]} == ids

    await assert_refunded_once_with_coupon(stack, made)
    for c in made:
        kinds = [
            (e["actor"], e["kind"])
            for e in await stack.pool.fetch(
                "SELECT actor, kind FROM cancellation_events WHERE cancellation_id = $1"
                " ORDER BY event_id",
                c.id,
            )
        ]
        assert kinds.count(("operator:sre-test", "refund_retry")) == 1, c.id

    # Run twice: nothing is parked any more, nothing happens.
    again = await retry_refunds(stack.client, sorted(ids), request=SRE)
    assert again.retried == 0 and again.skipped == 10 and again.errors == 0
    await assert_refunded_once_with_coupon(stack, made)


async def test_dry_run_changes_nothing_and_a_cancellation_not_failed_is_refused(
    stack: RefundStack,
) -> None:
    seller = unique("S")
    (parked,) = await park(stack, 1, seller)
    (waiting,) = await cancellations(stack, 1, seller=seller, window=timedelta(hours=1))
    await wait_for_status(waiting.handle, CancellationStatus.AWAITING_SELLER)
    before = await ledger_snapshot(stack, [parked, waiting])

    ran = await run_command(
        ORDERCANCEL, "refunds", "retry", parked.id, waiting.id, "--dry-run", env=stack.cli_env()
    )
    assert ran.returncode == 0, ran.stderr
    assert "would retry 1, would skip 1" in ran.stdout
    assert "Dry run: nothing was changed" in ran.stdout
    # The progress line of a dry run says what it would do, not what it did.
    assert "would retry 1 would skip 1" in ran.stderr and "retried 1" not in ran.stderr
    assert await ledger_snapshot(stack, [parked, waiting]) == before
    assert (await wait_for_status(parked.handle, CancellationStatus.REFUND_FAILED)).status is (
        CancellationStatus.REFUND_FAILED
    )

    # Not parked: the workflow's validator refuses, the tool says skipped.
    refused = await retry_one(stack.client, waiting.id, SRE)
    assert refused.outcome is RetryOutcome.SKIPPED
    assert refused.detail.startswith("not_refund_failed:")
    ran = await run_command(ORDERCANCEL, "refunds", "retry", waiting.id, env=stack.cli_env())
    assert ran.returncode == 0, ran.stderr
    assert "retried 0, skipped 1" in ran.stdout and "not_refund_failed" in ran.stdout
    view = await wait_for_status(waiting.handle, CancellationStatus.AWAITING_SELLER)
    assert not [e for e in view.audit if e.kind == "refund_retry"]
    # A mistyped id is an error, not a skip: the SRE must see it.
    unknown = await retry_one(stack.client, "cancel-NOPE-S-0", SRE)
    assert unknown.outcome is RetryOutcome.ERROR and "no such cancellation" in unknown.detail
    for dry in ((), ("--dry-run",)):
        ran = await run_command(
            ORDERCANCEL, "refunds", "retry", "cancel-NOPE-S-0", *dry, env=stack.cli_env()
        )
        assert ran.returncode == 1, (dry, ran.stdout, ran.stderr)
        assert "no such cancellation cancel-NOPE-S-0" in ran.stdout

    # A retry while the provider is still down: accepted, tried again, parked again.
    assert (await retry_one(stack.client, parked.id, SRE)).outcome is RetryOutcome.RETRIED

    async def parked_twice() -> None:
        rows = await list_failed(stack.client, stack.pool, seller=seller)
        assert [(r.cancellation_id, r.passes, r.provider_calls) for r in rows] == [
            (parked.id, 2, 4)
        ], rows
        assert rows[0].last_error is not None and rows[0].last_error.endswith("(pass 2)")

    await eventually(parked_twice, timeout=20)
    assert await create_calls(stack, parked.id) == 4

    await stack.provider.set_faults(parked.payment_id, SimulatorFaults())
    receipt = await retry_one(stack.client, parked.id, SRE)
    assert receipt.outcome is RetryOutcome.RETRIED
    # The receipt names the key the retry uses (the parked refund's) and the calls made.
    assert receipt.detail == (
        f"refund retry scheduled with the same idempotency key {parked.id}:refund-submit"
        " (4 provider call(s) so far)"
    ), receipt.detail
    await assert_refunded_once_with_coupon(stack, [parked])
    await waiting.handle.execute_update(
        OrderCancellation.decide, {"seller_id": seller, "decision": "reject", "reason": "done"}
    )
    assert (await waiting.handle.result()).status is CancellationStatus.REJECTED


async def test_a_refused_status_read_parks_reserved_and_the_retry_asks_under_the_same_key(
    stack: RefundStack,
) -> None:
    """Issue 18: the provider made the refund, then refuses the read of its status (a 4xx).
    The cancellation parks with the refund `failed`, not `declined`: still reserved, same key.
    The operator's retry asks again under that key and finds the one refund: no second one,
    even though the first one may still settle."""
    seller = unique("S")
    (c,) = await cancellations(stack, 1, seller=seller, faults=SimulatorFaults(read_errors=1))
    await assert_listed_for(stack, seller, {c.id})

    rows = await list_failed(stack.client, stack.pool, seller=seller)
    assert [(r.refund_stage, r.idempotency_key) for r in rows] == [
        ("failed", f"{c.id}:refund-submit")
    ]
    assert rows[0].last_error is not None and "RefundStatusUnreadable" in rows[0].last_error
    paid, refunded = await stack.pool.fetchrow(
        "SELECT amount_minor, refunded_minor FROM payments WHERE payment_id = $1", c.payment_id
    )
    assert refunded == paid  # still reserved: the refund may settle

    assert (await retry_one(stack.client, c.id, SRE)).outcome is RetryOutcome.RETRIED
    await assert_refunded_once_with_coupon(stack, [c])
    (result,) = await all_results([c])
    assert result.refund is not None and result.refund.generation == 1
    calls = await stack.pool.fetch(
        "SELECT operation, outcome FROM provider_sim.calls WHERE payment_id = $1 ORDER BY call_id",
        c.payment_id,
    )
    assert [tuple(r) for r in calls if r["operation"] == "create_refund"] == [
        ("create_refund", "created"),
        ("create_refund", "replayed"),
    ]


async def test_an_interrupted_bulk_retry_run_again_finishes_the_rest(stack: RefundStack) -> None:
    seller = unique("S")
    made = await park(stack, 6, seller)
    await provider_recovers(stack, made)
    query = failed_query(seller=seller)

    first_done = asyncio.Event()
    seen: list[RetryResult] = []

    def on_result(result: RetryResult) -> None:
        seen.append(result)
        first_done.set()

    ids = await find_failed_ids(stack.client, query)
    run = asyncio.create_task(
        retry_refunds(stack.client, ids, request=SRE, concurrency=1, rate=20, on_result=on_result)
    )
    await asyncio.wait_for(first_done.wait(), 20)
    run.cancel()  # Ctrl-C
    with pytest.raises(asyncio.CancelledError):
        await run
    assert 1 <= len(seen) < 6
    assert all(r.outcome is RetryOutcome.RETRIED for r in seen), [
        (r.cancellation_id, r.outcome, r.detail) for r in seen
    ]

    # Run again: only what is still parked is retried (a cancellation visibility still shows
    # as parked but that was retried is refused and skipped).
    rest = await retry_refunds(
        stack.client, await find_failed_ids(stack.client, query), request=SRE, concurrency=2
    )
    assert rest.errors == 0
    retried = {r.cancellation_id for r in seen} | {
        r.cancellation_id for r in rest.results if r.outcome is RetryOutcome.RETRIED
    }
    assert len(retried) >= 6 - 1  # the one cancelled in flight may have gone through
    await assert_refunded_once_with_coupon(stack, made)
    for c in made:
        retries = await stack.pool.fetchval(
            "SELECT count(*) FROM cancellation_events WHERE cancellation_id = $1"
            " AND kind = 'refund_retry'",
            c.id,
        )
        assert retries == 1, c.id
    await assert_listed_for(stack, seller, set())


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_the_cli_interrupted_after_the_first_retry_run_again_finishes_the_rest(
    stack: RefundStack,
) -> None:
    seller = unique("S")
    made = await park(stack, 4, seller)
    await provider_recovers(stack, made)
    ids = [c.id for c in made]
    command = [
        ORDERCANCEL,
        "refunds",
        "retry",
        "--all-failed",
        "--query",
        f'SellerId="{seller}"',
        "--concurrency",
        "1",
        "--rate",
        # One every 15 s: the interrupt comes once the first retry is in the ledger, which the
        # workflow writes after its update returns (seconds later on a loaded machine).
        "4/m",
    ]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **stack.cli_env()},
        # Ctrl-C as a terminal delivers it: a suite started in the background by a
        # non-interactive shell (`.ci/run &`) ignores SIGINT, and its children inherit that.
        preexec_fn=_sigint_default,
    )

    async def retried_so_far() -> int:
        count: int = await stack.pool.fetchval(
            "SELECT count(*) FROM cancellation_events WHERE cancellation_id = ANY($1::text[])"
            " AND kind = 'refund_retry'",
            ids,
        )
        return count

    async def first_retry() -> None:
        assert await retried_so_far() >= 1

    try:
        await eventually(first_retry, timeout=20, interval=0.05)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 130, (out, err)
    assert b"interrupted" in err, err
    assert 1 <= await retried_so_far() < 4

    ran = await run_command(*command[:-4], "--json", env=stack.cli_env())
    assert ran.returncode == 0, ran.stderr
    await assert_refunded_once_with_coupon(stack, made)
    assert await retried_so_far() == 4  # each retried exactly once over both runs


# --- the small parts -------------------------------------------------------------------------


def test_rates_and_since_parse() -> None:
    assert parse_rate("5") == 5 and parse_rate("5/s") == 5 and parse_rate("120/m") == 2
    assert parse_rate("3600/h") == 1
    for bad in ("0", "fast", "-1/s", "5/week"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert parse_since("2h", now=now) == datetime(2026, 3, 10, 10, tzinfo=UTC)
    assert parse_since("2026-03-01T00:00:00Z") == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_since("2026-03-01T00:00:00") == datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("yesterday")
    assert failed_query(seller="S-7", query='OrderId="O-1"').endswith(
        ' AND SellerId="S-7" AND (OrderId="O-1")'
    )
    with pytest.raises(ValueError):
        failed_query(seller='S" OR "1"="1')


async def test_token_bucket_paces_without_spinning() -> None:
    bucket = TokenBucket(50)  # one every 20 ms, no burst
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(6):
        await bucket.acquire()
    elapsed = loop.time() - start
    assert 0.09 <= elapsed < 0.5, elapsed  # the first is free, five waits of 20 ms


async def test_a_declined_refund_is_listed_apart_and_held_back_from_a_bulk_retry(
    stack: RefundStack,
) -> None:
    """A refund the provider declined for good is not one more transient failure: `refunds
    failed` lists it apart with its stage and error (provider texts shown as text, not console
    markup), and `--all-failed` leaves it out unless `--include-declined` says otherwise."""
    seller = unique("S")
    (declined,) = await cancellations(
        stack, 1, seller=seller, faults=SimulatorFaults(final_failure="[card_closed] by issuer")
    )
    (transient,) = await cancellations(stack, 1, seller=seller, faults=OUTAGE)
    view = await wait_for_status(declined.handle, CancellationStatus.REFUND_FAILED)
    assert view.refund is not None and view.refund.stage is RefundStage.DECLINED
    await assert_listed_for(stack, seller, {declined.id, transient.id})

    ran = await run_command(
        ORDERCANCEL, "refunds", "failed", "--seller", seller, env=stack.cli_env()
    )
    assert ran.returncode == 0, ran.stderr
    head, _, apart = ran.stdout.partition("declined for good by the provider")
    assert transient.id in head and declined.id not in head
    assert declined.id in apart and "[card_closed] by issuer" in apart and "declined" in apart
    ran = await run_command(
        ORDERCANCEL, "refunds", "failed", "--seller", seller, "--json", env=stack.cli_env()
    )
    (row,) = [r for r in json.loads(ran.stdout) if r["cancellation_id"] == declined.id]
    # A decline is a pass that ended parked: counted, and the same N as its "(pass N)".
    assert row["passes"] == 1 and row["last_error"].endswith("(pass 1)"), row
    assert row["provider_call_attempts"] == row["provider_calls"] == 1, row

    query = f'SellerId="{seller}"'
    ran = await run_command(
        ORDERCANCEL,
        "refunds",
        "retry",
        "--all-failed",
        "--query",
        query,
        "--dry-run",
        env=stack.cli_env(),
    )
    assert ran.returncode == 0, ran.stderr
    assert "would retry 1, would skip 1" in ran.stdout and "--include-declined" in ran.stdout

    await stack.provider.set_faults(transient.payment_id, SimulatorFaults())
    ran = await run_command(
        ORDERCANCEL, "refunds", "retry", "--all-failed", "--query", query, env=stack.cli_env()
    )
    assert ran.returncode == 0, ran.stderr
    assert "retried 1, skipped 1" in ran.stdout
    assert (await asyncio.wait_for(transient.handle.result(), 30)).status is (
        CancellationStatus.COMPLETED
    )
    held = await wait_for_status(declined.handle, CancellationStatus.REFUND_FAILED)
    assert not [e for e in held.audit if e.kind == "refund_retry"]

    # Asked for: it gets a new refund (the provider's fault cleared first), under the next
    # generation's key, which the receipt names (not the declined one's).
    await stack.provider.set_faults(declined.payment_id, SimulatorFaults())
    ran = await run_command(
        ORDERCANCEL,
        "refunds",
        "retry",
        "--all-failed",
        "--query",
        query,
        "--include-declined",
        "--json",
        env=stack.cli_env(),
    )
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["totals"] == {"retried": 1}, summary
    (receipt,) = summary["results"]
    assert receipt["detail"] == (
        f"refund retry scheduled: a new refund (generation 2) under idempotency key"
        f" {declined.id}:refund-submit-2; {declined.id}:refund-submit was declined"
    ), receipt
    done = await asyncio.wait_for(declined.handle.result(), 30)
    assert done.status is CancellationStatus.COMPLETED
    assert done.refund is not None and done.refund.idempotency_key == (
        f"{declined.id}:refund-submit-2"
    )

    # Reconciliation explains why the ledger has more refunds than the provider: the declined
    # generation never reached it (no finding for it).
    ran = await run_command(ORDERCANCEL, "reconcile", "--json", env=stack.cli_env())
    report = json.loads(ran.stdout)
    assert not [f for f in report["findings"] if f["cancellation_id"] == declined.id], report
    assert report["never_at_provider"] >= 1, report
    ran = await run_command(ORDERCANCEL, "reconcile", env=stack.cli_env())
    assert "declined or failed before the provider recorded it" in ran.stdout, ran.stdout


async def test_passes_and_the_last_errors_pass_are_one_number_across_a_decline(
    stack: RefundStack,
) -> None:
    """An outage parks the refund (pass 1); the operator's retry meets a decline for good
    (pass 2): `refunds failed` says 2 passes and the last error says "(pass 2)"."""
    seller = unique("S")
    (c,) = await park(stack, 1, seller)
    await stack.provider.set_faults(c.payment_id, SimulatorFaults(final_failure="card_closed"))
    assert (await retry_one(stack.client, c.id, SRE)).outcome is RetryOutcome.RETRIED

    async def declined() -> None:
        # Listed once visibility has it parked again (an AssertionError until then: retried).
        rows = await list_failed(stack.client, stack.pool, seller=seller)
        assert len(rows) == 1, rows
        (row,) = rows
        assert row.refund_stage == "declined", row
        assert row.passes == 2, row
        assert row.last_error is not None and row.last_error.endswith("(pass 2)"), row

    await eventually(declined, timeout=20)

"""Failed refunds, for the SREs on call (R10): find the cancellations parked in `refund_failed`
and retry them, one at a time or in bulk, safely.

Finding goes through Temporal visibility (the `CancellationStatus` search attribute, plus
`SellerId` or any query the SRE writes); the ledger adds what visibility does not hold (amount,
last error, how many passes failed, how many attempts to call the provider, since when).
Retrying only ever sends the workflow's update `retry_refund`, which the workflow accepts only
while it is parked in `refund_failed` and which resumes the refund with the same idempotency
key (the next generation's, after a decline or reversal; the receipt names it): sending it
twice, or re-running a bulk retry that was interrupted, retries nothing twice. What the CLI
(`ordercancel refunds ...`) calls; the HTTP API can call `retry_one` for its single retry.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain.errors import RefusalCode
from domain.models import (
    CancellationStatus,
    DecisionReceipt,
    Money,
    Record,
    RefundStage,
    RetryRefundRequest,
)
from domain.rules import parse_duration, refund_idempotency_key
from ledger.reports import ParkedRefund, latest_refunds
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation

WORKFLOW_TYPE = "OrderCancellation"
# Every parked cancellation: running (a parked workflow never ends by itself) and in
# refund_failed. A user's query is ANDed to this, so a retry never reaches anything else.
FAILED_QUERY = (
    f'WorkflowType="{WORKFLOW_TYPE}" AND ExecutionStatus="Running"'
    f' AND CancellationStatus="{CancellationStatus.REFUND_FAILED.value}"'
)

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def failed_query(*, seller: str | None = None, query: str | None = None) -> str:
    """The visibility query for parked cancellations, narrowed by seller and/or a query of the
    user's own (e.g. `OrderId IN ("O-1", "O-2")` or `StartTime > "2026-03-01T00:00:00Z"`)."""
    parts = [FAILED_QUERY]
    if seller is not None:
        if not _SAFE_VALUE.match(seller):
            raise ValueError(f"not a seller id: {seller!r}")
        parts.append(f'SellerId="{seller}"')
    if query is not None and query.strip():
        parts.append(f"({query.strip()})")
    return " AND ".join(parts)


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """`2h`, `30m`, `7d` (that long ago) or an ISO 8601 time (UTC when it names no zone)."""
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            ago = parse_duration(text)
        except ValueError:
            raise ValueError(
                f"--since {text!r}: give a duration (30m, 2h, 7d) or an ISO time"
            ) from None
        return (now or datetime.now(UTC)) - ago
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_rate(text: str) -> float:
    """Requests per second from `5`, `5/s`, `120/m`, `3600/h`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--rate {text!r}: give requests per second, e.g. 5/s, 120/m")
    per = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}
    return float(match.group(1)) / per[match.group(2)]


# --- listing ---------------------------------------------------------------------------------


class FailedRefund(Record):
    """One parked cancellation, as visibility and the ledger see it."""

    cancellation_id: str
    order_id: str | None = None
    seller_id: str | None = None
    amount: Money | None = None
    idempotency_key: str | None = None
    # `failed` (retries exhausted or refused for good) or `reversed` (confirmed, then reported
    # failed by the provider).
    refund_stage: str | None = None
    last_error: str | None = None
    # Passes of the refund that ended parked, over every run (each pass is up to
    # ORDERCANCEL_REFUND_SUBMIT_MAX_ATTEMPTS attempts to call the provider), declines and
    # reversals included: the N of the last error's "(pass N)".
    passes: int = 0
    # Our attempts to call the provider to create the latest refund (its idempotency key),
    # failed ones included (the ledger's refunds.attempts). Not what the provider saw: a call
    # that timed out may or may not have reached it. `provider_calls` is the former name of
    # `provider_call_attempts` (the same number, kept for scripts).
    provider_calls: int = 0
    provider_call_attempts: int = 0
    # When it parked the last time: the ledger's refunds.failed_at (reversed_at for a reversal).
    failed_since: datetime | None = None


async def find_failed_ids(client: Client, query: str) -> list[str]:
    """Workflow ids matching a visibility query, once each, in the order listed."""
    seen: dict[str, None] = {}
    async for execution in client.list_workflows(query):
        seen.setdefault(execution.id, None)
    return list(seen)


async def list_failed(
    client: Client,
    pool: asyncpg.Pool,
    *,
    seller: str | None = None,
    since: datetime | None = None,
    query: str | None = None,
) -> list[FailedRefund]:
    """Parked cancellations, oldest parked first. Visibility chooses them (status, seller,
    query); `since` keeps those that parked at or after it, by the ledger's clock."""
    found: dict[str, FailedRefund] = {}
    async for execution in client.list_workflows(failed_query(seller=seller, query=query)):
        attrs = execution.typed_search_attributes
        found.setdefault(
            execution.id,
            FailedRefund(
                cancellation_id=execution.id,
                order_id=attrs.get(sa.ORDER_ID),
                seller_id=attrs.get(sa.SELLER_ID),
            ),
        )
    for parked in await latest_refunds(pool, list(found)) if found else []:
        found[parked.cancellation_id] = FailedRefund(
            cancellation_id=parked.cancellation_id,
            order_id=parked.order_id,
            seller_id=parked.seller_id,
            amount=parked.amount,
            idempotency_key=parked.idempotency_key,
            refund_stage=parked.stage.value,
            last_error=parked.last_error,
            passes=parked.passes,
            provider_calls=parked.provider_calls,
            provider_call_attempts=parked.provider_calls,
            failed_since=parked.failed_since,
        )
    listed = [
        f
        for f in found.values()
        if since is None or f.failed_since is None or f.failed_since >= since
    ]
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(listed, key=lambda f: (f.failed_since or far, f.cancellation_id))


# --- retrying --------------------------------------------------------------------------------


class RetryOutcome(StrEnum):
    RETRIED = "retried"  # the workflow accepted retry_refund
    SKIPPED = "skipped"  # no longer failed (refused with not_refund_failed) or not running
    ERROR = "error"  # anything else: nothing is known to have changed; safe to run again
    WOULD_RETRY = "would_retry"  # dry run: parked in refund_failed now
    WOULD_SKIP = "would_skip"  # dry run: not parked (or not running)


class RetryResult(Record):
    cancellation_id: str
    outcome: RetryOutcome
    detail: str = ""
    # Skipped because the bulk run held it back (declined or reversed: a decision, not a bulk
    # action), not because it was no longer parked.
    held_back: bool = False


class RetrySummary(Record):
    dry_run: bool = False
    results: list[RetryResult]

    def count(self, outcome: RetryOutcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def retried(self) -> int:
        return self.count(RetryOutcome.RETRIED)

    @property
    def skipped(self) -> int:
        return self.count(RetryOutcome.SKIPPED)

    @property
    def errors(self) -> int:
        return self.count(RetryOutcome.ERROR)

    @property
    def held_back(self) -> int:
        return sum(1 for r in self.results if r.held_back)

    def totals(self) -> dict[str, int]:
        return {o.value: self.count(o) for o in RetryOutcome if self.count(o)}


class TokenBucket:
    """At most `rate` acquisitions per second on average, `burst` at once. Waiters sleep for
    exactly the time the next token needs (no polling loop)."""

    def __init__(
        self, rate: float, *, burst: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # first come, first served
            while True:
                now = self._clock()
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


async def retry_one(
    client: Client, cancellation_id: str, request: RetryRefundRequest
) -> RetryResult:
    """Send `retry_refund` once. A refusal because the cancellation is no longer parked (or
    has no running workflow) is a skip, not an error: someone, or an earlier run, got there
    first."""
    handle = client.get_workflow_handle(cancellation_id)
    try:
        receipt: DecisionReceipt = await handle.execute_update(
            OrderCancellation.retry_refund, request
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            outcome = (
                RetryOutcome.SKIPPED
                if cause.type == RefusalCode.NOT_REFUND_FAILED.value
                else RetryOutcome.ERROR
            )
            return RetryResult(
                cancellation_id=cancellation_id,
                outcome=outcome,
                detail=f"{cause.type}: {cause.message}",
            )
        return RetryResult(
            cancellation_id=cancellation_id, outcome=RetryOutcome.ERROR, detail=str(cause)
        )
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            # An ended workflow takes no update; an id Temporal never saw is a mistake.
            return await _ended_or_unknown(client, cancellation_id)
        return RetryResult(
            cancellation_id=cancellation_id,
            outcome=RetryOutcome.ERROR,
            detail=f"{err.status.name if err.status else 'rpc'}: {err.message}",
        )
    return RetryResult(
        cancellation_id=cancellation_id, outcome=RetryOutcome.RETRIED, detail=receipt.message
    )


async def _ended_or_unknown(client: Client, cancellation_id: str) -> RetryResult:
    try:
        description = await client.get_workflow_handle(cancellation_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return RetryResult(
                cancellation_id=cancellation_id,
                outcome=RetryOutcome.ERROR,
                detail=f"no such cancellation {cancellation_id}",
            )
        raise
    name = description.status.name.lower() if description.status else "ended"
    return RetryResult(
        cancellation_id=cancellation_id,
        outcome=RetryOutcome.SKIPPED,
        detail=f"not running ({name})",
    )


HELD_BACK = {
    RefundStage.DECLINED: (
        "declined for good by the provider: not retried in bulk (retry it by id, or pass"
        " --include-declined; it gets a new refund under a new key)"
    ),
    RefundStage.REVERSED: (
        "reversed by the provider after it confirmed: not retried in bulk (find a way to pay"
        " the buyer back with finance first, then retry it by id or pass --include-reversed;"
        " it gets a new refund under a new key)"
    ),
}


async def bulk_holds(
    pool: asyncpg.Pool,
    cancellation_ids: Sequence[str],
    *,
    include_declined: bool = False,
    include_reversed: bool = False,
) -> dict[str, str]:
    """The cancellations a bulk retry leaves out, with why: a refund the provider declined for
    good or reversed is dead under its key, so its retry makes a new refund (and, for a
    reversal, needs a way to pay the buyer back first): a decision per cancellation, taken
    in bulk only when the operator says so."""
    included = {
        RefundStage.DECLINED: include_declined,
        RefundStage.REVERSED: include_reversed,
    }
    return {
        r.cancellation_id: f"stage {r.stage.value}"
        + (f" ({r.last_error})" if r.last_error else "")
        + f"; {HELD_BACK[r.stage]}"
        for r in await latest_refunds(pool, cancellation_ids)
        if r.stage in HELD_BACK and not included[r.stage]
    }


def retry_plan(cancellation_id: str, parked: ParkedRefund | None) -> str:
    """The key a retry would use, as the workflow's receipt will name it: the parked refund's
    own, or the next generation's when the provider declined or reversed it (R10)."""
    if parked is None:
        return f"a new refund under idempotency key {refund_idempotency_key(cancellation_id)}"
    if parked.stage.is_dead:
        generation = parked.generation + 1
        key = refund_idempotency_key(cancellation_id, generation)
        return (
            f"a new refund (generation {generation}) under idempotency key {key};"
            f" {parked.idempotency_key} was {parked.stage.value}"
        )
    return (
        f"the same idempotency key {parked.idempotency_key}"
        f" ({parked.provider_calls} attempt(s) to call the provider so far)"
    )


async def retry_plans(pool: asyncpg.Pool, cancellation_ids: Sequence[str]) -> dict[str, str]:
    """`retry_plan` of each cancellation, from the ledger (a dry run shows it)."""
    latest = {r.cancellation_id: r for r in await latest_refunds(pool, cancellation_ids)}
    return {i: retry_plan(i, latest.get(i)) for i in cancellation_ids}


async def check_one(client: Client, cancellation_id: str, plan: str | None = None) -> RetryResult:
    """Dry run: what `retry_one` would do now, read from the workflow's description (its
    search attributes), changing nothing. `plan`: which key the retry would use
    (`retry_plan`), named in the result."""
    try:
        description = await client.get_workflow_handle(cancellation_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return RetryResult(
                cancellation_id=cancellation_id,
                outcome=RetryOutcome.ERROR,
                detail=f"no such cancellation {cancellation_id}",
            )
        return RetryResult(
            cancellation_id=cancellation_id, outcome=RetryOutcome.ERROR, detail=err.message
        )
    status = description.typed_search_attributes.get(sa.CANCELLATION_STATUS)
    if description.status != WorkflowExecutionStatus.RUNNING:
        name = description.status.name.lower() if description.status else "unknown"
        return RetryResult(
            cancellation_id=cancellation_id,
            outcome=RetryOutcome.WOULD_SKIP,
            detail=f"not running ({name}, status {status})",
        )
    if status != CancellationStatus.REFUND_FAILED.value:
        return RetryResult(
            cancellation_id=cancellation_id,
            outcome=RetryOutcome.WOULD_SKIP,
            detail=f"not_refund_failed: status {status}",
        )
    return RetryResult(
        cancellation_id=cancellation_id,
        outcome=RetryOutcome.WOULD_RETRY,
        detail="parked in refund_failed" + (f"; the retry would use {plan}" if plan else ""),
    )


async def retry_refunds(
    client: Client,
    cancellation_ids: Iterable[str],
    *,
    request: RetryRefundRequest,
    concurrency: int = 4,
    rate: float | None = None,
    dry_run: bool = False,
    on_result: Callable[[RetryResult], None] | None = None,
    hold: Mapping[str, str] | None = None,
    plans: Mapping[str, str] | None = None,
) -> RetrySummary:
    """Retry (or, with `dry_run`, check) each cancellation once: at most `concurrency` in
    flight, at most `rate` per second. Every result is reported to `on_result` as it comes
    (a progress bar, or the partial summary of an interrupted run). Cancelling the call
    midway is safe: each cancellation either got its update or did not, and running again
    retries only those still parked. `hold`: ids not to retry, with the reason (skipped, held
    back). `plans`: for a dry run, the key each retry would use (`retry_plans`)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    ids = list(dict.fromkeys(cancellation_ids))
    semaphore = asyncio.Semaphore(concurrency)
    bucket = TokenBucket(rate) if rate else None
    results: dict[str, RetryResult] = {}

    async def one(cancellation_id: str) -> None:
        if hold and cancellation_id in hold:
            result = RetryResult(
                cancellation_id=cancellation_id,
                outcome=RetryOutcome.WOULD_SKIP if dry_run else RetryOutcome.SKIPPED,
                detail=hold[cancellation_id],
                held_back=True,
            )
            results[cancellation_id] = result
            if on_result is not None:
                on_result(result)
            return
        async with semaphore:
            if bucket is not None:
                await bucket.acquire()
            try:
                if dry_run:
                    result = await check_one(
                        client, cancellation_id, (plans or {}).get(cancellation_id)
                    )
                else:
                    result = await retry_one(client, cancellation_id, request)
            except Exception as err:  # one bad cancellation must not stop the batch
                result = RetryResult(
                    cancellation_id=cancellation_id,
                    outcome=RetryOutcome.ERROR,
                    detail=f"{type(err).__name__}: {err}",
                )
        results[cancellation_id] = result
        if on_result is not None:
            on_result(result)

    async with asyncio.TaskGroup() as group:
        for cancellation_id in ids:
            group.create_task(one(cancellation_id))
    return RetrySummary(dry_run=dry_run, results=[results[i] for i in ids])


def summarize(results: Sequence[RetryResult], *, dry_run: bool = False) -> RetrySummary:
    """A summary of the results seen so far (an interrupted run prints this)."""
    return RetrySummary(dry_run=dry_run, results=list(results))

"""Reconciliation: the ledger's refunds against the payment provider's own records.

Finance asks "was everybody refunded exactly once?". This compares, refund by refund (the
idempotency key is the join: the ledger's primary key, the provider's idempotency key or
`metadata.refund_id`), and reports:

* `missing_at_provider`: the ledger says submitted, confirmed or reversed; the provider has
  nothing under that key.
* `unknown_to_ledger`: the provider has a refund of ours (by key) the ledger does not know.
* `amount_mismatch`: both know it, for different amounts or currencies.
* `status_mismatch`: both know it, in states that contradict each other. Three of them the
  workflows repair themselves once told (`--fix`): ledger `confirmed` but provider `failed` (a
  reversal nobody told us about), ledger `submitted` but provider `succeeded` or `failed` (a
  lost webhook). The others are reported: ledger `failed` but provider `succeeded`/`pending`
  (the refund was made, the response lost, the cancellation parked: an operator's retry finds
  it by its key), ledger `confirmed` but provider `pending`, ledger `reversed` but provider
  `succeeded`.

The provider's list is what it recorded; for a refund the ledger says `confirmed` and the list
says `succeeded`, reconciliation also asks the provider for its current status (the same read
the workflow makes while confirming): a refund failed or reversed since confirmation is often
only known on that read (the simulator's `--fail-after-success`; a processor that reverses
later), and it is then the `confirmed`/`failed` mismatch above. A read that fails leaves the
listed status (`status_unchecked` counts them).

A ledger refund still `requested` is in flight (intent recorded, provider call under way) and
is not compared. Repairs never write the ledger: each repairable mismatch becomes a synthetic
payment event, handed to `forward_payment_event` exactly like a webhook, whose id is derived
from the refund key and the provider status observed, so running `--fix` again sends nothing
new. The workflow then asks the provider itself and records what it finds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
from temporalio.client import Client

from domain.errors import ProviderReadError, ProviderTransientError
from domain.models import (
    PaymentEvent,
    PaymentEventType,
    Record,
    RefundStage,
)
from infra.settings import TASK_QUEUE
from ledger.reports import LedgerRefund, all_refunds
from ledger.repository import Ledger
from payments.provider import PaymentProvider, ProviderRefund, ProviderRefundStatus
from starter.payment_events import forward_payment_event


class FindingKind(StrEnum):
    MISSING_AT_PROVIDER = "missing_at_provider"
    UNKNOWN_TO_LEDGER = "unknown_to_ledger"
    AMOUNT_MISMATCH = "amount_mismatch"
    STATUS_MISMATCH = "status_mismatch"


class Finding(Record):
    kind: FindingKind
    idempotency_key: str
    cancellation_id: str | None = None
    ledger: LedgerRefund | None = None
    provider: ProviderRefund | None = None
    detail: str
    # What to do: repaired by --fix, or who must look.
    action: str
    # Repairable through the workflow: the synthetic event that tells it.
    fix_event: PaymentEventType | None = None
    fix_event_id: str | None = None
    # After --fix: what forward_payment_event did (delivered, reopened, ignored, ...), and
    # whether the event had been sent before (an earlier --fix).
    fix_outcome: str | None = None
    fix_duplicate: bool | None = None


class ReconcileReport(Record):
    checked_at: datetime
    ledger_refunds: int
    provider_refunds: int
    fix: bool
    findings: list[Finding]
    # Confirmed refunds whose current status was asked of the provider (not only listed), and
    # those the read failed for (the listed status was compared).
    status_checked: int = 0
    status_unchecked: int = 0
    # Ledger refunds the provider is not expected to have: declined outright at submission, or
    # parked as failed before the provider recorded anything (no finding), and those still
    # `requested` (in flight, not compared). They explain why the two counts can differ.
    never_at_provider: int = 0
    in_flight: int = 0

    @property
    def unresolved(self) -> list[Finding]:
        """Findings this run did not repair: finance's (no fix), and repairable ones that were
        not sent (no --fix) or did not reach a cancellation."""
        return [f for f in self.findings if f.fix_outcome not in ("delivered", "reopened")]

    def totals(self) -> dict[str, int]:
        counts = {kind.value: 0 for kind in FindingKind}
        for finding in self.findings:
            counts[finding.kind.value] += 1
        counts["repairable"] = sum(1 for f in self.findings if f.fix_event is not None)
        counts["repaired"] = sum(1 for f in self.findings if f.fix_outcome is not None)
        counts["for_finance"] = sum(1 for f in self.findings if f.fix_event is None)
        counts["unresolved"] = len(self.unresolved)
        return counts


# (ledger stage, provider status) -> the event that makes the workflow look again, or None.
_STATUS_RULES: dict[
    tuple[RefundStage, ProviderRefundStatus], tuple[PaymentEventType | None, str, str]
] = {
    (RefundStage.CONFIRMED, ProviderRefundStatus.FAILED): (
        PaymentEventType.REFUND_REVERSED,
        "confirmed in the ledger, failed at the provider: a reversal nobody told us about",
        "--fix: synthetic refund_reversed event; the cancellation reopens in refund_failed",
    ),
    (RefundStage.SUBMITTED, ProviderRefundStatus.SUCCEEDED): (
        PaymentEventType.REFUND_CONFIRMED,
        "submitted in the ledger, succeeded at the provider: a lost webhook",
        "--fix: synthetic refund_confirmed event; the cancellation confirms and completes",
    ),
    (RefundStage.SUBMITTED, ProviderRefundStatus.FAILED): (
        PaymentEventType.REFUND_FAILED,
        "submitted in the ledger, failed at the provider: a lost webhook",
        "--fix: synthetic refund_failed event; the cancellation parks in refund_failed",
    ),
    (RefundStage.FAILED, ProviderRefundStatus.SUCCEEDED): (
        None,
        "parked as failed in the ledger, but the provider made the refund (a lost response)",
        "operator: `ordercancel refunds retry ID` finds the provider's refund by its key",
    ),
    (RefundStage.FAILED, ProviderRefundStatus.PENDING): (
        None,
        "parked as failed in the ledger, but the provider has the refund pending",
        "operator: `ordercancel refunds retry ID` finds the provider's refund by its key",
    ),
    (RefundStage.CONFIRMED, ProviderRefundStatus.PENDING): (
        None,
        "confirmed in the ledger, still pending at the provider",
        "finance: check with the provider",
    ),
    (RefundStage.REVERSED, ProviderRefundStatus.SUCCEEDED): (
        None,
        "reversed in the ledger, succeeded at the provider",
        "finance: check with the provider before refunding again",
    ),
    (RefundStage.REVERSED, ProviderRefundStatus.PENDING): (
        None,
        "reversed in the ledger, pending at the provider",
        "finance: check with the provider before refunding again",
    ),
}


def fix_event_id(idempotency_key: str, status: ProviderRefundStatus) -> str:
    """Deterministic: the same mismatch always makes the same event, so a second --fix is a
    duplicate delivery that `forward_payment_event` recognises."""
    return f"reconcile:{idempotency_key}:{status.value}"


def compare(ledger: list[LedgerRefund], provider: list[ProviderRefund]) -> list[Finding]:
    """The findings, pure: ledger rows and provider records in, mismatches out."""
    at_provider = {p.idempotency_key: p for p in provider}
    in_ledger = {r.idempotency_key: r for r in ledger}
    findings: list[Finding] = []
    for row in ledger:
        if row.stage is RefundStage.REQUESTED:
            continue  # in flight: intent recorded, the provider call under way
        theirs = at_provider.get(row.idempotency_key)
        if theirs is None:
            # Parked before the provider recorded anything, or declined by it outright (a
            # final refusal at submission records no refund): nothing is missing there.
            if row.stage not in (RefundStage.FAILED, RefundStage.DECLINED):
                findings.append(
                    Finding(
                        kind=FindingKind.MISSING_AT_PROVIDER,
                        idempotency_key=row.idempotency_key,
                        cancellation_id=row.cancellation_id,
                        ledger=row,
                        detail=f"the ledger says {row.stage.value}"
                        + (f" as {row.provider_ref}" if row.provider_ref else "")
                        + "; the provider has no refund with this key",
                        action="finance: find the money at the provider (no automatic repair)",
                    )
                )
            continue
        if theirs.amount != row.amount:
            findings.append(
                Finding(
                    kind=FindingKind.AMOUNT_MISMATCH,
                    idempotency_key=row.idempotency_key,
                    cancellation_id=row.cancellation_id,
                    ledger=row,
                    provider=theirs,
                    detail=f"ledger {row.amount}, provider {theirs.amount}",
                    action="finance: the provider moved a different amount (no automatic repair)",
                )
            )
        rule = _STATUS_RULES.get((row.stage, theirs.status))
        if rule is not None:
            event, detail, action = rule
            findings.append(
                Finding(
                    kind=FindingKind.STATUS_MISMATCH,
                    idempotency_key=row.idempotency_key,
                    cancellation_id=row.cancellation_id,
                    ledger=row,
                    provider=theirs,
                    detail=detail + (f" ({theirs.failure_code})" if theirs.failure_code else ""),
                    action=action,
                    fix_event=event,
                    fix_event_id=(
                        fix_event_id(row.idempotency_key, theirs.status) if event else None
                    ),
                )
            )
    for theirs in provider:
        if theirs.idempotency_key not in in_ledger:
            findings.append(
                Finding(
                    kind=FindingKind.UNKNOWN_TO_LEDGER,
                    idempotency_key=theirs.idempotency_key,
                    provider=theirs,
                    detail=f"{theirs.kind.value} {theirs.provider_ref} of {theirs.amount}"
                    f" ({theirs.status.value}) on payment {theirs.payment_id}",
                    action="finance: money moved at the provider that the ledger does not know",
                )
            )
    return findings


async def reconcile(
    pool: asyncpg.Pool,
    provider: PaymentProvider,
    *,
    client: Client | None = None,
    fix: bool = False,
    task_queue: str = TASK_QUEUE,
) -> ReconcileReport:
    """Compare, and with `fix` (which needs `client`) send each repairable mismatch to its
    workflow as a synthetic payment event. Never writes the ledger itself."""
    if fix and client is None:
        raise ValueError("--fix needs a Temporal client")
    ours = await all_refunds(pool)
    listed = await provider.list_refunds()
    theirs, checked, unchecked = await _current_statuses(ours, listed, provider)
    findings = compare(ours, theirs)
    keys = {p.idempotency_key for p in theirs}
    if fix and client is not None:
        ledger = Ledger(pool)
        repaired: list[Finding] = []
        for finding in findings:
            if finding.fix_event is None or finding.provider is None:
                repaired.append(finding)
                continue
            assert finding.fix_event_id is not None
            forwarded = await forward_payment_event(
                client,
                ledger,
                PaymentEvent(
                    event_id=finding.fix_event_id,
                    type=finding.fix_event,
                    provider_ref=finding.provider.provider_ref,
                    refund_key=finding.idempotency_key,
                    failure_code=finding.provider.failure_code,
                    occurred_at=datetime.now(UTC),
                ),
                task_queue=task_queue,
            )
            repaired.append(
                finding.model_copy(
                    update={
                        "fix_outcome": forwarded.outcome.value,
                        "fix_duplicate": forwarded.duplicate,
                    }
                )
            )
        findings = repaired
    return ReconcileReport(
        checked_at=datetime.now(UTC),
        ledger_refunds=len(ours),
        provider_refunds=len(theirs),
        fix=fix,
        findings=findings,
        status_checked=checked,
        status_unchecked=unchecked,
        never_at_provider=sum(
            1
            for r in ours
            if r.stage in (RefundStage.FAILED, RefundStage.DECLINED)
            and r.idempotency_key not in keys
        ),
        in_flight=sum(1 for r in ours if r.stage is RefundStage.REQUESTED),
    )


async def _current_statuses(
    ours: list[LedgerRefund], listed: list[ProviderRefund], provider: PaymentProvider
) -> tuple[list[ProviderRefund], int, int]:
    """The provider's records, with the current status of each refund the ledger says
    `confirmed` and the list says `succeeded` (asked by its reference, as the workflow does):
    a refund that failed or was reversed after its confirmation shows up there."""
    confirmed = {r.idempotency_key for r in ours if r.stage is RefundStage.CONFIRMED}
    current: list[ProviderRefund] = []
    checked = unchecked = 0
    for record in listed:
        if (
            record.idempotency_key not in confirmed
            or record.status is not ProviderRefundStatus.SUCCEEDED
        ):
            current.append(record)
            continue
        try:
            now = await provider.get_refund(provider_ref=record.provider_ref)
        except (ProviderTransientError, ProviderReadError):
            unchecked += 1
            current.append(record)
            continue
        checked += 1
        current.append(now)
    return current, checked, unchecked

"""Activities that talk to the payment provider (R7-R10).

Each one reads the refund from the ledger, calls the provider outside any transaction with the
refund's deterministic idempotency key, then records the result in its own transaction. A retry
after a lost response finds the refund the provider already made instead of making another.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ledger_activities import business_error
from domain.errors import (
    LedgerError,
    ProviderFinalError,
    ProviderReadError,
    ProviderTransientError,
)
from domain.models import CancellationStatus, RefundStage, RefundStepInput, RefundView
from domain.rules import DEFAULT_ETA_TABLE, refund_eta
from infra.metrics import NO_METRICS, BusinessMetrics, seconds_between
from ledger.repository import Ledger, RefundRecord
from payments.provider import PaymentProvider, ProviderRefundStatus

# Failure types the workflow's retry policies and operators see.
PROVIDER_UNAVAILABLE = "ProviderUnavailable"
REFUND_REJECTED = "RefundRejected"
REFUND_FAILED_AT_PROVIDER = "RefundFailedAtProvider"
# The provider would not tell us how the refund stands (a 4xx on the read, an unknown
# reference, our key refused): not a decline. The refund parks still reserved, under its key.
REFUND_STATUS_UNREADABLE = "RefundStatusUnreadable"

log = structlog.get_logger(__name__)

# The status change each recorded stage is to the workflow: its one log line is written here
# (`workflows.order_cancellation._set_status`).
_STAGE_STATUS = {
    RefundStage.SUBMITTED: CancellationStatus.REFUND_SUBMITTED,
    RefundStage.CONFIRMED: CancellationStatus.REFUND_CONFIRMED,
}


def _log_stage(stage: RefundStage, view: RefundView) -> None:
    log.info(
        f"refund_{stage.value}",
        status=_STAGE_STATUS[stage].value,
        kind=view.kind.value,
        provider_ref=view.provider_ref,
    )


class SubmitRefundInput(RefundStepInput):
    """`submit_refund_and_confirm`'s input: the audit row's key of the confirmation too."""

    confirm_event_key: str


class RefundActivities:
    def __init__(
        self,
        ledger: Ledger,
        provider: PaymentProvider,
        *,
        eta_table: Mapping[str, tuple[int, int, bool]] = DEFAULT_ETA_TABLE,
        metrics: BusinessMetrics = NO_METRICS,
    ) -> None:
        self._ledger = ledger
        self._provider = provider
        self._metrics = metrics
        self._eta_table = eta_table

    @activity.defn
    async def submit_refund(self, params: RefundStepInput) -> RefundView:
        """Dot 2: hand the void or refund to the provider."""
        return await self._submit(params)

    async def _submit(
        self, params: RefundStepInput, *, confirm_event_key: str | None = None
    ) -> RefundView:
        """Dot 2; and dot 3 with it, under `confirm_event_key`, when given and the provider
        answered that the refund has succeeded (one ledger round trip for both)."""
        try:
            record = await self._ledger.get_refund(cancellation_id=params.cancellation_id)
        except LedgerError as err:
            raise business_error(err) from err
        if record.view.stage in (RefundStage.SUBMITTED, RefundStage.CONFIRMED):
            # Recorded by an earlier attempt, whose line may have been lost with it.
            _log_stage(RefundStage.SUBMITTED, record.view)
            return record.view
        try:
            made = await self._provider.create_refund(
                idempotency_key=record.view.idempotency_key,
                payment_id=record.payment_id,
                kind=record.view.kind,
                amount=record.view.amount,
            )
        except ProviderTransientError as err:
            self._metrics.refund_call_failed(reason=PROVIDER_UNAVAILABLE, step="submit")
            await self._count_call(record.view.idempotency_key)
            raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE) from err
        except ProviderFinalError as err:
            self._metrics.refund_call_failed(reason=REFUND_REJECTED, step="submit")
            await self._count_call(record.view.idempotency_key)
            raise ApplicationError(str(err), type=REFUND_REJECTED, non_retryable=True) from err
        eta = refund_eta(record.method, record.view.kind, datetime.now(UTC), self._eta_table)
        if confirm_event_key is not None and made.status is ProviderRefundStatus.SUCCEEDED:
            record, submitted = await self._ledger.record_refund_submitted_and_confirmed(
                cancellation_id=params.cancellation_id,
                provider_ref=made.provider_ref,
                eta=eta,
                event_key=params.event_key,
                confirm_event_key=confirm_event_key,
            )
            _log_stage(RefundStage.SUBMITTED, record.view)
            self._observe_stage(record, submitted)
            if submitted is RefundStage.SUBMITTED:
                # Confirmed in the same transaction.
                _log_stage(RefundStage.CONFIRMED, record.view)
                self._observe_stage(record, RefundStage.CONFIRMED)
            return record.view
        record = await self._ledger.record_refund_submitted(
            cancellation_id=params.cancellation_id,
            provider_ref=made.provider_ref,
            eta=eta,
            event_key=params.event_key,
        )
        _log_stage(RefundStage.SUBMITTED, record.view)
        self._observe_stage(record)
        return record.view

    @activity.defn
    async def submit_refund_and_confirm(self, params: SubmitRefundInput) -> RefundView:
        """Dot 2, and dot 3 with it when the provider answers synchronously (a void; a refund
        the provider settled at once): then no separate confirmation step follows. A pending
        answer returns the refund `submitted`, as `submit_refund` does."""
        # Pending, or recorded by an earlier attempt: returned `submitted`, and the workflow
        # asks (`confirm_refund`). Succeeded: submitted and confirmed in one transaction.
        return await self._submit(params, confirm_event_key=params.confirm_event_key)

    async def _count_call(self, idempotency_key: str) -> None:
        """The refund's `attempts` count every provider call to create it, the failed ones too
        (issue 20). Best effort: the provider's answer is what the activity reports."""
        try:
            await self._ledger.count_provider_call(idempotency_key=idempotency_key)
        except (LedgerError, OSError, asyncpg.PostgresError) as err:
            log.warning("provider_call_not_counted", error=str(err))

    @activity.defn
    async def confirm_refund(self, params: RefundStepInput) -> RefundView:
        """Dot 3: one look at the refund at the provider. Confirmed: recorded and returned.
        Pending: returned unchanged (stage `submitted`). Failed: a non-retryable error."""
        try:
            record = await self._ledger.get_refund(cancellation_id=params.cancellation_id)
        except LedgerError as err:
            raise business_error(err) from err
        if record.view.stage is RefundStage.CONFIRMED:
            _log_stage(RefundStage.CONFIRMED, record.view)
            return record.view
        if record.view.provider_ref is None:
            raise ApplicationError(
                "refund was never submitted", type=REFUND_FAILED_AT_PROVIDER, non_retryable=True
            )
        try:
            found = await self._provider.get_refund(provider_ref=record.view.provider_ref)
        except ProviderTransientError as err:
            self._metrics.refund_call_failed(reason=PROVIDER_UNAVAILABLE, step="confirm")
            raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE) from err
        except (ProviderReadError, ProviderFinalError) as err:
            # An error reading the refund, not an answer about it: only a refund the provider
            # reports failed (below) is dead.
            self._metrics.refund_call_failed(reason=REFUND_STATUS_UNREADABLE, step="confirm")
            raise _unreadable(record.view.provider_ref, err) from err
        if found.status is ProviderRefundStatus.PENDING:
            # Not a failure: the workflow asks again after its poll interval or a webhook.
            return record.view
        if found.status is ProviderRefundStatus.FAILED:
            self._metrics.refund_call_failed(reason=REFUND_FAILED_AT_PROVIDER, step="confirm")
            raise ApplicationError(
                f"the provider reports refund {found.provider_ref} failed: {found.failure_code}",
                type=REFUND_FAILED_AT_PROVIDER,
                non_retryable=True,
            )
        record = await self._ledger.record_refund_confirmed(
            cancellation_id=params.cancellation_id, event_key=params.event_key
        )
        _log_stage(RefundStage.CONFIRMED, record.view)
        self._observe_stage(record)
        return record.view

    def _observe_stage(self, record: RefundRecord, stage: RefundStage | None = None) -> None:
        """How long the refund took to reach its stage (`stage`, else the one it is in) from
        the previous one (ledger clock), from the timestamps the recording write returned (no
        read of their own)."""
        if not self._metrics.enabled:
            return
        refund = record.view
        stage = stage or refund.stage
        if stage is RefundStage.SUBMITTED:
            seconds = seconds_between(record.requested_at, record.submitted_at)
        elif stage is RefundStage.CONFIRMED:
            seconds = seconds_between(record.submitted_at, record.confirmed_at)
        else:
            return
        if seconds is not None:
            self._metrics.refund_stage_reached(
                stage=stage.value, kind=refund.kind.value, seconds=seconds
            )

    @activity.defn
    async def verify_reversal(self, params: RefundStepInput) -> RefundView:
        """The provider says a confirmed refund failed after all: check with the provider (the
        event may be stale or forged) and, if so, reverse it in the ledger. Returns the refund
        as it now stands: `reversed`, or unchanged when the provider still says succeeded."""
        try:
            record = await self._ledger.get_refund(cancellation_id=params.cancellation_id)
        except LedgerError as err:
            raise business_error(err) from err
        if record.view.stage is not RefundStage.CONFIRMED or record.view.provider_ref is None:
            return record.view
        try:
            found = await self._provider.get_refund(provider_ref=record.view.provider_ref)
        except ProviderTransientError as err:
            raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE) from err
        except (ProviderReadError, ProviderFinalError) as err:
            # Asking again gets the same refusal: the check ends here (the workflow says so).
            raise _unreadable(record.view.provider_ref, err) from err
        if found.status is not ProviderRefundStatus.FAILED:
            return record.view
        record = await self._ledger.reverse_refund(
            cancellation_id=params.cancellation_id,
            failure=f"the provider reversed refund {found.provider_ref}: {found.failure_code}",
            event_key=params.event_key,
        )
        self._metrics.refund_reversed(kind=record.view.kind.value)
        log.warning("refund_reversed", provider_ref=found.provider_ref, code=found.failure_code)
        return record.view


def _unreadable(provider_ref: str, err: Exception) -> ApplicationError:
    return ApplicationError(
        f"could not read refund {provider_ref} at the provider: {err}",
        type=REFUND_STATUS_UNREADABLE,
        non_retryable=True,
    )

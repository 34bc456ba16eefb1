"""Activities that talk to the payment provider (R7-R10).

Each one reads the refund from the ledger, calls the provider outside any transaction with the
refund's deterministic idempotency key, then records the result in its own transaction. A retry
after a lost response finds the refund the provider already made instead of making another.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ledger_activities import business_error
from domain.errors import LedgerError, ProviderFinalError, ProviderTransientError
from domain.models import RefundStage, RefundStepInput, RefundView
from domain.rules import DEFAULT_ETA_TABLE, refund_eta
from ledger.repository import Ledger
from payments.provider import PaymentProvider, ProviderRefundStatus

# Failure types the workflow's retry policies and operators see.
PROVIDER_UNAVAILABLE = "ProviderUnavailable"
REFUND_REJECTED = "RefundRejected"
REFUND_FAILED_AT_PROVIDER = "RefundFailedAtProvider"


class RefundActivities:
    def __init__(
        self,
        ledger: Ledger,
        provider: PaymentProvider,
        *,
        eta_table: Mapping[str, tuple[int, int, bool]] = DEFAULT_ETA_TABLE,
    ) -> None:
        self._ledger = ledger
        self._provider = provider
        self._eta_table = eta_table

    @activity.defn
    async def submit_refund(self, params: RefundStepInput) -> RefundView:
        """Dot 2: hand the void or refund to the provider."""
        try:
            record = await self._ledger.get_refund(cancellation_id=params.cancellation_id)
        except LedgerError as err:
            raise business_error(err) from err
        if record.view.stage in (RefundStage.SUBMITTED, RefundStage.CONFIRMED):
            return record.view
        try:
            made = await self._provider.create_refund(
                idempotency_key=record.view.idempotency_key,
                payment_id=record.payment_id,
                kind=record.view.kind,
                amount=record.view.amount,
            )
        except ProviderTransientError as err:
            raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE) from err
        except ProviderFinalError as err:
            raise ApplicationError(str(err), type=REFUND_REJECTED, non_retryable=True) from err
        eta = refund_eta(record.method, record.view.kind, datetime.now(UTC), self._eta_table)
        record = await self._ledger.record_refund_submitted(
            cancellation_id=params.cancellation_id,
            provider_ref=made.provider_ref,
            eta=eta,
            event_key=params.event_key,
        )
        return record.view

    @activity.defn
    async def confirm_refund(self, params: RefundStepInput) -> RefundView:
        """Dot 3: one look at the refund at the provider. Confirmed: recorded and returned.
        Pending: returned unchanged (stage `submitted`). Failed: a non-retryable error."""
        try:
            record = await self._ledger.get_refund(cancellation_id=params.cancellation_id)
        except LedgerError as err:
            raise business_error(err) from err
        if record.view.stage is RefundStage.CONFIRMED:
            return record.view
        if record.view.provider_ref is None:
            raise ApplicationError(
                "refund was never submitted", type=REFUND_FAILED_AT_PROVIDER, non_retryable=True
            )
        try:
            found = await self._provider.get_refund(provider_ref=record.view.provider_ref)
        except ProviderTransientError as err:
            raise ApplicationError(str(err), type=PROVIDER_UNAVAILABLE) from err
        except ProviderFinalError as err:
            raise ApplicationError(
                str(err), type=REFUND_FAILED_AT_PROVIDER, non_retryable=True
            ) from err
        if found.status is ProviderRefundStatus.PENDING:
            # Not a failure: the workflow asks again after its poll interval or a webhook.
            return record.view
        if found.status is ProviderRefundStatus.FAILED:
            raise ApplicationError(
                f"the provider reports refund {found.provider_ref} failed: {found.failure_code}",
                type=REFUND_FAILED_AT_PROVIDER,
                non_retryable=True,
            )
        record = await self._ledger.record_refund_confirmed(
            cancellation_id=params.cancellation_id, event_key=params.event_key
        )
        return record.view

"""Activities that write the ledger. One class, one external system (PostgreSQL)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.errors import LedgerError
from domain.models import (
    CouponInput,
    CouponOutcome,
    EventInput,
    OpenCancellationInput,
    OpenCancellationResult,
    RefundFailureInput,
    RefundPolicy,
    RefundRequestInput,
    RefundView,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import DEFAULT_ETA_TABLE
from ledger.repository import Ledger


def business_error(err: LedgerError) -> ApplicationError:
    """Ledger refusals are facts, not glitches: retrying cannot change them."""
    return ApplicationError(str(err), type=err.error_type, non_retryable=True)


class LedgerActivities:
    def __init__(
        self,
        ledger: Ledger,
        *,
        response_window: timedelta,
        timeout_policy: TimeoutPolicy,
        refund_policy: RefundPolicy,
        eta_table: Mapping[str, tuple[int, int, bool]] = DEFAULT_ETA_TABLE,
    ) -> None:
        self._ledger = ledger
        self._window = response_window
        self._timeout_policy = timeout_policy
        self._refund_policy = refund_policy
        self._eta_table = eta_table

    @activity.defn
    async def open_cancellation(self, params: OpenCancellationInput) -> OpenCancellationResult:
        try:
            snapshot = await self._ledger.open_cancellation(
                cancellation_id=params.cancellation_id, request=params.request
            )
        except LedgerError as err:
            raise business_error(err) from err
        return OpenCancellationResult(
            path=snapshot.path,
            amount=snapshot.amount,
            payment_method=snapshot.payment_method,
            capture=snapshot.capture,
            response_window=params.request.response_window or self._window,
            timeout_policy=self._timeout_policy,
            refund_policy=self._refund_policy,
        )

    @activity.defn
    async def record_transition(self, params: TransitionInput) -> None:
        try:
            await self._ledger.record_transition(params)
        except LedgerError as err:
            raise business_error(err) from err

    @activity.defn
    async def record_event(self, params: EventInput) -> None:
        await self._ledger.record_event(params)

    @activity.defn
    async def request_refund(self, params: RefundRequestInput) -> RefundView:
        try:
            record = await self._ledger.request_refund(
                cancellation_id=params.cancellation_id,
                event_key=params.event_key,
                now=datetime.now(UTC),
                eta_table=self._eta_table,
            )
        except LedgerError as err:
            raise business_error(err) from err
        return record.view

    @activity.defn
    async def restore_coupon(self, params: CouponInput) -> CouponOutcome:
        try:
            return await self._ledger.decide_coupon(
                cancellation_id=params.cancellation_id, event_key=params.event_key
            )
        except LedgerError as err:
            raise business_error(err) from err

    @activity.defn
    async def record_refund_failed(self, params: RefundFailureInput) -> RefundView:
        try:
            record = await self._ledger.record_refund_failed(
                cancellation_id=params.cancellation_id,
                error=f"{params.error} (attempt {params.attempts})",
                event_key=params.event_key,
            )
        except LedgerError as err:
            raise business_error(err) from err
        return record.view

"""Activities that write the ledger. One class, one external system (PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain.errors import CancellationIdMismatch, CancellationNotFound, LedgerError
from domain.models import (
    CancellationStatus,
    CouponDecision,
    CouponInput,
    CouponOutcome,
    EventInput,
    OpenCancellationInput,
    OpenCancellationResult,
    Record,
    RefundFailureInput,
    RefundPolicy,
    RefundRequestInput,
    RefundStage,
    RefundView,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import DEFAULT_ETA_TABLE, cancellation_id, safe_text
from infra.metrics import NO_METRICS, BusinessMetrics, decided_by, failure_reason, seconds_between
from ledger.reports import parked_passes
from ledger.repository import Ledger

log = structlog.get_logger(__name__)


# PostgreSQL refused the data itself (a NUL in a text, a string it cannot encode): retrying
# the same write cannot succeed, so it fails for good with this type instead of for ever.
LEDGER_DATA_REFUSED = "LedgerDataRefused"

# How long a coupon decision waits to learn whether a sibling's workflow still runs (Temporal
# unavailable: the sibling is told, as before).
_DESCRIBE_TIMEOUT = timedelta(seconds=5)


class ApproveInput(Record):
    """`approve_and_request_refund`: the approval (a transition) and the refund it records."""

    transition: TransitionInput
    refund: RefundRequestInput


class CompleteInput(Record):
    """`complete_with_coupon`: the coupon decision and the completion that goes with it."""

    coupon: CouponInput
    transition: TransitionInput


def business_error(err: LedgerError) -> ApplicationError:
    """Ledger refusals are facts, not glitches: retrying cannot change them."""
    return ApplicationError(str(err), type=err.error_type, non_retryable=True)


@contextmanager
def ledger_call() -> Iterator[None]:
    """A ledger write: business refusals and data PostgreSQL refuses (the `DataError` family,
    SQLSTATE class 22, e.g. `CharacterNotInRepertoireError`; or text the driver cannot encode)
    are final, typed and not retried; anything else (a restart, the network) is retried."""
    try:
        yield
    except LedgerError as err:
        raise business_error(err) from err
    except (asyncpg.DataError, UnicodeEncodeError) as err:
        log.warning("ledger_data_refused", error=type(err).__name__)
        raise ApplicationError(
            f"the ledger refused the data: {type(err).__name__}: {safe_text(str(err), 200)}",
            type=LEDGER_DATA_REFUSED,
            non_retryable=True,
        ) from err


class LedgerActivities:
    def __init__(
        self,
        ledger: Ledger,
        *,
        response_window: timedelta,
        timeout_policy: TimeoutPolicy,
        window_floor: timedelta = timedelta(0),
        refund_policy: RefundPolicy,
        eta_table: Mapping[str, tuple[int, int, bool]] = DEFAULT_ETA_TABLE,
        metrics: BusinessMetrics = NO_METRICS,
        client: Client | None = None,
    ) -> None:
        """`client`: to leave out of a coupon decision's `notify` the siblings whose workflow
        has ended (None: every sibling the ledger names is told)."""
        self._ledger = ledger
        self._client = client
        self._metrics = metrics
        self._window = response_window
        self._floor = window_floor
        self._timeout_policy = timeout_policy
        self._refund_policy = refund_policy
        self._eta_table = eta_table

    @activity.defn
    async def open_cancellation(self, params: OpenCancellationInput) -> OpenCancellationResult:
        request = params.request
        with ledger_call():
            if params.cancellation_id != cancellation_id(request.order_id, request.seller_id):
                # One cancellation per sub-order, under its own id, whatever a client started.
                raise CancellationIdMismatch(
                    f"{params.cancellation_id} is not the cancellation of order"
                    f" {request.order_id} / seller {request.seller_id}"
                )
            # R19: the window is the seller's policy (else the default), never below the floor,
            # never the request's; the ledger records it with the deadline.
            snapshot = await self._ledger.open_cancellation(
                cancellation_id=params.cancellation_id,
                request=params.request,
                default_window=self._window,
                floor=self._floor,
                default_policy=self._timeout_policy,
            )
        log.info("cancellation_opened", path=snapshot.path.value)
        self._metrics.cancellation_started(path=snapshot.path.value)
        return OpenCancellationResult(
            path=snapshot.path,
            amount=snapshot.amount,
            payment_method=snapshot.payment_method,
            capture=snapshot.capture,
            response_window=snapshot.response_window or max(self._window, self._floor),
            timeout_policy=snapshot.timeout_policy or self._timeout_policy,
            seller_deadline=snapshot.seller_deadline,
            opened_now=snapshot.opened_now,
            refund_policy=self._refund_policy,
            ledger_status=snapshot.status,
            refund=snapshot.refund,
            coupon=snapshot.coupon,
        )

    @activity.defn
    async def record_transition(self, params: TransitionInput) -> None:
        with ledger_call():
            created_at = await self._ledger.record_transition(params)
        self._transition_recorded(params, created_at)

    def _transition_recorded(self, params: TransitionInput, created_at: datetime) -> None:
        log.info(
            "transition_recorded", status=params.status.value, actor=params.actor, kind=params.kind
        )
        self._observe_transition(params, created_at)

    def _observe_transition(self, params: TransitionInput, created_at: datetime) -> None:
        """Metrics from what the write returned (no read of their own)."""
        if params.status.is_terminal:
            self._metrics.cancellation_ended(status=params.status.value)
        decided = params.status in (CancellationStatus.APPROVED, CancellationStatus.REJECTED)
        if not (decided and self._metrics.enabled):
            return
        # The workflow schedules this write as soon as the decision (or the timer) lands.
        seconds = seconds_between(created_at, _scheduled_time())
        if seconds is not None:
            self._metrics.seller_decided(
                decision=params.status.value, decided_by=decided_by(params.actor), seconds=seconds
            )

    @activity.defn
    async def record_event(self, params: EventInput) -> None:
        with ledger_call():
            await self._ledger.record_event(params)

    @activity.defn
    async def request_refund(self, params: RefundRequestInput) -> RefundView:
        with ledger_call():
            record = await self._ledger.request_refund(
                cancellation_id=params.cancellation_id,
                event_key=params.event_key,
                now=datetime.now(UTC),
                eta_table=self._eta_table,
            )
        _log_requested(record.view)
        return record.view

    @activity.defn
    async def approve_and_request_refund(self, params: ApproveInput) -> RefundView | None:
        """One business step: the approval (sub-order cancelled, audit row) and the refund it
        calls for (dot 1), in one ledger round trip and transaction (migration 014), each
        written once per event key (a retry writes neither twice). None: approved, but the
        ledger refused to record the refund (e.g. RefundLimitExceeded); the workflow then asks
        `request_refund`, which says why, and parks (issue 18). A refusal of the approval
        itself fails the activity, as `record_transition` does."""
        transition = params.transition
        if params.refund.cancellation_id != transition.cancellation_id:
            # Not what the workflow sends; each on its own then, as they name them.
            await self.record_transition(transition)
            try:
                return await self.request_refund(params.refund)
            except ApplicationError as err:
                if not err.non_retryable:
                    raise
                return None
        with ledger_call():
            created_at, record = await self._ledger.approve_and_request_refund(
                transition,
                event_key=params.refund.event_key,
                now=datetime.now(UTC),
                eta_table=self._eta_table,
            )
        self._transition_recorded(transition, created_at)
        if isinstance(record, LedgerError):
            return None
        _log_requested(record.view)
        return record.view

    @activity.defn
    async def complete_with_coupon(self, params: CompleteInput) -> CouponDecision:
        """One business step: the coupon decision (R11) and the completion after it. No coupon
        paid for the sub-order (most orders): both in one ledger round trip and transaction
        (migration 016). A coupon: decided as `restore_coupon` decides, then the completion."""
        coupon, transition = params.coupon, params.transition
        if coupon.again or coupon.cancellation_id != transition.cancellation_id:
            decision = await self.restore_coupon(coupon)
        else:
            with ledger_call():
                decided, created_at = await self._ledger.decide_coupon_and_complete(
                    cancellation_id=coupon.cancellation_id,
                    event_key=coupon.event_key,
                    transition=transition,
                )
            if decided is not None and created_at is not None:
                # No coupon: no sibling to wait on or tell, nothing to read again.
                self._observe_coupon(decided)
                self._transition_recorded(transition, created_at)
                return CouponDecision(outcome=decided, waiting_on=[], notify=[])
            decision = await self._restore_coupon(coupon, decided=decided, decide=decided is None)
        await self.record_transition(transition)
        return decision

    @activity.defn
    async def restore_coupon(self, params: CouponInput) -> CouponDecision:
        """The coupon decision of this refund (made once; called again, it reads it), with the
        siblings it may wait on or concern, and the outcome as it stands after both reads (a
        sibling that restored the coupon meanwhile shows)."""
        return await self._restore_coupon(params, decided=None, decide=not params.again)

    async def _restore_coupon(
        self, params: CouponInput, *, decided: CouponOutcome | None, decide: bool
    ) -> CouponDecision:
        """`restore_coupon`, the decision made now (`decide`) or already read (`decided`)."""
        with ledger_call():
            if decide:
                decided = await self._ledger.decide_coupon(
                    cancellation_id=params.cancellation_id, event_key=params.event_key
                )
            if decided is not None and decided.redemption_id is None:
                # No coupon paid for this sub-order (most orders): no coupon footprint, so no
                # sibling to wait on or tell, and no sibling can change this outcome (two reads
                # fewer).
                self._observe_coupon(decided)
                return CouponDecision(outcome=decided, waiting_on=[], notify=[])
            waiting_on, notify = await self._ledger.coupon_siblings(
                cancellation_id=params.cancellation_id
            )
            now = await self._ledger.coupon_outcome(cancellation_id=params.cancellation_id)
        outcome = now or decided
        if outcome is None:
            missing = CancellationNotFound(f"no coupon decision of {params.cancellation_id}")
            raise business_error(missing)
        if decided is not None:
            self._observe_coupon(decided)
        return CouponDecision(
            outcome=outcome, waiting_on=waiting_on, notify=await self._still_running(notify)
        )

    async def _still_running(self, cancellation_ids: list[str]) -> list[str]:
        """The siblings to tell (signal `coupon_settled`) of a decision already committed: those
        whose workflow still runs. One whose run has ended cannot be told (the signal would fail:
        a wasted command, action and events); it waits for nothing, and any run of it started
        later reads the ledger after this decision. A sibling that ends between this look and the
        signal costs the failed signal, as before; one that cannot be looked at is told."""
        if self._client is None or not cancellation_ids:
            return cancellation_ids
        client = self._client

        async def running(workflow_id: str) -> bool:
            try:
                described = await client.get_workflow_handle(workflow_id).describe(
                    rpc_timeout=_DESCRIBE_TIMEOUT
                )
            except RPCError as err:
                return err.status is not RPCStatusCode.NOT_FOUND
            except Exception:
                return True
            return described.status is WorkflowExecutionStatus.RUNNING

        found = await asyncio.gather(*(running(c) for c in cancellation_ids))
        return [c for c, keep in zip(cancellation_ids, found, strict=True) if keep]

    def _observe_coupon(self, decided: CouponOutcome) -> None:
        log.info("coupon_decided", outcome=decided.outcome.value)
        self._metrics.coupon_decided(outcome=decided.outcome.value)

    @activity.defn
    async def record_refund_failed(self, params: RefundFailureInput) -> RefundView:
        with ledger_call():
            # The pass as `refunds failed` counts it (ledger.reports.PARKED_KINDS, every run
            # of the cancellation, declines and reversals included): one number, not the
            # workflow's count of this run's passes (params.attempts).
            passes = 1 + await parked_passes(
                self._ledger.pool,
                params.cancellation_id,
                excluding_event_key=params.event_key,
            )
            record = await self._ledger.record_refund_failed(
                cancellation_id=params.cancellation_id,
                error=f"{params.error} (pass {passes})",
                event_key=params.event_key,
                final=params.final,
            )
        log.warning("refund_parked", error=params.error, passes=passes)
        self._metrics.refund_parked(reason=failure_reason(params.error))
        return record.view


def _log_requested(refund: RefundView) -> None:
    if refund.stage is RefundStage.REQUESTED:
        # The status change the workflow makes of it (its one log line, see
        # `workflows.order_cancellation._set_status`).
        log.info(
            "refund_requested",
            status=CancellationStatus.REFUND_REQUESTED.value,
            kind=refund.kind.value,
            amount_minor=refund.amount.amount_minor,
            currency=refund.amount.currency,
        )


def _scheduled_time() -> datetime:
    """When Temporal scheduled this activity (now, when called outside an activity)."""
    try:
        return activity.info().scheduled_time
    except RuntimeError:
        return datetime.now(UTC)

"""The cancellation ledger over asyncpg.

Each method is one transaction that makes one state transition and appends its audit row
(R12). Every write is idempotent, because activities retry: rows are keyed so that a second
call finds the first call's work (unique constraints and ON CONFLICT, never check-then-insert).
No method calls the payment provider: intent and result are recorded in separate transactions
around the call (R9).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import asyncpg

from domain.errors import (
    CancellationConflict,
    CancellationNotFound,
    RefundLimitExceeded,
    SubOrderAlreadyCancelled,
    SubOrderNotFound,
)
from domain.models import (
    AuditEntry,
    CancellationPath,
    CancellationReason,
    CancellationStatus,
    CancellationView,
    CaptureState,
    CouponOutcome,
    CouponOutcomeKind,
    EtaRange,
    EventInput,
    Money,
    PaymentMethod,
    Record,
    RefundKind,
    RefundStage,
    RefundView,
    RequestCancellationInput,
    SubOrderStatus,
    TransitionInput,
)
from domain.rules import decide_coupon, refund_eta, refund_idempotency_key, refund_kind


class SubOrderSnapshot(Record):
    """What the cancellation needs to know about the sub-order and its payment."""

    path: CancellationPath
    amount: Money
    payment_method: PaymentMethod
    capture: CaptureState


class RefundRecord(Record):
    """A refund row with what the provider call needs."""

    view: RefundView
    payment_id: str
    method: PaymentMethod


_APPEND_EVENT = """
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
"""

_SET_STATUS = """
    UPDATE cancellations SET status = $2, updated_at = clock_timestamp()
    WHERE cancellation_id = $1
"""

# The cancellation's status follows its refund only when the refund really is in that stage: a
# late or repeated call (e.g. "failed" after "confirmed") must not contradict the refund row.
_SET_STATUS_FROM_REFUND = """
    UPDATE cancellations c SET status = $2, updated_at = clock_timestamp()
    FROM refunds r
    WHERE c.cancellation_id = $1 AND r.cancellation_id = c.cancellation_id AND r.stage = $3
"""


class Ledger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- opening (R1) -----------------------------------------------------------------------

    async def open_cancellation(
        self, *, cancellation_id: str, request: RequestCancellationInput
    ) -> SubOrderSnapshot:
        """Record the request and choose the path in one transaction.

        The sub-order row is locked, so the switch from `unvalidated` to `cancelled` and the
        seller's acceptance (`accept_sub_order`) serialise: the first to commit wins and the
        other sees the new status. Calling again returns the path chosen the first time.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            sub = await conn.fetchrow(
                """
                SELECT s.status, s.cash_minor, p.currency, p.method, p.capture
                FROM sub_orders s JOIN payments p ON p.order_id = s.order_id
                WHERE s.order_id = $1 AND s.seller_id = $2
                FOR UPDATE OF s
                """,
                request.order_id,
                request.seller_id,
            )
            if sub is None:
                raise SubOrderNotFound(
                    f"no sub-order of seller {request.seller_id} in order {request.order_id}"
                )
            other = await conn.fetchrow(
                "SELECT cancellation_id, path FROM cancellations"
                " WHERE order_id = $1 AND seller_id = $2",
                request.order_id,
                request.seller_id,
            )
            if other is not None and other["cancellation_id"] != cancellation_id:
                raise CancellationConflict(
                    f"sub-order {request.order_id}/{request.seller_id} already has cancellation "
                    f"{other['cancellation_id']}"
                )
            existing = other["path"] if other is not None else None
            if existing is None:
                if sub["status"] == SubOrderStatus.CANCELLED:
                    raise SubOrderAlreadyCancelled(
                        f"sub-order {request.order_id}/{request.seller_id} is already cancelled"
                    )
                buyer = await conn.fetchval(
                    "SELECT buyer_id FROM checkout_orders WHERE order_id = $1", request.order_id
                )
                if buyer != request.buyer_id:
                    # Only the buyer of the order may cancel it; a wrong buyer id is a caller
                    # bug, not a reason to reveal whose order it is.
                    raise SubOrderNotFound(
                        f"order {request.order_id} has no sub-order of seller "
                        f"{request.seller_id} for buyer {request.buyer_id}"
                    )
                instant = sub["status"] == SubOrderStatus.UNVALIDATED
                path = CancellationPath.INSTANT if instant else CancellationPath.REQUEST
                if instant:
                    await conn.execute(
                        """
                        UPDATE sub_orders SET status = 'cancelled',
                            status_changed_at = clock_timestamp()
                        WHERE order_id = $1 AND seller_id = $2 AND status = 'unvalidated'
                        """,
                        request.order_id,
                        request.seller_id,
                    )
                await conn.execute(
                    """
                    INSERT INTO cancellations (cancellation_id, order_id, seller_id, buyer_id,
                        reason, fault, reason_text, path, status)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                    """,
                    cancellation_id,
                    request.order_id,
                    request.seller_id,
                    request.buyer_id,
                    request.reason.value,
                    request.reason.fault.value,
                    request.reason_text,
                    path.value,
                    (
                        CancellationStatus.APPROVED
                        if instant
                        else CancellationStatus.AWAITING_SELLER
                    ).value,
                )
                await conn.execute(
                    _APPEND_EVENT,
                    cancellation_id,
                    "000-requested",
                    f"buyer:{request.buyer_id}",
                    "requested",
                    f"reason {request.reason.value} ({request.reason.fault.value} fault)"
                    + (f": {request.reason_text}" if request.reason_text else ""),
                )
                await conn.execute(
                    _APPEND_EVENT,
                    cancellation_id,
                    "001-path",
                    "system",
                    "cancelled_instantly" if instant else "awaiting_seller",
                    "payment not validated yet: cancelled without the seller"
                    if instant
                    else "payment validated: the seller must decide",
                )
            else:
                path = CancellationPath(existing)
            return SubOrderSnapshot(
                path=path,
                amount=Money(amount_minor=sub["cash_minor"], currency=sub["currency"].strip()),
                payment_method=PaymentMethod(sub["method"]),
                capture=CaptureState(sub["capture"]),
            )

    async def accept_sub_order(self, *, order_id: str, seller_id: str) -> bool:
        """The order system's event: payment validated and the seller accepted the order.
        Returns False when the sub-order was no longer `unvalidated` (e.g. cancelled first)."""
        result = await self._pool.execute(
            """
            UPDATE sub_orders SET status = 'accepted', status_changed_at = clock_timestamp()
            WHERE order_id = $1 AND seller_id = $2 AND status = 'unvalidated'
            """,
            order_id,
            seller_id,
        )
        return result == "UPDATE 1"

    # --- transitions ------------------------------------------------------------------------

    async def record_transition(self, transition: TransitionInput) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT order_id, seller_id FROM cancellations WHERE cancellation_id = $1"
                " FOR UPDATE",
                transition.cancellation_id,
            )
            if row is None:
                raise CancellationNotFound(transition.cancellation_id)
            await conn.execute(_SET_STATUS, transition.cancellation_id, transition.status.value)
            if transition.cancel_sub_order:
                await conn.execute(
                    """
                    UPDATE sub_orders SET status = 'cancelled',
                        status_changed_at = clock_timestamp()
                    WHERE order_id = $1 AND seller_id = $2 AND status <> 'cancelled'
                    """,
                    row["order_id"],
                    row["seller_id"],
                )
            await conn.execute(
                _APPEND_EVENT,
                transition.cancellation_id,
                transition.event_key,
                transition.actor,
                transition.kind,
                transition.detail,
            )

    async def record_event(self, event: EventInput) -> None:
        await self._pool.execute(
            _APPEND_EVENT,
            event.cancellation_id,
            event.event_key,
            event.actor,
            event.kind,
            event.detail,
        )

    # --- refunds (R7-R10) -------------------------------------------------------------------

    async def request_refund(
        self,
        *,
        cancellation_id: str,
        event_key: str,
        now: datetime,
        eta_table: Mapping[str, tuple[int, int, bool]],
    ) -> RefundRecord:
        """Record the intent to refund (dot 1) and reserve the amount against the payment.

        The refund's primary key is its idempotency key and `cancellation_id` is unique: a
        second refund for the same cancellation cannot exist. The reservation is checked by
        the payments table's CHECK, so the total can never exceed what was paid.
        """
        key = refund_idempotency_key(cancellation_id)
        async with self._pool.acquire() as conn, conn.transaction():
            sub = await conn.fetchrow(
                """
                SELECT s.cash_minor, p.payment_id, p.currency, p.method, p.capture
                FROM cancellations c
                JOIN sub_orders s ON s.order_id = c.order_id AND s.seller_id = c.seller_id
                JOIN payments p ON p.order_id = c.order_id
                WHERE c.cancellation_id = $1
                FOR UPDATE OF p
                """,
                cancellation_id,
            )
            if sub is None:
                raise CancellationNotFound(cancellation_id)
            # Looked up only once the payment is locked: a concurrent call for the same
            # cancellation has committed its refund by then, and this statement's fresh
            # snapshot (read committed) sees it, so the amount is never reserved twice.
            existing = await self._refund_row(conn, cancellation_id=cancellation_id)
            if existing is not None:
                return existing
            kind = refund_kind(CaptureState(sub["capture"]))
            eta = refund_eta(PaymentMethod(sub["method"]), kind, now, eta_table)
            try:
                await conn.execute(
                    "UPDATE payments SET refunded_minor = refunded_minor + $2"
                    " WHERE payment_id = $1",
                    sub["payment_id"],
                    sub["cash_minor"],
                )
            except asyncpg.CheckViolationError as err:
                raise RefundLimitExceeded(
                    f"refunding {sub['cash_minor']} would exceed payment {sub['payment_id']}"
                ) from err
            await conn.execute(
                """
                INSERT INTO refunds (idempotency_key, cancellation_id, payment_id, kind,
                    amount_minor, currency, stage, eta_earliest, eta_latest)
                VALUES ($1, $2, $3, $4, $5, $6, 'requested', $7, $8)
                """,
                key,
                cancellation_id,
                sub["payment_id"],
                kind.value,
                sub["cash_minor"],
                sub["currency"],
                eta.earliest,
                eta.latest,
            )
            await conn.execute(
                _SET_STATUS, cancellation_id, CancellationStatus.REFUND_REQUESTED.value
            )
            await conn.execute(
                _APPEND_EVENT,
                cancellation_id,
                event_key,
                "system",
                "refund_requested",
                f"{kind.value} of {sub['cash_minor']} {sub['currency'].strip()} requested",
            )
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
            assert record is not None
            return record

    async def get_refund(self, *, cancellation_id: str) -> RefundRecord:
        async with self._pool.acquire() as conn:
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
        if record is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return record

    async def record_refund_submitted(
        self,
        *,
        cancellation_id: str,
        provider_ref: str,
        eta: EtaRange,
        event_key: str,
    ) -> RefundRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE refunds SET stage = 'submitted', provider_ref = $2,
                    submitted_at = clock_timestamp(), eta_earliest = $3, eta_latest = $4,
                    attempts = attempts + 1, last_error = NULL
                WHERE cancellation_id = $1 AND stage IN ('requested', 'failed')
                """,
                cancellation_id,
                provider_ref,
                eta.earliest,
                eta.latest,
            )
            await conn.execute(
                _SET_STATUS_FROM_REFUND,
                cancellation_id,
                CancellationStatus.REFUND_SUBMITTED.value,
                "submitted",
            )
            await conn.execute(
                _APPEND_EVENT,
                cancellation_id,
                event_key,
                "provider",
                "refund_submitted",
                f"accepted by the provider as {provider_ref}",
            )
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
            assert record is not None
            return record

    async def record_refund_confirmed(
        self, *, cancellation_id: str, event_key: str
    ) -> RefundRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE refunds SET stage = 'confirmed', confirmed_at = clock_timestamp(),
                    last_error = NULL
                WHERE cancellation_id = $1 AND stage = 'submitted'
                """,
                cancellation_id,
            )
            await conn.execute(
                _SET_STATUS_FROM_REFUND,
                cancellation_id,
                CancellationStatus.REFUND_CONFIRMED.value,
                "confirmed",
            )
            await conn.execute(
                _APPEND_EVENT,
                cancellation_id,
                event_key,
                "provider",
                "refund_confirmed",
                "the provider confirmed the refund",
            )
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
            assert record is not None
            return record

    async def record_refund_failed(
        self, *, cancellation_id: str, error: str, event_key: str
    ) -> RefundRecord:
        """Park the refund (R10). The reserved amount stays reserved: the money is still owed
        and an operator's retry resumes with the same idempotency key."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE refunds SET stage = 'failed', failed_at = clock_timestamp(),
                    last_error = $2
                WHERE cancellation_id = $1 AND stage <> 'confirmed'
                """,
                cancellation_id,
                error[:2000],
            )
            await conn.execute(
                _SET_STATUS_FROM_REFUND,
                cancellation_id,
                CancellationStatus.REFUND_FAILED.value,
                "failed",
            )
            await conn.execute(
                _APPEND_EVENT,
                cancellation_id,
                event_key,
                "system",
                "refund_failed",
                error[:2000],
            )
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
            assert record is not None
            return record

    async def _refund_row(
        self, conn: asyncpg.Connection, *, cancellation_id: str
    ) -> RefundRecord | None:
        row = await conn.fetchrow(
            """
            SELECT r.*, p.method FROM refunds r JOIN payments p ON p.payment_id = r.payment_id
            WHERE r.cancellation_id = $1
            """,
            cancellation_id,
        )
        if row is None:
            return None
        eta = (
            EtaRange(earliest=row["eta_earliest"], latest=row["eta_latest"])
            if row["eta_earliest"] is not None
            else None
        )
        return RefundRecord(
            payment_id=row["payment_id"],
            method=PaymentMethod(row["method"]),
            view=RefundView(
                idempotency_key=row["idempotency_key"],
                kind=RefundKind(row["kind"]),
                amount=Money(amount_minor=row["amount_minor"], currency=row["currency"].strip()),
                stage=RefundStage(row["stage"]),
                provider_ref=row["provider_ref"],
                eta=eta,
                attempts=row["attempts"],
                last_error=row["last_error"],
            ),
        )

    # --- coupons (R11) ----------------------------------------------------------------------

    async def decide_coupon(self, *, cancellation_id: str, event_key: str) -> CouponOutcome:
        """Decide whether the coupon that paid for this sub-order comes back.

        The redemption row is locked first, so two sibling sub-orders finishing together
        decide one after the other: the second one sees the first one's confirmed refund (read
        committed gives each statement a fresh snapshot taken after the lock was granted), so
        the last one is never missed, and `restored_at IS NULL` in the update makes the
        restoration happen once.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            # A retried attempt that overlaps the first one waits here and reads its decision.
            await conn.execute(
                "SELECT 1 FROM cancellations WHERE cancellation_id = $1 FOR UPDATE",
                cancellation_id,
            )
            previous = await conn.fetchrow(
                "SELECT * FROM coupon_decisions WHERE cancellation_id = $1", cancellation_id
            )
            if previous is not None:
                return _coupon_outcome(previous)
            cancellation = await conn.fetchrow(
                "SELECT order_id, seller_id FROM cancellations WHERE cancellation_id = $1",
                cancellation_id,
            )
            if cancellation is None:
                raise CancellationNotFound(cancellation_id)
            redemption = await conn.fetchrow(
                """
                SELECT r.redemption_id, r.coupon_code, r.expires_at, r.restored_at, r.restored_by
                FROM coupon_footprints f JOIN coupon_redemptions r USING (redemption_id)
                WHERE f.order_id = $1 AND f.seller_id = $2
                FOR UPDATE OF r
                """,
                cancellation["order_id"],
                cancellation["seller_id"],
            )
            now = await conn.fetchval("SELECT clock_timestamp()")
            if redemption is None:
                outcome = decide_coupon(
                    redemption_id=None, footprint_fully_refunded={}, expires_at=None, now=now
                )
                performed = False
            else:
                footprint = await conn.fetch(
                    """
                    SELECT f.seller_id,
                           (s.status = 'cancelled' AND rf.stage = 'confirmed'
                            AND rf.amount_minor = s.cash_minor) AS fully_refunded
                    FROM coupon_footprints f
                    JOIN sub_orders s ON s.order_id = f.order_id AND s.seller_id = f.seller_id
                    LEFT JOIN cancellations c
                        ON c.order_id = f.order_id AND c.seller_id = f.seller_id
                    LEFT JOIN refunds rf ON rf.cancellation_id = c.cancellation_id
                    WHERE f.redemption_id = $1
                    """,
                    redemption["redemption_id"],
                )
                outcome = decide_coupon(
                    redemption_id=redemption["redemption_id"],
                    footprint_fully_refunded={
                        r["seller_id"]: bool(r["fully_refunded"]) for r in footprint
                    },
                    expires_at=redemption["expires_at"],
                    now=now,
                )
                performed = False
                if outcome.outcome is CouponOutcomeKind.RESTORED:
                    if redemption["restored_at"] is None:
                        await conn.execute(
                            "UPDATE coupon_redemptions SET restored_at = $2, restored_by = $3"
                            " WHERE redemption_id = $1 AND restored_at IS NULL",
                            redemption["redemption_id"],
                            now,
                            cancellation_id,
                        )
                        performed = True
                        # Siblings that decided earlier said "partial_refund"; their stories
                        # get the ending too (R12).
                        await conn.execute(
                            """
                            INSERT INTO cancellation_events (cancellation_id, event_key, actor,
                                kind, detail)
                            SELECT d.cancellation_id, 'coupon-restored-by-' || $2, 'system',
                                   'coupon_restored', 'coupon ' || $3 || ' given back when '
                                   || $2 || ' finished'
                            FROM coupon_decisions d
                            WHERE d.redemption_id = $1 AND d.cancellation_id <> $2
                            ON CONFLICT (cancellation_id, event_key) DO NOTHING
                            """,
                            redemption["redemption_id"],
                            cancellation_id,
                            redemption["coupon_code"],
                        )
                    else:
                        outcome = outcome.model_copy(
                            update={
                                "reason": outcome.reason
                                + f" (given back when {redemption['restored_by']} finished)"
                            }
                        )
            await conn.execute(
                """
                INSERT INTO coupon_decisions (cancellation_id, redemption_id, outcome, reason,
                    active_sub_orders, performed_restore, decided_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                """,
                cancellation_id,
                outcome.redemption_id,
                outcome.outcome.value,
                outcome.reason,
                outcome.active_sub_orders,
                performed,
                now,
            )
            await conn.execute(
                _APPEND_EVENT,
                cancellation_id,
                event_key,
                "system",
                f"coupon_{outcome.outcome.value}",
                outcome.reason,
            )
            return outcome

    # --- reading ----------------------------------------------------------------------------

    async def audit_trail(self, *, cancellation_id: str) -> list[AuditEntry]:
        rows = await self._pool.fetch(
            "SELECT at, actor, kind, detail FROM cancellation_events"
            " WHERE cancellation_id = $1 ORDER BY event_id",
            cancellation_id,
        )
        return [AuditEntry(**dict(r)) for r in rows]

    async def coupon_outcome(self, *, cancellation_id: str) -> CouponOutcome | None:
        """The coupon outcome as the buyer should see it now (None before it is decided)."""
        row = await self._pool.fetchrow(
            """
            SELECT d.*, r.restored_by
            FROM coupon_decisions d
            LEFT JOIN coupon_redemptions r USING (redemption_id)
            WHERE d.cancellation_id = $1
            """,
            cancellation_id,
        )
        return _coupon_outcome(row) if row is not None else None

    async def view(self, *, cancellation_id: str) -> CancellationView:
        """The full story of one cancellation, from the ledger alone."""
        row = await self._pool.fetchrow(
            "SELECT * FROM cancellations WHERE cancellation_id = $1", cancellation_id
        )
        if row is None:
            raise CancellationNotFound(f"no cancellation {cancellation_id}")
        async with self._pool.acquire() as conn:
            refund = await self._refund_row(conn, cancellation_id=cancellation_id)
        coupon = await self.coupon_outcome(cancellation_id=cancellation_id)
        return CancellationView(
            cancellation_id=cancellation_id,
            order_id=row["order_id"],
            seller_id=row["seller_id"],
            buyer_id=row["buyer_id"],
            reason=CancellationReason(row["reason"]),
            path=CancellationPath(row["path"]),
            status=CancellationStatus(row["status"]),
            refund=refund.view if refund else None,
            coupon=coupon,
            last_error=refund.view.last_error if refund else None,
            audit=await self.audit_trail(cancellation_id=cancellation_id),
        )


def _coupon_outcome(row: asyncpg.Record) -> CouponOutcome:
    """The decision as recorded; when read with the redemption's current state, a coupon that a
    sibling restored later is shown as restored (the decision itself stays as it was made)."""
    restored_by = row.get("restored_by")
    if row["outcome"] == CouponOutcomeKind.PARTIAL_REFUND and restored_by:
        return CouponOutcome(
            outcome=CouponOutcomeKind.RESTORED,
            reason=f"given back when {restored_by} finished (when this cancellation finished:"
            f" {row['reason']})",
            redemption_id=row["redemption_id"],
        )
    return CouponOutcome(
        outcome=CouponOutcomeKind(row["outcome"]),
        reason=row["reason"],
        redemption_id=row["redemption_id"],
        active_sub_orders=list(row["active_sub_orders"]),
    )

"""The cancellation ledger over asyncpg.

Each method is one transaction that makes one state transition and appends its audit row
(R12). Every write is idempotent, because activities retry: rows are keyed so that a second
call finds the first call's work (unique constraints and ON CONFLICT, never check-then-insert).
No method calls the payment provider: intent and result are recorded in separate transactions
around the call (R9).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from domain.errors import (
    CancellationConflict,
    CancellationNotFound,
    LedgerError,
    RefundLimitExceeded,
    RefundWouldRepeatRefusal,
    SubOrderAlreadyCancelled,
    SubOrderAlreadyShipped,
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
    PaymentAmounts,
    PaymentEvent,
    PaymentMethod,
    Record,
    RefundDot,
    RefundKind,
    RefundStage,
    RefundView,
    RequestCancellationInput,
    TimeoutPolicy,
    TransitionInput,
)
from domain.rules import (
    decide_coupon,
    messages_of,
    refund_dots,
    refund_eta,
    repeated_refusal,
)

# A cancellation whose refund is on its way: its coupon decision is still to come (R11).
_REFUNDING = (
    CancellationStatus.APPROVED,
    CancellationStatus.REFUND_REQUESTED,
    CancellationStatus.REFUND_SUBMITTED,
    CancellationStatus.REFUND_CONFIRMED,
    CancellationStatus.REFUND_FAILED,
)


class SubOrderSnapshot(Record):
    """What the cancellation needs to know about the sub-order and its payment."""

    path: CancellationPath
    amount: Money
    payment_method: PaymentMethod
    capture: CaptureState
    # Where the cancellation stands in the ledger (a later run of an ended one resumes there).
    status: CancellationStatus
    refund: RefundView | None = None
    # A completed cancellation's coupon outcome: a later run reports it, never decides again.
    coupon: CouponOutcome | None = None
    # R19, as recorded when the cancellation opened (None: opened before migration 008).
    response_window: timedelta | None = None
    timeout_policy: TimeoutPolicy | None = None
    seller_deadline: datetime | None = None
    # This call created the cancellation (False: it existed already).
    opened_now: bool = False


class RefundRecord(Record):
    """A refund row with what the provider call needs, and when it reached each stage (ledger
    clock; for the duration metrics, so that they need no read of their own)."""

    view: RefundView
    payment_id: str
    method: PaymentMethod
    requested_at: datetime | None = None
    submitted_at: datetime | None = None
    confirmed_at: datetime | None = None


_APPEND_EVENT = """
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
"""

_SET_STATUS = """
    UPDATE cancellations SET status = $2, updated_at = clock_timestamp()
    WHERE cancellation_id = $1
"""

# Stage transitions are single statements of data-modifying CTEs: one round trip, and still one
# transaction with its audit row (PostgreSQL runs one statement atomically, as a transaction of
# its own; all its parts commit or none). An `UPDATE` takes the same row lock a `SELECT ... FOR
# UPDATE` took, and under read committed it re-checks its condition on the newest version of a
# row it had to wait for. The parts of one statement share one snapshot and do not see each
# other's changes: each reads what an earlier part changed from that part's `RETURNING`, never
# from the table. A part that must not run when there is nothing to transition is guarded by
# `EXISTS` on the part it depends on, so a refused call writes nothing.

# $1 cancellation, $2 status, $3 cancel the sub-order too, $4 event key, $5 actor, $6 kind,
# $7 detail. Returns the cancellation's creation time (no row: unknown cancellation).
_TRANSITION = """
WITH c AS (
    UPDATE cancellations SET status = $2, updated_at = clock_timestamp()
    WHERE cancellation_id = $1
    RETURNING order_id, seller_id, created_at
), s AS (
    UPDATE sub_orders so SET status = 'cancelled', status_changed_at = clock_timestamp()
    FROM c
    WHERE $3 AND so.order_id = c.order_id AND so.seller_id = c.seller_id
      AND so.status <> 'cancelled'
), e AS (
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    SELECT $1, $4, $5, $6, $7 FROM c
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
)
SELECT created_at FROM c
"""

# The refund as it stands after `upd` (a refund update spliced in, `RETURNING *`): the updated
# row, or, when the update matched nothing (a repeated or late call), the rows as they are now.
# `FOR SHARE` makes that read wait for, and then see, a concurrent transition of the same refund
# that made `upd` skip its row (a plain read would return the statement's older snapshot), as
# the re-read after the lock did when this was several statements. The newest generation is
# the one that counts (the live one, if any).
_REFUND_AFTER = """
), unchanged AS (
    SELECT r.* FROM refunds r
    WHERE r.cancellation_id = $1 AND NOT EXISTS (SELECT 1 FROM upd)
    FOR SHARE
), cur AS (
    SELECT * FROM upd
    UNION ALL
    SELECT * FROM unchanged
"""
_REFUND_RESULT = """
SELECT cur.*, p.method FROM cur JOIN payments p ON p.payment_id = cur.payment_id
ORDER BY cur.generation DESC
LIMIT 1
"""

# Submitted / confirmed. $1 cancellation, $2 cancellation status, $3 the refund stage it needs,
# $4 event key, $5 actor, $6 kind, $7 detail, then the update's own parameters. The
# cancellation's status follows its refund only when the refund really is in that stage: a late
# or repeated call (e.g. "submitted" after "confirmed") must not contradict the refund row. The
# audit row is written when the cancellation has a refund (no refund: nothing is written).
_REFUND_STAGE = (
    "WITH upd AS ({update} RETURNING *"
    + _REFUND_AFTER
    + """
), st AS (
    UPDATE cancellations c SET status = $2, updated_at = clock_timestamp()
    WHERE c.cancellation_id = $1 AND EXISTS (SELECT 1 FROM cur WHERE cur.stage = $3)
), ev AS (
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    SELECT $1, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM cur)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
)"""
    + _REFUND_RESULT
)

_REFUND_SUBMITTED = _REFUND_STAGE.format(
    update="""
    UPDATE refunds SET stage = 'submitted', provider_ref = $8,
        submitted_at = clock_timestamp(), eta_earliest = $9, eta_latest = $10,
        attempts = attempts + 1, last_error = NULL
    WHERE cancellation_id = $1 AND stage IN ('requested', 'failed')
    """
)

_REFUND_CONFIRMED = _REFUND_STAGE.format(
    update="""
    UPDATE refunds SET stage = 'confirmed', confirmed_at = clock_timestamp(),
        last_error = NULL
    WHERE cancellation_id = $1 AND stage = 'submitted'
    """
)

# Parking (R10). $1 cancellation, $2 the refund's new stage (failed / declined), $3 the error,
# $4 release the reservation (declined), $5 the cancellation's status, $6 event key, $7 kind.
# Only a live refund that has not been confirmed is parked; the audit row is written whenever
# the cancellation has a refund (a late report is still part of the story).
_REFUND_FAILED = (
    """
WITH upd AS (
    UPDATE refunds SET stage = $2, failed_at = clock_timestamp(), last_error = $3
    WHERE cancellation_id = $1 AND stage NOT IN ('confirmed', 'declined', 'reversed')
    RETURNING *
), pay AS (
    UPDATE payments p SET refunded_minor = p.refunded_minor - upd.amount_minor,
        released_minor = p.released_minor
            - CASE WHEN upd.kind = 'void' THEN upd.amount_minor ELSE 0 END
    FROM upd
    WHERE $4 AND p.payment_id = upd.payment_id
), st AS (
    UPDATE cancellations SET status = $5, updated_at = clock_timestamp()
    WHERE cancellation_id = $1 AND EXISTS (SELECT 1 FROM upd)"""
    + _REFUND_AFTER
    + """
), ev AS (
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    SELECT $1, $6, 'system', $7, $3 WHERE EXISTS (SELECT 1 FROM cur)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
)"""
    + _REFUND_RESULT
)

# What the views (one cancellation, the list, the buyer's order view) read beside the
# cancellation's row `c`: why it was rejected and by whom (the `rejected` audit row), and when
# it last changed, the coupon outcome included: a decision, its supersession, or a sibling's
# later restoration of the coupon (GREATEST ignores the NULLs).
VIEW_EXTRAS_COLUMNS = """
    rej.detail AS decision_reason, rej.actor AS decided_by,
    GREATEST(c.updated_at, cd.decided_at, cd.superseded_at, cr.restored_at) AS changed_at
"""
VIEW_EXTRAS_JOINS = """
    LEFT JOIN LATERAL (
        SELECT e.detail, e.actor FROM cancellation_events e
        WHERE e.cancellation_id = c.cancellation_id AND e.kind = 'rejected'
        ORDER BY e.event_id DESC LIMIT 1
    ) rej ON true
    LEFT JOIN LATERAL (
        SELECT d.decided_at, d.superseded_at, d.redemption_id FROM coupon_decisions d
        WHERE d.cancellation_id = c.cancellation_id
        ORDER BY d.round DESC LIMIT 1
    ) cd ON true
    LEFT JOIN coupon_redemptions cr ON cr.redemption_id = cd.redemption_id
"""


class Ledger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    # --- opening (R1) -----------------------------------------------------------------------

    async def open_cancellation(
        self,
        *,
        cancellation_id: str,
        request: RequestCancellationInput,
        default_window: timedelta = timedelta(hours=48),
        floor: timedelta = timedelta(0),
        default_policy: TimeoutPolicy = TimeoutPolicy.AUTO_APPROVE,
    ) -> SubOrderSnapshot:
        """Record the request and choose the path in one transaction, one round trip (the
        function of migration 005).

        The sub-order row is locked, so the switch from `unvalidated` to `cancelled` and the
        seller's acceptance (`accept_sub_order`) serialise: the first to commit wins and the
        other sees the new status. Calling again returns the path chosen the first time.
        """
        reason = request.reason
        row = await self._pool.fetchrow(
            "SELECT * FROM ledger_open_cancellation($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            cancellation_id,
            request.order_id,
            request.seller_id,
            request.buyer_id,
            reason.value,
            reason.fault.value,
            request.reason_text,
            f"reason {reason.value} ({reason.fault.value} fault)"
            + (f": {request.reason_text}" if request.reason_text else ""),
            default_window,
            floor,
            default_policy.value,
        )
        assert row is not None  # the function always returns one row
        sub_order = f"{request.order_id}/{request.seller_id}"
        coupon: CouponOutcome | None = None
        match row["outcome"]:
            case "not_found":
                raise SubOrderNotFound(
                    f"no sub-order of seller {request.seller_id} in order {request.order_id}"
                )
            case "conflict":
                raise CancellationConflict(
                    f"sub-order {sub_order} already has cancellation {row['other_cancellation_id']}"
                )
            case "already_cancelled":
                raise SubOrderAlreadyCancelled(f"sub-order {sub_order} is already cancelled")
            case "already_shipped":
                # R14: the buyer goes through a return or a dispute instead.
                raise SubOrderAlreadyShipped(
                    f"sub-order {sub_order} has shipped: it cannot be cancelled (a return or a"
                    " dispute can)"
                )
            case "wrong_buyer":
                # Only the buyer of the order may cancel it; a wrong buyer id is a caller bug,
                # not a reason to reveal whose order it is.
                raise SubOrderNotFound(
                    f"order {request.order_id} has no sub-order of seller "
                    f"{request.seller_id} for buyer {request.buyer_id}"
                )
            case "opened":
                # Just created under the sub-order's lock: no refund can reference it yet.
                view = None
            case "existing":
                async with self._pool.acquire() as conn:
                    buyer = await conn.fetchval(
                        "SELECT buyer_id FROM cancellations WHERE cancellation_id = $1",
                        cancellation_id,
                    )
                    if buyer != request.buyer_id:
                        # Another buyer cannot adopt the cancellation (whatever a client
                        # started): the same answer as for a sub-order that is not theirs.
                        raise SubOrderNotFound(
                            f"order {request.order_id} has no sub-order of seller "
                            f"{request.seller_id} for buyer {request.buyer_id}"
                        )
                    refund = await self._refund_row(conn, cancellation_id=cancellation_id)
                view = refund.view if refund is not None else None
                if row["status"] == CancellationStatus.COMPLETED.value:
                    coupon = await self.coupon_outcome(cancellation_id=cancellation_id)
            case other:
                raise AssertionError(f"unknown outcome {other!r} of ledger_open_cancellation")
        return SubOrderSnapshot(
            path=CancellationPath(row["path"]),
            amount=Money(amount_minor=row["cash_minor"], currency=row["currency"].strip()),
            payment_method=PaymentMethod(row["method"]),
            capture=CaptureState(row["capture"]),
            status=CancellationStatus(row["status"]),
            refund=view,
            coupon=coupon,
            response_window=row["response_window"],
            timeout_policy=TimeoutPolicy(row["timeout_policy"]) if row["timeout_policy"] else None,
            seller_deadline=row["seller_deadline"],
            opened_now=row["outcome"] == "opened",
        )

    async def sub_order_amount(
        self, *, order_id: str, seller_id: str
    ) -> tuple[Money, PaymentMethod] | None:
        """The cash paid for a sub-order and how, for one-line summaries (None: unknown)."""
        row = await self._pool.fetchrow(
            """
            SELECT s.cash_minor, p.currency, p.method
            FROM sub_orders s JOIN payments p ON p.order_id = s.order_id
            WHERE s.order_id = $1 AND s.seller_id = $2
            """,
            order_id,
            seller_id,
        )
        if row is None:
            return None
        money = Money(amount_minor=row["cash_minor"], currency=row["currency"].strip())
        return money, PaymentMethod(row["method"])

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

    async def record_transition(self, transition: TransitionInput) -> datetime:
        """One stage of the cancellation, with its audit row, in one statement: the status, the
        sub-order cancelled when the transition says so, the audit row once per event key.
        Returns when the cancellation was created (for the seller-decision metric)."""
        created_at: datetime | None = await self._pool.fetchval(
            _TRANSITION,
            transition.cancellation_id,
            *_transition_args(transition),
        )
        if created_at is None:
            raise CancellationNotFound(transition.cancellation_id)
        return created_at

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

        The refund's primary key is its idempotency key, and a cancellation has at most one
        live (not reversed) refund: a second one cannot exist. The reservation is checked by
        the payments table's CHECK, so the total can never exceed what was paid. After a
        reversal the next call makes the next generation, with a key of its own. One round
        trip (the function of migration 014): the payment locked, the live refund looked up
        under that lock, the reservation, the refund, the status and the audit row.
        """
        _, record = await self._request_refund(
            cancellation_id=cancellation_id, event_key=event_key, now=now, eta_table=eta_table
        )
        return record

    async def approve_and_request_refund(
        self,
        transition: TransitionInput,
        *,
        event_key: str,
        now: datetime,
        eta_table: Mapping[str, tuple[int, int, bool]],
    ) -> tuple[datetime, RefundRecord | LedgerError]:
        """The approval (`record_transition`) and the refund it calls for (`request_refund`) in
        one round trip and one transaction. Returns when the cancellation was created (for the
        seller-decision metric) and the refund, or why the ledger refused to record it: the
        approval is recorded all the same. A refusal of the transition itself (an unknown
        cancellation) raises, and nothing is written."""
        try:
            return await self._request_refund(
                cancellation_id=transition.cancellation_id,
                event_key=event_key,
                now=now,
                eta_table=eta_table,
                transition=transition,
            )
        except _RefusedAfterTransition as refused:
            return refused.created_at, refused.error

    async def _request_refund(
        self,
        *,
        cancellation_id: str,
        event_key: str,
        now: datetime,
        eta_table: Mapping[str, tuple[int, int, bool]],
        transition: TransitionInput | None = None,
    ) -> tuple[datetime, RefundRecord]:
        """`ledger_request_refund` (migration 014): one statement, one round trip. A declined
        newest refund is checked here (`_refuse_a_repeat`, issue 18) and the function called
        again with its generation checked (a second round trip, only after a decline)."""
        keys, earliest, latest = _eta_choices(now, eta_table)
        checked: int | None = None
        created_at: datetime | None = None
        while True:
            row = await self._pool.fetchrow(
                "SELECT * FROM ledger_request_refund("
                "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                cancellation_id,
                event_key,
                CancellationStatus.REFUND_REQUESTED.value,
                keys,
                earliest,
                latest,
                checked,
                *_transition_args(transition),
            )
            assert row is not None  # the function always returns one row
            created_at = created_at or row["created_at"]
            try:
                match row["outcome"]:
                    case "requested" | "existing":
                        return created_at or now, _refund_record(row)
                    case "not_found":
                        raise CancellationNotFound(cancellation_id)
                    case "limit_exceeded":
                        amount = Money(amount_minor=row["cash_minor"], currency=row["pay_currency"])
                        raise RefundLimitExceeded(
                            f"refunding {amount} would exceed payment {row['pay_payment_id']}"
                        )
                    case "declined":
                        declined = _refund_record(row)
                        _refuse_a_repeat(declined, RefundKind(row["next_kind"]), row["cash_minor"])
                        # It may go through: again, past this declined generation (the
                        # transition, if any, is recorded).
                        checked = declined.view.generation
                        transition = None
                    case other:
                        raise AssertionError(f"unknown outcome {other!r} of ledger_request_refund")
            except LedgerError as err:
                if created_at is not None and not isinstance(err, CancellationNotFound):
                    raise _RefusedAfterTransition(created_at, err) from err
                raise

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
        row = await self._pool.fetchrow(
            _REFUND_SUBMITTED,
            cancellation_id,
            CancellationStatus.REFUND_SUBMITTED.value,
            RefundStage.SUBMITTED.value,
            event_key,
            "provider",
            "refund_submitted",
            _submitted_detail(provider_ref),
            provider_ref,
            eta.earliest,
            eta.latest,
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _refund_record(row)

    async def record_refund_submitted_and_confirmed(
        self,
        *,
        cancellation_id: str,
        provider_ref: str,
        eta: EtaRange,
        event_key: str,
        confirm_event_key: str,
    ) -> tuple[RefundRecord, RefundStage]:
        """`record_refund_submitted`, then `record_refund_confirmed` when the refund was left
        `submitted` by it, in one round trip and one transaction (migration 015), each with its
        audit row once per its event key. For a refund the provider settled when it was created.
        Returns the refund as it stands and the stage the submission left it in."""
        row = await self._pool.fetchrow(
            "SELECT * FROM ledger_refund_submitted_and_confirmed($1, $2, $3, $4, $5, $6, $7)",
            cancellation_id,
            provider_ref,
            eta.earliest,
            eta.latest,
            event_key,
            _submitted_detail(provider_ref),
            confirm_event_key,
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _refund_record(row), RefundStage(row["submitted_stage"])

    async def count_provider_call(self, *, idempotency_key: str) -> int | None:
        """A call to create this refund that the provider failed or refused: `attempts` counts
        every call to create the refund (a submission that took counts in
        `record_refund_submitted`). None when the refund is no longer waiting to be submitted
        (nothing to count)."""
        attempts: int | None = await self._pool.fetchval(
            "UPDATE refunds SET attempts = attempts + 1"
            " WHERE idempotency_key = $1 AND stage IN ('requested', 'failed')"
            " RETURNING attempts",
            idempotency_key,
        )
        return attempts

    async def record_refund_confirmed(
        self, *, cancellation_id: str, event_key: str
    ) -> RefundRecord:
        row = await self._pool.fetchrow(
            _REFUND_CONFIRMED,
            cancellation_id,
            CancellationStatus.REFUND_CONFIRMED.value,
            RefundStage.CONFIRMED.value,
            event_key,
            "provider",
            "refund_confirmed",
            "the provider confirmed the refund",
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _refund_record(row)

    async def record_refund_failed(
        self, *, cancellation_id: str, error: str, event_key: str, final: bool = False
    ) -> RefundRecord:
        """Park the refund (R10). A transient failure keeps the amount reserved: the money is
        still owed and an operator's retry resumes with the same idempotency key. A final one
        (`final`: the provider refused for good) makes the refund `declined`, dead under its
        key: its reservation is released and the retry makes the next generation."""
        row = await self._pool.fetchrow(
            _REFUND_FAILED,
            cancellation_id,
            RefundStage.DECLINED.value if final else RefundStage.FAILED.value,
            error[:2000],
            final,
            CancellationStatus.REFUND_FAILED.value,
            event_key,
            "refund_declined" if final else "refund_failed",
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _refund_record(row)

    async def _refund_row(
        self, conn: asyncpg.Connection, *, cancellation_id: str
    ) -> RefundRecord | None:
        row = await conn.fetchrow(
            """
            SELECT r.*, p.method FROM refunds r JOIN payments p ON p.payment_id = r.payment_id
            WHERE r.cancellation_id = $1
            ORDER BY r.generation DESC
            LIMIT 1
            """,
            cancellation_id,
        )
        return _refund_record(row) if row is not None else None

    async def reverse_refund(
        self, *, cancellation_id: str, failure: str, event_key: str
    ) -> RefundRecord:
        """The provider confirmed the refund, then reports it failed (R7): the money did not
        reach the buyer after all. In one transaction the refund becomes `reversed` (its
        reservation released, so the next generation can reserve it again), the cancellation
        parks in `refund_failed`, and the coupon decision is re-evaluated: a coupon given back
        because this sub-order counted as fully refunded is taken back, on every cancellation
        of its footprint's story. Calling it again changes nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                SELECT r.idempotency_key, r.amount_minor, r.payment_id, r.stage, r.generation,
                    r.kind
                FROM refunds r
                WHERE r.cancellation_id = $1 AND r.stage NOT IN ('declined', 'reversed')
                FOR UPDATE
                """,
                cancellation_id,
            )
            if row is not None and row["stage"] == RefundStage.CONFIRMED:
                await conn.execute(
                    "SELECT 1 FROM payments WHERE payment_id = $1 FOR UPDATE", row["payment_id"]
                )
                await conn.execute(
                    """
                    UPDATE refunds SET stage = 'reversed', reversed_at = clock_timestamp(),
                        last_error = $2
                    WHERE idempotency_key = $1
                    """,
                    row["idempotency_key"],
                    failure[:2000],
                )
                await conn.execute(
                    "UPDATE payments SET refunded_minor = refunded_minor - $2,"
                    " released_minor = released_minor - CASE WHEN $3 THEN $2 ELSE 0 END"
                    " WHERE payment_id = $1",
                    row["payment_id"],
                    row["amount_minor"],
                    row["kind"] == RefundKind.VOID.value,
                )
                await conn.execute(
                    _SET_STATUS, cancellation_id, CancellationStatus.REFUND_FAILED.value
                )
                await conn.execute(
                    _APPEND_EVENT,
                    cancellation_id,
                    event_key,
                    "provider",
                    "refund_reversed",
                    failure[:2000],
                )
                await self._revoke_coupon(
                    conn, cancellation_id=cancellation_id, generation=row["generation"]
                )
            record = await self._refund_row(conn, cancellation_id=cancellation_id)
            if record is None:
                raise CancellationNotFound(f"no refund for {cancellation_id}")
            return record

    async def _revoke_coupon(
        self, conn: asyncpg.Connection, *, cancellation_id: str, generation: int
    ) -> None:
        redemption = await conn.fetchrow(
            """
            SELECT r.redemption_id, r.coupon_code, r.restored_at
            FROM cancellations c
            JOIN coupon_footprints f ON f.order_id = c.order_id AND f.seller_id = c.seller_id
            JOIN coupon_redemptions r USING (redemption_id)
            WHERE c.cancellation_id = $1
            FOR UPDATE OF r
            """,
            cancellation_id,
        )
        now = await conn.fetchval("SELECT clock_timestamp()")
        # This cancellation's decision followed a refund that no longer holds.
        await conn.execute(
            "UPDATE coupon_decisions SET superseded_at = $2"
            " WHERE cancellation_id = $1 AND superseded_at IS NULL",
            cancellation_id,
            now,
        )
        if redemption is None or redemption["restored_at"] is None:
            return
        await conn.execute(
            "UPDATE coupon_redemptions SET restored_at = NULL, restored_by = NULL"
            " WHERE redemption_id = $1",
            redemption["redemption_id"],
        )
        await conn.execute(
            "UPDATE coupon_decisions SET superseded_at = $2"
            " WHERE redemption_id = $1 AND superseded_at IS NULL",
            redemption["redemption_id"],
            now,
        )
        await conn.execute(
            """
            INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
            SELECT c.cancellation_id, 'coupon-revoked-' || $2 || '-g' || ($3::int)::text, 'system',
                   'coupon_revoked',
                   'coupon ' || $4 || ' taken back: the refund of ' || $2 || ' was reversed'
            FROM coupon_footprints f
            JOIN cancellations c ON c.order_id = f.order_id AND c.seller_id = f.seller_id
            WHERE f.redemption_id = $1
            ON CONFLICT (cancellation_id, event_key) DO NOTHING
            """,
            redemption["redemption_id"],
            cancellation_id,
            generation,
            redemption["coupon_code"],
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
            # NO KEY UPDATE, not UPDATE: a reversal of a sibling holds the redemption and then
            # writes this cancellation's `coupon_revoked` row, whose foreign key check takes KEY
            # SHARE on this row; FOR UPDATE would block it while this waits for the redemption
            # (a deadlock). NO KEY UPDATE still serialises two attempts of this decision.
            cancellation = await conn.fetchrow(
                "SELECT order_id, seller_id FROM cancellations WHERE cancellation_id = $1"
                " FOR NO KEY UPDATE",
                cancellation_id,
            )
            if cancellation is None:
                raise CancellationNotFound(cancellation_id)
            # One decision per refund generation: after a reversal, the retried refund's
            # coupon is decided again. The round and its decision, if made, in one statement
            # run after the lock above was granted.
            state = await conn.fetchrow(
                """
                WITH r AS (
                    SELECT coalesce(max(generation), 1) AS decision_round
                    FROM refunds WHERE cancellation_id = $1
                )
                SELECT r.decision_round, clock_timestamp() AS read_at, d.*
                FROM r LEFT JOIN coupon_decisions d
                    ON d.cancellation_id = $1 AND d.round = r.decision_round
                """,
                cancellation_id,
            )
            round_ = state["decision_round"]
            if state["cancellation_id"] is not None:
                return _coupon_outcome(state)
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
            # Without a coupon nothing depends on the moment; with one, it is read after the
            # redemption's lock was granted (below), so siblings decide in the order they lock.
            now = state["read_at"]
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
                            AND rf.amount_minor = s.cash_minor) AS fully_refunded,
                           clock_timestamp() AS read_at
                    FROM coupon_footprints f
                    JOIN sub_orders s ON s.order_id = f.order_id AND s.seller_id = f.seller_id
                    LEFT JOIN cancellations c
                        ON c.order_id = f.order_id AND c.seller_id = f.seller_id
                    LEFT JOIN refunds rf
                        ON rf.cancellation_id = c.cancellation_id
                        AND rf.stage NOT IN ('declined', 'reversed')
                    WHERE f.redemption_id = $1
                    """,
                    redemption["redemption_id"],
                )
                if footprint:
                    now = footprint[0]["read_at"]
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
                            SELECT DISTINCT d.cancellation_id,
                                   'coupon-restored-by-' || $2 || '-r' || ($4::int)::text, 'system',
                                   'coupon_restored', 'coupon ' || $3 || ' given back when '
                                   || $2 || ' finished'
                            FROM coupon_decisions d
                            WHERE d.redemption_id = $1 AND d.cancellation_id <> $2
                            ON CONFLICT (cancellation_id, event_key) DO NOTHING
                            """,
                            redemption["redemption_id"],
                            cancellation_id,
                            redemption["coupon_code"],
                            round_,
                        )
                    else:
                        outcome = outcome.model_copy(
                            update={
                                "reason": outcome.reason
                                + f" (given back when {redemption['restored_by']} finished)"
                            }
                        )
            # The decision and its audit row in one statement (one round trip).
            await conn.execute(
                """
                WITH decision AS (
                    INSERT INTO coupon_decisions (cancellation_id, redemption_id, outcome,
                        reason, active_sub_orders, performed_restore, decided_at, round)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                )
                INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
                VALUES ($1, $9, 'system', $10, $4)
                ON CONFLICT (cancellation_id, event_key) DO NOTHING
                """,
                cancellation_id,
                outcome.redemption_id,
                outcome.outcome.value,
                outcome.reason,
                outcome.active_sub_orders,
                performed,
                now,
                round_,
                event_key,
                f"coupon_{outcome.outcome.value}",
            )
            return outcome

    async def decide_coupon_and_complete(
        self, *, cancellation_id: str, event_key: str, transition: TransitionInput
    ) -> tuple[CouponOutcome | None, datetime | None]:
        """The coupon decision of a sub-order no coupon paid for and the transition after it
        (the completion), in one round trip and one transaction (migration 016), each audit row
        once per its event key. Returns the decision (None: a coupon paid for the sub-order and
        it is not decided yet; `decide_coupon` decides it, nothing was written) and, when the
        transition was written, the cancellation's creation time (None: a coupon decision,
        whose siblings are read before the transition)."""
        no_coupon = decide_coupon(
            redemption_id=None, footprint_fully_refunded={}, expires_at=None, now=datetime.now(UTC)
        )
        row = await self._pool.fetchrow(
            "SELECT * FROM ledger_decide_coupon($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            cancellation_id,
            event_key,
            no_coupon.outcome.value,
            no_coupon.reason,
            *_transition_args(transition),
        )
        assert row is not None  # the function always returns one row
        match row["result"]:
            case "not_found":
                raise CancellationNotFound(cancellation_id)
            case "coupon":
                return None, None
            case "decided" | "existing":
                return _coupon_outcome(row), row["created_at"]
            case other:
                raise AssertionError(f"unknown result {other!r} of ledger_decide_coupon")

    async def coupon_siblings(self, *, cancellation_id: str) -> tuple[list[str], list[str]]:
        """The other cancellations of this sub-order's coupon footprint (R11): those whose
        refund is on its way (approved, refunding, or parked) with no coupon decision standing,
        with which the coupon may still come back; and those whose standing decision was
        `partial_refund`, which a decision of this one may concern. Sorted ids."""
        rows = await self._pool.fetch(
            """
            SELECT c.cancellation_id, c.status,
                   bool_or(d.decision_id IS NOT NULL) AS decided,
                   bool_or(d.outcome = 'partial_refund') AS partial
            FROM cancellations me
            JOIN coupon_footprints mine
                ON mine.order_id = me.order_id AND mine.seller_id = me.seller_id
            JOIN coupon_footprints f ON f.redemption_id = mine.redemption_id
            JOIN cancellations c ON c.order_id = f.order_id AND c.seller_id = f.seller_id
            LEFT JOIN coupon_decisions d
                ON d.cancellation_id = c.cancellation_id AND d.superseded_at IS NULL
            WHERE me.cancellation_id = $1 AND c.cancellation_id <> $1
            GROUP BY c.cancellation_id, c.status
            ORDER BY c.cancellation_id
            """,
            cancellation_id,
        )
        refunding = {s.value for s in _REFUNDING}
        waiting_on = [
            r["cancellation_id"] for r in rows if not r["decided"] and r["status"] in refunding
        ]
        notify = [r["cancellation_id"] for r in rows if r["partial"]]
        return waiting_on, notify

    # --- the provider's webhook events -------------------------------------------------------

    async def original_request(self, *, cancellation_id: str) -> RequestCancellationInput:
        """The buyer's request as recorded, to start a new run of an ended cancellation."""
        row = await self._pool.fetchrow(
            "SELECT order_id, seller_id, buyer_id, reason, reason_text FROM cancellations"
            " WHERE cancellation_id = $1",
            cancellation_id,
        )
        if row is None:
            raise CancellationNotFound(f"no cancellation {cancellation_id}")
        return RequestCancellationInput(
            order_id=row["order_id"],
            seller_id=row["seller_id"],
            buyer_id=row["buyer_id"],
            reason=CancellationReason(row["reason"]),
            reason_text=row["reason_text"],
        )

    async def find_refund_owner(
        self, *, provider_ref: str | None, refund_key: str | None
    ) -> str | None:
        """The cancellation a provider refund belongs to, by provider reference or our key."""
        return await self._pool.fetchval(
            "SELECT cancellation_id FROM refunds"
            " WHERE ($1::text IS NOT NULL AND provider_ref = $1)"
            " OR ($2::text IS NOT NULL AND idempotency_key = $2)"
            " LIMIT 1",
            provider_ref,
            refund_key,
        )

    async def payment_event_outcome(self, *, event_id: str) -> tuple[str, str | None] | None:
        """What was done with this event before, and for which cancellation (None: never
        seen)."""
        row = await self._pool.fetchrow(
            "SELECT outcome, cancellation_id FROM payment_events WHERE event_id = $1", event_id
        )
        return (row["outcome"], row["cancellation_id"]) if row is not None else None

    async def record_payment_event(
        self, event: PaymentEvent, *, cancellation_id: str | None, outcome: str
    ) -> str:
        """Keep the event once; returns the outcome recorded first (a concurrent duplicate
        delivery gets the first one's)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO payment_events (event_id, type, provider_ref, refund_key,
                    failure_code, occurred_at, cancellation_id, outcome)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (event_id) DO NOTHING
                """,
                event.event_id,
                event.type.value,
                event.provider_ref,
                event.refund_key,
                event.failure_code,
                event.occurred_at,
                cancellation_id,
                outcome,
            )
            first: str = await conn.fetchval(
                "SELECT outcome FROM payment_events WHERE event_id = $1", event.event_id
            )
            return first

    # --- reading ----------------------------------------------------------------------------

    async def audit_trail(self, *, cancellation_id: str) -> list[AuditEntry]:
        rows = await self._pool.fetch(
            "SELECT at, actor, kind, detail FROM cancellation_events"
            " WHERE cancellation_id = $1 ORDER BY event_id",
            cancellation_id,
        )
        return [AuditEntry(**dict(r)) for r in rows]

    async def story(self, *, cancellation_id: str) -> list[AuditEntry]:
        """The audit trail (in the order it was written) with the provider's events on this
        cancellation put in among its rows by when they were received (kind `payment_event`):
        what the workflow noted of them ends with its run, the ledger keeps them
        (`payment_events`, with what was done with each)."""
        trail = await self.audit_trail(cancellation_id=cancellation_id)
        events = await self._pool.fetch(
            "SELECT received_at, event_id, type, outcome FROM payment_events"
            " WHERE cancellation_id = $1 ORDER BY received_at, event_id",
            cancellation_id,
        )
        story: list[AuditEntry] = []
        i = 0
        for row in trail:
            while i < len(events) and events[i]["received_at"] < row.at:
                story.append(_payment_event_entry(events[i]))
                i += 1
            story.append(row)
        story.extend(_payment_event_entry(e) for e in events[i:])
        return story

    async def coupon_outcome(self, *, cancellation_id: str) -> CouponOutcome | None:
        """The coupon outcome as the buyer should see it now (None before it is decided)."""
        row = await self._pool.fetchrow(
            """
            SELECT d.*, r.restored_by
            FROM coupon_decisions d
            LEFT JOIN coupon_redemptions r USING (redemption_id)
            WHERE d.cancellation_id = $1
            ORDER BY d.round DESC
            LIMIT 1
            """,
            cancellation_id,
        )
        return _coupon_outcome(row) if row is not None else None

    async def payment_amounts(self, *, cancellation_id: str) -> PaymentAmounts | None:
        """R15: authorised, released, captured and refunded on this cancellation's payment.
        `refunded_minor` counts voids and refunds alike (001), `released_minor` the voids among
        them (010); captured is what the capture took (009, at most what was not released)."""
        row = await self._pool.fetchrow(
            """
            SELECT p.payment_id, p.currency, p.amount_minor, p.released_minor, p.captured_minor,
                p.refunded_minor - p.released_minor AS refunded_minor
            FROM cancellations c JOIN payments p ON p.order_id = c.order_id
            WHERE c.cancellation_id = $1
            """,
            cancellation_id,
        )
        if row is None:
            return None
        return PaymentAmounts(
            payment_id=row["payment_id"],
            currency=row["currency"].strip(),
            authorised_minor=row["amount_minor"],
            released_minor=row["released_minor"],
            captured_minor=row["captured_minor"],
            refunded_minor=row["refunded_minor"],
        )

    async def recorded_at(
        self, *, cancellation_id: str, kind: str, actor: str, detail: str
    ) -> datetime | None:
        """When the ledger recorded the latest audit row of this kind, actor and detail."""
        at: datetime | None = await self._pool.fetchval(
            "SELECT at FROM cancellation_events WHERE cancellation_id = $1 AND kind = $2"
            " AND actor = $3 AND detail = $4 ORDER BY event_id DESC LIMIT 1",
            cancellation_id,
            kind,
            actor,
            detail,
        )
        return at

    async def view_extras(self, *, cancellation_id: str) -> dict[str, Any]:
        """The view's fields only the ledger knows: the buyer's free text, why the request was
        rejected and by whom, when it last changed (its coupon outcome included). Empty when
        the ledger does not have the cancellation (yet)."""
        row = await self._pool.fetchrow(
            f"SELECT c.reason_text, c.seller_deadline, {VIEW_EXTRAS_COLUMNS} FROM cancellations c"
            f" {VIEW_EXTRAS_JOINS} WHERE c.cancellation_id = $1",
            cancellation_id,
        )
        if row is None:
            return {}
        return {
            "reason_text": row["reason_text"],
            "decision_reason": row["decision_reason"],
            "decided_by": row["decided_by"],
            "updated_at": row["changed_at"],
            # Recorded at the opening: a later run (reopened by a reversal) keeps it.
            "seller_deadline": row["seller_deadline"],
        }

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
        audit = await self.story(cancellation_id=cancellation_id)
        # R17: once it has ended too, the seller's deadline and when each dot happened.
        return CancellationView(
            cancellation_id=cancellation_id,
            order_id=row["order_id"],
            seller_id=row["seller_id"],
            buyer_id=row["buyer_id"],
            reason=CancellationReason(row["reason"]),
            path=CancellationPath(row["path"]),
            status=CancellationStatus(row["status"]),
            refund=refund.view if refund else None,
            dots=buyer_dots(refund.view if refund else None, refund_times(refund)),
            coupon=coupon,
            last_error=refund.view.last_error if refund else None,
            audit=audit,
            messages=messages_of(audit),
            payment=await self.payment_amounts(cancellation_id=cancellation_id),
            **await self.view_extras(cancellation_id=cancellation_id),
        )

    async def latest_refund(self, *, cancellation_id: str) -> RefundRecord | None:
        """The cancellation's newest refund (None: no refund yet)."""
        async with self._pool.acquire() as conn:
            return await self._refund_row(conn, cancellation_id=cancellation_id)

    async def refund_times(self, *, cancellation_id: str) -> dict[RefundStage, datetime | None]:
        """When the ledger recorded each stage of the cancellation's newest refund (R17)."""
        return refund_times(await self.latest_refund(cancellation_id=cancellation_id))


def buyer_dots(
    refund: RefundView | None, times: Mapping[RefundStage, datetime | None] | None = None
) -> list[RefundDot]:
    """The three dots as the buyer sees them: once the refund is confirmed, no ETA any more
    (the money is back; the Web UI drops it too). `refund.eta` keeps the estimate given."""
    dots = refund_dots(refund, times)
    if refund is not None and refund.stage is RefundStage.CONFIRMED:
        return [d.model_copy(update={"eta": None}) for d in dots]
    return dots


def refund_times(refund: RefundRecord | None) -> dict[RefundStage, datetime | None]:
    """The refund's dots' times: requested, submitted, confirmed (ledger clock)."""
    if refund is None:
        return {}
    return {
        RefundStage.REQUESTED: refund.requested_at,
        RefundStage.SUBMITTED: refund.submitted_at,
        RefundStage.CONFIRMED: refund.confirmed_at,
    }


def _transition_args(transition: TransitionInput | None) -> tuple[Any, ...]:
    """A transition as the ledger's statements and functions take it: status, whether the
    sub-order is cancelled, event key, actor, kind, detail (None: no transition)."""
    if transition is None:
        return (None, False, None, None, None, None)
    return (
        transition.status.value,
        transition.cancel_sub_order,
        transition.event_key,
        transition.actor,
        transition.kind,
        transition.detail,
    )


def _coupon_outcome(row: asyncpg.Record) -> CouponOutcome:
    """The decision as recorded; when read with the redemption's current state, a coupon that a
    sibling restored later is shown as restored (the decision itself stays as it was made)."""
    restored_by = row.get("restored_by")
    superseded = row.get("superseded_at") is not None and "restored_by" in row.keys()
    if superseded and not restored_by:
        return CouponOutcome(
            outcome=CouponOutcomeKind.PARTIAL_REFUND,
            reason="not restored: a refund of the coupon's sub-orders was reversed by the"
            f" provider after this decision (then: {row['reason']})",
            redemption_id=row["redemption_id"],
        )
    if row["outcome"] != CouponOutcomeKind.RESTORED and restored_by:
        return CouponOutcome(
            outcome=CouponOutcomeKind.RESTORED,
            reason=f"given back when {restored_by} finished; this cancellation had found it"
            f" {row['reason']}",
            redemption_id=row["redemption_id"],
        )
    return CouponOutcome(
        outcome=CouponOutcomeKind(row["outcome"]),
        reason=row["reason"],
        redemption_id=row["redemption_id"],
        active_sub_orders=list(row["active_sub_orders"]),
    )


def _refund_record(row: asyncpg.Record) -> RefundRecord:
    """A refund row (`refunds.*` and the payment's `method`) as the activities use it."""
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
            generation=row["generation"],
            kind=RefundKind(row["kind"]),
            amount=Money(amount_minor=row["amount_minor"], currency=row["currency"].strip()),
            stage=RefundStage(row["stage"]),
            provider_ref=row["provider_ref"],
            eta=eta,
            attempts=row["attempts"],
            last_error=row["last_error"],
        ),
        requested_at=row["requested_at"],
        submitted_at=row["submitted_at"],
        confirmed_at=row["confirmed_at"],
    )


def _submitted_detail(provider_ref: str) -> str:
    return f"accepted by the provider as {provider_ref}"


class _RefusedAfterTransition(Exception):
    """The refund was refused after the transition of the same call was recorded."""

    def __init__(self, created_at: datetime, error: LedgerError) -> None:
        super().__init__(str(error))
        self.created_at = created_at
        self.error = error


def _eta_choices(
    now: datetime, eta_table: Mapping[str, tuple[int, int, bool]]
) -> tuple[list[str], list[str], list[str]]:
    """The refund's ETA for each key of the ETA table (`void`, or a payment method), from one
    moment, as ISO 8601 texts: `ledger_request_refund` picks the one of the refund it records."""
    keys: list[str] = []
    earliest: list[str] = []
    latest: list[str] = []
    for key in eta_table:
        if key == RefundKind.VOID.value:
            eta = refund_eta(PaymentMethod.CARD, RefundKind.VOID, now, eta_table)
        elif key in _METHODS:
            eta = refund_eta(PaymentMethod(key), RefundKind.REFUND, now, eta_table)
        else:
            continue
        keys.append(key)
        earliest.append(_iso(eta.earliest))
        latest.append(_iso(eta.latest))
    return keys, earliest, latest


_METHODS = frozenset(m.value for m in PaymentMethod)


def _iso(at: datetime) -> str:
    """A moment as PostgreSQL reads it back exactly (naive: UTC, as asyncpg takes it)."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).isoformat()


def _refuse_a_repeat(declined: RefundRecord, kind: RefundKind, amount_minor: int) -> None:
    """Issue 18: an operator's retry must change something. A refund the provider refused for
    what it is would be refused again under a new key: say why, and what would change it."""
    refund = declined.view
    code = repeated_refusal(
        refund.last_error, (refund.kind, refund.amount.amount_minor), (kind, amount_minor)
    )
    if code is None:
        return
    raise RefundWouldRepeatRefusal(
        f"generation {refund.generation} ({refund.kind.value} of {refund.amount}) was refused"
        f" with {code}; the same {kind.value} would be refused again. Capture the payment (the"
        " retry then refunds it, R2) or settle it with the provider by hand, then retry"
    )


def _payment_event_entry(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(
        at=row["received_at"],
        actor="provider",
        kind="payment_event",
        detail=f"{row['type']} ({row['event_id']}): {row['outcome']}",
    )

"""Proposal P2 of docs/performance.md, measured and not adopted: ledger transitions in one
statement each.

`LeanLedger` is `ledger.repository.Ledger` with three methods rewritten so that each stage
transition is still exactly one transaction with its audit row, but one round trip instead of
five to seven: the status update, the sub-order update, the audit row and the refund row it
returns become one statement of data-modifying CTEs (PostgreSQL runs a single statement as its
own transaction, atomically; the `UPDATE` takes the same row lock the `SELECT ... FOR UPDATE`
took). The ledger owners decide whether to adopt it; until then `ordercancel bench
--experiment lean-ledger` runs the product worker with it (the worker process swaps the class
`workers.worker.build_worker` instantiates) and `pytest -p bench.experiments` runs the ledger
tests against it.
"""

from __future__ import annotations

from typing import Any

from domain.errors import CancellationNotFound
from domain.models import (
    CancellationStatus,
    EtaRange,
    Money,
    PaymentMethod,
    RefundKind,
    RefundStage,
    RefundView,
    TransitionInput,
)
from ledger.repository import Ledger, RefundRecord

_TRANSITION = """
WITH c AS (
    UPDATE cancellations SET status = $2, updated_at = clock_timestamp()
    WHERE cancellation_id = $1
    RETURNING order_id, seller_id
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
SELECT count(*) FROM c
"""

# $1 cancellation, $2 cancellation status, $3 refund stage reached, $4 event key, $5 actor,
# $6 kind, $7 detail; the refund update is spliced in as `upd`.
_REFUND_STAGE = """
WITH upd AS (
    {update}
    RETURNING *
), cur AS (
    SELECT * FROM upd
    UNION ALL
    SELECT r.* FROM refunds r WHERE r.cancellation_id = $1 AND NOT EXISTS (SELECT 1 FROM upd)
), st AS (
    UPDATE cancellations c SET status = $2, updated_at = clock_timestamp()
    WHERE c.cancellation_id = $1 AND EXISTS (SELECT 1 FROM cur WHERE cur.stage = $3)
), ev AS (
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    VALUES ($1, $4, $5, $6, $7)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING
)
SELECT cur.*, p.method FROM cur JOIN payments p ON p.payment_id = cur.payment_id
ORDER BY cur.generation DESC
LIMIT 1
"""

_SUBMITTED = _REFUND_STAGE.format(
    update="""UPDATE refunds SET stage = 'submitted', provider_ref = $8,
        submitted_at = clock_timestamp(), eta_earliest = $9, eta_latest = $10,
        attempts = attempts + 1, last_error = NULL
    WHERE cancellation_id = $1 AND stage IN ('requested', 'failed')"""
)
_CONFIRMED = _REFUND_STAGE.format(
    update="""UPDATE refunds SET stage = 'confirmed', confirmed_at = clock_timestamp(),
        last_error = NULL
    WHERE cancellation_id = $1 AND stage = 'submitted'"""
)


def _record(row: Any) -> RefundRecord:
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
    )


class LeanLedger(Ledger):
    async def record_transition(self, transition: TransitionInput) -> None:
        found = await self._pool.fetchval(
            _TRANSITION,
            transition.cancellation_id,
            transition.status.value,
            transition.cancel_sub_order,
            transition.event_key,
            transition.actor,
            transition.kind,
            transition.detail,
        )
        if not found:
            raise CancellationNotFound(transition.cancellation_id)

    async def record_refund_submitted(
        self, *, cancellation_id: str, provider_ref: str, eta: EtaRange, event_key: str
    ) -> RefundRecord:
        row = await self._pool.fetchrow(
            _SUBMITTED,
            cancellation_id,
            CancellationStatus.REFUND_SUBMITTED.value,
            "submitted",
            event_key,
            "provider",
            "refund_submitted",
            f"accepted by the provider as {provider_ref}",
            provider_ref,
            eta.earliest,
            eta.latest,
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _record(row)

    async def record_refund_confirmed(
        self, *, cancellation_id: str, event_key: str
    ) -> RefundRecord:
        row = await self._pool.fetchrow(
            _CONFIRMED,
            cancellation_id,
            CancellationStatus.REFUND_CONFIRMED.value,
            "confirmed",
            event_key,
            "provider",
            "refund_confirmed",
            "the provider confirmed the refund",
        )
        if row is None:
            raise CancellationNotFound(f"no refund for {cancellation_id}")
        return _record(row)


def use_lean_ledger() -> None:
    """Make `workers.worker.build_worker` (and anything importing the name afterwards) build
    its activities on `LeanLedger`. For the bench's worker process and the test plugin only."""
    import ledger.repository
    import workers.worker

    workers.worker.Ledger = LeanLedger  # type: ignore[misc]
    ledger.repository.Ledger = LeanLedger  # type: ignore[misc]


def pytest_configure(config: Any) -> None:
    """`pytest -p bench.experiments tests/test_ledger.py`: the ledger tests on LeanLedger."""
    use_lean_ledger()

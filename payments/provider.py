"""The payment provider as the cancellation service sees it, and a simulator behind it.

The interface is what a real provider (Stripe and the like) offers: create a refund or void an
authorisation with an idempotency key, then read the refund's status. A real adapter plugs in
behind `PaymentProvider`; the simulator keeps its records in its own schema (`provider_sim`) so
they survive worker restarts and can be compared with the ledger.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import asyncpg
from pydantic import BaseModel, ConfigDict

from domain.errors import ProviderFinalError, ProviderTransientError
from domain.models import Money, RefundKind


class ProviderRefundStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ProviderRefund(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider_ref: str
    idempotency_key: str
    payment_id: str
    kind: RefundKind
    amount: Money
    status: ProviderRefundStatus
    failure_code: str | None = None


class PaymentProvider(Protocol):
    async def create_refund(
        self, *, idempotency_key: str, payment_id: str, kind: RefundKind, amount: Money
    ) -> ProviderRefund:
        """Void or refund. The same key always returns the same refund, never a second one.
        Raises ProviderTransientError (retry with the same key) or ProviderFinalError."""
        ...

    async def get_refund(self, *, provider_ref: str) -> ProviderRefund:
        """The refund's current status at the provider."""
        ...

    async def find_refund(self, *, idempotency_key: str) -> ProviderRefund | None:
        """The refund created with this key, if the provider has one."""
        ...

    async def list_refunds(self, *, since: datetime | None = None) -> list[ProviderRefund]:
        """Every refund and void this service made at the provider (created at or after
        `since` when given), as the provider records them: what reconciliation compares the
        ledger with. Read-only."""
        ...


class SimulatorFaults(BaseModel):
    """Faults injected for one payment (see provider_sim.faults)."""

    model_config = ConfigDict(frozen=True)

    transient_failures: int = 0
    lose_response: bool = False
    final_failure: str | None = None
    confirm_after_polls: int = 0
    fail_after_success: bool = False


class SimulatedProvider:
    """A provider with real idempotency semantics, stored in PostgreSQL schema `provider_sim`.

    `latency` delays every call; `transient_rate` fails that share of calls before anything is
    recorded; per-payment faults come from `provider_sim.faults` (`set_faults`).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        latency_seconds: float = 0.0,
        transient_rate: float = 0.0,
        confirm_after_polls: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._latency = latency_seconds
        self._transient_rate = transient_rate
        self._confirm_after_polls = confirm_after_polls
        self._rng = rng or random.Random()

    async def set_faults(self, payment_id: str, faults: SimulatorFaults) -> None:
        await self._pool.execute(
            """
            INSERT INTO provider_sim.faults AS f (payment_id, transient_failures, lose_response,
                final_failure, confirm_after_polls, fail_after_success)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (payment_id) DO UPDATE SET
                transient_failures = EXCLUDED.transient_failures,
                lose_response = EXCLUDED.lose_response,
                final_failure = EXCLUDED.final_failure,
                confirm_after_polls = EXCLUDED.confirm_after_polls,
                fail_after_success = EXCLUDED.fail_after_success
            """,
            payment_id,
            faults.transient_failures,
            faults.lose_response,
            faults.final_failure,
            faults.confirm_after_polls,
            faults.fail_after_success,
        )

    async def _network(self) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)
        if self._transient_rate and self._rng.random() < self._transient_rate:
            raise ProviderTransientError("simulated provider timeout")

    async def _log(
        self,
        conn: asyncpg.Connection,
        operation: str,
        key: str | None,
        payment: str | None,
        outcome: str,
    ) -> None:
        await conn.execute(
            "INSERT INTO provider_sim.calls (operation, idempotency_key, payment_id, outcome)"
            " VALUES ($1, $2, $3, $4)",
            operation,
            key,
            payment,
            outcome,
        )

    async def create_refund(
        self, *, idempotency_key: str, payment_id: str, kind: RefundKind, amount: Money
    ) -> ProviderRefund:
        await self._network()
        lost_response = False
        key_reused = False
        async with self._pool.acquire() as conn, conn.transaction():
            fault = await conn.fetchrow(
                "SELECT * FROM provider_sim.faults WHERE payment_id = $1 FOR UPDATE", payment_id
            )
            if fault is not None and fault["transient_failures"] > 0:
                await conn.execute(
                    "UPDATE provider_sim.faults SET transient_failures = transient_failures - 1"
                    " WHERE payment_id = $1",
                    payment_id,
                )
                await self._log(conn, "create_refund", idempotency_key, payment_id, "transient")
                # Commit the decrement, then fail like a timeout would.
            elif fault is not None and fault["final_failure"]:
                await self._log(conn, "create_refund", idempotency_key, payment_id, "final")
            else:
                confirm_after = (
                    fault["confirm_after_polls"] if fault is not None else self._confirm_after_polls
                )
                inserted = await conn.fetchrow(
                    """
                    INSERT INTO provider_sim.refunds (provider_ref, idempotency_key, payment_id,
                        kind, amount_minor, currency, status, confirm_after_polls,
                        fail_after_success)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                    ON CONFLICT (idempotency_key) DO NOTHING
                    RETURNING provider_ref
                    """,
                    "re_" + uuid.uuid4().hex[:20],
                    idempotency_key,
                    payment_id,
                    kind.value,
                    amount.amount_minor,
                    amount.currency,
                    # A void releases an authorisation at once; a refund settles later.
                    "succeeded" if kind is RefundKind.VOID else "pending",
                    confirm_after,
                    bool(fault["fail_after_success"]) if fault is not None else False,
                )
                row = await conn.fetchrow(
                    "SELECT * FROM provider_sim.refunds WHERE idempotency_key = $1",
                    idempotency_key,
                )
                assert row is not None
                key_reused = (
                    row["amount_minor"],
                    row["currency"].strip(),
                    row["payment_id"],
                    row["kind"],
                ) != (amount.amount_minor, amount.currency, payment_id, kind.value)
                if key_reused:
                    # Logged and committed like every other call; the error is raised below,
                    # outside the transaction, or the log row would be rolled back with it.
                    await self._log(conn, "create_refund", idempotency_key, payment_id, "mismatch")
                else:
                    lost_response = (
                        inserted is not None and fault is not None and fault["lose_response"]
                    )
                    if lost_response:
                        await conn.execute(
                            "UPDATE provider_sim.faults SET lose_response = false"
                            " WHERE payment_id = $1",
                            payment_id,
                        )
                    await self._log(
                        conn,
                        "create_refund",
                        idempotency_key,
                        payment_id,
                        "created" if inserted is not None else "replayed",
                    )
                    result = _to_refund(row)
        if fault is not None and fault["transient_failures"] > 0:
            raise ProviderTransientError("simulated provider unavailable (503)")
        if key_reused:
            raise ProviderFinalError(
                "idempotency_key_reused",
                "this idempotency key was used with different parameters",
            )
        if fault is not None and fault["final_failure"]:
            raise ProviderFinalError(fault["final_failure"], "refund refused by the provider")
        if lost_response:
            raise ProviderTransientError("simulated timeout after the provider recorded the refund")
        return result

    async def get_refund(self, *, provider_ref: str) -> ProviderRefund:
        await self._network()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM provider_sim.refunds WHERE provider_ref = $1 FOR UPDATE",
                provider_ref,
            )
            if row is None:
                raise ProviderFinalError("no_such_refund", f"unknown refund {provider_ref}")
            polls = row["polls"] + 1
            status = row["status"]
            failure = row["failure_code"]
            if status == "pending" and polls > row["confirm_after_polls"]:
                status = "succeeded"
            elif status == "succeeded" and row["fail_after_success"] and row["polls"] > 0:
                # Providers report some refunds failed after success (e.g. a closed card).
                status, failure = "failed", "card_closed_after_refund"
            row = await conn.fetchrow(
                "UPDATE provider_sim.refunds SET polls = $2, status = $3, failure_code = $4"
                " WHERE provider_ref = $1 RETURNING *",
                provider_ref,
                polls,
                status,
                failure,
            )
            await self._log(conn, "get_refund", row["idempotency_key"], row["payment_id"], status)
        return _to_refund(row)

    async def find_refund(self, *, idempotency_key: str) -> ProviderRefund | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM provider_sim.refunds WHERE idempotency_key = $1", idempotency_key
        )
        return _to_refund(row) if row is not None else None

    async def list_refunds(self, *, since: datetime | None = None) -> list[ProviderRefund]:
        rows = await self._pool.fetch(
            "SELECT * FROM provider_sim.refunds"
            " WHERE $1::timestamptz IS NULL OR created_at >= $1 ORDER BY created_at",
            since,
        )
        return [_to_refund(row) for row in rows]


def _to_refund(row: asyncpg.Record) -> ProviderRefund:
    return ProviderRefund(
        provider_ref=row["provider_ref"],
        idempotency_key=row["idempotency_key"],
        payment_id=row["payment_id"],
        kind=RefundKind(row["kind"]),
        amount=Money(amount_minor=row["amount_minor"], currency=row["currency"].strip()),
        status=ProviderRefundStatus(row["status"]),
        failure_code=row["failure_code"],
    )

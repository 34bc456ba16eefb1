"""The payment provider as the cancellation service sees it, and a simulator behind it.

The interface is what a real provider (Stripe and the like) offers: create a refund or void an
authorisation with an idempotency key, then read the refund's status. A real adapter plugs in
behind `PaymentProvider`; the simulator keeps its records in its own schema (`provider_sim`) so
they survive worker restarts and can be compared with the ledger.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from domain.errors import ProviderFinalError, ProviderReadError, ProviderTransientError
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
        """The refund's current status at the provider. Raises ProviderTransientError (ask
        again) or ProviderReadError (the read itself was refused: unknown reference, a 4xx,
        our key refused); neither says anything about the refund."""
        ...

    async def find_refund(self, *, idempotency_key: str) -> ProviderRefund | None:
        """The refund created with this key, if the provider has one."""
        ...

    async def list_refunds(self, *, since: datetime | None = None) -> list[ProviderRefund]:
        """Every refund and void this service made at the provider (created at or after
        `since` when given), as the provider records them: what reconciliation compares the
        ledger with. Read-only."""
        ...


class CapturesRemaining(Protocol):
    """A provider that captures what is left of an authorisation once shares were released
    from it (R15): authorised minus released (Stripe's `amount_to_capture`). Both the simulator
    and the Stripe adapter have it; a capture flow (the order system's `payment_captured`)
    can use it."""

    async def capture_remaining(self, *, payment_id: str, idempotency_key: str) -> Money:
        """The amount captured. Capturing again returns the same amount; a voided
        authorisation raises ProviderFinalError."""
        ...


class SimulatorFaults(BaseModel):
    """Faults injected for one payment (see provider_sim.faults)."""

    model_config = ConfigDict(frozen=True)

    transient_failures: int = 0
    lose_response: bool = False
    final_failure: str | None = None
    confirm_after_polls: int = 0
    fail_after_success: bool = False
    # The next N status reads of this payment's refunds fail like a 4xx on the read.
    read_errors: int = 0
    # Every refund call for the payment answers this much later (a slow provider).
    latency_ms: int = Field(default=0, ge=0)


class SimulatorSettings(BaseModel):
    """Provider-wide behaviour set at run time (`provider_sim.settings`): overrides the
    worker's ORDERCANCEL_SIM_TRANSIENT_RATE and ORDERCANCEL_SIM_LATENCY within a second."""

    model_config = ConfigDict(frozen=True)

    transient_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: int = Field(default=0, ge=0)


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
        settle_at_once: bool = False,
    ) -> None:
        self._pool = pool
        self._latency = latency_seconds
        self._transient_rate = transient_rate
        self._confirm_after_polls = confirm_after_polls
        # A refund of a payment with no faults has succeeded when it is created: a provider
        # that answers synchronously (as card refunds often do; a void always does).
        self._settle_at_once = settle_at_once
        self._rng = rng or random.Random()
        self._settings: SimulatorSettings | None = None
        self._settings_read_at = float("-inf")

    # --- rehearsal controls (`ordercancel provider ...`) ----------------------------------

    async def set_settings(self, settings: SimulatorSettings | None) -> None:
        """Provider-wide behaviour for every worker; None: back to their own settings."""
        if settings is None:
            await self._pool.execute("DELETE FROM provider_sim.settings")
            return
        await self._pool.execute(
            """
            INSERT INTO provider_sim.settings (singleton, transient_rate, latency_ms)
            VALUES (true, $1, $2)
            ON CONFLICT (singleton) DO UPDATE SET transient_rate = EXCLUDED.transient_rate,
                latency_ms = EXCLUDED.latency_ms, updated_at = clock_timestamp()
            """,
            settings.transient_rate,
            settings.latency_ms,
        )

    async def get_settings(self) -> SimulatorSettings | None:
        row = await self._pool.fetchrow(
            "SELECT transient_rate, latency_ms FROM provider_sim.settings"
        )
        return SimulatorSettings(**dict(row)) if row is not None else None

    async def clear_faults(self, payment_id: str | None = None) -> int:
        """Remove the faults of one payment, or of all (None). Returns how many were set."""
        status = await self._pool.execute(
            "DELETE FROM provider_sim.faults WHERE $1::text IS NULL OR payment_id = $1",
            payment_id,
        )
        return int(status.split()[-1])

    async def list_faults(self) -> dict[str, SimulatorFaults]:
        rows = await self._pool.fetch("SELECT * FROM provider_sim.faults ORDER BY payment_id")
        return {
            row["payment_id"]: SimulatorFaults(
                **{k: v for k, v in dict(row).items() if k != "payment_id"}
            )
            for row in rows
        }

    def _keep_settings(self, row: asyncpg.Record, read_at: float) -> None:
        """The settings a call read with its own statement (`settings_found`, `s_*`): the next
        calls use them as if `get_settings` had read them then."""
        if not row["settings_found"]:
            self._settings = None
        elif self._settings is None or (
            self._settings.transient_rate,
            self._settings.latency_ms,
        ) != (row["s_transient_rate"], row["s_latency_ms"]):
            self._settings = SimulatorSettings(
                transient_rate=row["s_transient_rate"], latency_ms=row["s_latency_ms"]
            )
        self._settings_read_at = read_at

    async def _current_settings(self) -> tuple[float, float]:
        """(transient rate, latency seconds): the table's row when there is one (read at most
        once a second), else this process's own."""
        now = time.monotonic()
        if now - self._settings_read_at >= 1.0:
            self._settings = await self.get_settings()
            self._settings_read_at = now
        if self._settings is None:
            return self._transient_rate, self._latency
        return self._settings.transient_rate, self._settings.latency_ms / 1000

    async def set_faults(self, payment_id: str, faults: SimulatorFaults) -> None:
        await self._pool.execute(
            """
            INSERT INTO provider_sim.faults AS f (payment_id, transient_failures, lose_response,
                final_failure, confirm_after_polls, fail_after_success, latency_ms,
                read_errors)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (payment_id) DO UPDATE SET
                transient_failures = EXCLUDED.transient_failures,
                lose_response = EXCLUDED.lose_response,
                final_failure = EXCLUDED.final_failure,
                confirm_after_polls = EXCLUDED.confirm_after_polls,
                fail_after_success = EXCLUDED.fail_after_success,
                latency_ms = EXCLUDED.latency_ms,
                read_errors = EXCLUDED.read_errors
            """,
            payment_id,
            faults.transient_failures,
            faults.lose_response,
            faults.final_failure,
            faults.confirm_after_polls,
            faults.fail_after_success,
            faults.latency_ms,
            faults.read_errors,
        )

    async def _network(self) -> None:
        transient_rate, latency = await self._current_settings()
        if latency:
            await asyncio.sleep(latency)
        if transient_rate and self._rng.random() < transient_rate:
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
        new_refund = _new_refund(idempotency_key, payment_id, kind, amount)
        fast_refund = (*new_refund[:6], "succeeded") if self._settle_at_once else new_refund
        # A payment without faults, a void (R15: it releases its share of the authorisation)
        # or a refund: one statement (migration 017), which also reads the settings.
        read_at = time.monotonic()
        fast = await self._pool.fetchrow(
            "SELECT * FROM provider_sim.create_refund($1, $2, $3, $4, $5, $6, $7, $8)",
            *fast_refund,
            self._confirm_after_polls,
        )
        assert fast is not None  # the function always returns one row
        self._keep_settings(fast, read_at)
        match fast["outcome"]:
            case "created" | "replayed":
                return _to_refund(fast)
            case "mismatch":
                raise _key_reused()
            case "refused":
                code = fast["refusal"]
                raise ProviderFinalError(
                    code, f"cannot release {amount} of payment {payment_id}: {_REFUSALS[code]}"
                )
        # A payment with faults: nothing was recorded or logged; the full path decides.
        lost_response = False
        key_reused = False
        release_refused: str | None = None
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
            elif kind is RefundKind.VOID and (
                release_refused := await _release(conn, idempotency_key, payment_id, amount)
            ):
                await self._log(conn, "create_refund", idempotency_key, payment_id, "refused")
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
                    *new_refund,
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
        if fault is not None and fault["latency_ms"]:
            # A slow answer, with no lock or transaction held meanwhile.
            await asyncio.sleep(fault["latency_ms"] / 1000)
        if fault is not None and fault["transient_failures"] > 0:
            raise ProviderTransientError("simulated provider unavailable (503)")
        if key_reused:
            raise _key_reused()
        if release_refused:
            raise ProviderFinalError(
                release_refused,
                f"cannot release {amount} of payment {payment_id}: {_REFUSALS[release_refused]}",
            )
        if fault is not None and fault["final_failure"]:
            raise ProviderFinalError(fault["final_failure"], "refund refused by the provider")
        if lost_response:
            raise ProviderTransientError("simulated timeout after the provider recorded the refund")
        return result

    async def capture_remaining(self, *, payment_id: str, idempotency_key: str) -> Money:
        """Capture what is left of the authorisation: authorised minus released (R15), like
        Stripe's `amount_to_capture`. Capturing again returns the same amount."""
        await self._network()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_KNOW_AUTHORISATION, payment_id)
            held = await conn.fetchrow(
                "SELECT * FROM provider_sim.authorisations WHERE payment_id = $1 FOR UPDATE",
                payment_id,
            )
            if held is None:
                await self._log(conn, "capture", idempotency_key, payment_id, "unknown")
            elif held["status"] == "authorised":
                held = await conn.fetchrow(
                    "UPDATE provider_sim.authorisations SET status = 'captured',"
                    " captured_minor = amount_minor - released_minor"
                    " WHERE payment_id = $1 RETURNING *",
                    payment_id,
                )
                await self._log(conn, "capture", idempotency_key, payment_id, "captured")
            else:
                await self._log(conn, "capture", idempotency_key, payment_id, held["status"])
        if held is None:
            raise ProviderFinalError("resource_missing", f"no authorisation {payment_id}")
        if held["status"] == "voided":
            raise ProviderFinalError(
                "payment_intent_unexpected_state", f"{payment_id} was voided: nothing to capture"
            )
        return Money(amount_minor=held["captured_minor"], currency=held["currency"].strip())

    async def authorisation(self, payment_id: str) -> asyncpg.Record | None:
        """The simulator's account of an authorisation (held, released, captured, status)."""
        row: asyncpg.Record | None = await self._pool.fetchrow(
            "SELECT * FROM provider_sim.authorisations WHERE payment_id = $1", payment_id
        )
        return row

    async def get_refund(self, *, provider_ref: str) -> ProviderRefund:
        await self._network()
        row = await self._pool.fetchrow(_POLL, provider_ref)
        if row is None:
            raise ProviderReadError("resource_missing", f"no such refund: {provider_ref} (404)")
        if row["read_error"]:
            raise ProviderReadError(
                "simulated_read_error", f"reading refund {provider_ref} was refused (400)"
            )
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


# A status poll in one statement: an injected read error (the read refused, the refund
# untouched), the row lock, the settlement rules (a pending refund succeeds
# after `confirm_after_polls` polls; one marked `fail_after_success` fails on the poll after its
# success), the call log, the refund as it now is (`read_error` true: the read was refused).
# No row: unknown refund.
_POLL = """
WITH read_error AS (
    UPDATE provider_sim.faults f SET read_errors = f.read_errors - 1
    FROM provider_sim.refunds r
    WHERE r.provider_ref = $1 AND f.payment_id = r.payment_id AND f.read_errors > 0
    RETURNING f.payment_id
), polled AS (
    UPDATE provider_sim.refunds SET
        polls = polls + 1,
        status = CASE
            WHEN status = 'pending' AND polls + 1 > confirm_after_polls THEN 'succeeded'
            WHEN status = 'succeeded' AND fail_after_success AND polls > 0 THEN 'failed'
            ELSE status
        END,
        failure_code = CASE
            WHEN status = 'pending' AND polls + 1 > confirm_after_polls THEN failure_code
            WHEN status = 'succeeded' AND fail_after_success AND polls > 0
                THEN 'card_closed_after_refund'
            ELSE failure_code
        END
    WHERE provider_ref = $1 AND NOT EXISTS (SELECT 1 FROM read_error)
    RETURNING *
), logged AS (
    INSERT INTO provider_sim.calls (operation, idempotency_key, payment_id, outcome)
    SELECT 'get_refund', idempotency_key, payment_id, status FROM polled
    UNION ALL
    SELECT 'get_refund', r.idempotency_key, r.payment_id, 'read_error'
    FROM provider_sim.refunds r, read_error WHERE r.provider_ref = $1
)
SELECT polled.*, false AS read_error FROM polled
UNION ALL
SELECT r.*, true FROM provider_sim.refunds r, read_error WHERE r.provider_ref = $1
"""


# The simulator learns an authorisation the first time a void or a capture names it, from the
# order's payment (a real provider knows it since checkout). Unknown payments stay unknown.
_KNOW_AUTHORISATION = """
INSERT INTO provider_sim.authorisations (payment_id, amount_minor, currency)
SELECT payment_id, amount_minor, currency FROM payments
WHERE payment_id = $1 AND capture = 'authorized'
ON CONFLICT (payment_id) DO NOTHING
"""

_REFUSALS = {
    "payment_not_voidable": "it was captured (captured money is refunded)",
    "release_exceeds_authorisation": "more than is left of the authorisation",
}


async def _release(
    conn: asyncpg.Connection, idempotency_key: str, payment_id: str, amount: Money
) -> str | None:
    """R15, inside the call's transaction: a void of a share releases it from the
    authorisation, which is voided once nothing is left to capture. Returns a refusal code, or
    None (released; or a replay of this key; or a payment the simulator does not know, whose
    void is taken as it comes)."""
    if await conn.fetchval(
        "SELECT 1 FROM provider_sim.refunds WHERE idempotency_key = $1", idempotency_key
    ):
        return None
    await conn.execute(_KNOW_AUTHORISATION, payment_id)
    held = await conn.fetchrow(
        "SELECT * FROM provider_sim.authorisations WHERE payment_id = $1 FOR UPDATE", payment_id
    )
    if held is None:
        return None
    if held["status"] == "captured":
        return "payment_not_voidable"
    if amount.amount_minor > held["amount_minor"] - held["released_minor"]:
        return "release_exceeds_authorisation"
    await conn.execute(
        """
        UPDATE provider_sim.authorisations SET released_minor = released_minor + $2,
            status = CASE WHEN released_minor + $2 = amount_minor THEN 'voided' ELSE status END
        WHERE payment_id = $1
        """,
        payment_id,
        amount.amount_minor,
    )
    return None


def _new_refund(
    idempotency_key: str, payment_id: str, kind: RefundKind, amount: Money
) -> tuple[str, str, str, str, int, str, str]:
    """The first seven columns of a new provider_sim.refunds row, in table order."""
    return (
        "re_" + uuid.uuid4().hex[:20],
        idempotency_key,
        payment_id,
        kind.value,
        amount.amount_minor,
        amount.currency,
        # A void releases an authorisation at once; a refund settles later.
        "succeeded" if kind is RefundKind.VOID else "pending",
    )


def _key_reused() -> ProviderFinalError:
    return ProviderFinalError(
        "idempotency_key_reused", "this idempotency key was used with different parameters"
    )


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

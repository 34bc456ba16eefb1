"""Response bodies of the API. Request bodies are the workflow's own models (domain.models)."""

from __future__ import annotations

from typing import Literal

from domain.models import (
    CancellationPath,
    CancellationResult,
    CancellationStatus,
    CancellationView,
    Record,
)


class CancellationAccepted(Record):
    """Answer to POST /v1/cancellations."""

    cancellation_id: str
    status: CancellationStatus
    path: CancellationPath | None = None
    # True once the cancellation has ended; `outcome` then holds its result. An instant-path
    # cancellation usually ends within the request; a request-path one waits for the seller.
    final: bool
    outcome: CancellationResult | None = None
    status_url: str


class CancellationDetails(CancellationView):
    """Answer to GET /v1/cancellations/{id}: the workflow's status query while it runs, the
    ledger's record once it has ended. The coupon is always read from the ledger, where a
    sibling's later restoration shows."""

    running: bool
    source: Literal["workflow", "ledger"]


class WithdrawalReceipt(Record):
    cancellation_id: str
    # True when the workflow has ended the request as withdrawn; False when it had not yet
    # applied the withdrawal when the API stopped waiting (read the status).
    applied: bool
    status: CancellationStatus
    message: str


class Health(Record):
    status: Literal["ok"] = "ok"


class Readiness(Record):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]

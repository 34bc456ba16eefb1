"""Response bodies of the API, and the bodies of the operators' endpoints. The other request
bodies are the workflow's own models (domain.models)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from domain.models import (
    CancellationPath,
    CancellationResult,
    CancellationStatus,
    CancellationView,
    Decision,
    FreeText,
    Identifier,
    Record,
    Strict,
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


# The operator is the caller's key (`sre` or `sre:<operator>`), never the body's: the workflow
# records what the API tells it, so the API tells it who authenticated (issue 18).
_OPERATOR_ID = Field(
    default=None,
    description=(
        "Deprecated: the operator is the caller's API key (`sre:<operator>`, or `sre`). If"
        " sent, it must be that same operator (403 `operator_mismatch` otherwise)."
    ),
)


class RetryRefundBody(Strict):
    """Body of POST /v1/cancellations/{id}/retry-refund (update `retry_refund`)."""

    operator_id: Identifier | None = _OPERATOR_ID
    reason: FreeText = ""


class EscalationDecisionBody(Strict):
    """Body of POST /v1/cancellations/{id}/escalation-decision (update `resolve_escalation`)."""

    operator_id: Identifier | None = _OPERATOR_ID
    decision: Decision
    reason: FreeText = ""


class MessageBody(Strict):
    """Body of POST /v1/cancellations/{id}/messages (R18): the text only. Who writes is the
    caller's key: a seller key writes as its seller, the buyer service as the cancellation's
    buyer. At most 500 characters once trimmed (`message_too_long`), printable (R20)."""

    text: Annotated[FreeText, StringConstraints(min_length=1)]

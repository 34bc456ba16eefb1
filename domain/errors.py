"""Business errors: specific, typed, and stable enough for other services to branch on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RefusalCode(StrEnum):
    """Why a decision, withdrawal or retry was refused. Part of the public contract: the update
    failure's `type` and the API's 409 `code` carry it."""

    WRONG_SELLER = "wrong_seller"
    WRONG_BUYER = "wrong_buyer"
    ALREADY_DECIDED = "already_decided"
    NOT_PENDING = "not_pending"
    NOT_ESCALATED = "not_escalated"
    NOT_REFUND_FAILED = "not_refund_failed"
    INVALID_PAYLOAD = "invalid_payload"
    UNKNOWN_REFUND = "unknown_refund"
    # R18: a message on a request (update `message`).
    MESSAGE_TOO_LONG = "message_too_long"
    TOO_MANY_MESSAGES = "too_many_messages"


class DecisionRefused(Exception):
    """A decision that is not allowed now. Changes nothing."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UndecodablePayload:
    """A message argument the data converter could not decode: JSON with a lone surrogate
    (`"\\ud800"`, which no UTF-8 text holds), bytes that are not UTF-8 or not JSON, an encoding
    it does not know. The converter (infra/converter.py) hands it to the handler as this value,
    so that a signal or update from any client is refused as `invalid_payload` and counted
    (R20), never dropped or refused by the SDK before the handler sees it."""

    encoding: str
    error: str


class LedgerError(Exception):
    """Base of the ledger's domain errors."""

    error_type = "LedgerError"


class SubOrderNotFound(LedgerError):
    error_type = "SubOrderNotFound"


class SubOrderAlreadyCancelled(LedgerError):
    error_type = "SubOrderAlreadyCancelled"


class CancellationConflict(LedgerError):
    """The sub-order already has a cancellation under another id."""

    error_type = "CancellationConflict"


class CancellationIdMismatch(LedgerError):
    """The workflow id is not the one of the request's sub-order (`cancel-{order}~{seller}`):
    a client picked another sub-order's id, or an id of no sub-order at all (R20)."""

    error_type = "CancellationIdMismatch"


class CancellationNotFound(LedgerError):
    error_type = "CancellationNotFound"


class RefundLimitExceeded(LedgerError):
    """The refund would take the payment's refunded total above what was paid (R9)."""

    error_type = "RefundLimitExceeded"


class RefundWouldRepeatRefusal(LedgerError):
    """The next generation of a declined refund would be the same request the provider refused
    for what it is (e.g. a partial void Stripe cannot make): refused without asking again."""

    error_type = "RefundWouldRepeatRefusal"


class OrderConflict(LedgerError):
    """An order id is already loaded with different content."""

    error_type = "OrderConflict"


class ProviderError(Exception):
    """Base of the payment provider's errors."""


class ProviderTransientError(ProviderError):
    """Worth retrying with the same idempotency key (timeout, 5xx, rate limit)."""


class ProviderFinalError(ProviderError):
    """The provider will never accept this refund (card closed, refund rejected)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ProviderReadError(ProviderError):
    """The provider did not tell us how a refund stands: an error *reading* it (a 4xx on the
    read, an unknown reference, a refused API key). It says nothing about the refund itself,
    which may still settle: never a decline (issue 18)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class SubOrderAlreadyShipped(LedgerError):
    """R14: a shipped sub-order is not cancelled here (a return or a dispute is)."""

    error_type = "SubOrderAlreadyShipped"


class OrderNotFound(LedgerError):
    """An order event names an order the ledger does not have."""

    error_type = "OrderNotFound"


class OrderEventConflict(LedgerError):
    """An order event id already recorded with another document."""

    error_type = "OrderEventConflict"


class CaptureExceedsAuthorisation(LedgerError):
    """A capture of more than the payment authorised."""

    error_type = "CaptureExceedsAuthorisation"

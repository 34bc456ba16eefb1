"""The rule book (R1-R12) as pure functions: no I/O, no clocks, no Temporal.

Workflows and activities call these; tests exercise them directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from domain.errors import DecisionRefused, RefusalCode
from domain.models import (
    AuditEntry,
    CancellationStatus,
    CaptureState,
    CouponOutcome,
    CouponOutcomeKind,
    Decision,
    EtaRange,
    Message,
    MessageAuthor,
    PaymentMethod,
    RefundDot,
    RefundKind,
    RefundStage,
    RefundView,
    TimeoutPolicy,
)

# --- money ---------------------------------------------------------------------------------------


def allocate_largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` minor units in proportion to `weights` so the parts sum exactly to `total`.

    Each part gets the floor of its exact share; the units left over go one each to the largest
    fractional remainders (ties to the earlier weight). Never negative, never more than a weight
    when `total <= sum(weights)`.
    """
    if total < 0:
        raise ValueError("total must not be negative")
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    weight_sum = sum(weights)
    if not weights or weight_sum == 0:
        if total == 0:
            return [0] * len(weights)
        raise ValueError("cannot allocate a positive total over zero weights")
    floors = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    left = total - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def refund_kind(capture: CaptureState) -> RefundKind:
    """R2: money only authorised is voided; money captured is refunded."""
    return RefundKind.VOID if capture is CaptureState.AUTHORIZED else RefundKind.REFUND


# --- ETA (R8) -----------------------------------------------------------------------------------


# (earliest, latest, business_days) after submission to the provider. Business days skip
# Saturdays and Sundays; wallet and balance refunds land within a calendar day. Voids release an
# authorisation within a day.
DEFAULT_ETA_TABLE: Mapping[str, tuple[int, int, bool]] = {
    PaymentMethod.CARD.value: (3, 20, True),
    PaymentMethod.WALLET.value: (0, 1, False),
    PaymentMethod.BALANCE.value: (0, 1, False),
    PaymentMethod.BANK_TRANSFER.value: (7, 10, True),
    RefundKind.VOID.value: (0, 1, False),
}


def add_business_days(start: datetime, days: int) -> datetime:
    current = start
    # Starting on a weekend, the count begins on the next Monday.
    while current.weekday() >= 5:
        current += timedelta(days=1)
    added = 0
    while added < days:
        current += timedelta(days=1)
        if current.weekday() < 5:
            added += 1
    return current


def refund_eta(
    method: PaymentMethod,
    kind: RefundKind,
    submitted_at: datetime,
    table: Mapping[str, tuple[int, int, bool]] = DEFAULT_ETA_TABLE,
) -> EtaRange:
    """When the money reaches the buyer, as a range, counted from submission to the provider."""
    key = RefundKind.VOID.value if kind is RefundKind.VOID else method.value
    earliest, latest, business = table[key]
    if business:
        return EtaRange(
            earliest=add_business_days(submitted_at, earliest),
            latest=add_business_days(submitted_at, latest),
        )
    return EtaRange(
        earliest=submitted_at + timedelta(days=earliest),
        latest=submitted_at + timedelta(days=latest),
    )


# --- seller decisions (R3, R4, R5) ---------------------------------------------------------------


def check_seller_decision(
    *,
    status: CancellationStatus,
    expected_seller: str,
    seller_id: str,
    already_decided: bool,
) -> None:
    """Raise `DecisionRefused` with a specific code unless this seller may decide now."""
    if seller_id != expected_seller:
        raise DecisionRefused(
            RefusalCode.WRONG_SELLER,
            f"seller {seller_id!r} may not decide on a sub-order of seller {expected_seller!r}",
        )
    if already_decided:
        raise DecisionRefused(
            RefusalCode.ALREADY_DECIDED, "a decision was already made on this cancellation"
        )
    if status is not CancellationStatus.AWAITING_SELLER:
        raise DecisionRefused(
            RefusalCode.NOT_PENDING,
            f"this cancellation is not awaiting a seller decision (status: {status.value})",
        )


def check_withdrawal(*, status: CancellationStatus, expected_buyer: str, buyer_id: str) -> None:
    if buyer_id != expected_buyer:
        raise DecisionRefused(
            RefusalCode.WRONG_BUYER,
            f"buyer {buyer_id!r} did not request this cancellation",
        )
    if status not in (CancellationStatus.AWAITING_SELLER, CancellationStatus.ESCALATED):
        raise DecisionRefused(
            RefusalCode.NOT_PENDING,
            f"only a pending request can be withdrawn (status: {status.value})",
        )


def timeout_outcome(policy: TimeoutPolicy) -> Decision | None:
    """R4: what the silence of the seller means. None: escalate to operators."""
    if policy is TimeoutPolicy.AUTO_APPROVE:
        return Decision.ACCEPT
    if policy is TimeoutPolicy.AUTO_REJECT:
        return Decision.REJECT
    return None


# --- coupons (R11) -------------------------------------------------------------------------------


def decide_coupon(
    *,
    redemption_id: str | None,
    footprint_fully_refunded: Mapping[str, bool],
    expires_at: datetime | None,
    now: datetime,
) -> CouponOutcome:
    """Restore iff every sub-order of the footprint is cancelled and fully refunded and the coupon
    has not expired. `footprint_fully_refunded` maps each footprint seller id to that fact."""
    if redemption_id is None:
        return CouponOutcome(
            outcome=CouponOutcomeKind.NO_COUPON, reason="no coupon paid for this sub-order"
        )
    active = sorted(seller for seller, done in footprint_fully_refunded.items() if not done)
    if active:
        return CouponOutcome(
            outcome=CouponOutcomeKind.PARTIAL_REFUND,
            redemption_id=redemption_id,
            active_sub_orders=active,
            reason=(
                f"not restored: the sub-order of seller {active[0]} is"
                if len(active) == 1
                else f"not restored: the sub-orders of sellers {', '.join(active)} are"
            )
            + " not cancelled and fully refunded",
        )
    if expires_at is not None and expires_at <= now:
        return CouponOutcome(
            outcome=CouponOutcomeKind.EXPIRED,
            redemption_id=redemption_id,
            reason=f"not restored: the coupon expired at {expires_at.isoformat()}",
        )
    return CouponOutcome(
        outcome=CouponOutcomeKind.RESTORED,
        redemption_id=redemption_id,
        reason="every sub-order the coupon paid for is cancelled and fully refunded",
    )


# --- identifiers and keys ------------------------------------------------------------------------


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def safe_text(text: str, limit: int = 500) -> str:
    """Text this service writes about a message it refused (an audit row, a log line): control
    characters and lone surrogates escaped (`\\x00`, `\\ud800`), so that PostgreSQL always
    takes it, and at most `limit` characters. The message itself was refused: nothing of it is
    stored as it came."""
    escaped = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


# The workflow id is `cancel-{order_id}~{seller_id}`. Identifiers never hold `~` (their
# alphabet is `[A-Za-z0-9_.:-]`, domain.models.Identifier), so the id is one-to-one: order
# `A-B` of seller `C` and order `A` of seller `B-C` are two cancellations (with `-` as the
# separator they were one).
ID_PREFIX = "cancel-"
ID_SEPARATOR = "~"
_ID_PART = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
CANCELLATION_ID_PATTERN = rf"cancel-(?P<order>{_ID_PART})~(?P<seller>{_ID_PART})"
_CANCELLATION_ID = re.compile(CANCELLATION_ID_PATTERN)


def cancellation_id(order_id: str, seller_id: str) -> str:
    """The workflow id: public contract `cancel-{order_id}~{seller_id}`."""
    return f"{ID_PREFIX}{order_id}{ID_SEPARATOR}{seller_id}"


def parse_cancellation_id(workflow_id: str) -> tuple[str, str] | None:
    """`(order_id, seller_id)` of a workflow id, None if it is not one."""
    match = _CANCELLATION_ID.fullmatch(workflow_id)
    return (match["order"], match["seller"]) if match else None


def refund_idempotency_key(cancellation_id: str, generation: int = 1) -> str:
    """R9: derived from the cancellation id and the stage that calls the provider; never random.
    The same key is used for every retry, so a refund that reached the provider is found. Only
    after the provider reversed a refund does a new generation get a key of its own."""
    suffix = "" if generation == 1 else f"-{generation}"
    return f"{cancellation_id}:refund-submit{suffix}"


_DURATION = re.compile(r"(\d+)\s*(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse '48h', '5s', '1h30m', '2d', '250ms' (or a bare number of seconds)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return timedelta(seconds=float(value))
    pos = 0
    seconds = 0.0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f"not a duration: {text!r} (expected e.g. '48h', '30m', '5s', '1h30m')")
    return timedelta(seconds=seconds)


# --- the three dots (R7) -------------------------------------------------------------------------

DOT_LABELS = (
    (RefundStage.REQUESTED, "Dispute finished"),
    (RefundStage.SUBMITTED, "Refund in progress"),
    (RefundStage.CONFIRMED, "Refund completed"),
)


def refund_dots(
    refund: RefundView | None, times: Mapping[RefundStage, datetime | None] | None = None
) -> list[RefundDot]:
    """What the buyer sees: three dots, each done or not, the last one with its ETA; with
    `times` (when the ledger recorded each stage), each done dot says when it happened (R17)."""
    reached = refund.stage.dots if refund is not None else 0
    return [
        RefundDot(
            stage=stage,
            label=label,
            done=n < reached,
            at=(times or {}).get(stage) if n < reached else None,
            eta=refund.eta if refund is not None and stage is RefundStage.CONFIRMED else None,
        )
        for n, (stage, label) in enumerate(DOT_LABELS)
    ]


# --- messages on a request (R18) ------------------------------------------------------------------

# How long a message may be (characters, once trimmed) and how many a cancellation takes.
MESSAGE_TEXT_MAX = 500
MESSAGES_MAX = 20
MESSAGE_KIND = "message"


def check_message(
    *,
    status: CancellationStatus,
    answered: bool,
    author: MessageAuthor,
    author_id: str,
    buyer_id: str,
    seller_id: str,
    text: str,
    count: int,
) -> str:
    """R18: the cancellation's buyer or seller, while the request waits for the seller (not
    once it is answered, withdrawn or escalated), a bounded text, a bounded number of them.
    Returns the text as recorded (trimmed); raises `DecisionRefused` otherwise."""
    if author is MessageAuthor.BUYER and author_id != buyer_id:
        raise DecisionRefused(
            RefusalCode.WRONG_BUYER, f"buyer {author_id!r} did not request this cancellation"
        )
    if author is MessageAuthor.SELLER and author_id != seller_id:
        raise DecisionRefused(
            RefusalCode.WRONG_SELLER,
            f"seller {author_id!r} may not write on a sub-order of seller {seller_id!r}",
        )
    if answered:
        raise DecisionRefused(
            RefusalCode.ALREADY_DECIDED,
            "the request was already decided or withdrawn: messages are closed",
        )
    if status is not CancellationStatus.AWAITING_SELLER:
        raise DecisionRefused(
            RefusalCode.NOT_PENDING,
            f"messages are taken only while the request waits for the seller (status:"
            f" {status.value})",
        )
    trimmed = text.strip()
    if not trimmed:
        raise DecisionRefused(RefusalCode.INVALID_PAYLOAD, "invalid payload: text: empty message")
    if len(trimmed) > MESSAGE_TEXT_MAX:
        raise DecisionRefused(
            RefusalCode.MESSAGE_TOO_LONG,
            f"a message is at most {MESSAGE_TEXT_MAX} characters (this one: {len(trimmed)})",
        )
    if count >= MESSAGES_MAX:
        raise DecisionRefused(
            RefusalCode.TOO_MANY_MESSAGES,
            f"this cancellation has its {MESSAGES_MAX} messages already",
        )
    return trimmed


def messages_of(audit: Sequence[AuditEntry]) -> list[Message]:
    """The messages (R18) of an audit trail, oldest first."""
    return [
        Message(at=e.at, author=e.actor, text=e.detail) for e in audit if e.kind == MESSAGE_KIND
    ]


# --- a retry that would be refused again (issue 18) ---------------------------------------------

# Provider refusals of a refund *as asked* (its kind and amount on this payment), not of the
# moment: the same request under a new key gets the same answer.
REFUSALS_OF_THE_REQUEST = (
    "partial_void_unsupported",
    "payment_not_voidable",
    # R15: releasing more than is left of the authorisation.
    "release_exceeds_authorisation",
)


def repeated_refusal(
    declined_error: str | None,
    declined: tuple[RefundKind, int],
    next_refund: tuple[RefundKind, int],
) -> str | None:
    """The refusal code a new generation would get again, or None when it may go through: the
    declined refund was refused for what it is and the next one is the same (kind, amount)."""
    if declined != next_refund or not declined_error:
        return None
    return next((code for code in REFUSALS_OF_THE_REQUEST if code in declined_error), None)

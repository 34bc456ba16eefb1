"""The payment provider on Stripe, with the official `stripe` package (async, over httpx).

Mapping (docs/runbook.md says the same for operators):

* The payment id of our orders (`payments.payment_id`) is the Stripe **PaymentIntent** id
  (`pi_...`): the order system hands over the PaymentIntent it charged.
* **Void** (money only authorised, R2) = cancel the PaymentIntent while it is uncaptured
  (`requires_capture`). Its reference (`provider_ref`) is the PaymentIntent id; our idempotency
  key is written to the PaymentIntent's `metadata.refund_id` first, so reconciliation finds it.
  Stripe cannot void part of an authorisation, so a void of one seller's share (R15) is a
  **release** kept on the PaymentIntent itself: its metadata gets `oc_rel_<hash>` =
  `<amount>:<our key>` and nothing else changes at Stripe; its reference is
  `<pi>:release:<hash>`. The share that releases the last of the amount cancels the
  PaymentIntent (a void as above). Every release re-reads the PaymentIntent after writing its
  entry, so of two concurrent last shares at least one sees the total and cancels.
  `capture_remaining` captures `amount_to_capture` = authorised - released.
* **Refund** (money captured) = a Refund on the PaymentIntent, with `metadata.refund_id` = our
  idempotency key and the same key as `Idempotency-Key`. Before creating one, the refunds of the
  PaymentIntent are listed and the one whose `metadata.refund_id` is our key is returned if it
  exists: Stripe forgets idempotency keys after 24 hours (and localstripe ignores them), so a
  retry after a lost response finds the refund by this look-up, not by the key alone.
* The SDK's own network retries are off (`max_network_retries=0`): a retry it made by itself
  would skip the look-up. Our activities retry with backoff and come back through it.
* Errors: connection problems, timeouts, 429, 409 (a concurrent request on the same object),
  5xx, and 401/403 (a configuration problem an operator can fix) are `ProviderTransientError`;
  the other 4xx (payment unknown, already refunded, amount too large, ...) are
  `ProviderFinalError` with Stripe's error code. Reading a refund's status is different: any
  4xx there (unknown id, 401/403 included) is a `ProviderReadError`, which says nothing about
  the refund and never declines it (issue 18).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import stripe

from domain.errors import ProviderFinalError, ProviderReadError, ProviderTransientError
from domain.models import Money, RefundKind
from payments.provider import ProviderRefund, ProviderRefundStatus

if TYPE_CHECKING:
    from stripe.params import PaymentIntentListParams, RefundListParams

    from infra.settings import Settings

# Where our idempotency key travels with a Stripe object.
METADATA_KEY = "refund_id"
# A released share of an authorisation (R15): `oc_rel_<hash of our key>` = `<amount>:<our key>`.
RELEASE_PREFIX = "oc_rel_"
RELEASE_REF = ":release:"
# Stripe's answer time we wait for; shorter than the submit activity's timeout (60 s).
DEFAULT_TIMEOUT_SECONDS = 30.0

T = TypeVar("T")

_REFUND_STATUS = {
    "pending": ProviderRefundStatus.PENDING,
    "requires_action": ProviderRefundStatus.PENDING,
    "succeeded": ProviderRefundStatus.SUCCEEDED,
    "failed": ProviderRefundStatus.FAILED,
    "canceled": ProviderRefundStatus.FAILED,
}
# PaymentIntent states in which the money is still only authorised: a void cancels them.
_VOIDABLE = ("requires_capture", "requires_confirmation", "requires_action")


class StripeProvider:
    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeProvider:
        if settings.stripe_api_key is None:
            raise RuntimeError(
                "ORDERCANCEL_PROVIDER=stripe needs ORDERCANCEL_STRIPE_API_KEY (a restricted key"
                " with write access to PaymentIntents and Refunds)"
            )
        return cls.connect(
            settings.stripe_api_key.get_secret_value(), api_base=settings.stripe_api_base
        )

    @classmethod
    def connect(
        cls,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> StripeProvider:
        return cls(
            stripe.StripeClient(
                api_key,
                base_addresses={"api": api_base} if api_base else None,
                max_network_retries=0,
                http_client=stripe.HTTPXClient(timeout=timeout),
            )
        )

    # --- PaymentProvider --------------------------------------------------------------------

    async def create_refund(
        self, *, idempotency_key: str, payment_id: str, kind: RefundKind, amount: Money
    ) -> ProviderRefund:
        if kind is RefundKind.VOID:
            return await self._void(idempotency_key, payment_id, amount)
        made = await self._find_on_payment(payment_id, idempotency_key)
        if made is None:
            refund = await _call(
                self._client.v1.refunds.create_async(
                    {
                        "payment_intent": payment_id,
                        "amount": amount.amount_minor,
                        "metadata": {METADATA_KEY: idempotency_key},
                    },
                    {"idempotency_key": idempotency_key},
                )
            )
            made = _refund(refund, payment_id=payment_id)
        if (made.payment_id, made.amount, made.kind) != (payment_id, amount, kind):
            raise ProviderFinalError(
                "idempotency_key_reused",
                f"refund {made.provider_ref} was made with this key for {made.amount} on"
                f" {made.payment_id}, not {amount} on {payment_id}",
            )
        return made

    async def get_refund(self, *, provider_ref: str) -> ProviderRefund:
        """A 4xx here is Stripe refusing the *read* (unknown id, our key refused): a
        ProviderReadError, never a decline of the refund, which may still settle."""
        if RELEASE_REF in provider_ref:
            intent_id, entry = provider_ref.split(RELEASE_REF, 1)
            intent = await _read(self._client.v1.payment_intents.retrieve_async(intent_id))
            released = _releases(intent).get(RELEASE_PREFIX + entry)
            if released is None:
                raise ProviderReadError("resource_missing", f"no release {provider_ref}")
            return _release_of(intent, *released)
        if provider_ref.startswith("pi_"):
            intent = await _read(self._client.v1.payment_intents.retrieve_async(provider_ref))
            return _void_of(intent)
        refund = await _read(self._client.v1.refunds.retrieve_async(provider_ref))
        return _refund(refund)

    async def find_refund(self, *, idempotency_key: str) -> ProviderRefund | None:
        """Without the payment, Stripe can only be searched by listing: reconciliation and
        operators use this, never the submit path (which looks on the PaymentIntent)."""
        for made in await self.list_refunds():
            if made.idempotency_key == idempotency_key:
                return made
        return None

    async def list_refunds(self, *, since: datetime | None = None) -> list[ProviderRefund]:
        """Refunds and voids carrying our `metadata.refund_id` (others are not ours)."""
        refund_params: RefundListParams = {"limit": 100}
        intent_params: PaymentIntentListParams = {"limit": 100}
        if since is not None:
            refund_params["created"] = intent_params["created"] = {"gte": int(since.timestamp())}
        found: list[ProviderRefund] = []
        refunds = await _call(self._client.v1.refunds.list_async(refund_params))
        async for refund in refunds.auto_paging_iter():
            if _metadata_key(refund) is not None:
                found.append(_refund(refund))
        intents = await _call(self._client.v1.payment_intents.list_async(intent_params))
        async for intent in intents.auto_paging_iter():
            voided = _metadata_key(intent) if intent.status == "canceled" else None
            for amount, key in _releases(intent).values():
                if key != voided:
                    found.append(_release_of(intent, amount, key))
            if voided is not None:
                found.append(_void_of(intent))
        return found

    async def capture_remaining(self, *, payment_id: str, idempotency_key: str) -> Money:
        """Capture what is left of the authorisation (R15): `amount_to_capture` = authorised
        - released. Already captured: the amount Stripe received."""
        intent = await _call(self._client.v1.payment_intents.retrieve_async(payment_id))
        released = sum(amount for amount, _ in _releases(intent).values())
        if intent.status == "requires_capture":
            intent = await _call(
                self._client.v1.payment_intents.capture_async(
                    payment_id,
                    {"amount_to_capture": intent.amount - released},
                    {"idempotency_key": f"{idempotency_key}:capture"},
                )
            )
        if intent.status != "succeeded":
            raise ProviderFinalError(
                "payment_intent_unexpected_state",
                f"PaymentIntent {payment_id} is {intent.status}: nothing to capture",
            )
        # Stripe says what it received; localstripe does not (it has no `amount_received`).
        received = _fields(intent).get("amount_received") or intent.amount - released
        return Money(amount_minor=received, currency=intent.currency.upper())

    # --- inside -----------------------------------------------------------------------------

    async def _find_on_payment(
        self, payment_id: str, idempotency_key: str
    ) -> ProviderRefund | None:
        """The refund of this PaymentIntent made with our key, if there is one."""
        refunds = await _call(
            self._client.v1.refunds.list_async({"payment_intent": payment_id, "limit": 100})
        )
        async for refund in refunds.auto_paging_iter():
            if _metadata_key(refund) == idempotency_key:
                return _refund(refund, payment_id=payment_id)
        return None

    async def _void(self, idempotency_key: str, payment_id: str, amount: Money) -> ProviderRefund:
        intent = await _call(self._client.v1.payment_intents.retrieve_async(payment_id))
        if intent.status == "canceled":
            # Ours after a lost response, or released anyway (authorisations expire): either
            # way the money is no longer held. A share released before: that release again.
            mine = _releases(intent).get(_release_entry(idempotency_key))
            if mine is not None and _metadata_key(intent) != idempotency_key:
                return _release_of(intent, mine[0], idempotency_key)
            return _void_of(intent, idempotency_key=idempotency_key, amount=amount)
        if intent.status not in _VOIDABLE:
            raise ProviderFinalError(
                "payment_not_voidable",
                f"PaymentIntent {payment_id} is {intent.status}: only an uncaptured one can be"
                " voided (captured money is refunded)",
            )
        if amount.currency != intent.currency.upper():
            raise ProviderFinalError(
                "currency_mismatch", f"PaymentIntent {payment_id} is in {intent.currency}"
            )
        entry = _release_entry(idempotency_key)
        others = sum(a for k, (a, _) in _releases(intent).items() if k != entry)
        if others + amount.amount_minor > intent.amount:
            raise ProviderFinalError(
                "release_exceeds_authorisation",
                f"PaymentIntent {payment_id} holds {intent.amount}, {others} of it released:"
                f" {amount} more cannot be released",
            )
        if others + amount.amount_minor < intent.amount:
            # A share (R15): noted on the PaymentIntent, nothing released at Stripe yet.
            if entry not in _releases(intent):
                await _call(
                    self._client.v1.payment_intents.update_async(
                        payment_id,
                        {"metadata": {entry: f"{amount.amount_minor}:{idempotency_key}"}},
                        {"idempotency_key": f"{idempotency_key}:release"},
                    )
                )
            intent = await _call(self._client.v1.payment_intents.retrieve_async(payment_id))
            released = sum(a for a, _ in _releases(intent).values())
            if released >= intent.amount and intent.status in _VOIDABLE:
                # A concurrent share released the rest meanwhile and may not have seen ours:
                # whoever sees the total cancels.
                await self._cancel(payment_id, idempotency_key)
            return _release_of(intent, amount.amount_minor, idempotency_key)
        # Mark it first, so that reconciliation knows the void is ours; then cancel. Each call
        # has its own idempotency key (Stripe scopes a key to one request).
        await _call(
            self._client.v1.payment_intents.update_async(
                payment_id,
                {"metadata": {METADATA_KEY: idempotency_key}},
                {"idempotency_key": f"{idempotency_key}:mark"},
            )
        )
        intent = await self._cancel(payment_id, idempotency_key)
        return _void_of(intent, idempotency_key=idempotency_key, amount=amount)

    async def _cancel(self, payment_id: str, idempotency_key: str) -> Any:
        """Cancel the PaymentIntent; one a concurrent call canceled first is as good."""
        try:
            return await _call(
                self._client.v1.payment_intents.cancel_async(
                    payment_id, None, {"idempotency_key": f"{idempotency_key}:void"}
                )
            )
        except ProviderFinalError:
            intent = await _call(self._client.v1.payment_intents.retrieve_async(payment_id))
            if intent.status != "canceled":
                raise
            return intent


async def _call(request: Awaitable[T]) -> T:
    """One Stripe call, its errors mapped to the provider interface's two kinds."""
    try:
        return await request
    except (stripe.APIConnectionError, stripe.RateLimitError) as err:
        raise ProviderTransientError(f"stripe unreachable or throttling: {err}") from err
    except (stripe.AuthenticationError, stripe.PermissionError) as err:
        raise ProviderTransientError(
            f"stripe refused our API key ({err.http_status}): fix ORDERCANCEL_STRIPE_API_KEY,"
            f" then retry: {err.user_message or err}"
        ) from err
    except stripe.StripeError as err:
        status = err.http_status
        if status is None or status >= 500 or status == 409:
            raise ProviderTransientError(f"stripe error {status}: {err}") from err
        code = err.code or type(err).__name__
        raise ProviderFinalError(code, err.user_message or str(err)) from err


async def _read(request: Awaitable[T]) -> T:
    """A read of a refund's status. Timeouts, 5xx, 409 and 429 are worth asking again; any
    other refusal (a 4xx, our key refused included) is an error reading, not an answer."""
    try:
        return await _call(request)
    except ProviderFinalError as err:
        raise ProviderReadError(err.code, str(err)) from err
    except ProviderTransientError as err:
        cause = err.__cause__
        if isinstance(cause, (stripe.AuthenticationError, stripe.PermissionError)):
            raise ProviderReadError(f"http_{cause.http_status}", str(err)) from cause
        raise


def _fields(obj: Any) -> dict[str, Any]:
    """A Stripe object's data as a plain dict (they are not dicts since stripe 15)."""
    data: dict[str, Any] = obj.to_dict()
    return data


def _metadata_key(obj: Any) -> str | None:
    value = (_fields(obj).get("metadata") or {}).get(METADATA_KEY)
    return value if isinstance(value, str) and value else None


def _refund(refund: Any, *, payment_id: str | None = None) -> ProviderRefund:
    data = _fields(refund)
    status = _REFUND_STATUS.get(data["status"], ProviderRefundStatus.PENDING)
    return ProviderRefund(
        provider_ref=data["id"],
        idempotency_key=_metadata_key(refund) or "",
        payment_id=data.get("payment_intent") or payment_id or data.get("charge") or "",
        kind=RefundKind.REFUND,
        amount=Money(amount_minor=data["amount"], currency=data["currency"].upper()),
        status=status,
        failure_code=(
            (data.get("failure_reason") or data["status"])
            if status is ProviderRefundStatus.FAILED
            else None
        ),
    )


def _release_entry(idempotency_key: str) -> str:
    """The metadata key of a released share (Stripe keys are at most 40 characters)."""
    return RELEASE_PREFIX + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def _releases(intent: Any) -> dict[str, tuple[int, str]]:
    """The shares released from this PaymentIntent: metadata key -> (amount, our key)."""
    found: dict[str, tuple[int, str]] = {}
    for name, value in (_fields(intent).get("metadata") or {}).items():
        if name.startswith(RELEASE_PREFIX) and isinstance(value, str) and ":" in value:
            amount, key = value.split(":", 1)
            if amount.isdigit():
                found[name] = (int(amount), key)
    return found


def _release_of(intent: Any, amount_minor: int, idempotency_key: str) -> ProviderRefund:
    """A released share: done once noted, whether or not the PaymentIntent is canceled yet."""
    entry = _release_entry(idempotency_key)
    return ProviderRefund(
        provider_ref=f"{intent.id}{RELEASE_REF}{entry.removeprefix(RELEASE_PREFIX)}",
        idempotency_key=idempotency_key,
        payment_id=intent.id,
        kind=RefundKind.VOID,
        amount=Money(amount_minor=amount_minor, currency=intent.currency.upper()),
        status=ProviderRefundStatus.SUCCEEDED,
    )


def _void_of(
    intent: Any, *, idempotency_key: str | None = None, amount: Money | None = None
) -> ProviderRefund:
    """A void, seen through its PaymentIntent: done once the intent is canceled."""
    if intent.status == "canceled":
        status, failure = ProviderRefundStatus.SUCCEEDED, None
    elif intent.status == "processing":
        status, failure = ProviderRefundStatus.PENDING, None
    else:
        status, failure = ProviderRefundStatus.FAILED, f"payment_intent_{intent.status}"
    return ProviderRefund(
        provider_ref=intent.id,
        idempotency_key=idempotency_key or _metadata_key(intent) or "",
        payment_id=intent.id,
        kind=RefundKind.VOID,
        # The void takes what the releases before it left (R15).
        amount=amount
        or Money(
            amount_minor=intent.amount
            - sum(a for a, key in _releases(intent).values() if key != _metadata_key(intent)),
            currency=intent.currency.upper(),
        ),
        status=status,
        failure_code=failure,
    )

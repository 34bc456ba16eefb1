"""The Stripe adapter against localstripe (a stateful Stripe stand-in from PyPI), started on a
free local port for this module.

localstripe ignores `Idempotency-Key` (the test below shows it): only the adapter's look-up by
`metadata.refund_id` stands between a retry after a lost response and a second refund. A small
proxy in front of localstripe loses one response on purpose: the refund is made, the adapter
sees a dropped connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from helpers.localstripe import API_KEY, payment_intent

from devstack.embedded import free_port
from domain.errors import ProviderFinalError, ProviderReadError, ProviderTransientError
from domain.models import Money, RefundKind
from infra.settings import Settings
from payments.provider import ProviderRefundStatus
from payments.stripe_provider import METADATA_KEY, StripeProvider
from workers.worker import build_provider


@dataclass
class LossyProxy:
    """Forwards everything to localstripe; told to, it lets the next refund creation reach
    localstripe and then drops the connection instead of answering (a lost response)."""

    upstream: str
    lose_next_refund: bool = False
    refund_posts: int = 0
    url: str = ""
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "application/json")
        if request.method == "POST" and request.path == "/v1/refunds":
            self.refund_posts += 1
            if self.lose_next_refund:
                self.lose_next_refund = False
                assert request.transport is not None
                request.transport.abort()  # made upstream; the answer never arrives
                return web.Response(status=599)
        return web.Response(body=payload, status=status, headers={"Content-Type": content_type})

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


@pytest.fixture
async def proxy(localstripe_url: str) -> AsyncIterator[LossyProxy]:
    proxy = LossyProxy(localstripe_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def eur(cents: int) -> Money:
    return Money(amount_minor=cents, currency="EUR")


def key() -> str:
    return f"cancel-O-{uuid.uuid4().hex[:8]}-S-7:refund-submit"


async def refunds_of(client: stripe.StripeClient, intent_id: str) -> list[Any]:
    page = await client.v1.refunds.list_async({"payment_intent": intent_id, "limit": 100})
    return [r async for r in page.auto_paging_iter()]


async def test_void_cancels_the_uncaptured_payment_intent(
    localstripe_url: str, stripe_client: stripe.StripeClient
) -> None:
    provider = StripeProvider.connect(API_KEY, api_base=localstripe_url)
    intent = await payment_intent(stripe_client, 2800, captured=False)
    k = key()
    voided = await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2800)
    )
    assert voided.kind is RefundKind.VOID
    assert voided.status is ProviderRefundStatus.SUCCEEDED
    assert voided.provider_ref == intent.id and voided.idempotency_key == k
    seen = await stripe_client.v1.payment_intents.retrieve_async(intent.id)
    assert seen.status == "canceled"
    assert seen.metadata[METADATA_KEY] == k
    assert await refunds_of(stripe_client, intent.id) == []  # a void is no refund

    # Asked again (a retry after a lost response): the same void, nothing new.
    again = await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2800)
    )
    assert again == voided
    assert await provider.get_refund(provider_ref=intent.id) == voided
    assert (await provider.find_refund(idempotency_key=k)) == voided


async def test_shares_are_released_on_the_intent_and_the_last_one_cancels_it(
    localstripe_url: str, stripe_client: stripe.StripeClient
) -> None:
    # R15: a checkout of two sellers, 20.00 + 30.00, authorised as one PaymentIntent.
    provider = StripeProvider.connect(API_KEY, api_base=localstripe_url)
    intent = await payment_intent(stripe_client, 5000, captured=False)
    first, second = key(), key()

    released = await provider.create_refund(
        idempotency_key=first, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2000)
    )
    assert released.kind is RefundKind.VOID and released.amount == eur(2000)
    assert released.status is ProviderRefundStatus.SUCCEEDED
    assert released.provider_ref.startswith(f"{intent.id}:release:")
    # Stripe cannot release part of an authorisation: nothing happened there but the note.
    seen = await stripe_client.v1.payment_intents.retrieve_async(intent.id)
    assert seen.status == "requires_capture" and seen.amount == 5000
    assert await provider.get_refund(provider_ref=released.provider_ref) == released
    again = await provider.create_refund(
        idempotency_key=first, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2000)
    )
    assert again == released

    # More than is left: refused for good, nothing changed.
    with pytest.raises(ProviderFinalError) as refused:
        await provider.create_refund(
            idempotency_key=key(), payment_id=intent.id, kind=RefundKind.VOID, amount=eur(3001)
        )
    assert refused.value.code == "release_exceeds_authorisation"
    assert (await stripe_client.v1.payment_intents.retrieve_async(intent.id)).status == (
        "requires_capture"
    )

    # The last share: nothing is left to capture, the PaymentIntent is canceled.
    voided = await provider.create_refund(
        idempotency_key=second, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(3000)
    )
    assert voided.provider_ref == intent.id and voided.amount == eur(3000)
    assert voided.status is ProviderRefundStatus.SUCCEEDED
    seen = await stripe_client.v1.payment_intents.retrieve_async(intent.id)
    assert seen.status == "canceled" and seen.metadata[METADATA_KEY] == second
    assert await provider.get_refund(provider_ref=intent.id) == voided
    # The first share asked again after the cancel: still its own release.
    assert (
        await provider.create_refund(
            idempotency_key=first, payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2000)
        )
        == released
    )
    listed = await provider.list_refunds()
    assert released in listed and voided in listed
    assert await refunds_of(stripe_client, intent.id) == []


async def test_the_capture_takes_the_authorisation_less_what_was_released(
    localstripe_url: str, stripe_client: stripe.StripeClient
) -> None:
    provider = StripeProvider.connect(API_KEY, api_base=localstripe_url)
    intent = await payment_intent(stripe_client, 5000, captured=False)
    await provider.create_refund(
        idempotency_key=key(), payment_id=intent.id, kind=RefundKind.VOID, amount=eur(1200)
    )
    k = key()
    captured = await provider.capture_remaining(payment_id=intent.id, idempotency_key=k)
    assert captured == eur(3800)
    seen = await stripe_client.v1.payment_intents.retrieve_async(intent.id)
    assert seen.status == "succeeded"
    latest = seen.to_dict()["latest_charge"]
    charge_id = latest if isinstance(latest, str) else latest["id"]
    charge = await stripe_client.v1.charges.retrieve_async(charge_id)
    # localstripe books the uncaptured rest as a refund of the charge (Stripe releases it).
    assert charge.captured and charge.amount - charge.amount_refunded == 3800
    # Asked again: the same capture, nothing more.
    assert await provider.capture_remaining(payment_id=intent.id, idempotency_key=k) == eur(3800)
    # Captured money is refunded, not released.
    with pytest.raises(ProviderFinalError) as refused:
        await provider.create_refund(
            idempotency_key=key(), payment_id=intent.id, kind=RefundKind.VOID, amount=eur(1000)
        )
    assert refused.value.code == "payment_not_voidable"


async def test_full_refund_carries_our_key(
    localstripe_url: str, stripe_client: stripe.StripeClient
) -> None:
    provider = StripeProvider.connect(API_KEY, api_base=localstripe_url)
    intent = await payment_intent(stripe_client, 2800, captured=True)
    k = key()
    made = await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(2800)
    )
    assert made.kind is RefundKind.REFUND
    assert made.provider_ref.startswith("re_")
    assert made.payment_id == intent.id
    assert made.amount == eur(2800)
    assert made.status is ProviderRefundStatus.SUCCEEDED
    (at_stripe,) = await refunds_of(stripe_client, intent.id)
    assert at_stripe.id == made.provider_ref
    assert at_stripe.metadata[METADATA_KEY] == k
    assert at_stripe.amount == 2800
    assert await provider.get_refund(provider_ref=made.provider_ref) == made
    assert await provider.find_refund(idempotency_key=k) == made
    assert made in await provider.list_refunds()

    # The same key again, after success: the same refund, never a second one.
    again = await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(2800)
    )
    assert again == made
    assert len(await refunds_of(stripe_client, intent.id)) == 1


async def test_retry_after_a_lost_response_does_not_refund_twice(
    proxy: LossyProxy, stripe_client: stripe.StripeClient
) -> None:
    # localstripe does not honour Idempotency-Key: two creations with the same key make two
    # refunds. So whatever protects us below is the adapter's look-up.
    probe = await payment_intent(stripe_client, 3000, captured=True)
    for _ in range(2):
        await stripe_client.v1.refunds.create_async(
            {"payment_intent": probe.id, "amount": 1000}, {"idempotency_key": "same-key"}
        )
    assert len(await refunds_of(stripe_client, probe.id)) == 2

    provider = StripeProvider.connect(API_KEY, api_base=proxy.url)
    intent = await payment_intent(stripe_client, 2800, captured=True)
    k = key()
    proxy.lose_next_refund = True
    with pytest.raises(ProviderTransientError):
        await provider.create_refund(
            idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(2800)
        )
    # The provider made it; we never heard.
    (made_then,) = await refunds_of(stripe_client, intent.id)
    assert made_then.metadata[METADATA_KEY] == k

    # The activity's retry: the look-up finds it, no second creation is even sent.
    found = await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(2800)
    )
    assert found.provider_ref == made_then.id
    assert found.status is ProviderRefundStatus.SUCCEEDED
    assert proxy.refund_posts == 1
    assert [r.id for r in await refunds_of(stripe_client, intent.id)] == [made_then.id]


async def test_stripe_errors_map_to_transient_or_final(
    localstripe_url: str, stripe_client: stripe.StripeClient
) -> None:
    provider = StripeProvider.connect(API_KEY, api_base=localstripe_url)
    intent = await payment_intent(stripe_client, 2800, captured=True)
    # A request Stripe refuses (400): final, with Stripe's answer.
    with pytest.raises(ProviderFinalError):
        await provider.create_refund(
            idempotency_key=key(), payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(0)
        )
    # Captured money cannot be voided: refused for good (it is refunded instead).
    with pytest.raises(ProviderFinalError) as not_voidable:
        await provider.create_refund(
            idempotency_key=key(), payment_id=intent.id, kind=RefundKind.VOID, amount=eur(2800)
        )
    assert not_voidable.value.code == "payment_not_voidable"
    # An unknown PaymentIntent: final too.
    with pytest.raises(ProviderFinalError):
        await provider.create_refund(
            idempotency_key=key(),
            payment_id="pi_doesnotexist",
            kind=RefundKind.REFUND,
            amount=eur(100),
        )
    # The same key for another amount: refused, the first refund stands alone.
    k = key()
    await provider.create_refund(
        idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(1000)
    )
    with pytest.raises(ProviderFinalError) as reused:
        await provider.create_refund(
            idempotency_key=k, payment_id=intent.id, kind=RefundKind.REFUND, amount=eur(1200)
        )
    assert reused.value.code == "idempotency_key_reused"
    assert len(await refunds_of(stripe_client, intent.id)) == 1
    # A 4xx while reading a refund says nothing about the refund: an error reading, never a
    # decline (issue 18).
    with pytest.raises(ProviderReadError):
        await provider.get_refund(provider_ref="re_doesnotexist")
    with pytest.raises(ProviderReadError):
        await provider.get_refund(provider_ref="pi_doesnotexist")
    # Nobody listening: worth retrying with the same key.
    down = StripeProvider.connect(API_KEY, api_base=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ProviderTransientError):
        await down.get_refund(provider_ref="re_whatever")


async def test_settings_select_the_stripe_adapter(localstripe_url: str) -> None:
    settings = Settings(provider="stripe", stripe_api_key=API_KEY, stripe_api_base=localstripe_url)
    provider = build_provider(settings, pool=None)  # type: ignore[arg-type]
    assert isinstance(provider, StripeProvider)
    assert await provider.list_refunds() is not None
    with pytest.raises(RuntimeError, match="ORDERCANCEL_STRIPE_API_KEY"):
        build_provider(Settings(provider="stripe"), pool=None)  # type: ignore[arg-type]

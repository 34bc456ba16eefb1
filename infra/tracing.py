"""OpenTelemetry traces: one trace per cancellation, from the API request that opens it through
the workflow and its activities to the ledger's statements and the payment provider's calls.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: then
nothing is instrumented, no interceptor is added and the OpenTelemetry SDK is not even imported.
On (`start_tracing`, called by `ordercancel api`, `ordercancel worker` and `ordercancel dev`):

- the Temporal client gets the SDK's `TracingInterceptor` (`client_interceptors`, used by
  `infra.client.connect`); a worker built on that client uses it too. The client's spans
  (`StartWorkflow:...`, `SignalWorkflow:...`, `StartWorkflowUpdate:...`) carry the caller's
  context in a Temporal header, so the worker's `RunWorkflow:...`, `StartActivity:...` and
  `RunActivity:...` spans join the trace of the API request that opened the cancellation;
- the API's requests are spans (FastAPI/ASGI instrumentation, `instrument_app`): the root;
- every asyncpg statement and every httpx request (the Stripe adapter) is a span;
- each payment-provider call is a span of its own (`payment_provider.<call>`, `TracedProvider`),
  whatever the provider (the simulator makes no HTTP call).

Spans go over OTLP/HTTP (`opentelemetry-exporter-otlp-proto-http`), configured by the standard
`OTEL_*` variables (docs/observability.md). `service.name` is the process's (`ordercancel-api`,
`ordercancel-worker`, `ordercancel-dev`) unless `OTEL_SERVICE_NAME` says otherwise. The tests
pass their own exporter (an in-memory one).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer
    from temporalio.client import Interceptor

    from domain.models import Money, RefundKind
    from payments.provider import PaymentProvider, ProviderRefund

T = TypeVar("T")

SERVICE_API = "ordercancel-api"
SERVICE_WORKER = "ordercancel-worker"
SERVICE_DEV = "ordercancel-dev"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACER_NAME = "order-cancellation"
PROBE_PATHS = "/healthz,/readyz,/livez"


@dataclass
class Tracing:
    """Tracing as this process runs it: the provider every instrumentation writes to."""

    provider: TracerProvider
    service: str

    def tracer(self) -> Tracer:
        return self.provider.get_tracer(TRACER_NAME)


_active: Tracing | None = None


def endpoint_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an OTLP endpoint is set (an empty variable counts as unset)."""
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


def active() -> Tracing | None:
    return _active


def start_tracing(
    service: str,
    *,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] | None = None,
) -> Tracing | None:
    """Turn tracing on for this process, as `service`; None (and no cost) when no OTLP endpoint
    is set and no `exporter` is given. `exporter`: spans go there as each one ends (tests);
    otherwise they are batched to OTLP/HTTP. A second call returns the first one's tracing."""
    global _active
    if _active is not None:
        return _active
    env = os.environ if environ is None else environ
    if exporter is None and not endpoint_configured(env):
        return None
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    name = env.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    AsyncPGInstrumentor().instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _active = Tracing(provider, name)
    return _active


def stop_tracing() -> None:
    """Export what is pending and turn tracing off again (end of a process, of a test)."""
    global _active
    if _active is None:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    AsyncPGInstrumentor().uninstrument()
    HTTPXClientInstrumentor().uninstrument()
    _active.provider.shutdown()
    _active = None


def client_interceptors() -> list[Interceptor]:
    """The Temporal client's interceptors for tracing: the SDK's, or none while tracing is off.
    A worker built on the client uses it as well (workflow and activity spans)."""
    if _active is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_active.tracer())]


def instrument_app(app: FastAPI) -> None:
    """Each request a span (the root of the trace it starts); nothing while tracing is off."""
    if _active is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Probes are polled every few seconds: no trace of them.
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_active.provider, excluded_urls=PROBE_PATHS
    )


def traced_provider(provider: PaymentProvider) -> PaymentProvider:
    """`provider` with a span per call while tracing is on; `provider` itself otherwise."""
    if _active is None:
        return provider
    return TracedProvider(provider, _active.tracer())


class TracedProvider:
    """A `PaymentProvider` whose calls are spans: `payment_provider.create_refund` and so on,
    with the payment, the kind, the amount and the provider's reference (never a secret)."""

    def __init__(self, inner: PaymentProvider, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self._system = type(inner).__name__

    async def _call(
        self, call: str, attributes: dict[str, Any], run: Callable[[], Awaitable[T]]
    ) -> T:
        from opentelemetry.trace import SpanKind

        from payments.provider import ProviderRefund

        with self._tracer.start_as_current_span(
            f"payment_provider.{call}",
            kind=SpanKind.CLIENT,
            attributes={"payment_provider.system": self._system, **attributes},
        ) as span:
            result = await run()
            if isinstance(result, ProviderRefund):
                span.set_attribute("payment_provider.refund_ref", result.provider_ref)
                span.set_attribute("payment_provider.status", str(result.status))
            return result

    async def create_refund(
        self, *, idempotency_key: str, payment_id: str, kind: RefundKind, amount: Money
    ) -> ProviderRefund:
        return await self._call(
            "create_refund",
            {
                "payment_provider.payment_id": payment_id,
                "payment_provider.kind": str(kind),
                "payment_provider.amount_minor": amount.amount_minor,
                "payment_provider.currency": str(amount.currency),
            },
            lambda: self._inner.create_refund(
                idempotency_key=idempotency_key, payment_id=payment_id, kind=kind, amount=amount
            ),
        )

    async def get_refund(self, *, provider_ref: str) -> ProviderRefund:
        return await self._call(
            "get_refund",
            {"payment_provider.refund_ref": provider_ref},
            lambda: self._inner.get_refund(provider_ref=provider_ref),
        )

    async def find_refund(self, *, idempotency_key: str) -> ProviderRefund | None:
        return await self._call(
            "find_refund", {}, lambda: self._inner.find_refund(idempotency_key=idempotency_key)
        )

    async def list_refunds(self, *, since: datetime | None = None) -> list[ProviderRefund]:
        return await self._call("list_refunds", {}, lambda: self._inner.list_refunds(since=since))

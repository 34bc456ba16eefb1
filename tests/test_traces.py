"""Traces (issue 19): one trace per cancellation, from the API request that opens it through the
workflow and its activities to the ledger's statements and the payment provider's calls.

The API (over ASGI), the product's worker, a real Temporal dev server and a real PostgreSQL,
with tracing on in this process and spans kept by an in-memory exporter (infra/tracing.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from helpers.api import load_order, request_body
from helpers.stacks import ApiStack, api_stack
from helpers.wait import eventually
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra import tracing
from infra.client import connect
from infra.settings import Settings

pytestmark = pytest.mark.e2e

SECRET = "whsec_test_" + "t" * 32
SELLER, BUYER = "S-TR", "B-TR"


@dataclass
class Traced:
    stack: ApiStack
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        active = tracing.active()
        assert active is not None
        active.provider.force_flush()
        return list(self.exporter.get_finished_spans())


@pytest.fixture
async def traced(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    assert tracing.start_tracing("ordercancel-test", exporter=exporter) is not None
    settings = Settings(
        task_queue=f"traces-{uuid.uuid4().hex[:8]}",
        refund_submit_initial_interval=timedelta(milliseconds=100),
        refund_poll_interval=timedelta(milliseconds=200),
        refund_poll_max_interval=timedelta(seconds=1),
        api_instant_wait=timedelta(seconds=10),
    )
    try:
        async with api_stack(
            temporal_address,
            e2e_database_url,
            settings,
            principals=("buyer-service",),
            webhook_secret=SECRET,
        ) as stack:
            yield Traced(stack, exporter)
    finally:
        tracing.stop_tracing()


@pytest.fixture
def no_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    tracing.stop_tracing()


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        found = by_id[parent.span_id]
        names.append(found.name)
        parent = found.parent
    return names


async def test_a_cancellation_opened_through_the_api_is_one_trace(traced: Traced) -> None:
    order_id = await load_order(traced.stack.pool, "TR", buyer=BUYER, seller=SELLER, paid=False)
    response = await traced.stack.http.post(
        "/v1/cancellations",
        json=request_body(order_id, SELLER, BUYER),
        headers={"Authorization": f"Bearer {traced.stack.keys['buyer-service']}"},
    )
    assert response.status_code in (200, 202), response.text
    cancellation_id = response.json()["cancellation_id"]

    async def completed() -> None:
        status = await traced.stack.pool.fetchval(
            "SELECT status FROM cancellations WHERE cancellation_id = $1", cancellation_id
        )
        assert status == "completed"
        assert any(s.name == "CompleteWorkflow:OrderCancellation" for s in traced.spans())

    await eventually(completed, timeout=30)
    spans = traced.spans()

    (root,) = [
        s
        for s in spans
        if s.parent is None
        and s.attributes
        and s.attributes.get("http.route") == "/v1/cancellations"
    ]
    trace_id = root.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    by_id = {s.context.span_id: s for s in in_trace}

    # The API request is the root; the client's start and the worker's run join it.
    assert "StartWorkflow:OrderCancellation" in names, sorted(names)
    assert "RunWorkflow:OrderCancellation" in names, sorted(names)
    assert "CompleteWorkflow:OrderCancellation" in names, sorted(names)
    run_activities = {n for n in names if n.startswith("RunActivity:")}
    assert {
        "RunActivity:open_cancellation",
        "RunActivity:submit_refund_and_confirm",
    } <= run_activities
    # The provider's call inside the activity that made it.
    (provider_call,) = [s for s in in_trace if s.name == "payment_provider.create_refund"]
    assert "RunActivity:submit_refund_and_confirm" in ancestors(provider_call, by_id)
    assert provider_call.attributes is not None
    assert provider_call.attributes["payment_provider.payment_id"] == f"P-{order_id}"
    # The ledger's statements: asyncpg spans, under the activities and under the API request.
    statements = [
        s for s in in_trace if s.attributes and s.attributes.get("db.system") == "postgresql"
    ]
    assert statements
    assert any(any(a.startswith("RunActivity:") for a in ancestors(s, by_id)) for s in statements)
    assert all(ancestors(s, by_id)[-1] == root.name for s in in_trace if s is not root)

    # One trace per cancellation: every span naming the workflow is in this trace.
    naming = [
        s
        for s in spans
        if s.attributes and s.attributes.get("temporalWorkflowID") == cancellation_id
    ]
    assert naming and {s.context.trace_id for s in naming} == {trace_id}
    # The probes, polled every few seconds, make no trace.
    assert (await traced.stack.http.get("/healthz")).status_code == 200
    assert not [s for s in traced.spans() if s.name.startswith("GET /healthz")]
    # Spans say which process made them.
    assert root.resource.attributes["service.name"] == "ordercancel-test"


def test_tracing_is_off_without_an_endpoint(no_endpoint: None) -> None:
    assert not tracing.endpoint_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert tracing.start_tracing("ordercancel-api", environ={}) is None
    assert tracing.active() is None
    assert tracing.client_interceptors() == []
    provider = object()
    assert tracing.traced_provider(provider) is provider  # type: ignore[arg-type]


async def test_an_endpoint_turns_tracing_on_with_the_process_name(
    no_endpoint: None, temporal_address: str
) -> None:
    on = tracing.start_tracing(
        "ordercancel-worker", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )
    assert on is not None and on.service == "ordercancel-worker"
    assert on.provider.resource.attributes["service.name"] == "ordercancel-worker"
    client = await connect(temporal_address)
    from temporalio.contrib.opentelemetry import TracingInterceptor

    assert any(isinstance(i, TracingInterceptor) for i in client.config()["interceptors"])

"""The metrics plumbing without a server: where the endpoint is served, labels kept bounded,
and a worker without metrics recording nothing. (test_observability.py scrapes a real one.)"""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import httpx
import pytest
from temporalio.common import MetricMeter

from api.app import create_app
from api.keys import KeyStore
from devstack.embedded import free_port
from infra.metrics import (
    API_REQUEST_SECONDS,
    API_REQUESTS,
    DEFAULT_METRICS_PORT,
    HISTOGRAM_BUCKETS,
    NO_METRICS,
    ApiMetrics,
    BusinessMetrics,
    DispatchMetrics,
    decided_by,
    delivery_failure_reason,
    failure_reason,
    metrics_address,
    metrics_runtime,
    worker_metrics_runtime,
)
from infra.settings import Settings


def test_metrics_port_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_port is None  # tests and one-off commands serve nothing
    monkeypatch.setenv("ORDERCANCEL_METRICS_PORT", "9999")
    monkeypatch.setenv("ORDERCANCEL_METRICS_HOST", "0.0.0.0")
    settings = Settings()
    assert metrics_address(settings.metrics_port, settings.metrics_host) == "0.0.0.0:9999"


def test_worker_default_port_and_off_switch() -> None:
    assert metrics_address(None, default_port=DEFAULT_METRICS_PORT) == "127.0.0.1:9464"
    assert metrics_address(None) is None
    assert metrics_address(0, default_port=DEFAULT_METRICS_PORT) is None
    assert worker_metrics_runtime(0) == (None, None)


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics_runtime(f"127.0.0.1:{port}")


def test_labels_drop_ids() -> None:
    assert decided_by("seller:S-7") == "seller"
    assert decided_by("operator:op-1") == "operator"
    assert decided_by("timer") == "timer"
    assert decided_by("someone-else:x") == "other"
    assert failure_reason("RefundRejected: card_closed: refused") == "RefundRejected"
    assert failure_reason("ProviderUnavailable: 503") == "ProviderUnavailable"
    assert failure_reason("something new for cancel-O-1-S-7") == "other"


def test_without_metrics_nothing_is_recorded() -> None:
    assert not NO_METRICS.enabled
    NO_METRICS.cancellation_started(path="instant")  # a no-op, not an error
    NO_METRICS.seller_decided(decision="approved", decided_by="seller", seconds=1.0)


def test_business_metrics_come_out_of_the_runtime_endpoint() -> None:
    port = free_port()
    runtime = metrics_runtime(f"127.0.0.1:{port}")
    metrics = BusinessMetrics.for_runtime(runtime)
    assert metrics.enabled
    metrics.cancellation_started(path="request")
    metrics.seller_decided(decision="approved", decided_by="timer", seconds=30 * 3600)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'ordercancel_cancellations_started{path="request"' in text
    # Hour-scale buckets: 30 h falls between 24 h and 36 h.
    bucket = "ordercancel_seller_decision_seconds_bucket"
    assert any(
        line.startswith(bucket) and 'le="86400"' in line and line.endswith(" 0")
        for line in text.splitlines()
    )
    assert any(
        line.startswith(bucket) and 'le="129600"' in line and line.endswith(" 1")
        for line in text.splitlines()
    )


async def test_api_requests_are_counted_by_route_template_method_and_status() -> None:
    """The API's answers on a real Prometheus endpoint: the route's template, never the raw
    path with its ids; a path no route matches is `unmatched`."""
    port = free_port()
    runtime = metrics_runtime(f"127.0.0.1:{port}")
    app = create_app(
        Settings(), keys=KeyStore.from_keys({}), metrics=ApiMetrics.for_runtime(runtime)
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test"
    ) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        # Served without its lifespan (no ledger, no Temporal): not ready, 503.
        refused = await http.get("/v1/cancellations/cancel-O-7~S-9")
        assert refused.status_code == 503
        assert (await http.get("/no/such/path")).status_code == 404

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        return text

    text = await asyncio.to_thread(scrape)
    lines = text.splitlines()

    def value(name: str, **labels: str) -> float:
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value(API_REQUESTS, route="/healthz", method="GET", status="200") == 2
    assert (
        value(API_REQUESTS, route="/v1/cancellations/{cancellation_id}", method="GET", status="503")
        == 1
    )
    assert value(API_REQUESTS, route="unmatched", method="GET", status="404") == 1
    assert value(API_REQUEST_SECONDS + "_count", route="/healthz", method="GET", status="200") == 2
    # Seconds-scale buckets: both health answers (in-process, no I/O) are under half a second,
    # counted in a sub-second bucket, not lumped into the exporter's millisecond defaults.
    healthz = {"route": "/healthz", "method": "GET", "status": "200"}
    assert value(API_REQUEST_SECONDS + "_bucket", le="0.5", **healthz) == 2
    assert value(API_REQUEST_SECONDS + "_bucket", le="0.005", **healthz) <= 2
    buckets = [
        line.split('le="', 1)[1].split('"', 1)[0]
        for line in lines
        if line.startswith(API_REQUEST_SECONDS + "_bucket{") and 'route="/healthz"' in line
    ]
    assert buckets == [*(str(b) for b in HISTOGRAM_BUCKETS[API_REQUEST_SECONDS]), "+Inf"]
    assert "cancel-O-7" not in text and "/no/such/path" not in text


def test_dispatch_failure_reasons_are_a_small_set() -> None:
    assert delivery_failure_reason(503, None) == "http_5xx"
    assert delivery_failure_reason(404, None) == "http_4xx"
    assert delivery_failure_reason(None, httpx.ReadTimeout("slow")) == "timeout"
    assert delivery_failure_reason(None, httpx.ConnectError("refused")) == "connect"
    assert delivery_failure_reason(None, httpx.RemoteProtocolError("bad")) == "other"


class _RecordingMeter:
    """Stands in for a MetricMeter: notes each histogram created, and its unit."""

    def __init__(self) -> None:
        self.histograms: dict[str, str | None] = {}

    def _histogram(self, name: str, description: str | None = None, unit: str | None = None):  # type: ignore[no-untyped-def]
        self.histograms[name] = unit
        return MetricMeter.noop.create_histogram_float(name, description, unit)

    create_histogram = create_histogram_float = create_histogram_timedelta = _histogram

    def __getattr__(self, attr: str) -> object:
        return getattr(MetricMeter.noop, attr)


def test_every_histogram_records_seconds_into_buckets_of_its_own() -> None:
    """The exporter's default buckets are milliseconds (the SDK's unit): a histogram of seconds
    without its own buckets would put every observation in the first bucket."""
    meter = _RecordingMeter()
    for kind in (BusinessMetrics, DispatchMetrics, ApiMetrics):
        kind(meter)  # type: ignore[arg-type]
    assert meter.histograms  # the three kinds do create histograms
    assert set(meter.histograms.values()) == {"s"}
    assert set(meter.histograms) == set(HISTOGRAM_BUCKETS)
    for name, buckets in HISTOGRAM_BUCKETS.items():
        assert list(buckets) == sorted(buckets), name
    api = HISTOGRAM_BUCKETS[API_REQUEST_SECONDS]
    assert api[0] <= 0.01 and 1 in api and api[-1] >= 10

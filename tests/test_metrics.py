"""The metrics plumbing without a server: where the endpoint is served, labels kept bounded,
and a worker without metrics recording nothing. (test_observability.py scrapes a real one.)"""

from __future__ import annotations

import socket
import urllib.request

import pytest

from devstack.embedded import free_port
from infra.metrics import (
    DEFAULT_METRICS_PORT,
    NO_METRICS,
    BusinessMetrics,
    decided_by,
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

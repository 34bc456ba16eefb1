"""Prometheus metrics: the Temporal SDK's own and the business metrics, on one endpoint.

The Temporal runtime serves both: `metrics_runtime()` builds a `Runtime` with the Prometheus
exporter, the client is connected with it (`infra.client.connect(runtime=...)`), the SDK's
worker and client metrics come out of it, and `BusinessMetrics` records through the same
runtime's meter. Names, types and labels are documented in docs/observability.md.

Labels carry only values from small fixed sets (path, status, outcome, error type): never an
order, seller, buyer or workflow id, which would make one time series per cancellation.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final

from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

# What `ordercancel worker` and `ordercancel dev` serve on when ORDERCANCEL_METRICS_PORT is
# unset (the OpenTelemetry/Prometheus exporter convention); 0 turns the endpoint off.
DEFAULT_METRICS_PORT: Final = 9464

CANCELLATIONS_STARTED: Final = "ordercancel_cancellations_started"
CANCELLATION_OUTCOMES: Final = "ordercancel_cancellation_outcomes"
SELLER_DECISION_SECONDS: Final = "ordercancel_seller_decision_seconds"
REFUND_STAGE_SECONDS: Final = "ordercancel_refund_stage_seconds"
REFUND_FAILURES: Final = "ordercancel_refund_failures"
REFUNDS_PARKED: Final = "ordercancel_refunds_parked"
REFUNDS_REVERSED: Final = "ordercancel_refunds_reversed"
COUPON_OUTCOMES: Final = "ordercancel_coupon_outcomes"

API_REQUESTS: Final = "ordercancel_api_requests"
API_REQUEST_SECONDS: Final = "ordercancel_api_request_seconds"

_HOUR = 3600.0
# Every histogram here records seconds, so each needs buckets of its own: the exporter's
# defaults are made for the SDK's millisecond durations (50, 100, 500, 1000, 2500, 10000), and
# in seconds they would put every API answer in the first bucket, and cut off a seller's 48 h
# or a card refund's days. Checked by tests/test_metrics.py: every histogram is listed here.
HISTOGRAM_BUCKETS: Final[Mapping[str, Sequence[float]]] = {
    # An API answer: a read of the ledger is milliseconds, a start or an update waits for
    # Temporal (tens to hundreds of ms); past 10 s the client has given up.
    API_REQUEST_SECONDS: (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    SELLER_DECISION_SECONDS: (
        60,
        5 * 60,
        15 * 60,
        _HOUR,
        4 * _HOUR,
        12 * _HOUR,
        24 * _HOUR,
        36 * _HOUR,
        48 * _HOUR,
        72 * _HOUR,
    ),
    REFUND_STAGE_SECONDS: (
        0.1,
        0.5,
        1,
        5,
        30,
        60,
        5 * 60,
        _HOUR,
        6 * _HOUR,
        24 * _HOUR,
        72 * _HOUR,
        7 * 24 * _HOUR,
    ),
}

# Refund failure reasons are the activities' ApplicationError types; anything else is "other".
REFUND_FAILURE_REASONS: Final = frozenset(
    {"ProviderUnavailable", "RefundRejected", "RefundFailedAtProvider"}
)


def metrics_address(
    port: int | None, host: str = "127.0.0.1", *, default_port: int | None = None
) -> str | None:
    """`host:port` to serve metrics on: `port`, else `default_port`; None (off) when that is
    unset or 0."""
    chosen = port if port is not None else default_port
    return f"{host}:{chosen}" if chosen else None


def metrics_runtime(bind_address: str) -> Runtime:
    """A Temporal runtime exporting every metric at `http://<bind_address>/metrics`.

    Keep it for the life of the process and connect the worker's client with it: the SDK's
    metrics belong to the client's runtime. Checked first, because a port already in use
    otherwise surfaces later as an obscure error from the runtime's exporter thread.
    """
    host, _, port = bind_address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", int(port)))
        except OSError as err:
            raise RuntimeError(
                f"cannot serve metrics on {bind_address}: {err.strerror}; set"
                " ORDERCANCEL_METRICS_PORT to a free port (0 turns metrics off)"
            ) from err
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=bind_address, histogram_bucket_overrides=HISTOGRAM_BUCKETS
            )
        )
    )


def worker_metrics_runtime(
    port: int | None, host: str = "127.0.0.1"
) -> tuple[Runtime | None, str | None]:
    """The runtime (and scrape URL) of `ordercancel worker` / `dev`: `port` (Settings'
    `metrics_port`), else DEFAULT_METRICS_PORT; (None, None) when turned off with 0."""
    address = metrics_address(port, host, default_port=DEFAULT_METRICS_PORT)
    if address is None:
        return None, None
    return metrics_runtime(address), f"http://{address}/metrics"


def decided_by(actor: str) -> str:
    """The audit actor (`seller:S-7`, `timer`, `operator:op-1`) without its id."""
    kind = actor.split(":", 1)[0]
    return kind if kind in ("seller", "timer", "operator", "buyer") else "other"


def failure_reason(error: str) -> str:
    """The error type an activity failure message starts with (`RefundRejected: ...`)."""
    kind = error.split(":", 1)[0].strip()
    return kind if kind in REFUND_FAILURE_REASONS else "other"


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start) / timedelta(seconds=1), 0.0)


class BusinessMetrics:
    """What the business did, recorded by the activities (they run once per step, unlike
    workflow code, which replays). An activity retried after its work committed but before
    its completion reached Temporal counts again: these are at-least-once counts.

    `BusinessMetrics()` records nothing; `enabled` tells callers whether reading extra facts
    (timestamps) for a metric is worth a query.
    """

    def __init__(self, meter: MetricMeter | None = None) -> None:
        meter = meter or MetricMeter.noop
        self.enabled = meter is not MetricMeter.noop
        self._started = meter.create_counter(
            CANCELLATIONS_STARTED, "Cancellations opened, by path (instant, request)"
        )
        self._outcomes = meter.create_counter(
            CANCELLATION_OUTCOMES,
            "Cancellations that ended, by final status (completed, rejected, withdrawn)",
        )
        self._decision = meter.create_histogram_float(
            SELLER_DECISION_SECONDS,
            "Time from the request to the decision on it, by decision and who decided",
            "s",
        )
        self._stage = meter.create_histogram_float(
            REFUND_STAGE_SECONDS,
            "Time a refund took to reach a stage from the previous one (requested -> submitted"
            " -> confirmed), by stage and kind (void, refund)",
            "s",
        )
        self._refund_failures = meter.create_counter(
            REFUND_FAILURES, "Failed calls to the payment provider, by error type and step"
        )
        self._parked = meter.create_counter(
            REFUNDS_PARKED, "Refunds parked in refund_failed for an operator, by error type"
        )
        self._reversed = meter.create_counter(
            REFUNDS_REVERSED,
            "Confirmed refunds the provider reported failed afterwards, by kind (void, refund)",
        )
        self._coupons = meter.create_counter(
            COUPON_OUTCOMES,
            "Coupon decisions, by outcome (restored, partial_refund, expired, no_coupon)",
        )

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> BusinessMetrics:
        return cls(runtime.metric_meter)

    @classmethod
    def for_client(cls, client: Client) -> BusinessMetrics:
        """Record through the runtime the client was connected with (no-op without metrics)."""
        runtime = client.service_client.config.runtime or Runtime.default()
        return cls.for_runtime(runtime)

    def cancellation_started(self, *, path: str) -> None:
        self._started.add(1, {"path": path})

    def cancellation_ended(self, *, status: str) -> None:
        self._outcomes.add(1, {"status": status})

    def seller_decided(self, *, decision: str, decided_by: str, seconds: float) -> None:
        self._decision.record(seconds, {"decision": decision, "decided_by": decided_by})

    def refund_stage_reached(self, *, stage: str, kind: str, seconds: float) -> None:
        self._stage.record(seconds, {"stage": stage, "kind": kind})

    def refund_call_failed(self, *, reason: str, step: str) -> None:
        self._refund_failures.add(1, {"reason": reason, "step": step})

    def refund_parked(self, *, reason: str) -> None:
        self._parked.add(1, {"reason": reason})

    def refund_reversed(self, *, kind: str) -> None:
        self._reversed.add(1, {"kind": kind})

    def coupon_decided(self, *, outcome: str) -> None:
        self._coupons.add(1, {"outcome": outcome})


NO_METRICS: Final = BusinessMetrics()


OUTBOX_LAG_EVENTS: Final = "ordercancel_outbox_lag_events"
OUTBOX_OLDEST_UNDELIVERED_SECONDS: Final = "ordercancel_outbox_oldest_undelivered_seconds"
OUTBOX_DELIVERIES: Final = "ordercancel_outbox_deliveries"
OUTBOX_DELIVERY_FAILURES: Final = "ordercancel_outbox_delivery_failures"


def delivery_failure_reason(status: int | None, error: BaseException | None) -> str:
    """A small fixed set: http_4xx, http_5xx, timeout, connect, other."""
    if status is not None:
        return "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "other"
    name = type(error).__name__ if error is not None else ""
    if "Timeout" in name:
        return "timeout"
    if "Connect" in name:
        return "connect"
    return "other"


class DispatchMetrics:
    """The outbound events' dispatcher (outbound/dispatcher.py), per subscriber: how far behind
    it is (events, and the age of the oldest it has not acknowledged), deliveries, failures.
    The subscriber label is a configured name (a few), never an event or cancellation id."""

    def __init__(self, meter: MetricMeter | None = None) -> None:
        meter = meter or MetricMeter.noop
        self._lag = meter.create_gauge(
            OUTBOX_LAG_EVENTS, "Events in the stream after the subscriber's position"
        )
        self._oldest = meter.create_gauge_float(
            OUTBOX_OLDEST_UNDELIVERED_SECONDS,
            "Age of the oldest event the subscriber has not acknowledged (0: none)",
            "s",
        )
        self._deliveries = meter.create_counter(
            OUTBOX_DELIVERIES, "Events the subscriber acknowledged (2xx)"
        )
        self._failures = meter.create_counter(
            OUTBOX_DELIVERY_FAILURES,
            "Failed delivery attempts, by subscriber and reason (http_4xx, http_5xx, timeout,"
            " connect, other)",
        )

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> DispatchMetrics:
        return cls(runtime.metric_meter)

    def lag(self, *, subscriber: str, events: int, oldest_seconds: float) -> None:
        self._lag.set(events, {"subscriber": subscriber})
        self._oldest.set(oldest_seconds, {"subscriber": subscriber})

    def delivered(self, *, subscriber: str) -> None:
        self._deliveries.add(1, {"subscriber": subscriber})

    def failed(self, *, subscriber: str, reason: str) -> None:
        self._failures.add(1, {"subscriber": subscriber, "reason": reason})


NO_DISPATCH_METRICS: Final = DispatchMetrics()


# Default port of `ordercancel api`'s endpoint (`ordercancel dev` serves the API's metrics on
# the worker's).
DEFAULT_API_METRICS_PORT: Final = 9466


class ApiMetrics:
    """The HTTP API's requests and latency, by route template (`/v1/cancellations/{id}`, never
    the raw path, which carries ids), method and status code (api/middleware.py)."""

    def __init__(self, meter: MetricMeter | None = None) -> None:
        meter = meter or MetricMeter.noop
        self._requests = meter.create_counter(
            API_REQUESTS, "HTTP requests answered, by route template, method and status code"
        )
        self._seconds = meter.create_histogram_float(
            API_REQUEST_SECONDS,
            "Time to answer an HTTP request, by route template, method and status code",
            "s",
        )

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> ApiMetrics:
        return cls(runtime.metric_meter)

    def answered(self, *, route: str, method: str, status: int, seconds: float) -> None:
        labels = {"route": route, "method": method, "status": str(status)}
        self._requests.add(1, labels)
        self._seconds.record(seconds, labels)


NO_API_METRICS: Final = ApiMetrics()

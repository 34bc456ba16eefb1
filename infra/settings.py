"""Every setting the service reads, from the environment (docs/configuration.md lists them)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.models import RefundPolicy, TimeoutPolicy
from domain.rules import parse_duration

TASK_QUEUE = "order-cancellation"


def _duration(value: object) -> object:
    return parse_duration(value) if isinstance(value, str) else value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
# A number of pollers (at least 1), or "auto".
Pollers = Annotated[int, Field(ge=1)] | Literal["auto"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERCANCEL_", extra="ignore")

    # Servers the user already runs. Unset: `ordercancel dev` starts embedded ones.
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "ORDERCANCEL_DATABASE_URL")
    )
    temporal_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TEMPORAL_ADDRESS", "ORDERCANCEL_TEMPORAL_ADDRESS"),
    )
    temporal_namespace: str = Field(
        default="default",
        validation_alias=AliasChoices("TEMPORAL_NAMESPACE", "ORDERCANCEL_TEMPORAL_NAMESPACE"),
    )
    task_queue: str = TASK_QUEUE

    @field_validator("database_url", "temporal_address", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`DATABASE_URL=` (as an env file or a shell leaves it) means unset, not "localhost"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    # The rule book's defaults (R4, R10); every one is configuration.
    seller_response_window: Duration = timedelta(hours=48)
    # R19: no seller's window (policy or default) is shorter than this.
    seller_response_window_floor: Duration = timedelta(hours=1)
    timeout_policy: TimeoutPolicy = TimeoutPolicy.AUTO_APPROVE
    refund_submit_initial_interval: Duration = timedelta(seconds=1)
    refund_submit_max_interval: Duration = timedelta(minutes=5)
    refund_submit_max_attempts: int = Field(default=8, ge=1, le=1000)
    refund_poll_interval: Duration = timedelta(seconds=5)
    refund_poll_max_interval: Duration = timedelta(hours=1)

    # The embedded stack (`ordercancel dev`).
    data_dir: Path = Path(".data")
    temporal_port: int = 7233
    ui_port: int = 8233

    # The payment provider: the built-in simulator (fault injection), or Stripe
    # (payments/stripe_provider.py: our payment ids are Stripe PaymentIntent ids).
    provider: Literal["simulator", "stripe"] = "simulator"
    stripe_api_key: SecretStr | None = None
    # Another API base, e.g. a localstripe for tests (unset: Stripe's own).
    stripe_api_base: str | None = None
    sim_latency: Duration = timedelta(0)
    sim_transient_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    sim_confirm_after_polls: int = Field(default=1, ge=0)

    # The worker's tuning (workers.worker.build_worker), the SDK's defaults unless set. Pollers:
    # how many task polls each kind keeps open, a number or "auto" (PollerBehaviorAutoscaling).
    # Concurrency unset: the SDK's own (100 slots each). While it caches workflows, the SDK wants
    # at least 2 workflow-task pollers and 2 concurrent workflow tasks.
    worker_max_cached_workflows: int = Field(default=1000, ge=0)
    worker_workflow_task_pollers: Pollers = 5
    worker_activity_task_pollers: Pollers = 5
    worker_max_concurrent_workflow_tasks: int | None = Field(default=None, ge=1)
    worker_max_concurrent_activities: int | None = Field(default=None, ge=1)

    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=10, ge=1)

    # Prometheus endpoint of `ordercancel worker` / `dev` (unset: 9464 there; 0: off). Other
    # processes, tests included, serve none unless they ask (infra.metrics).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # The HTTP API (`ordercancel api`, and beside the worker in `ordercancel dev`; docs/api.md).
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    # Prometheus endpoint of `ordercancel api` (0: off); `ordercancel dev` serves the API's
    # metrics on the worker's endpoint.
    api_metrics_port: int = Field(default=9466, ge=0, le=65535)
    # API keys, stored hashed (`ordercancel api hash-key`): a file, and/or the same lines in
    # ORDERCANCEL_API_KEYS (newline- or `;`-separated) for tests and dev.
    api_keys_file: Path | None = None
    api_keys: SecretStr | None = None
    # How long POST /v1/cancellations waits for the outcome of an instant-path cancellation.
    api_instant_wait: Duration = timedelta(seconds=5)
    # The payment provider's webhook: shared HMAC secret and how old a signature may be.
    payment_webhook_secret: SecretStr | None = None
    webhook_tolerance: Duration = timedelta(minutes=5)
    # Stripe's webhook endpoint secret (`whsec_...`) for POST /v1/providers/stripe/webhook.
    stripe_webhook_secret: SecretStr | None = None

    # Outbound events (R16, docs/events.md): the subscribers, as a JSON list and/or a file
    # holding one (outbound/subscribers.py), and how `ordercancel dispatch` delivers.
    subscribers: SecretStr | None = None
    subscribers_file: Path | None = None
    dispatch_poll_interval: Duration = timedelta(seconds=1)
    dispatch_retry_initial: Duration = timedelta(seconds=1)
    # The backoff's cap is also how long a subscriber that came back may wait for its next event.
    dispatch_retry_max: Duration = timedelta(seconds=30)
    dispatch_timeout: Duration = timedelta(seconds=10)
    # How often the lag gauges (events behind, oldest undelivered age) are refreshed.
    dispatch_metrics_interval: Duration = timedelta(seconds=5)
    # Prometheus endpoint of `ordercancel dispatch` (0: off); `ordercancel dev` serves the
    # dispatcher's metrics on the worker's endpoint.
    dispatch_metrics_port: int = Field(default=9465, ge=0, le=65535)

    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def refund_policy(self) -> RefundPolicy:
        return RefundPolicy(
            submit_initial_interval=self.refund_submit_initial_interval,
            submit_max_interval=self.refund_submit_max_interval,
            submit_max_attempts=self.refund_submit_max_attempts,
            poll_interval=self.refund_poll_interval,
            poll_max_interval=self.refund_poll_max_interval,
        )

    def database_dsn(self) -> str:
        if self.database_url is None:
            raise RuntimeError("DATABASE_URL is not set and no embedded PostgreSQL was started")
        return self.database_url.get_secret_value()

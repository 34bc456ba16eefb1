"""`ordercancel api`: serve the HTTP API; `api hash-key`: make a key; `api openapi`: export the
OpenAPI document. Heavy imports wait until a command needs them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from api.keys import (
    DOCS_EXAMPLE_KEY_ID,
    KeyConfigError,
    KeyStore,
    Principal,
    generate_key,
    key_line,
)
from infra.logging import configure_logging
from infra.settings import Settings

api_app = typer.Typer(
    help="The HTTP API (docs/api.md). With no command: serve it (as below). Commands: make API"
    " keys, export the OpenAPI document.",
    invoke_without_command=True,
)


@api_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: ORDERCANCEL_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: ORDERCANCEL_API_PORT")] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="json (default) or console")
    ] = None,
) -> None:
    """Serve the API until SIGINT/SIGTERM (needs Temporal and PostgreSQL, as `worker` does)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from api.app import create_app
    from infra.tracing import SERVICE_API, start_tracing

    settings = Settings()
    configure_logging(log_format or settings.log_format, settings.log_level)  # type: ignore[arg-type]
    start_tracing(SERVICE_API)
    try:
        keys = KeyStore.load(
            file=settings.api_keys_file,
            env_value=settings.api_keys.get_secret_value() if settings.api_keys else None,
        )
        check_secrets(settings, keys)
    except KeyConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    from api.app import connected
    from infra.metrics import ApiMetrics, metrics_address, metrics_runtime

    # The API's metrics (requests and latency per route, the Temporal client's) on their own
    # endpoint: ORDERCANCEL_API_METRICS_PORT (0: off).
    address = metrics_address(settings.api_metrics_port, settings.metrics_host)
    runtime = metrics_runtime(address) if address else None
    app = create_app(
        settings,
        keys=keys,
        resources=connected(settings, runtime),
        metrics=ApiMetrics.for_runtime(runtime) if runtime else ApiMetrics(),
    )
    config = uvicorn.Config(
        app,
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        log_config=None,  # uvicorn's lines go through our structlog handler
        server_header=False,
    )
    uvicorn.Server(config).run()


# What templates and docs put where a secret goes: deploy/k8s/secret.yaml (CHANGE-ME, ""),
# docs/api.md's worked example (whsec_example), and the usual stand-ins.
_PLACEHOLDER = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|set[-_ ]?me|placeholder|example|dummy|secret[-_ ]?here"
    r"|todo|fixme|\.\.\.|^<.*>$|^x+$|^whsec_?$",
    re.IGNORECASE,
)
MIN_WEBHOOK_SECRET = 16


def check_secrets(settings: Settings, keys: KeyStore) -> None:
    """Refuse to serve on a secret that was never set: an empty or placeholder webhook secret
    (anyone could sign events), no API key at all, or a key line copied from docs/api.md.
    Raises `KeyConfigError` naming the setting."""
    check_webhook_secrets(settings)
    if not len(keys):
        raise KeyConfigError(
            "no API keys: ORDERCANCEL_API_KEYS (or ORDERCANCEL_API_KEYS_FILE) is empty or unset;"
            " add the lines of `ordercancel api hash-key <principal>`"
        )
    if keys.has_key_id(DOCS_EXAMPLE_KEY_ID):
        raise KeyConfigError(
            f"ORDERCANCEL_API_KEYS holds the example hash of docs/api.md (key id"
            f" {DOCS_EXAMPLE_KEY_ID}), a placeholder: make real keys with"
            " `ordercancel api hash-key`"
        )


def check_webhook_secrets(settings: Settings) -> None:
    """Refuse a configured webhook secret that is empty, a placeholder or too short: the payment
    provider's (ORDERCANCEL_PAYMENT_WEBHOOK_SECRET) and Stripe's endpoint secret
    (ORDERCANCEL_STRIPE_WEBHOOK_SECRET). Raises `KeyConfigError` naming the setting."""
    webhooks = (
        ("ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", settings.payment_webhook_secret, "payment provider"),
        ("ORDERCANCEL_STRIPE_WEBHOOK_SECRET", settings.stripe_webhook_secret, "Stripe endpoint"),
    )
    for name, configured, whose in webhooks:
        if configured is None:
            continue
        secret = configured.get_secret_value().strip()
        if not secret:
            raise KeyConfigError(f"{name} is empty: set the {whose}'s webhook secret, or unset it")
        if _PLACEHOLDER.search(secret) or len(secret) < MIN_WEBHOOK_SECRET:
            raise KeyConfigError(
                f"{name} holds a placeholder (or is shorter than {MIN_WEBHOOK_SECRET}"
                f" characters): set the {whose}'s real webhook secret"
            )


@api_app.command("hash-key")
def hash_key(
    principal: Annotated[
        str, typer.Argument(help="buyer-service, seller:<seller_id>, sre or payment-provider")
    ],
    key_stdin: Annotated[
        bool, typer.Option("--key-stdin", help="Hash the key read from stdin instead of a new one")
    ] = False,
) -> None:
    """Make a new API key for PRINCIPAL and print it once, with the line for the keys file."""
    try:
        who = Principal.parse(principal)
        key = sys.stdin.readline().strip() if key_stdin else generate_key()
        line = key_line(who, key)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if not key_stdin:
        typer.echo(f"# API key for {who}: give it to its owner; it is stored nowhere", err=True)
        typer.echo(f"key: {key}")
    typer.echo("# add this line to the keys file (or to ORDERCANCEL_API_KEYS):", err=True)
    typer.echo(line)


@api_app.command("openapi")
def openapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")
    ] = None,
) -> None:
    """Print the OpenAPI document (docs/openapi.json is this, kept in sync by a test)."""
    from api.app import create_app

    text = openapi_json(create_app(Settings()).openapi())
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


def openapi_json(document: dict[str, object]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"

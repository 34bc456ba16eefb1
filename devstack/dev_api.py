"""The API inside `ordercancel dev`: served in the dev stack's event loop, beside the worker.

Unless keys are configured (`ORDERCANCEL_API_KEYS`, `ORDERCANCEL_API_KEYS_FILE`), demo keys and
a webhook secret are made once and kept in `.data/dev-api-keys.json` (development only: they
are plaintext there, and printed to the console, never to the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
import uvicorn
from rich.console import Console
from temporalio.client import Client

from api.app import borrowed, create_app
from api.keys import KeyStore, generate_key
from infra.metrics import NO_API_METRICS, ApiMetrics
from infra.settings import Settings

log = structlog.get_logger(__name__)

DEV_KEYS_FILE = "dev-api-keys.json"
# The principals of the demo and of the README's try-it orders.
DEV_PRINCIPALS = (
    "buyer-service",
    "sre",
    "payment-provider",
    "order-system",
    "seller:S-1",
    "seller:S-2",
    "seller:S-7",
    "seller:S-8",
)


@dataclass(frozen=True)
class DevCredentials:
    keys: dict[str, str]  # principal -> plaintext key
    webhook_secret: str
    path: Path


def dev_credentials(data_dir: Path) -> DevCredentials:
    """The dev keys, made on first use and kept for the next `make run`."""
    path = data_dir / DEV_KEYS_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            keys = {str(p): str(k) for p, k in stored["keys"].items()}
            webhook_secret = str(stored["payment_webhook_secret"])
        except (ValueError, KeyError, AttributeError) as err:
            raise RuntimeError(f"{path} is unreadable ({err}); delete it to make new keys") from err
        missing = [p for p in DEV_PRINCIPALS if p not in keys]
        if missing:
            # A principal added since the file was made (e.g. order-system): its key is made
            # now, the others are kept.
            keys.update({principal: generate_key() for principal in missing})
            _write(path, keys, webhook_secret, replace=True)
        return DevCredentials(keys=keys, webhook_secret=webhook_secret, path=path)
    credentials = DevCredentials(
        keys={principal: generate_key() for principal in DEV_PRINCIPALS},
        webhook_secret="whsec_" + secrets.token_urlsafe(32),
        path=path,
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    _write(path, credentials.keys, credentials.webhook_secret, replace=False)
    return credentials


def _write(path: Path, keys: dict[str, str], webhook_secret: str, *, replace: bool) -> None:
    document = {
        "warning": "development keys of `ordercancel dev`; never use them elsewhere",
        "keys": keys,
        "payment_webhook_secret": webhook_secret,
    }
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(document, file, indent=2)


class _InLoopServer(uvicorn.Server):
    """uvicorn without its own signal handling: `ordercancel dev` owns Ctrl-C and stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class DevApi:
    url: str | None
    banner: str
    server: _InLoopServer | None = None
    task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task


async def start_dev_api(
    settings: Settings,
    *,
    pool: asyncpg.Pool,
    client: Client,
    console: Console,
    metrics: ApiMetrics = NO_API_METRICS,
) -> DevApi:
    """Serve the API on settings.api_host:api_port; a port already taken is reported, and the
    rest of the stack goes on without the API."""
    configured = settings.api_keys is not None or settings.api_keys_file is not None
    credentials = None if configured else dev_credentials(settings.data_dir)
    keys = KeyStore.from_keys(credentials.keys) if credentials is not None else None
    secret = None
    if settings.payment_webhook_secret is None and credentials is not None:
        secret = credentials.webhook_secret
    app = create_app(
        settings,
        resources=borrowed(pool, client),
        keys=keys,
        webhook_secret=secret,
        metrics=metrics,
    )
    server = _InLoopServer(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            server_header=False,
        )
    )

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way of saying it could not start (port taken)
            log.warning("api_not_started", port=settings.api_port)

    task = asyncio.create_task(serve())
    # uvicorn exposes only a flag for "listening".
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if not server.started:
        return DevApi(
            url=None,
            banner=f"API: not started (port {settings.api_port} taken? set ORDERCANCEL_API_PORT)",
        )
    url = f"http://{settings.api_host}:{settings.api_port}"
    return DevApi(
        url=url,
        banner=dev_banner(settings, url, credentials, secret),
        server=server,
        task=task,
    )


def shell_variable(principal: str) -> str:
    """The shell variable holding a principal's dev key: BUYER_KEY (the README's name),
    SRE_KEY, PAYMENT_PROVIDER_KEY, ORDER_SYSTEM_KEY, SELLER_S1_KEY, ..."""
    if principal == "buyer-service":
        return "BUYER_KEY"
    name = principal.upper().replace(":", "_").replace("-", "_")
    if name.startswith("SELLER_"):
        name = "SELLER_" + name.removeprefix("SELLER_").replace("_", "")
    return f"{name}_KEY"


def dev_banner(
    settings: Settings, url: str, credentials: DevCredentials | None, secret: str | None
) -> str:
    """What `ordercancel dev` prints about its API: the URL, the dev keys, the webhooks and
    one `export` line per variable of the README's curl examples (print it with
    `print_banner`, which never wraps a line)."""
    lines = [f"API: {url} (OpenAPI UI at {url}/docs, guide in docs/api.md)"]
    if credentials is not None:
        lines.append(f"Dev API keys (also in {credentials.path}; development only):")
        lines += [f"  {principal:<17} {key}" for principal, key in credentials.keys.items()]
        buyer = credentials.keys["buyer-service"]
        lines.append(
            f"  curl -H 'Authorization: Bearer {buyer}' {url}/v1/cancellations/cancel-O-2001~S-7"
        )
    if secret is not None:
        lines.append(f"Payment-events webhook (POST /v1/payment-events) secret: {secret}")
    elif settings.payment_webhook_secret is not None:
        lines.append(
            "Payment-events webhook (POST /v1/payment-events): on, secret from"
            " ORDERCANCEL_PAYMENT_WEBHOOK_SECRET"
        )
    if settings.stripe_webhook_secret is not None:
        lines.append(
            "Stripe webhook (POST /v1/providers/stripe/webhook): on, endpoint secret from"
            " ORDERCANCEL_STRIPE_WEBHOOK_SECRET"
        )
    else:
        lines.append(
            "Stripe webhook (POST /v1/providers/stripe/webhook): off; to turn it on, restart with"
            " ORDERCANCEL_STRIPE_WEBHOOK_SECRET=<the endpoint's whsec_... secret, e.g. from"
            " `stripe listen`> (docs/api.md)"
        )
    if credentials is not None:
        # The variables the README's curl examples use, ready to paste into a shell: one per
        # line, so that no wrapped line leaves a key unexported.
        lines.append("For the README's curl examples, paste:")
        lines.append(f"  export API={url}")
        lines += [
            f"  export {shell_variable(principal)}={key}"
            for principal, key in credentials.keys.items()
        ]
        if secret is not None:
            lines.append(f"  export PAYMENT_WEBHOOK_SECRET={secret}")
    return "\n".join(lines)


def print_banner(console: Console, banner: str) -> None:
    """Print the banner as is: no markup, no highlighting and no line wrapped at the
    terminal's width (rich would otherwise break a long line into two)."""
    console.print(banner, markup=False, highlight=False, soft_wrap=True)

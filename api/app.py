"""The API's composition root: settings -> (logging, by the command) -> pool -> client -> app.

`create_app` builds the FastAPI app and nothing else; its lifespan connects (or borrows the
pool and client of `ordercancel dev` and of the tests), loads the keys and serves. Nothing is
created at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from api.deps import ApiContext
from api.errors import ApiError, Problem, field_errors, problem_response
from api.keys import KeyStore
from api.middleware import MAX_BODY_BYTES, BodySizeLimit, CatchAll, RequestMetrics
from api.routes import BODY_MODELS, router
from api.service import CancellationService
from api.stores import IdempotencyStore, SubOrders
from infra.metrics import NO_API_METRICS, ApiMetrics
from infra.settings import Settings
from infra.tracing import instrument_app
from ledger.repository import Ledger

log = structlog.get_logger("api")

TITLE = "order-cancellation API"
VERSION = "1.0.0"
DESCRIPTION = (
    "Marketplace cancellations for services that do not speak Temporal: request a"
    " cancellation, read its state, decide as the seller, withdraw as the buyer, retry a"
    " parked refund, and receive the payment provider's signed webhooks. Every refusal is a"
    " problem document with a machine-readable `code` (docs/api.md)."
)

# Yields the pool and the client the app uses; it owns them or borrows them.
Resources = Callable[[], AbstractAsyncContextManager[tuple[asyncpg.Pool, Client]]]


def connected(settings: Settings, runtime: Runtime | None = None) -> Resources:
    """The app's own connections (`ordercancel api`): the ledger migrated, then Temporal (its
    client on `runtime`, which serves the metrics, when given)."""

    @asynccontextmanager
    async def resources() -> AsyncIterator[tuple[asyncpg.Pool, Client]]:
        from infra.stack import open_stack

        async with open_stack(settings, runtime=runtime) as stack:
            yield stack.pool, stack.client

    return resources


def borrowed(pool: asyncpg.Pool, client: Client) -> Resources:
    """Connections someone else opened and will close (`ordercancel dev`, tests)."""

    @asynccontextmanager
    async def resources() -> AsyncIterator[tuple[asyncpg.Pool, Client]]:
        yield pool, client

    return resources


def create_app(
    settings: Settings,
    *,
    resources: Resources | None = None,
    keys: KeyStore | None = None,
    webhook_secret: str | None = None,
    metrics: ApiMetrics = NO_API_METRICS,
) -> FastAPI:
    """`keys` and `webhook_secret` default to the settings' (`api_keys_file`, `api_keys`,
    `payment_webhook_secret`); `metrics` records every answer (default: nothing)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        key_store = keys
        if key_store is None:
            env_keys = settings.api_keys.get_secret_value() if settings.api_keys else None
            key_store = KeyStore.load(file=settings.api_keys_file, env_value=env_keys)
        secret = webhook_secret
        if secret is None and settings.payment_webhook_secret is not None:
            secret = settings.payment_webhook_secret.get_secret_value()
        if not len(key_store):
            log.warning("api_no_keys", hint="every /v1 request will be refused with 401")
        if secret is None:
            log.warning("api_no_webhook_secret", hint="POST /v1/payment-events answers 503")
        async with (resources or connected(settings))() as (pool, client):

            async def ping_database() -> object:
                return await pool.fetchval("SELECT 1")

            app.state.ctx = ApiContext(
                settings=settings,
                client=client,
                keys=key_store,
                webhook_secret=secret,
                service=CancellationService(
                    client,
                    Ledger(pool),
                    SubOrders(pool),
                    task_queue=settings.task_queue,
                    instant_wait=settings.api_instant_wait,
                ),
                idempotency=IdempotencyStore(pool),
                ping_database=ping_database,
                stripe_webhook_secret=(
                    settings.stripe_webhook_secret.get_secret_value()
                    if settings.stripe_webhook_secret is not None
                    else None
                ),
            )
            log.info(
                "api_ready",
                keys=len(key_store),
                # Which webhooks can be served: POST /v1/payment-events, and Stripe's
                # POST /v1/providers/stripe/webhook.
                webhooks_configured={
                    "payment_events": secret is not None,
                    "stripe": settings.stripe_webhook_secret is not None,
                },
            )
            try:
                yield
            finally:
                app.state.ctx = None

    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.ctx = None
    app.include_router(router)
    _install_handlers(app)
    # The last added is the outermost: CatchAll sees everything, including a 413.
    app.add_middleware(BodySizeLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(CatchAll)
    # Outermost: it sees the status CatchAll answers with, and the route routing matched.
    app.add_middleware(RequestMetrics, metrics=metrics)
    # While tracing is on (infra.tracing), outermost of all: each request is the root span.
    instrument_app(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _install_handlers(app: FastAPI) -> None:
    async def on_refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return problem_response(request.scope, exc)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = field_errors(exc.errors())
        where = ", ".join(".".join(str(p) for p in e.loc) for e in errors[:5])
        refusal = ApiError(422, "invalid_payload", f"invalid fields: {where}", errors=errors)
        return problem_response(request.scope, refusal)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        refusal = ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return problem_response(request.scope, refusal)

    async def on_temporal(request: Request, exc: Exception) -> Response:
        log.warning("temporal_call_failed", error=str(exc), path=request.url.path)
        refusal = ApiError(503, "temporal_unavailable", "Temporal did not answer; retry shortly")
        return problem_response(request.scope, refusal)

    async def on_database(request: Request, exc: Exception) -> Response:
        log.warning("database_call_failed", error=str(exc), path=request.url.path)
        refusal = ApiError(503, "database_unavailable", "the ledger did not answer; retry shortly")
        return problem_response(request.scope, refusal)

    app.add_exception_handler(ApiError, on_refusal)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RPCError, on_temporal)
    for error in (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError):
        app.add_exception_handler(error, on_database)


def _openapi_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    # The request bodies, parsed after the auth checks (api.deps.json_body), and the problem
    # document every refusal answers with.
    _, definitions = models_json_schema(
        [(model, "validation") for model in BODY_MODELS] + [(Problem, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    # FastAPI documents its own validation error shape; every error here is a `Problem`.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path in document.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if "422" in responses and "HTTPValidationError" in str(responses["422"]):
                responses["422"] = {
                    "description": "Unprocessable Content",
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                }
    return document

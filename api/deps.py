"""Request dependencies: the app's context, who is calling, what they may do, and the JSON body.

Dependencies run in the order a route declares them, so every route checks the key (401),
then the role (403), and only then reads the body (400/415/422): a caller who may not use an
endpoint learns nothing about its payload.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from temporalio.client import Client

from api.errors import ApiError, FieldError, validation_refusal
from api.keys import KeyStore, Principal, Role
from api.service import CancellationService
from api.stores import IdempotencyStore
from domain.rules import parse_cancellation_id
from infra.settings import Settings

M = TypeVar("M", bound=BaseModel)


@dataclass
class ApiContext:
    """Everything a request needs, built once by the lifespan (api.app)."""

    settings: Settings
    client: Client
    keys: KeyStore
    webhook_secret: str | None
    service: CancellationService
    idempotency: IdempotencyStore
    ping_database: Callable[[], Awaitable[object]]
    # Stripe's endpoint secret (POST /v1/providers/stripe/webhook); None: not configured.
    stripe_webhook_secret: str | None = None


def context(request: Request) -> ApiContext:
    ctx: ApiContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise ApiError(503, "not_ready", "the API is starting or stopping; retry shortly")
    return ctx


Context = Annotated[ApiContext, Depends(context)]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer ock_<key id>_<secret>`",
)


async def authenticate(
    request: Request,
    ctx: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "unauthenticated",
            "an API key is required: Authorization: Bearer <key>",
            headers=challenge,
        )
    principal = ctx.keys.authenticate(credentials.credentials)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "the API key is not valid", headers=challenge)
    # For the refusal log lines (api.errors): the principal, never the key.
    request.state.principal = str(principal)
    return principal


def allow(*roles: Role, action: str) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in roles:
            raise ApiError(
                403,
                "forbidden",
                f"{principal} may not {action} (allowed: {', '.join(r.value for r in roles)})",
            )
        return principal

    return check


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """The body validated by the workflow's own model: unknown fields, wrong types, unknown
    enum values and oversized text are refused field by field."""

    async def parse(request: Request) -> M:
        if not _is_json(request.headers.get("content-type", "")):
            raise ApiError(
                415,
                "unsupported_media_type",
                "send the body as JSON (Content-Type: application/json)",
            )
        try:
            parsed = model.model_validate_json(await request.body())
        except ValidationError as err:
            raise validation_refusal(err) from None
        refuse_control_characters(parsed)
        return parsed

    parse.__name__ = f"{model.__name__}_body"
    return parse


# Tab, line feed and carriage return stay allowed in text; every other control character, and
# a lone surrogate (which UTF-8 cannot encode), is refused: PostgreSQL stores no NUL, and
# neither belongs in an id or a message (R20).
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def _strings(value: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*loc, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, (*loc, index))


def _has_control(text: str) -> bool:
    return any(
        unicodedata.category(c) in ("Cc", "Cs") and c not in _ALLOWED_CONTROLS
        for c in text
        if not c.isprintable()
    )


def refuse_control_characters(body: BaseModel) -> None:
    """422 `invalid_payload`, field by field, for text holding control characters."""
    errors = [
        FieldError(
            loc=["body", *loc],
            msg="control characters (NUL, escapes, lone surrogates) are not allowed",
            type="string_control_characters",
        )
        for loc, text in _strings(body.model_dump(mode="python"), ())
        if _has_control(text)
    ]
    if errors:
        where = ", ".join(".".join(str(p) for p in e.loc[1:]) for e in errors[:5])
        raise ApiError(422, "invalid_payload", f"invalid fields: {where}", errors=errors)


# Workflow ids are `cancel-{order_id}~{seller_id}` with identifiers of a safe alphabet
# (domain.rules.parse_cancellation_id); anything else cannot exist and is not worth a round
# trip to Temporal.


def checked_id(cancellation_id: str) -> str:
    if parse_cancellation_id(cancellation_id) is None:
        raise ApiError(404, "not_found", "no such cancellation (ids read cancel-<order>~<seller>)")
    return cancellation_id


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def checked_idempotency_key(value: str | None) -> str | None:
    if value is not None and not _IDEMPOTENCY_KEY.fullmatch(value):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces",
        )
    return value

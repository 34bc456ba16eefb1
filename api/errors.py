"""Refusals as problem documents (RFC 9457 shape, plus a machine-readable `code`).

Every refusal goes through `problem_response`, which logs it with the principal and the reason,
never with a key or a body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse
from starlette.types import Scope

log = structlog.get_logger("api")

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    """One field at fault: where (`loc`, e.g. ["body", "decision"]), what, and its kind."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The body of every 4xx/5xx response."""

    status: int
    title: str
    code: str
    detail: str
    errors: list[FieldError] = []


class ApiError(Exception):
    """A refusal: raised anywhere in a request, answered with its problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})


def field_errors(raw: Sequence[Any]) -> list[FieldError]:
    """pydantic's errors without their `input` and `ctx` (they can echo whole bodies)."""
    return [
        FieldError(
            loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            msg=str(e.get("msg", "")),
            type=str(e.get("type", "")),
        )
        for e in raw
    ]


def validation_refusal(err: ValidationError, *, prefix: str = "body") -> ApiError:
    """400 for a body that is not JSON at all, 422 (`invalid_payload`) for one that does not fit
    the model, field by field."""
    errors = [
        e.model_copy(update={"loc": [prefix, *e.loc]})
        for e in field_errors(err.errors(include_url=False))
    ]
    if any(e.type == "json_invalid" for e in errors):
        return ApiError(400, "malformed_json", "the body is not valid JSON", errors=errors)
    where = ", ".join(".".join(str(p) for p in e.loc[1:]) or "body" for e in errors[:5])
    return ApiError(422, "invalid_payload", f"invalid fields: {where}", errors=errors)


def _principal(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("principal", "anonymous"))


def problem_response(scope: Scope, error: ApiError) -> JSONResponse:
    fields = {
        "principal": _principal(scope),
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": error.status,
        "code": error.code,
        "reason": error.detail,
    }
    if error.status >= 500:
        log.error("api_request_failed", **fields)
    else:
        log.warning("api_request_refused", **fields)
    problem = Problem(
        status=error.status,
        title=HTTPStatus(error.status).phrase,
        code=error.code,
        detail=error.detail,
        errors=error.errors,
    )
    return JSONResponse(
        problem.model_dump(mode="json"),
        status_code=error.status,
        headers=error.headers,
        media_type=PROBLEM_JSON,
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: these statuses answer with a `Problem` (its schema is added by api.app)."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }

"""Guards around the whole app, as plain ASGI: a body size limit, a last-resort handler that
turns an unexpected error into a logged 500 problem instead of a dropped connection, and the
requests' metrics."""

from __future__ import annotations

import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, problem_response
from infra.metrics import ApiMetrics

log = structlog.get_logger("api")

MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """Refuse a body over `limit` bytes with 413 before any of it is parsed.

    The body is read here (it is small by construction) and handed on whole, so the declared
    `Content-Length` and the bytes actually sent are both checked, chunked uploads included.
    """

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.limit:
                await self._refuse(scope, receive, send, 413, self._too_large(int(declared)))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, 413, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"the body is {size} bytes or more; at most {self.limit} bytes are accepted"

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, detail: str
    ) -> None:
        code = "payload_too_large" if status == 413 else "bad_request"
        response = problem_response(scope, ApiError(status, code, detail))
        await response(scope, receive, send)


class CatchAll:
    """The last line: an error nothing else handled is logged with its traceback and answered
    with a 500 problem. (Starlette's own handler re-raises after answering.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("api_unhandled_error", method=scope.get("method"), path=scope.get("path"))
            if started:
                raise
            response = problem_response(
                scope, ApiError(500, "internal_error", "an unexpected error; it has been logged")
            )
            await response(scope, receive, send)


# Methods outside this set are counted as "other" (the label stays a small set).
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class RequestMetrics:
    """Count and time every answer by route template, method and status (infra.metrics.
    ApiMetrics). The template is the matched route's path (`/v1/cancellations/{cancellation_id}`),
    `unmatched` when no route matched (a 404 of an unknown path, or one refused before routing),
    never the raw path."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.answered(
                route=template,
                method=method if method in _METHODS else "other",
                status=status,
                seconds=time.perf_counter() - started,
            )

"""Liveness and readiness of a worker process over HTTP, for Kubernetes probes and compose
health checks (`ORDERCANCEL_HEALTH_PORT`; off when unset).

A worker serves no traffic, so "ready" means what a rollout needs to know: the worker has
checked its namespace and is polling its task queue, and it is not draining after SIGTERM.

- `GET /livez` (alias `/healthz`): 200 while the process's event loop answers.
- `GET /readyz`: 200 when ready, 503 otherwise (starting, draining, or the worker failed).

A few lines of asyncio rather than a web framework: the worker image carries no HTTP stack, and
the server must keep answering while the worker drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger(__name__)

_READ_TIMEOUT = 5.0
_MAX_HEADER_LINES = 100


class HealthSettings(BaseSettings):
    """The health endpoint's own settings (listed in docs/configuration.md with the others)."""

    model_config = SettingsConfigDict(env_prefix="ORDERCANCEL_", extra="ignore")

    health_port: int | None = Field(default=None, ge=0, le=65535)
    health_host: str = "0.0.0.0"


async def _respond(writer: asyncio.StreamWriter, status: int, body: str, head: bool) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + (b"" if head else data)
    )
    await writer.drain()


def _handler(
    ready: Callable[[], bool],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)
            for _ in range(_MAX_HEADER_LINES):  # headers are read and ignored
                line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            head = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, "method not allowed\n", head)
            elif path in ("/livez", "/healthz"):
                await _respond(writer, 200, "alive\n", head)
            elif path == "/readyz":
                ok = ready()
                await _respond(writer, 200 if ok else 503, "ready\n" if ok else "not ready\n", head)
            else:
                await _respond(writer, 404, "not found\n", head)
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a probe that hangs up or dawdles gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return handle


@contextlib.asynccontextmanager
async def serve_health(
    ready: Callable[[], bool], *, port: int | None = None, host: str | None = None
) -> AsyncIterator[int | None]:
    """Serve the probes while the block runs; yields the bound port (None when disabled).

    `port`/`host` default to `ORDERCANCEL_HEALTH_PORT`/`ORDERCANCEL_HEALTH_HOST`; port 0 binds
    a free port (tests).
    """
    if port is None or host is None:
        settings = HealthSettings()
        port = settings.health_port if port is None else port
        host = settings.health_host if host is None else host
    if port is None:
        yield None
        return
    server = await asyncio.start_server(_handler(ready), host, port)
    bound = int(server.sockets[0].getsockname()[1])
    log.info("health_serving", host=host, port=bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()

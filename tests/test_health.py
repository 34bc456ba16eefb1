"""The worker's probe endpoint (workers/health.py): what Kubernetes and compose ask it."""

from __future__ import annotations

import asyncio

import pytest

from workers.health import HealthSettings, serve_health


async def http(port: int, request: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    return await http(port, f"{method} {path} HTTP/1.1\r\nHost: probe\r\nUser-Agent: kube\r\n\r\n")


async def test_ready_follows_the_worker_and_liveness_does_not() -> None:
    state = {"ready": False}
    async with serve_health(lambda: state["ready"], port=0, host="127.0.0.1") as port:
        assert port
        assert await get(port, "/readyz") == (503, "not ready\n")
        assert await get(port, "/livez") == (200, "alive\n")
        state["ready"] = True
        assert await get(port, "/readyz") == (200, "ready\n")
        assert await get(port, "/healthz") == (200, "alive\n")
        assert await get(port, "/readyz?verbose=1") == (200, "ready\n")
        state["ready"] = False  # draining
        assert (await get(port, "/readyz"))[0] == 503


async def test_other_requests_are_answered_not_crashed_on() -> None:
    async with serve_health(lambda: True, port=0, host="127.0.0.1") as port:
        assert port
        assert (await get(port, "/metrics"))[0] == 404
        assert (await get(port, "/readyz", "POST"))[0] == 405
        assert await get(port, "/readyz", "HEAD") == (200, "")
        assert (await http(port, "garbage\r\n\r\n"))[0] == 405
        # A client that connects and says nothing does not block the next one.
        _, idle = await asyncio.open_connection("127.0.0.1", port)
        assert (await get(port, "/livez"))[0] == 200
        idle.close()


async def test_off_unless_a_port_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERCANCEL_HEALTH_PORT", raising=False)
    assert HealthSettings().health_port is None
    async with serve_health(lambda: True) as port:
        assert port is None
    monkeypatch.setenv("ORDERCANCEL_HEALTH_PORT", "0")
    monkeypatch.setenv("ORDERCANCEL_HEALTH_HOST", "127.0.0.1")
    async with serve_health(lambda: True) as port:
        assert port and (await get(port, "/livez"))[0] == 200

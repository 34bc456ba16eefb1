"""A worker in a process of its own, for the tools and the tests that drive real processes.

One class for both ways of running one: `ordercancel worker` (tools.chaos, tests/test_scale_out),
configured through its environment and ready once its `/readyz` answers 200; and the bench's
`python -m tools.bench.worker_proc`, which talks JSON lines over stdin/stdout (it prints
`{"ready": ...}` once polling, then answers what it is asked). The command is a parameter.

Every worker is started with a parent-death signal (SIGKILL), so none outlives the process that
started it, however that one dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devstack.embedded import die_with_parent, free_port

HOST = socket.gethostname()
# The checkout the tools run from (tools/worker_process.py -> the repository root).
REPO_ROOT = Path(__file__).resolve().parents[1]


def ordercancel_command() -> list[str]:
    """The installed `ordercancel` script beside this interpreter, else the module itself."""
    script = Path(sys.executable).parent / "ordercancel"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import main; main()"]


def checkout_module_command(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter (run with `checkout_environment`)."""
    return [sys.executable, "-m", module, *args]


def checkout_environment(*, pycache: Path | None = None) -> dict[str, str]:
    """This process's environment, with the checkout on PYTHONPATH (tools/ is not installed).
    `pycache`: where the worker may keep compiled bytecode (PYTHONPYCACHEPREFIX), as an
    installed package has it; None: the environment decides (PYTHONDONTWRITEBYTECODE=1 with an
    editable install means no bytecode at all, and the workflow sandbox then compiles the
    workflow module's source again for every workflow it loads)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def worker_environment(settings: Mapping[str, str], health_port: int) -> dict[str, str]:
    """For `ordercancel worker`: this process's environment without its own DATABASE_URL,
    TEMPORAL_* and ORDERCANCEL_*, plus `settings`, a health server on `health_port`, JSON logs
    and no metrics port. An empty value in `settings` removes that variable."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "ORDERCANCEL_")) and k != "DATABASE_URL"
    }
    env = {
        **base,
        "ORDERCANCEL_HEALTH_PORT": str(health_port),
        "ORDERCANCEL_HEALTH_HOST": "127.0.0.1",
        "ORDERCANCEL_METRICS_PORT": "0",
        "ORDERCANCEL_LOG_FORMAT": "json",
        **settings,
    }
    return {k: v for k, v in env.items() if v}


class WorkerStartError(RuntimeError):
    def __init__(self, message: str, worker: WorkerProcess | None = None) -> None:
        super().__init__(message)
        self.worker = worker


class WorkerProcess:
    """One worker subprocess: `command` with `env`, its output in `log`.

    Ready when (`start`): with `health_port`, its `/readyz` answers 200; with `control`, it
    prints `{"ready": ...}` on stdout (its stderr goes to `log`, and `ask` talks to it).
    Stopped by `stop` (graceful: `stop` on stdin with `control`, else SIGTERM; SIGKILL if it
    takes longer), `terminate` (SIGTERM, drain timed) or `kill` (SIGKILL)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        health_port: int | None = None,
        control: bool = False,
    ) -> None:
        if (health_port is None) == (not control):
            raise ValueError("a worker is ready through exactly one of health_port and control")
        self.name = name
        self.command = list(command)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.health_port = health_port
        self.control = control
        self.started = 0.0
        # Set when whoever runs it stops it (a kill or a drain): any other exit is unexpected.
        self.stopped_on_purpose = False
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    # --- state -----------------------------------------------------------------------------

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, f"{self.name} was not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def identity(self) -> str:
        """The SDK's default worker identity, `pid@host`, as histories and describe show it."""
        return f"{self.pid}@{HOST}"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- start -----------------------------------------------------------------------------

    async def start(self, *, ready_within: float = 60) -> WorkerProcess:
        """Start it and return once ready. If it exits first or is not ready in time, it is
        killed and WorkerStartError (carrying it) says why, with its log."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE if self.control else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if self.control else out,
                stderr=out if self.control else asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=str(self.cwd) if self.cwd is not None else None,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        self.started = time.monotonic()
        try:
            if self.control:
                await self._await_ready_line(ready_within)
            else:
                await self._await_readyz(ready_within)
        except WorkerStartError:
            if self.alive:  # an exit while starting stays unexpected (stopped_on_purpose)
                await self.kill()
            raise
        return self

    async def _await_ready_line(self, within: float) -> None:
        try:
            said = await asyncio.wait_for(self._read(), within)
        except TimeoutError:
            raise WorkerStartError(
                f"{self.name} not ready after {within:.0f}s:\n{self.log_tail()}", self
            ) from None
        except RuntimeError as err:
            raise WorkerStartError(f"{self.name} {err}:\n{self.log_tail()}", self) from err
        if not said.get("ready"):
            raise WorkerStartError(f"{self.name} said {said}:\n{self.log_tail()}", self)

    async def _await_readyz(self, within: float) -> None:
        deadline = time.monotonic() + within
        while not await self.ready():
            if not self.alive:
                raise WorkerStartError(
                    f"{self.name} exited while starting:\n{self.log_tail()}", self
                )
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"{self.name} not ready after {within:.0f}s:\n{self.log_tail()}", self
                )
            await asyncio.sleep(0.2)

    async def ready(self) -> bool:
        """`/readyz` answers 200: polling its task queue, not draining (`health_port` only)."""
        if self.health_port is None:
            raise ValueError(f"{self.name} serves no health probes")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.health_port), 2
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: worker\r\n\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 2)).startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # --- control channel -------------------------------------------------------------------

    async def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("exited")
        message: dict[str, Any] = json.loads(line)
        return message

    async def ask(self, command: str, timeout: float = 30) -> dict[str, Any]:
        """Send one line to a `control` worker and return its JSON answer."""
        if not self.control:
            raise ValueError(f"{self.name} has no control channel")
        async with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command.encode() + b"\n")
            await self.proc.stdin.drain()
            return await asyncio.wait_for(self._read(), timeout)

    # --- stop ------------------------------------------------------------------------------

    async def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; whatever it was doing is cut off."""
        self.stopped_on_purpose = True
        if self._proc is None:
            return
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()

    async def terminate(self, *, within: float) -> tuple[int | None, float]:
        """SIGTERM and wait for the drain: (exit code or None if still running, seconds)."""
        self.stopped_on_purpose = True
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            return None, time.monotonic() - sent
        return code, time.monotonic() - sent

    async def stop(self, timeout: float = 30) -> None:
        """Graceful stop (`stop` on stdin with `control`, else SIGTERM), SIGKILL after
        `timeout`. Safe to call twice, or on a worker that never started."""
        if not self.alive:
            return
        self.stopped_on_purpose = True
        proc = self.proc
        try:
            if self.control and proc.stdin is not None:
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
                proc.stdin.close()
            else:
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, ConnectionError, ProcessLookupError):
            await self.kill()


def ordercancel_worker(name: str, *, log_dir: Path, settings: Mapping[str, str]) -> WorkerProcess:
    """`ordercancel worker` configured by `settings` (see `worker_environment`), run in
    `log_dir`, its output in `log_dir/<name>.log`, ready once its /readyz answers 200."""
    health_port = free_port()
    return WorkerProcess(
        name,
        [*ordercancel_command(), "worker"],
        log=log_dir / f"{name}.log",
        env=worker_environment(settings, health_port),
        cwd=log_dir,
        health_port=health_port,
    )

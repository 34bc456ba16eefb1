"""The embedded stack's real servers: they start, keep their data, and leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import psutil
import pytest
from helpers.wait import eventually
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from devstack.embedded import EmbeddedPostgres, TemporalDevServer, free_port, free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
STATUS = SearchAttributeKey.for_keyword("CancellationStatus")
STAGE = SearchAttributeKey.for_int("RefundStage")


@workflow.defn
class Echo:
    @workflow.run
    async def run(self, text: str) -> str:
        return text


def _gone(proc: psutil.Process) -> bool:
    """Exited; a zombie counts (this machine's init does not reap re-parented daemons)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until_gone(proc: psutil.Process, within: float) -> bool:
    async def gone() -> None:
        assert _gone(proc)

    try:
        await eventually(gone, timeout=within, interval=0.05)
    except AssertionError:
        return False
    return True


def _postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The postmaster running on `data_dir` and its children (their titles omit the data dir)."""
    pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def _postgres_running_on(data_dir: Path) -> bool:
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(data_dir) in (proc.info["cmdline"] or []):
            if not _gone(proc):
                return True
    return False


async def _fetch_value(url: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT note FROM kept")
    finally:
        await conn.close()


async def test_postgres_keeps_data_across_restarts_and_leaves_no_process(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    assert pg.url == url
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE kept (note text)")
        await conn.execute("INSERT INTO kept VALUES ('still here')")
    finally:
        await conn.close()
    processes = _postgres_processes(pg.data_dir)

    pg.stop()
    pg.stop()  # idempotent

    assert all(_gone(p) for p in processes)
    assert not _postgres_running_on(pg.data_dir)
    with pytest.raises(RuntimeError, match="not started"):
        _ = pg.url

    with pg:
        assert await _fetch_value(pg.url) == "still here"
    assert not _postgres_running_on(pg.data_dir)


async def test_postgres_adopts_a_server_left_by_a_crashed_process(tmp_path: Path) -> None:
    data_dir = (tmp_path / "pg").resolve()
    crash = (
        "import os, sys; from pathlib import Path; from devstack.embedded import EmbeddedPostgres;"
        "EmbeddedPostgres(Path(sys.argv[1])).start(); os._exit(0)"
    )
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", crash, str(data_dir), cwd=REPO_ROOT
    )
    assert await crashed.wait() == 0
    left_over = _postgres_processes(data_dir)[0]
    assert not _gone(left_over)

    pg = EmbeddedPostgres(data_dir)
    try:
        url = pg.start()
        assert _postgres_processes(data_dir)[0].pid == left_over.pid  # adopted, not restarted
        conn = await asyncpg.connect(url)
        await conn.close()
    finally:
        pg.stop()
    assert _gone(left_over)


async def test_postgres_starts_despite_a_stale_pid_file(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    pg.stop()
    # As after a reboot: the lock file survived and its PID now belongs to another process.
    pid_file = pg.data_dir / "postmaster.pid"
    pid_file.write_text(f"{os.getpid()}\n{pg.data_dir}\n0\n5432\n{pg.data_dir}\n\n0 0\nready\n")
    with pg:
        conn = await asyncpg.connect(pg.url)
        await conn.close()
    assert not _postgres_running_on(pg.data_dir)


async def _eventually_listed(client: Client, query: str, workflow_id: str) -> None:
    """Visibility trails the history by a moment: poll, within a bound."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        ids = [execution.id async for execution in client.list_workflows(query)]
        if workflow_id in ids:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{workflow_id} not in {query}: {ids}"
        await asyncio.sleep(0.1)


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


async def test_temporal_dev_server_persists_workflows_and_search_attributes(
    tmp_path: Path,
) -> None:
    namespace = "embedded-test"
    db_file = tmp_path / "temporal" / "dev.db"
    log_file = tmp_path / "temporal.log"
    port, ui_port = free_ports(2)
    server = TemporalDevServer(
        port=port,
        ui_port=ui_port,
        db_file=db_file,
        namespace=namespace,
        search_attributes={"CancellationStatus": "Keyword"},
        log_file=log_file,
    )
    workflow_id = f"echo-{uuid.uuid4()}"
    task_queue = f"embedded-{uuid.uuid4()}"

    assert await server.start() == server.address
    process = psutil.Process(server.pid)
    try:
        client = await Client.connect(server.address, namespace=namespace)
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[Echo],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):
            result = await client.execute_workflow(
                Echo.run,
                "hello",
                id=workflow_id,
                task_queue=task_queue,
                search_attributes=TypedSearchAttributes([SearchAttributePair(STATUS, "x")]),
            )
        assert result == "hello"
        await _eventually_listed(client, 'CancellationStatus="x"', workflow_id)
        assert server.ui_url is not None
        assert await asyncio.to_thread(_http_status, server.ui_url) == 200
    finally:
        server.stop()
    server.stop()  # idempotent
    assert _gone(process)
    assert db_file.exists() and log_file.stat().st_size > 0

    # Same database, headless, and one attribute more: the CLI would silently skip registering
    # it on an existing database; start() adds it.
    restarted = TemporalDevServer(
        port=free_port(),
        ui_port=None,
        db_file=db_file,
        namespace=namespace,
        search_attributes={"CancellationStatus": "Keyword", "RefundStage": "Int"},
    )
    async with restarted:
        assert restarted.ui_url is None
        client = await Client.connect(restarted.address, namespace=namespace)
        await _eventually_listed(client, 'CancellationStatus="x"', workflow_id)
        staged = await client.start_workflow(
            Echo.run,
            "parked",
            id=f"staged-{uuid.uuid4()}",
            task_queue=task_queue,
            search_attributes=TypedSearchAttributes([SearchAttributePair(STAGE, 2)]),
        )
        await _eventually_listed(client, "RefundStage=2", staged.id)
        process = psutil.Process(restarted.pid)
    assert _gone(process)

    # A type that differs from the registered one cannot be honoured: say so, leave nothing.
    clashing = TemporalDevServer(
        port=free_port(),
        ui_port=None,
        db_file=db_file,
        namespace=namespace,
        search_attributes={"RefundStage": "Keyword"},
    )
    with pytest.raises(RuntimeError, match="another type"):
        await clashing.start()
    assert clashing.pid is None


async def test_temporal_port_in_use_is_reported_clearly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TemporalDevServer(port=port, ui_port=None, db_file=None)
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} is already in use"):
            await server.start(timeout=20)
    assert server.pid is None


async def test_temporal_start_failure_quotes_the_server_log(tmp_path: Path) -> None:
    # A directory where the SQLite file should be: the server exits at once, explaining why.
    server = TemporalDevServer(port=free_port(), ui_port=None, db_file=tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with code \d+(.|\n)*unable to open database"):
        await server.start(timeout=20)
    assert server.pid is None


async def test_temporal_server_dies_with_a_killed_parent() -> None:
    script = (
        "import asyncio\n"
        "from devstack.embedded import TemporalDevServer, free_port\n"
        "async def main() -> None:\n"
        "    server = TemporalDevServer(port=free_port(), ui_port=None, db_file=None)\n"
        "    await server.start()\n"
        "    print(server.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        server = psutil.Process(int(line))
        assert not _gone(server)
    finally:
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
    assert await _until_gone(server, within=10), "the dev server outlived its killed parent"

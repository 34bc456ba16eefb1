"""`python -m tools.bench replay`: the workflow code's own CPU, from the recorded histories.

Each history of `tests/histories/` (one generation, the current shape by default) is replayed
`rounds` times through the worker's own workflow setup (the sandboxed runner and its
pass-through modules, the data converter, the log-context interceptor) on one workflow thread.
A replay runs every activation a live run runs, with no server, ledger or activity in the way:
the figure is what the workflow code and the SDK's activation handling cost per cancellation,
about the same on a quiet machine and on a busy one (CPU time, not wall time). Two differences
with a live run: `workflow.logger` writes nothing while replaying, and the histories come from
a JSON file rather than the server.
"""

from __future__ import annotations

import cProfile
import re
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from infra.converter import data_converter
from infra.log_context import LogContextInterceptor
from workers.worker import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).resolve().parents[2] / "tests" / "histories"
# The generation recorded with the shape new cancellations take (docs/performance.md).
DEFAULT_TAG = "lean-and-drain"


def load_histories(
    tag: str, names: Sequence[str] | None = None
) -> list[tuple[str, WorkflowHistory]]:
    """The histories recorded under `tag` (`instant.<tag>.json`, ...), or those of `names`,
    each with its name (`instant`)."""
    found = sorted(HISTORIES.glob(f"*.{tag}.json"))
    if names:
        wanted = set(names)
        found = [p for p in found if p.name.removesuffix(f".{tag}.json") in wanted]
        missing = wanted - {p.name.removesuffix(f".{tag}.json") for p in found}
        if missing:
            raise ValueError(f"no history {', '.join(sorted(missing))} recorded as {tag!r}")
    if not found:
        raise ValueError(f"no history recorded as {tag!r} in {HISTORIES}")
    histories = []
    for path in found:
        text = path.read_text()
        match = re.search(r'"workflowId":\s*"([^"]+)"', text)
        if match is None:
            raise ValueError(f"{path.name}: no workflowId")
        name = path.name.removesuffix(f".{tag}.json")
        histories.append((name, WorkflowHistory.from_json(match.group(1), text)))
    return histories


@contextmanager
def bytecode_cache() -> Iterator[str | None]:
    """Compiled bytecode for what the sandbox loads again for every workflow, as an installed
    package has it (and as the bench gives its workers): where the environment forbids writing
    bytecode (PYTHONDONTWRITEBYTECODE=1, an editable install), the sandbox would compile the
    workflow module's source for every replay, about 3 ms each. Yields the cache directory,
    None when the environment writes bytecode anyway."""
    if not sys.dont_write_bytecode:
        yield None
        return
    saved = sys.pycache_prefix
    with tempfile.TemporaryDirectory(prefix="bench-replay-pycache-") as cache:
        sys.dont_write_bytecode, sys.pycache_prefix = False, cache
        try:
            yield cache
        finally:
            sys.dont_write_bytecode, sys.pycache_prefix = True, saved


async def run_replay(
    tag: str = DEFAULT_TAG,
    names: Sequence[str] | None = None,
    rounds: int = 20,
    profile: Path | None = None,
    bytecode: bool = True,
) -> dict[str, Any]:
    """Replay each history once to warm up, then `rounds` times; CPU per replay. `bytecode`:
    with a bytecode cache (`bytecode_cache`), as the bench's workers have one."""
    with bytecode_cache() if bytecode else nullcontext():
        return await _replay_each(tag, names, rounds, profile, bytecode)


async def _replay_each(
    tag: str,
    names: Sequence[str] | None,
    rounds: int,
    profile: Path | None,
    bytecode: bool,
) -> dict[str, Any]:
    histories = load_histories(tag, names)
    threads: list[int] = []
    profiler = cProfile.Profile(time.thread_time) if profile else None

    def started() -> None:
        threads.append(threading.get_ident())
        if profiler is not None:
            profiler.enable()

    def thread_cpu() -> float:
        """CPU seconds of the workflow thread (alive until the executor shuts down)."""
        return sum(time.clock_gettime(time.pthread_getcpuclockid(t)) for t in threads)

    executor = ThreadPoolExecutor(max_workers=1, initializer=started)
    replayer = Replayer(
        workflows=list(WORKFLOWS),
        workflow_runner=workflow_runner(),
        data_converter=data_converter,
        interceptors=[LogContextInterceptor()],
        workflow_task_executor=executor,
    )

    async def replay(items: list[WorkflowHistory]) -> None:
        async def each() -> AsyncIterator[WorkflowHistory]:
            for item in items:
                yield item

        async with replayer.workflow_replay_iterator(each()) as results:
            async for result in results:
                if result.replay_failure is not None:
                    raise RuntimeError(f"replay failed: {result.replay_failure}")

    rows = []
    try:
        await replay([h for _, h in histories])  # warm-up: imports, caches, bytecode
        for name, history in histories:
            process0, thread0 = time.process_time(), thread_cpu()
            await replay([history] * rounds)
            process1, thread1 = time.process_time(), thread_cpu()
            rows.append(
                {
                    "history": name,
                    "workflow_id": history.workflow_id,
                    "events": len(history.events),
                    "process_cpu_ms": (process1 - process0) / rounds * 1000,
                    "workflow_thread_cpu_ms": (thread1 - thread0) / rounds * 1000,
                }
            )
    finally:
        executor.shutdown()
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    return {"tag": tag, "rounds": rounds, "bytecode": bytecode, "histories": rows}


def replay_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title=f"replay CPU per history ({report['tag']}, {report['rounds']} replays each)"
    )
    for column in ("history", "events", "process CPU ms", "workflow thread CPU ms"):
        table.add_column(column, justify="left" if column == "history" else "right")
    rows = report["histories"]
    for row in rows:
        table.add_row(
            row["history"],
            str(row["events"]),
            f"{row['process_cpu_ms']:.1f}",
            f"{row['workflow_thread_cpu_ms']:.1f}",
        )
    if rows:
        table.add_row(
            "mean",
            f"{sum(r['events'] for r in rows) / len(rows):.1f}",
            f"{sum(r['process_cpu_ms'] for r in rows) / len(rows):.1f}",
            f"{sum(r['workflow_thread_cpu_ms'] for r in rows) / len(rows):.1f}",
        )
    return table

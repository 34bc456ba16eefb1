"""The worker of one bench side, in a process of its own (so its CPU and memory are its own).

    python -m tools.bench.worker_proc '<WorkerConfig as JSON>'

`product`: the product's worker exactly as `ordercancel worker` builds it
(`workers.worker.build_worker`), its pool counting every statement (bench.sql_counter), the
provider simulator at zero latency (`confirm_after_polls=0`), JSON logs to stderr (the parent
sends them to a file), the SDK's and the business metrics exported (as `ordercancel worker`
does). `limit`: `BenchLimitShape` and its no-op activity with the same worker options, runner and
metrics, and no database.

Talks to the parent in JSON lines: it prints `{"ready": ...}` once polling, then answers each
line read from stdin: `stats` (statement counters), `reset` (zero them), `stop` (shut down).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel
from temporalio.worker import Worker

from infra.settings import Settings
from tools.bench.sql_counter import SqlCounter, counting_pool


class WorkerConfig(BaseModel):
    # "limit" runs `BenchLimitShape` (the limit and reference-4 sides alike).
    side: Literal["product", "limit"]
    address: str
    namespace: str = "default"
    task_queue: str
    database_url: str | None = None
    # The worker's tuning, as `Settings.worker_*` (None: the product's default).
    max_cached_workflows: int | None = None
    # A number, or "auto" (PollerBehaviorAutoscaling).
    wf_pollers: int | Literal["auto"] | None = None
    act_pollers: int | Literal["auto"] | None = None
    max_workflow_tasks: int | None = None
    max_activities: int | None = None
    pool_min: int = 2
    pool_max: int = 10
    metrics: bool = True
    # Experiment: workflows without the sandbox (temporalio's UnsandboxedWorkflowRunner).
    unsandboxed: bool = False
    log_level: str = "info"
    # Write a cProfile of the worker's asyncio loop thread here when it stops (where the time
    # goes). It counts that thread's CPU time (time.thread_time), not wall-clock time: on a
    # saturated machine a wall clock charges every preemption to whatever call was running.
    profile: str | None = None

    def settings(self) -> Settings:
        """The product's settings for this worker: the simulator at zero latency, the tuning
        given here (both sides are tuned alike, through `workers.worker.worker_tuning`)."""
        tuning: dict[str, Any] = {
            "worker_max_cached_workflows": self.max_cached_workflows,
            "worker_workflow_task_pollers": self.wf_pollers,
            "worker_activity_task_pollers": self.act_pollers,
            "worker_max_concurrent_workflow_tasks": self.max_workflow_tasks,
            "worker_max_concurrent_activities": self.max_activities,
        }
        return Settings(
            provider="simulator",
            sim_latency=timedelta(0),
            sim_confirm_after_polls=0,
            # R19: the silent path's seller has a window of seconds (tools.bench.mix).
            seller_response_window_floor=timedelta(seconds=1),
            task_queue=self.task_queue,
            **{k: v for k, v in tuning.items() if v is not None},
        )


def _print(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(config: WorkerConfig) -> None:
    from devstack.embedded import free_port
    from infra.client import connect
    from infra.logging import configure_logging
    from infra.metrics import metrics_runtime

    configure_logging("json", config.log_level)
    profiler = None
    if config.profile:
        import cProfile
        import time

        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
    runtime = metrics_runtime(f"127.0.0.1:{free_port()}") if config.metrics else None
    client = await connect(config.address, config.namespace, runtime=runtime)
    if config.unsandboxed:
        from temporalio.worker import UnsandboxedWorkflowRunner

        import workers.worker

        workers.worker.workflow_runner = UnsandboxedWorkflowRunner  # type: ignore[assignment]
    counter = SqlCounter()
    pool = None
    worker: Worker
    if config.side == "product":
        from payments.provider import SimulatedProvider
        from workers.worker import build_worker

        assert config.database_url is not None
        pool = await counting_pool(
            config.database_url,
            counter,
            min_size=config.pool_min,
            max_size=config.pool_max,
        )
        worker = build_worker(
            client,
            pool,
            config.settings(),
            # A provider that answers synchronously: a refund has succeeded when created.
            provider=SimulatedProvider(pool, confirm_after_polls=0, settle_at_once=True),
        )
    else:
        from tools.bench.limit_workflow import BenchLimitShape, bench_noop
        from workers.worker import GRACEFUL_SHUTDOWN, worker_tuning, workflow_runner

        worker = Worker(
            client,
            task_queue=config.task_queue,
            workflows=[BenchLimitShape],
            activities=[bench_noop],
            workflow_runner=workflow_runner(),
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            **worker_tuning(config.settings()),
        )
    try:
        async with worker:
            _print({"ready": True, "pid": os.getpid()})
            while True:
                line = (await asyncio.to_thread(sys.stdin.readline)).strip()
                if line in ("", "stop"):
                    break
                if line == "stats":
                    _print({"sql": counter.snapshot()})
                elif line == "reset":
                    counter.reset()
                    _print({"ok": True})
                else:
                    _print({"error": f"unknown command {line!r}"})
    finally:
        if pool is not None:
            await pool.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(config.profile or "worker.prof")


def main() -> None:
    config = WorkerConfig.model_validate_json(sys.argv[1])
    asyncio.run(serve(config))
    _print({"stopped": True})


if __name__ == "__main__":
    main()

"""`python -m tools.bench parked`: many cancellations waiting for their sellers, then all decided.

Product only, on its own dev server and worker process (as `python -m tools.bench`). Each
cancellation is a request-path order whose seller has the configured window (48 h by default).

Start phase: requests go out with bounded concurrency; at each checkpoint the driver stops
starting, waits until every started cancellation is parked (Temporal visibility shows it
`awaiting_seller`, which the workflow sets in the same task as its seller timer), then samples
the worker's and the server's RSS. Rates are per segment between checkpoints.

Drain phase: update `decide` (accept) goes to every cancellation with bounded concurrency; the
ledger is polled every second for completed cancellations. Decision→confirmed is the ledger's
`refunds.confirmed_at` minus the moment the update was sent (one clock: same machine).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import temporalio
from rich.table import Table

from domain.models import Decision, SellerDecision
from infra.client import connect
from infra.settings import Settings
from ledger.repository import Ledger
from tools.bench.analysis import percentiles
from tools.bench.mix import ACCEPT, build_units
from tools.bench.procs import Probe, Sampler, bench_worker
from tools.bench.run import load_in_chunks
from tools.bench.sql_counter import SqlCounter, counting_pool
from tools.bench.stack import database, temporal
from tools.bench.worker_proc import WorkerConfig

MIB = 1024 * 1024


@dataclass
class ParkedOptions:
    count: int = 10_000
    concurrency: int = 32
    checkpoints: list[int] | None = None
    wf_pollers: str | None = None
    act_pollers: str | None = None
    cache: int = 1000
    server_db: str = "file"
    metrics: bool = True
    park_timeout: float = 1800
    # False: stop once all are parked (the memory question) without deciding them.
    drain: bool = True


def default_checkpoints(count: int) -> list[int]:
    """1k, 2k, 5k, 10k, ... up to `count` (and `count` itself); thirds for small counts."""
    marks = [m for m in (1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000) if m < count]
    if count < 1000:
        marks = [m for m in (count // 3, 2 * count // 3) if m > 0]
    return sorted({*marks, count})


async def _wait_parked(client: Any, task_queue: str, target: int, timeout: float) -> int:
    query = f'TaskQueue="{task_queue}" AND CancellationStatus="awaiting_seller"'
    deadline = time.monotonic() + timeout
    while True:
        count = (await client.count_workflows(query)).count
        if count >= target or time.monotonic() > deadline:
            return int(count)
        await asyncio.sleep(0.5)


async def run_parked(
    options: ParkedOptions,
    *,
    progress: Callable[[str, int], Callable[[Any], None]] | None = None,
    note: Callable[[str], None] = print,
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    settings = Settings()
    workdir = Path(tempfile.mkdtemp(prefix="ordercancel-bench-parked-"))
    checkpoints = sorted(
        {c for c in (options.checkpoints or [options.count]) if c <= options.count}
    )
    if not checkpoints or checkpoints[-1] != options.count:
        checkpoints.append(options.count)
    report: dict[str, Any] = {
        "run_id": run_id,
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "load_avg_at_start": list(os.getloadavg()),
        },
        "options": {
            "count": options.count,
            "concurrency": options.concurrency,
            "max_cached_workflows": options.cache,
            "wf_pollers": options.wf_pollers or "sdk default (5)",
            "act_pollers": options.act_pollers or "sdk default (5)",
            "seller_window": str(settings.seller_response_window),
            "server_db": options.server_db,
            "drain": options.drain,
        },
        "checkpoints": [],
    }
    units, orders = build_units(
        run_id, "parked", {ACCEPT: options.count}, silent_window=timedelta(seconds=1)
    )
    try:
        async with database(settings, workdir) as db:
            note(f"loading {len(orders)} orders")
            loader = await counting_pool(db.dsn, SqlCounter(), min_size=1, max_size=2)
            try:
                await load_in_chunks(loader, orders)
            finally:
                await loader.close()
            async with temporal(settings, workdir, "parked", server_db=options.server_db) as srv:
                client = await connect(srv.address, srv.namespace)
                config = WorkerConfig(
                    side="product",
                    address=srv.address,
                    namespace=srv.namespace,
                    task_queue=f"bench-parked-{run_id}",
                    database_url=db.dsn,
                    max_cached_workflows=options.cache,
                    wf_pollers=options.wf_pollers,
                    act_pollers=options.act_pollers,
                    pool_min=settings.db_pool_min,
                    pool_max=settings.db_pool_max,
                    metrics=options.metrics,
                )
                worker = bench_worker(
                    config, workdir / f"worker-parked-{run_id}.log", pycache=workdir / "pycache"
                )
                starter_pool = await counting_pool(
                    db.dsn, SqlCounter(), min_size=1, max_size=max(options.concurrency, 2)
                )
                await worker.start()
                try:
                    await _phases(
                        report,
                        options,
                        checkpoints,
                        units,
                        client=client,
                        ledger=Ledger(starter_pool),
                        pool=starter_pool,
                        task_queue=config.task_queue,
                        worker=Probe(worker.pid),
                        server=srv.probe,
                        progress=progress,
                        note=note,
                    )
                finally:
                    await worker.stop()
                    await starter_pool.close()
    finally:
        report["machine"]["load_avg_at_end"] = list(os.getloadavg())
        shutil.rmtree(workdir, ignore_errors=True)
    return report


async def _phases(
    report: dict[str, Any],
    options: ParkedOptions,
    checkpoints: list[int],
    units: list[Any],
    *,
    client: Any,
    ledger: Ledger,
    pool: Any,
    task_queue: str,
    worker: Probe,
    server: Probe,
    progress: Callable[[str, int], Callable[[Any], None]] | None,
    note: Callable[[str], None],
) -> None:
    from starter.requests import start_cancellation
    from workflows.order_cancellation import OrderCancellation

    gate = asyncio.Semaphore(max(options.concurrency, 1))
    handles: list[Any] = []
    started_tick = progress("started", options.count) if progress else None
    errors: list[str] = []

    async def start(unit: Any) -> None:
        async with gate:
            try:
                handles.append(
                    await start_cancellation(
                        client, unit.requests[0], task_queue=task_queue, ledger=ledger
                    )
                )
            except Exception as err:  # reported; the run goes on
                errors.append(f"{type(err).__name__}: {err}")
        if started_tick:
            started_tick(None)

    t0 = time.time()
    previous, previous_at = 0, t0
    for mark in checkpoints:
        await asyncio.gather(*(start(u) for u in units[previous:mark]))
        started_at = time.time()
        parked = await _wait_parked(client, task_queue, mark, options.park_timeout)
        parked_at = time.time()
        await asyncio.sleep(1.0)  # let the worker settle before sampling its memory
        row = {
            "parked": parked,
            "target": mark,
            "elapsed_s": parked_at - t0,
            "start_rate_per_s": (mark - previous) / max(started_at - previous_at, 1e-9),
            "parked_rate_per_s": (mark - previous) / max(parked_at - previous_at, 1e-9),
            "worker_rss_mib": (worker.rss() or 0) / MIB,
            "server_rss_mib": (server.rss() or 0) / MIB or None,
        }
        report["checkpoints"].append(row)
        note(
            f"parked {parked}: start {row['start_rate_per_s']:.1f}/s, worker RSS "
            f"{row['worker_rss_mib']:.0f} MiB"
        )
        previous, previous_at = mark, time.time()

    if not options.drain:
        report["drain"] = None
        _summarise(report, errors)
        return

    # --- drain ---------------------------------------------------------------------------
    sent: dict[str, float] = {}
    ids = [h.id for h in handles]
    drained_tick = progress("completed", len(ids)) if progress else None

    async def decide(handle: Any, seller: str) -> None:
        async with gate:
            sent[handle.id] = time.time()
            try:
                await handle.execute_update(
                    OrderCancellation.decide,
                    SellerDecision(seller_id=seller, decision=Decision.ACCEPT, reason=""),
                )
            except Exception as err:  # reported; the run goes on
                errors.append(f"{type(err).__name__}: {err}")

    async def completed() -> int:
        value = await pool.fetchval(
            "SELECT count(*) FROM cancellations WHERE cancellation_id = ANY($1::text[])"
            " AND status = 'completed'",
            ids,
        )
        return int(value)

    cpu_before = {"worker": worker.cpu(), "server": server.cpu()}
    with Sampler({"worker": worker, "server": server}) as sampler:
        began = time.time()
        deciding = asyncio.gather(*(decide(h, "S-1") for h in handles))
        done, timeline = 0, []
        while done < len(ids):
            await asyncio.sleep(1.0)
            now_done = await completed()
            if drained_tick:
                for _ in range(now_done - done):
                    drained_tick(None)
            done = now_done
            timeline.append((time.time() - began, done))
            if len(timeline) > 30 and timeline[-30][1] == done:
                note("the drain made no progress for 30 s: stopping")
                break
        await deciding
        decisions_done = max(sent.values(), default=began)
        finished = time.time()
    cpu_after = {"worker": worker.cpu(), "server": server.cpu()}
    rows = await pool.fetch(
        "SELECT cancellation_id, confirmed_at FROM refunds WHERE cancellation_id = ANY($1::text[])"
        " AND confirmed_at IS NOT NULL",
        ids,
    )
    latency = [
        r["confirmed_at"].timestamp() - sent[r["cancellation_id"]]
        for r in rows
        if r["cancellation_id"] in sent
    ]
    drain_time = max(finished - began, 1e-9)
    # The completion instant is known to the poll's second; use the last poll that saw it all.
    for at, value in timeline:
        if value >= len(ids):
            drain_time = at
            break
    report["drain"] = {
        "cancellations": len(ids),
        "completed": done,
        "duration_s": drain_time,
        "rate_per_s": done / max(drain_time, 1e-9),
        "decisions_sent_per_s": len(sent) / max(decisions_done - began, 1e-9),
        "decision_to_confirmed_ms": {k: v * 1000 for k, v in percentiles(latency).items()},
        "worker_rss_peak_mib": sampler.peaks.get("worker", 0) / MIB,
        "server_rss_peak_mib": (sampler.peaks["server"] / MIB)
        if "server" in sampler.peaks
        else None,
        "cpu_s_per_cancellation": {
            k: ((cpu_after[k] or 0.0) - (cpu_before[k] or 0.0)) / max(done, 1)
            if cpu_before[k] is not None
            else None
            for k in cpu_before
        },
        "timeline": timeline,
    }
    _summarise(report, errors)


def _summarise(report: dict[str, Any], errors: list[str]) -> None:
    report["errors"] = len(errors)
    report["error_samples"] = sorted(set(errors))[:5]
    first = report["checkpoints"][0]["worker_rss_mib"]
    last = report["checkpoints"][-1]["worker_rss_mib"]
    report["worker_rss_ratio_last_to_first"] = last / first if first else None


def parked_table(report: dict[str, Any]) -> list[Table]:
    opts = report["options"]
    start = Table(
        title=(
            f"python -m tools.bench parked: {opts['count']} cancellations, concurrency "
            f"{opts['concurrency']}, max_cached_workflows {opts['max_cached_workflows']}"
        )
    )
    for column in (
        "parked",
        "elapsed s",
        "starts/s",
        "parked/s",
        "worker RSS MiB",
        "server RSS MiB",
    ):
        start.add_column(column, justify="right")
    for row in report["checkpoints"]:
        start.add_row(
            f"{row['parked']}",
            f"{row['elapsed_s']:.0f}",
            f"{row['start_rate_per_s']:.1f}",
            f"{row['parked_rate_per_s']:.1f}",
            f"{row['worker_rss_mib']:.0f}",
            f"{row['server_rss_mib']:.0f}" if row["server_rss_mib"] else "-",
        )
    ratio_row = (
        "worker RSS at last / first checkpoint",
        f"{report.get('worker_rss_ratio_last_to_first') or 0:.2f}",
    )
    drain = report.get("drain")
    if drain is None:  # --no-drain
        second = Table(title="no drain (--no-drain): the parked cancellations are left waiting")
        second.add_column("figure")
        second.add_column("value", justify="right")
        second.add_row(*ratio_row)
        second.add_row("errors", str(report.get("errors", 0)))
        return [start, second]
    lat = drain.get("decision_to_confirmed_ms", {})
    second = Table(title="drain: every parked cancellation decided (update `decide`, accept)")
    second.add_column("figure")
    second.add_column("value", justify="right")
    rows = [
        ("completed", f"{drain.get('completed', 0)} / {drain.get('cancellations', 0)}"),
        ("drain rate (completed/s)", f"{drain.get('rate_per_s', 0):.1f}"),
        ("decisions sent/s", f"{drain.get('decisions_sent_per_s', 0):.1f}"),
        ("decision→refund confirmed p50 ms", f"{lat.get('p50', 0):.0f}"),
        ("decision→refund confirmed p95 ms", f"{lat.get('p95', 0):.0f}"),
        ("decision→refund confirmed p99 ms", f"{lat.get('p99', 0):.0f}"),
        ("worker RSS peak MiB (drain)", f"{drain.get('worker_rss_peak_mib', 0):.0f}"),
        ("server RSS peak MiB (drain)", f"{drain.get('server_rss_peak_mib') or 0:.0f}"),
        ratio_row,
        ("errors", str(report.get("errors", 0))),
    ]
    for label, value in rows:
        second.add_row(label, value)
    return [start, second]

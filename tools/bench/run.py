"""`python -m tools.bench`: the product's cancellation mix and the engine's limit, side by side.

1. PostgreSQL (embedded in a temporary directory, or DATABASE_URL) is migrated and the orders
   of the run are generated and loaded in bulk (unique ids per run).
2. **product**, on its own fresh dev server and worker process: one cancellation per path
   first (calibration; also the warm-up), whose histories give each path's event shape; then
   the measured mix.
3. **limit**, on another fresh dev server and worker process: one `BenchLimitShape` per path
   (warm-up), its event counts compared with the product's per path (`shape_check`); then the
   same mix, measured.

For each measured side: wall-clock window from the first request to the last result; CPU of
each process over that window; statement counters of the worker (and of the starter's summary
look-up); pg_stat_database commits; RSS sampled every 0.5 s; histories fetched afterwards.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import temporalio

from domain.orders import CheckoutOrderIn, OrdersFile
from infra.client import connect
from infra.settings import Settings
from ledger.orders import load_orders
from ledger.policies import set_policy
from ledger.repository import Ledger
from tools.bench.analysis import analyse_histories, fetch_events, percentiles
from tools.bench.driver import LimitSide, ProductSide, ReferenceSide, Side, Timing, run_units
from tools.bench.mix import (
    COUPON,
    DEFAULT_MIX,
    PATHS,
    SILENT_SELLER,
    Unit,
    allocate,
    build_units,
    unit_count,
)
from tools.bench.procs import Probe, Sampler, bench_worker, reset_counts, sql_counts
from tools.bench.shape import REFERENCE, Shape, derive_shape, event_counts, reference_shape
from tools.bench.sql_counter import LEDGER, PROVIDER, SqlCounter, counting_pool
from tools.bench.stack import Temporal, database, pg_commits, temporal
from tools.bench.worker_proc import WorkerConfig
from tools.worker_process import WorkerProcess

MIB = 1024 * 1024
# An idle backend reports its counts to pg_stat_database within PGSTAT_IDLE_INTERVAL (10 s);
# one that exits, at once. Measured here: 100 statements took 12 s to show from idle backends.
STATS_SETTLE = 11.0
# Server CPU per cancellation, product/limit, seen in 30 runs here: 0.89-1.17, one at 1.36.
DRIFT_BAND = (0.85, 1.2)
_LOAD_CHUNK = 5000


@dataclass
class BenchOptions:
    count: int = 200
    concurrency: int = 8
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    silent_window: timedelta = timedelta(seconds=1)
    history_sample: int = 1000
    wf_pollers: str | None = None
    act_pollers: str | None = None
    max_workflow_tasks: int | None = None
    max_activities: int | None = None
    pool_min: int | None = None
    pool_max: int | None = None
    cache: int = 1000
    metrics: bool = True
    unsandboxed: bool = False
    server_db: str = "file"
    sides: tuple[str, ...] = ("product", "limit", REFERENCE)
    # Measured slices per side, the sides alternated A B, B A, ... (1: each side in one go).
    rounds: int = 4
    logs_dir: Path | None = None
    # Seconds to wait for idle sessions' counts to reach pg_stat_database (0: skip, the
    # PostgreSQL commit cross-check is then approximate).
    stats_settle: float = STATS_SETTLE
    log_level: str = "info"
    profile_dir: Path | None = None
    # Workers keep compiled bytecode (as an installed package does); False reproduces a source
    # tree run with PYTHONDONTWRITEBYTECODE=1.
    bytecode: bool = True

    def public(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "concurrency": self.concurrency,
            "mix": self.mix,
            "silent_window_s": self.silent_window.total_seconds(),
            "history_sample": self.history_sample,
            "wf_pollers": self.wf_pollers or "sdk default (5)",
            "act_pollers": self.act_pollers or "sdk default (5)",
            "max_workflow_tasks": self.max_workflow_tasks,
            "max_activities": self.max_activities,
            "pool": [self.pool_min, self.pool_max],
            "max_cached_workflows": self.cache,
            "metrics": self.metrics,
            "unsandboxed": self.unsandboxed,
            "sides": list(self.sides),
            "rounds": self.rounds,
            "server_db": self.server_db,
            "log_level": self.log_level,
            "bytecode": self.bytecode,
        }


Progress = Callable[[str, int], Callable[[Timing], None]]


async def load_in_chunks(pool: Any, orders: list[CheckoutOrderIn]) -> None:
    for i in range(0, len(orders), _LOAD_CHUNK):
        await load_orders(pool, OrdersFile(orders=orders[i : i + _LOAD_CHUNK]))


def _machine_busy() -> float:
    """CPU seconds the machine's CPUs spent on anything (steal excluded)."""
    t = psutil.cpu_times()
    return float(
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "steal", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


def _steal() -> float:
    """CPU seconds the hypervisor gave to others while we wanted to run (a VM's noise)."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


@dataclass
class Tally:
    """One side's measured slices, added up (a side measured in one go is one slice)."""

    timings: list[Timing] = field(default_factory=list)
    # Sum of the slices' wall-clock windows, first request to last result of each.
    duration: float = 0.0
    cpu: dict[str, float | None] = field(default_factory=dict)
    worker_threads: dict[str, float] = field(default_factory=dict)
    other_cpu: float = 0.0
    # CPU of the other side's worker and dev server, idle while this side ran.
    idle_side_cpu: float = 0.0
    steal: float = 0.0
    rss_end: dict[str, int | None] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SideStack:
    """One side's servers, worker and driver during a run."""

    name: str
    side: Side
    client: Any
    worker: WorkerProcess
    probes: dict[str, Probe]
    units: list[Unit]
    starter_counter: SqlCounter | None
    # Stops the worker and closes the starter's pool (their sessions' counts then reach
    # pg_stat_database). Safe to call twice.
    release: Callable[[], Awaitable[None]]
    on_done: Callable[[Timing], None] | None
    tally: Tally = field(default_factory=Tally)


@dataclass
class Measured:
    tally: Tally
    sql: dict[str, int]
    starter_sql: dict[str, int]
    pg: dict[str, int] | None
    histories: dict[str, Any]
    decision_to_confirmed: list[float]
    counts_by_shape: dict[str, dict[str, int]]


def _add(total: float | None, delta: float | None) -> float | None:
    return None if total is None or delta is None else total + delta


def split(units: list[Unit], rounds: int) -> list[list[Unit]]:
    """`units` in `rounds` consecutive slices of (nearly) equal size, in order."""
    n = len(units)
    return [units[i * n // rounds : (i + 1) * n // rounds] for i in range(rounds)]


def slice_order(rounds: int, sides: list[str]) -> list[tuple[str, int]]:
    """(side, round) in the order measured: A B, B A, A B, ... A machine whose speed drifts
    during the run then weighs on both sides alike (the first side of a round is the second
    of the next)."""
    order: list[tuple[str, int]] = []
    for rnd in range(rounds):
        names = sides if rnd % 2 == 0 else list(reversed(sides))
        order += [(name, rnd) for name in names]
    return order


async def measure_slice(
    stack: SideStack, units: list[Unit], *, idle: list[Probe], concurrency: int, rnd: int
) -> None:
    """Run one slice of `stack`'s units and add its figures to `stack.tally`. `idle`: the other
    side's processes, waiting meanwhile (their CPU is kept apart from "other processes")."""
    probes = stack.probes
    cpu_before = {k: p.cpu() for k, p in probes.items()}
    idle_before = [p.cpu() for p in idle]
    threads_before = probes["worker"].threads()
    busy_before = _machine_busy()
    steal_before = _steal()
    load_before = os.getloadavg()[0]
    with Sampler({"worker": probes["worker"], "server": probes["server"]}) as sampler:
        run = await run_units(stack.side, units, concurrency=concurrency, on_done=stack.on_done)
    cpu_after = {k: p.cpu() for k, p in probes.items()}
    idle_after = [p.cpu() for p in idle]
    threads_after = probes["worker"].threads()
    busy = _machine_busy() - busy_before
    steal = _steal() - steal_before
    tally = stack.tally
    cpu: dict[str, float | None] = {}
    for k in probes:
        before, after = cpu_before[k], cpu_after[k]
        cpu[k] = after - before if before is not None and after is not None else None
        tally.cpu[k] = _add(tally.cpu.get(k, 0.0), cpu[k])
    for k, seconds in threads_after.items():
        tally.worker_threads[k] = (
            tally.worker_threads.get(k, 0.0) + seconds - threads_before.get(k, 0.0)
        )
    idle_cpu = sum(
        after - before
        for before, after in zip(idle_before, idle_after, strict=True)
        if before is not None and after is not None
    )
    ours = sum(v for v in cpu.values() if v is not None)
    tally.other_cpu += max(busy - ours - idle_cpu, 0.0)
    tally.idle_side_cpu += idle_cpu
    tally.steal += steal
    tally.rss_end = sampler.sample()
    for k, peak in sampler.peaks.items():
        tally.rss_peak[k] = max(tally.rss_peak.get(k, 0), peak)
    tally.load = [tally.load[0] if tally.load else load_before, os.getloadavg()[0]]
    ok = [t for t in run.timings if t.error is None and t.ended is not None]
    active = [t.ended - t.started - t.window for t in ok if t.ended is not None]
    began = min((t.started for t in run.timings), default=run.began)
    ended = max((t.ended for t in ok if t.ended is not None), default=run.finished)
    duration = max(ended - began, 1e-9)
    tally.duration += duration
    tally.timings += run.timings
    server = cpu.get("server")
    tally.slices.append(
        {
            "round": rnd + 1,
            "cancellations": len(ok),
            "duration_s": duration,
            "throughput_per_s": len(ok) / duration,
            "server_cpu_s_per_cancellation": server / len(ok) if server and ok else None,
            "worker_cpu_s_per_cancellation": (
                worker_cpu / len(ok)
                if (worker_cpu := cpu.get("worker")) is not None and ok
                else None
            ),
            "p95_ms_excl_window": percentiles(active).get("p95", 0.0) * 1000 or None,
            # What else the machine did meanwhile, per second of the slice (a shared machine).
            "other_cpu_s_per_s": max(busy - ours - idle_cpu, 0.0) / duration,
        }
    )


async def finish(stack: SideStack, shapes: dict[str, Shape], options: BenchOptions) -> Measured:
    """The side's statement counters and histories, once its slices are done; releases it."""
    if stack.name == REFERENCE:
        shapes = {key: reference_shape(key) for key in shapes}
    sql = await sql_counts(stack.worker)
    starter_sql = stack.starter_counter.snapshot() if stack.starter_counter is not None else {}
    await stack.release()
    figures = await analyse_histories(
        stack.client, stack.tally.timings, shapes, sample=options.history_sample
    )
    return Measured(
        tally=stack.tally,
        sql=sql,
        starter_sql=starter_sql,
        pg=None,
        histories=figures.summary(),
        decision_to_confirmed=figures.decision_to_confirmed,
        counts_by_shape=figures.counts_by_shape,
    )


def _per_second(offsets: list[float]) -> list[int]:
    buckets = [0] * (int(max(offsets, default=0.0)) + 1)
    for offset in offsets:
        buckets[int(max(offset, 0.0))] += 1
    return buckets


def _ms(stats: dict[str, float]) -> dict[str, float]:
    return {k: v * 1000 for k, v in stats.items()}


def side_report(m: Measured) -> dict[str, Any]:
    tally = m.tally
    ok = [t for t in tally.timings if t.error is None and t.ended is not None]
    n = len(ok)
    per = max(n, 1)
    began = min((t.started for t in tally.timings), default=0.0)
    duration = max(tally.duration, 1e-9)
    terminal = [t.ended - t.started for t in ok if t.ended is not None]
    active = [t.ended - t.started - t.window for t in ok if t.ended is not None]

    def sql(counter: dict[str, int], category: str, what: str) -> int:
        return counter.get(f"{category}.{what}", 0)

    ledger_rt = sql(m.sql, LEDGER, "statements") + sql(m.starter_sql, LEDGER, "statements")
    ledger_tx = sql(m.sql, LEDGER, "transactions") + sql(m.starter_sql, LEDGER, "transactions")
    by_path = Counter(t.path for t in ok)
    return {
        "cancellations": n,
        "errors": len(tally.timings) - n,
        "error_samples": sorted({t.error for t in tally.timings if t.error})[:5],
        "by_path": {p: by_path.get(p, 0) for p in PATHS},
        "statuses": dict(Counter(t.status for t in ok if t.status)),
        "duration_s": duration,
        "throughput_per_s": n / duration,
        "latency_ms": {
            "request_to_terminal": _ms(percentiles(terminal)),
            "request_to_terminal_excl_window": _ms(percentiles(active)),
            "decision_to_confirmed": _ms(percentiles(m.decision_to_confirmed)),
        },
        "cpu_s_per_cancellation": {
            k: (v / per if v is not None else None) for k, v in tally.cpu.items()
        }
        | {"other_processes": tally.other_cpu / per},
        "cpu_s_total": tally.cpu
        | {"other_processes": tally.other_cpu, "other_side_idle": tally.idle_side_cpu},
        "worker_cpu_s_per_cancellation_by_thread": {
            k: v / per for k, v in tally.worker_threads.items()
        },
        "history": m.histories,
        "ledger": {
            "round_trips_per_cancellation": ledger_rt / per,
            "transactions_per_cancellation": ledger_tx / per,
            "pool_resets_per_cancellation": (
                sql(m.sql, LEDGER, "resets") + sql(m.starter_sql, LEDGER, "resets")
            )
            / per,
            "starter_round_trips_per_cancellation": sql(m.starter_sql, LEDGER, "statements") / per,
            "provider_sim_round_trips_per_cancellation": sql(m.sql, PROVIDER, "statements") / per,
            "provider_sim_transactions_per_cancellation": sql(m.sql, PROVIDER, "transactions")
            / per,
            "pg_commits_per_cancellation": (m.pg["commits"] / per) if m.pg else None,
            "rollbacks": m.sql.get("rollbacks", 0),
            # Every statement (pool resets included) by the activity that sent it, ledger and
            # provider simulator together.
            "round_trips_by_activity_per_cancellation": {
                k.removeprefix("by_activity."): v / per
                for k, v in sorted(m.sql.items())
                if k.startswith("by_activity.")
            },
            "raw": {"worker": m.sql, "starter": m.starter_sql, "pg_stat_database": m.pg},
        },
        "rss_mib": {
            "worker_end": (tally.rss_end.get("worker") or 0) / MIB,
            "worker_peak": tally.rss_peak.get("worker", 0) / MIB,
            "server_end": (tally.rss_end.get("server") or 0) / MIB or None,
            "server_peak": (
                (tally.rss_peak["server"] / MIB) if tally.rss_peak.get("server") else None
            ),
        },
        "updates_rejected": sum(t.rejected_updates for t in tally.timings),
        "max_latency_ms": max(terminal, default=0.0) * 1000,
        # Completions per second since the side's first request, to tell a stall from a
        # steady rate (the other side's slices show as gaps).
        "completions_per_second": _per_second([t.ended - began for t in ok if t.ended]),
        "starts_per_second": _per_second([t.started - began for t in tally.timings]),
        "load_avg_1m": tally.load,
        "cpu_steal_s": tally.steal,
        "slices": tally.slices,
    }


def ratios(product: dict[str, Any], limit: dict[str, Any]) -> dict[str, float | None]:
    def get(side: dict[str, Any], path: str) -> Any:
        node: Any = side
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    keys = [
        "throughput_per_s",
        "latency_ms.request_to_terminal.p50",
        "latency_ms.request_to_terminal.p95",
        "latency_ms.request_to_terminal.p99",
        "latency_ms.request_to_terminal_excl_window.p95",
        "latency_ms.decision_to_confirmed.p50",
        "latency_ms.decision_to_confirmed.p95",
        "latency_ms.decision_to_confirmed.p99",
        "cpu_s_per_cancellation.worker",
        "cpu_s_per_cancellation.server",
        "history.events_per_cancellation",
        "history.actions_per_cancellation",
        "rss_mib.worker_peak",
        "rss_mib.server_peak",
    ]
    found: dict[str, float | None] = {}
    for key in keys:
        p, lim = get(product, key), get(limit, key)
        found[key] = (
            p / lim if isinstance(p, int | float) and isinstance(lim, int | float) and lim else None
        )
    return found


# (name, the other side, the slice figure, the side figure, target, higher is better)
TARGETS: list[tuple[str, str, str, str, float, bool]] = [
    (
        "throughput vs reference-4",
        REFERENCE,
        "throughput_per_s",
        "throughput_per_s",
        0.8,
        True,
    ),
    ("throughput vs limit", "limit", "throughput_per_s", "throughput_per_s", 0.9, True),
    (
        "p95 (seller window excluded) vs limit",
        "limit",
        "p95_ms_excl_window",
        "latency_ms.request_to_terminal_excl_window.p95",
        1.2,
        False,
    ),
    (
        "worker CPU per cancellation vs limit",
        "limit",
        "worker_cpu_s_per_cancellation",
        "cpu_s_per_cancellation.worker",
        1.2,
        False,
    ),
]
# Issue 19's shape targets on the default mix: (name, the product's figure, the most allowed).
SHAPE_TARGETS: list[tuple[str, str, int]] = [
    ("billable actions per cancellation", "history.actions_per_cancellation", 9),
    ("history events per cancellation", "history.events_per_cancellation", 40),
]
# Another load on the machine above this (CPU s per s, beside the bench's own processes) in
# any slice makes the run too noisy to judge: its sides did not run on the same machine.
NOISY_OTHER_CPU = 0.25


def _round_sizes(slices: list[list[Unit]]) -> str:
    """How many units the rounds of one side take: `50`, or `49-50` when they differ."""
    sizes = sorted({len(s) for s in slices})
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def _dig(node: Any, path: str) -> Any:
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def judge_targets(sides: dict[str, Any], drift: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 19 with the run's ratio, the ratio of each round (its spread) and a
    verdict: `met` when every round meets it, `missed` when no round does, otherwise `noisy`
    (the rounds straddle the target), and `noisy` whenever the machine was busy with something
    else or its speed drifted between the sides (`drift_check`): no number is judged then."""
    product = sides["product"]
    other_load = max(
        (s.get("other_cpu_s_per_s") or 0.0 for side in sides.values() for s in side["slices"]),
        default=0.0,
    )
    found: dict[str, dict[str, Any]] = {}
    for name, other, slice_key, side_key, target, higher in TARGETS:
        if other not in sides:
            found[name] = {
                "target": f"{'>=' if higher else '<='} {target}",
                "ratio": None,
                "rounds": [],
                "spread": None,
                "verdict": "not run",
                "why": f"the {other} side was not run (--sides)",
            }
            continue
        p, o = _dig(product, side_key), _dig(sides[other], side_key)
        value = p / o if isinstance(p, int | float) and isinstance(o, int | float) and o else None
        rounds = [
            a[slice_key] / b[slice_key]
            for a, b in zip(product["slices"], sides[other]["slices"], strict=True)
            if a.get(slice_key) and b.get(slice_key)
        ]

        def meets(x: float, target: float = target, higher: bool = higher) -> bool:
            return x >= target if higher else x <= target

        reasons = []
        if drift.get("suspect"):
            reasons.append("the server's CPU per event differed between the sides (drift)")
        if other_load > NOISY_OTHER_CPU:
            reasons.append(f"other processes took up to {other_load:.2f} CPU s/s")
        if rounds and value is not None and not reasons:
            if all(meets(r) for r in rounds):
                verdict = "met"
            elif not any(meets(r) for r in rounds):
                verdict = "missed"
            else:
                verdict = "noisy"
                reasons.append("the rounds straddle the target")
        else:
            verdict = "noisy" if reasons else "no figure"
        found[name] = {
            "target": f"{'>=' if higher else '<='} {target}",
            "ratio": value,
            "rounds": rounds,
            "spread": [min(rounds), max(rounds)] if rounds else None,
            "verdict": verdict,
            "why": "; ".join(reasons),
        }
    # The shape's targets: counts from every history of the sample, not ratios of a round (a
    # path's shape is the same in every round).
    for name, side_key, limit in SHAPE_TARGETS:
        value = _dig(product, side_key)
        found[name] = {
            "target": f"<= {limit}",
            "ratio": value,
            "rounds": [],
            "spread": None,
            "verdict": "no figure" if value is None else "met" if value <= limit else "missed",
            "why": "",
        }
    return found


def shape_check(
    shapes: dict[str, Shape], limit_counts: dict[str, dict[str, int]]
) -> dict[str, dict[str, Any]]:
    """Per shape: do the limit's event counts equal the product's?"""
    found = {}
    for key, shape in sorted(shapes.items()):
        got = limit_counts.get(key)
        found[key] = {
            "match": got == shape.event_counts,
            "events": sum(shape.event_counts.values()),
            "product": shape.event_counts,
            "limit": got,
        }
    return found


def _calibration_counts() -> dict[str, int]:
    return {p: (2 if p == COUPON else 1) for p in PATHS}


async def run_bench(
    options: BenchOptions, *, progress: Progress | None = None, note: Callable[[str], None] = print
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    settings = Settings()
    counts = allocate(options.count, options.mix)
    if not 1 <= options.rounds <= unit_count(counts):
        raise ValueError(f"rounds must be between 1 and {unit_count(counts)}")
    workdir = Path(tempfile.mkdtemp(prefix="ordercancel-bench-"))
    report: dict[str, Any] = {
        "run_id": run_id,
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "load_avg_at_start": list(os.getloadavg()),
        },
        "options": options.public(),
        "planned": counts,
        "sides": {},
    }
    pool_min = options.pool_min or settings.db_pool_min
    pool_max = options.pool_max or settings.db_pool_max
    report["options"]["pool"] = [pool_min, pool_max]

    def worker_config(side: str, server: Temporal, dsn: str | None) -> WorkerConfig:
        return WorkerConfig(
            side="product" if side == "product" else "limit",
            address=server.address,
            namespace=server.namespace,
            task_queue=f"bench-{side}-{run_id}",
            database_url=dsn,
            max_cached_workflows=options.cache,
            wf_pollers=options.wf_pollers,
            act_pollers=options.act_pollers,
            max_workflow_tasks=options.max_workflow_tasks,
            max_activities=options.max_activities,
            pool_min=pool_min,
            pool_max=pool_max,
            metrics=options.metrics,
            unsandboxed=options.unsandboxed,
            log_level=options.log_level,
            profile=(
                str(options.profile_dir / f"worker-{side}-{run_id}.prof")
                if options.profile_dir
                else None
            ),
        )

    # The workers write their logs and profiles there when they stop: a missing directory
    # would lose them silently (the worker's exit is not watched for that).
    for wanted in (options.logs_dir, options.profile_dir):
        if wanted is not None:
            wanted.mkdir(parents=True, exist_ok=True)
    try:
        async with database(settings, workdir) as db, AsyncExitStack() as servers:
            report["machine"]["postgres"] = "embedded" if db.embedded else "DATABASE_URL"
            calib_units, calib_orders = build_units(
                run_id, "calibration", _calibration_counts(), silent_window=options.silent_window
            )
            product_units, product_orders = build_units(
                run_id,
                "product",
                counts,
                silent_window=options.silent_window,
                rounds=options.rounds,
            )
            note(f"loading {len(calib_orders) + len(product_orders)} orders")
            loader = await counting_pool(db.dsn, SqlCounter(), min_size=1, max_size=2)
            try:
                await load_in_chunks(loader, calib_orders + product_orders)
                await set_policy(
                    loader,
                    seller_id=SILENT_SELLER,
                    response_window=options.silent_window,
                    floor=options.silent_window,
                )
            finally:
                await loader.close()

            def probes(worker: WorkerProcess, server: Temporal) -> dict[str, Probe]:
                return {
                    "worker": Probe(worker.pid),
                    "server": server.probe,
                    "postgres": db.probe,
                    "driver": Probe(os.getpid()),
                }

            stacks: dict[str, SideStack] = {}

            # --- product: calibration, the event shape of each path --------------------------
            shapes: dict[str, Shape] = {}
            product_servers = await servers.enter_async_context(AsyncExitStack())
            srv = await product_servers.enter_async_context(
                temporal(settings, workdir, "product", server_db=options.server_db)
            )
            report["machine"]["temporal"] = "embedded" if srv.embedded else srv.address
            client = await connect(srv.address, srv.namespace)
            config = worker_config("product", srv, db.dsn)
            worker = bench_worker(
                config,
                (options.logs_dir or workdir) / f"worker-product-{run_id}.log",
                pycache=workdir / "pycache" if options.bytecode else None,
            )
            starter_counter = SqlCounter()
            starter_pool = await counting_pool(
                db.dsn, starter_counter, min_size=1, max_size=max(options.concurrency, 2)
            )

            async def release(worker: WorkerProcess = worker, pool: Any = starter_pool) -> None:
                await worker.stop()
                if not pool.is_closing():
                    await pool.close()

            product_servers.push_async_callback(release)
            await worker.start()
            side = ProductSide(client, config.task_queue, Ledger(starter_pool))
            note("product: calibration (one cancellation per path)")
            cal = await run_units(side, calib_units, concurrency=16)
            failed = [t for t in cal.timings if t.error]
            if failed:
                raise RuntimeError(f"calibration failed: {failed[0].error}")
            for t in cal.timings:
                shapes[t.shape_key] = derive_shape(
                    t.shape_key, await fetch_events(client, t.workflow_id)
                )
            report["shapes"] = {k: s.model_dump() for k, s in sorted(shapes.items())}
            if "product" in options.sides:
                stacks["product"] = SideStack(
                    name="product",
                    side=side,
                    client=client,
                    worker=worker,
                    probes=probes(worker, srv),
                    units=product_units,
                    starter_counter=starter_counter,
                    release=release,
                    on_done=progress("product", options.count) if progress else None,
                )
            else:
                await product_servers.aclose()

            # --- limit: warm-up and shape check ----------------------------------------------
            if "limit" in options.sides:
                warm_units, _ = build_units(
                    run_id, "warmup", _calibration_counts(), silent_window=options.silent_window
                )
                limit_units, _ = build_units(
                    run_id,
                    "limit",
                    counts,
                    silent_window=options.silent_window,
                    rounds=options.rounds,
                )
                srv = await servers.enter_async_context(
                    temporal(settings, workdir, "limit", server_db=options.server_db)
                )
                client = await connect(srv.address, srv.namespace)
                config = worker_config("limit", srv, None)
                worker = bench_worker(
                    config,
                    (options.logs_dir or workdir) / f"worker-limit-{run_id}.log",
                    pycache=workdir / "pycache" if options.bytecode else None,
                )
                servers.push_async_callback(worker.stop)
                await worker.start()
                lside = LimitSide(client, config.task_queue, shapes, run_id)
                note("limit: warm-up (one per path) and shape check")
                warm = await run_units(lside, warm_units, concurrency=16)
                failed = [t for t in warm.timings if t.error]
                if failed:
                    raise RuntimeError(f"limit warm-up failed: {failed[0].error}")
                counts_by_shape = {
                    t.shape_key: event_counts(await fetch_events(client, t.workflow_id))
                    for t in warm.timings
                }
                report["shape_check"] = shape_check(shapes, counts_by_shape)
                stacks["limit"] = SideStack(
                    name="limit",
                    side=lside,
                    client=client,
                    worker=worker,
                    probes=probes(worker, srv),
                    units=limit_units,
                    starter_counter=None,
                    release=worker.stop,
                    on_done=progress("limit", options.count) if progress else None,
                )

            # --- reference-4: a fixed no-op shape, warmed up like the limit ------------------
            if REFERENCE in options.sides:
                # Order ids start with the label's initial: "q", none of the others'.
                warm_units, _ = build_units(
                    run_id, "qwarm", _calibration_counts(), silent_window=options.silent_window
                )
                ref_units, _ = build_units(
                    run_id,
                    "reference",
                    counts,
                    silent_window=options.silent_window,
                    rounds=options.rounds,
                )
                srv = await servers.enter_async_context(
                    temporal(settings, workdir, "reference", server_db=options.server_db)
                )
                client = await connect(srv.address, srv.namespace)
                config = worker_config(REFERENCE, srv, None)
                worker = bench_worker(
                    config,
                    (options.logs_dir or workdir) / f"worker-reference-{run_id}.log",
                    pycache=workdir / "pycache" if options.bytecode else None,
                )
                servers.push_async_callback(worker.stop)
                await worker.start()
                rside = ReferenceSide(client, config.task_queue, run_id)
                note(f"{REFERENCE}: warm-up (one per path)")
                warm = await run_units(rside, warm_units, concurrency=16)
                failed = [t for t in warm.timings if t.error]
                if failed:
                    raise RuntimeError(f"{REFERENCE} warm-up failed: {failed[0].error}")
                stacks[REFERENCE] = SideStack(
                    name=REFERENCE,
                    side=rside,
                    client=client,
                    worker=worker,
                    probes=probes(worker, srv),
                    units=ref_units,
                    starter_counter=None,
                    release=worker.stop,
                    on_done=progress(REFERENCE, options.count) if progress else None,
                )

            # --- measured: the sides in alternated slices -----------------------------------
            for stack in stacks.values():
                await reset_counts(stack.worker)
                if stack.starter_counter is not None:
                    stack.starter_counter.reset()
            pg_before = None
            if "product" in stacks:
                # Counts of the calibration still pending in idle sessions must land first.
                await asyncio.sleep(options.stats_settle)
                pg_before = await pg_commits(db.dsn)
            names = list(stacks)
            slices = {name: split(stacks[name].units, options.rounds) for name in names}
            note(
                f"measured run: {options.rounds} round(s) per side, each of "
                + " and ".join(f"{name} {_round_sizes(slices[name])} units" for name in names)
                + " (a unit is one order: one cancellation, two for a coupon order)"
            )
            for name, rnd in slice_order(options.rounds, names):
                stack = stacks[name]
                idle = [
                    other.probes[k]
                    for other in stacks.values()
                    if other is not stack
                    for k in ("worker", "server")
                ]
                await measure_slice(
                    stack,
                    slices[name][rnd],
                    idle=idle,
                    concurrency=options.concurrency,
                    rnd=rnd,
                )
            for name, stack in stacks.items():
                measured = await finish(stack, shapes, options)
                if name == "product" and pg_before is not None:
                    await asyncio.sleep(1.0)
                    pg_after = await pg_commits(db.dsn)
                    if pg_after is not None:
                        measured.pg = {k: pg_after[k] - pg_before[k] for k in pg_after}
                report["sides"][name] = side_report(measured)
    finally:
        report["machine"]["load_avg_at_end"] = list(os.getloadavg())
        shutil.rmtree(workdir, ignore_errors=True)
    sides = report["sides"]
    if "product" in sides and "limit" in sides:
        report["ratios"] = ratios(sides["product"], sides["limit"])
        # The dev server does the same work per cancellation on both sides (same events), so
        # its CPU per cancellation should match: when it does not, the machine itself ran at
        # another speed for one side (a VM's neighbours), and the run says more about that.
        server = report["ratios"].get("cpu_s_per_cancellation.server")
        report["drift_check"] = {
            "server_cpu_ratio": server,
            "suspect": server is not None and not DRIFT_BAND[0] <= server <= DRIFT_BAND[1],
        }
        # Each round's throughput ratio: their spread is the noise within this run.
        report["round_ratios"] = [
            p["throughput_per_s"] / lim["throughput_per_s"]
            for p, lim in zip(sides["product"]["slices"], sides["limit"]["slices"], strict=True)
        ]
    if "product" in sides and REFERENCE in sides:
        report["ratios_reference_4"] = ratios(sides["product"], sides[REFERENCE])
        report["round_ratios_reference_4"] = [
            p["throughput_per_s"] / ref["throughput_per_s"]
            for p, ref in zip(sides["product"]["slices"], sides[REFERENCE]["slices"], strict=True)
        ]
    if "product" in sides:
        report["targets"] = judge_targets(sides, report.get("drift_check", {}))
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report

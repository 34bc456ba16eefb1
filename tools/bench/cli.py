"""`python -m tools.bench` and `python -m tools.bench parked` (tools/bench/__main__.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

bench_app = typer.Typer(
    help=(
        "Benchmarks: the cancellation mix against the engine's limit (a no-op workflow of the"
        " same shape) and reference-4 (a fixed no-op shape), alternated on one machine; parked"
        " cancellations; the workflow code's CPU by replay (docs/performance.md)."
    ),
    invoke_without_command=True,
    no_args_is_help=False,
)

_err = Console(stderr=True)


def _console(as_json: bool) -> Console:
    """Where the tables go (stderr beside JSON), at the terminal's width, or wide enough for
    the three-side table when written to a file or a pipe (rich would cut it to 80 columns)."""
    stream = sys.stderr if as_json else sys.stdout
    return Console(stderr=as_json, width=None if stream.isatty() else 160)


def _run_until_stopped(main: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run a bench; SIGTERM stops it as Ctrl-C does: the run is cancelled and the servers it
    started (its PostgreSQL, its dev servers, its workers) are stopped before it exits 130.
    (A shell's background job ignores SIGINT, so SIGTERM is how a long run is stopped there.)"""

    async def cancellable() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    try:
        return asyncio.run(cancellable())
    except (KeyboardInterrupt, asyncio.CancelledError):
        _err.print("[yellow]stopped[/yellow]: the bench's servers were shut down, no report")
        raise typer.Exit(130) from None


Pollers = Annotated[
    str | None,
    typer.Option(help="Workflow-task pollers: a number, or 'auto' (PollerBehaviorAutoscaling)"),
]
ActPollers = Annotated[
    str | None,
    typer.Option(help="Activity-task pollers: a number, or 'auto' (PollerBehaviorAutoscaling)"),
]


def _progress_factory(console: Console) -> tuple[Any, Callable[[str, int], Callable[[Any], None]]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def factory(name: str, total: int) -> Callable[[Any], None]:
        task = progress.add_task(name, total=total)
        return lambda _timing: progress.advance(task)

    return progress, factory


def _write(report: dict[str, Any], as_json: bool, out: Path | None, render: Callable[[], None]):
    text = json.dumps(report, indent=2, default=str)
    if out is not None:
        out.write_text(text + "\n")
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        render()


@bench_app.callback()
def bench(
    ctx: typer.Context,
    count: Annotated[int, typer.Option(help="Cancellations per side")] = 200,
    concurrency: Annotated[int, typer.Option(help="Workflows in flight per side")] = 8,
    mix: Annotated[
        str | None,
        typer.Option(help="Weights, e.g. instant=30,accept=45,reject=10,silent=5,coupon=10"),
    ] = None,
    silent_window: Annotated[
        float, typer.Option(help="Seconds the silent seller's window lasts (>= 1)")
    ] = 1.0,
    history_sample: Annotated[int, typer.Option(help="Histories fetched per side")] = 1000,
    wf_pollers: Pollers = None,
    act_pollers: ActPollers = None,
    max_workflow_tasks: Annotated[
        int | None, typer.Option(help="max_concurrent_workflow_tasks")
    ] = None,
    max_activities: Annotated[int | None, typer.Option(help="max_concurrent_activities")] = None,
    pool_max: Annotated[int | None, typer.Option(help="asyncpg pool max size (worker)")] = None,
    cache: Annotated[int, typer.Option(help="max_cached_workflows")] = 1000,
    metrics: Annotated[bool, typer.Option(help="Export the worker's metrics")] = True,
    unsandboxed: Annotated[
        bool,
        typer.Option("--unsandboxed", help="Experiment: workflows without the sandbox"),
    ] = False,
    sides: Annotated[
        str, typer.Option(help="Sides to measure: product,limit,reference-4")
    ] = "product,limit,reference-4",
    rounds: Annotated[
        int,
        typer.Option(
            help="Measured slices per side, the sides alternated (A B, B A, ...) so that the"
            " machine's drift in speed weighs on every side alike; 1: each side in one go"
        ),
    ] = 4,
    server_db: Annotated[str, typer.Option(help="Dev server's SQLite: file or memory")] = "file",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here")] = None,
    logs: Annotated[
        Path | None, typer.Option(help="Keep the worker logs in this directory")
    ] = None,
    stats_settle: Annotated[
        float, typer.Option(help="Seconds for pg_stat_database to catch up (0: skip)")
    ] = 11.0,
    log_level: Annotated[str, typer.Option(help="The worker's log level")] = "info",
    bytecode: Annotated[
        bool, typer.Option(help="Workers keep compiled bytecode (as an installed package)")
    ] = True,
    profile: Annotated[
        Path | None, typer.Option(help="Write a cProfile of each worker into this directory")
    ] = None,
) -> None:
    """The product's cancellation mix against the engine's limit (a no-op workflow with the same
    event shape), side by side, on servers of its own. Method: docs/performance.md."""
    if ctx.invoked_subcommand is not None:
        return
    from tools.bench.mix import DEFAULT_MIX, allocate, parse_mix, unit_count
    from tools.bench.report import bench_table, shape_table, targets_table
    from tools.bench.run import BenchOptions, run_bench

    try:
        parsed_mix = parse_mix(mix) if mix else dict(DEFAULT_MIX)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--mix") from err
    chosen = tuple(side.strip() for side in sides.split(","))
    known = BenchOptions.sides
    unknown = [side for side in chosen if side not in known]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown side {', '.join(map(repr, unknown))}: choose among {', '.join(known)}",
            param_hint="--sides",
        )
    units = unit_count(allocate(count, parsed_mix))
    if not 1 <= rounds <= units:
        raise typer.BadParameter(
            f"{rounds} rounds: between 1 and {units} (the units of {count} cancellations)",
            param_hint="--rounds",
        )
    options = BenchOptions(
        count=count,
        concurrency=concurrency,
        mix=parsed_mix,
        silent_window=timedelta(seconds=max(silent_window, 1.0)),
        history_sample=history_sample,
        wf_pollers=wf_pollers,
        act_pollers=act_pollers,
        max_workflow_tasks=max_workflow_tasks,
        max_activities=max_activities,
        pool_max=pool_max,
        cache=cache,
        metrics=metrics,
        unsandboxed=unsandboxed,
        sides=chosen,
        rounds=rounds,
        server_db=server_db,
        logs_dir=logs,
        stats_settle=stats_settle,
        log_level=log_level,
        profile_dir=profile,
        bytecode=bytecode,
    )
    console = _console(as_json)
    progress, factory = _progress_factory(console)

    async def main() -> dict[str, Any]:
        with progress:
            return await run_bench(options, progress=factory, note=progress.console.log)

    report = _run_until_stopped(main)

    def render() -> None:
        if report.get("shape_check"):  # the limit's shapes, checked: only when it ran
            console.print(shape_table(report))
        console.print(bench_table(report))
        if report.get("targets"):
            console.print(targets_table(report))

    _write(report, as_json, out, render)
    drift = report.get("drift_check", {})
    if drift.get("suspect"):
        _err.print(
            f"[yellow]warning:[/yellow] the Temporal server needed {drift['server_cpu_ratio']:.2f}x"
            " the CPU per cancellation on the product side for the same events: the machine's"
            " speed changed between the sides; repeat the run before reading the ratios"
        )
    if any(side["errors"] for side in report["sides"].values()):
        _err.print("[red]some cancellations failed[/red] (see errors in the report)")
        raise typer.Exit(1)


@bench_app.command()
def parked(
    count: Annotated[
        int, typer.Option(help="Cancellations parked waiting for the seller")
    ] = 10_000,
    concurrency: Annotated[int, typer.Option(help="Starts and decisions in flight")] = 32,
    checkpoints: Annotated[
        str | None, typer.Option(help="Parked counts to report at, e.g. 1000,5000,10000")
    ] = None,
    wf_pollers: Pollers = None,
    act_pollers: ActPollers = None,
    cache: Annotated[int, typer.Option(help="max_cached_workflows")] = 1000,
    server_db: Annotated[str, typer.Option(help="Dev server's SQLite: file or memory")] = "file",
    drain: Annotated[
        bool,
        typer.Option(
            help="Then decide them all and measure the drain (--no-drain: stop once parked)"
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here")] = None,
) -> None:
    """Park COUNT cancellations waiting for their sellers, reporting start rate and memory as
    the number grows, then decide them all and report how the backlog drains."""
    from tools.bench.parked import ParkedOptions, default_checkpoints, parked_table, run_parked

    options = ParkedOptions(
        count=count,
        concurrency=concurrency,
        checkpoints=(
            [int(c) for c in checkpoints.split(",")] if checkpoints else default_checkpoints(count)
        ),
        wf_pollers=wf_pollers,
        act_pollers=act_pollers,
        cache=cache,
        server_db=server_db,
        drain=drain,
    )
    console = _console(as_json)
    progress, factory = _progress_factory(console)

    async def main() -> dict[str, Any]:
        with progress:
            return await run_parked(options, progress=factory, note=progress.console.log)

    report = _run_until_stopped(main)
    _write(report, as_json, out, lambda: console.print(*parked_table(report)))


@bench_app.command()
def sweep(
    levels: Annotated[str, typer.Option(help="Concurrencies to run, e.g. 4,8,16,32")] = "4,8,16,32",
    count: Annotated[int, typer.Option(help="Cancellations per side and level")] = 200,
    chart: Annotated[
        Path | None, typer.Option(help="Write a PNG chart here (needs matplotlib)")
    ] = None,
    stats_settle: Annotated[
        float, typer.Option(help="Seconds for pg_stat_database to catch up (0: skip)")
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sweep as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON here")] = None,
) -> None:
    """The bench at several concurrencies: where the limit peaks, and product/limit there."""
    if chart is not None and importlib.util.find_spec("matplotlib") is None:
        # Said before the sweep's minutes of runs, not after them.
        raise typer.BadParameter(
            "needs matplotlib, the project's `chart` extra:"
            " .venv/bin/python -m pip install -e '.[chart]'",
            param_hint="--chart",
        )
    from tools.bench.run import BenchOptions
    from tools.bench.sweep import run_sweep, sweep_chart, sweep_table

    base = BenchOptions(count=count, stats_settle=stats_settle)
    console = _console(as_json)
    progress, factory = _progress_factory(console)

    async def main() -> dict[str, Any]:
        with progress:
            return await run_sweep(
                base,
                [int(level) for level in levels.split(",")],
                progress=factory,
                note=progress.console.log,
            )

    result = _run_until_stopped(main)
    if chart is not None:
        sweep_chart(result, chart)
    _write(result, as_json, out, lambda: console.print(sweep_table(result)))


@bench_app.command()
def replay(
    rounds: Annotated[int, typer.Option(help="Replays of each history")] = 20,
    tag: Annotated[
        str, typer.Option(help="Which recorded generation of tests/histories/")
    ] = "lean-and-drain",
    history: Annotated[
        list[str] | None, typer.Option(help="Only this history (e.g. instant); repeatable")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="Write a cProfile of the workflow thread here")
    ] = None,
    bytecode: Annotated[
        bool,
        typer.Option(help="Keep compiled bytecode, as an installed package (and the bench) does"),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here")] = None,
) -> None:
    """The workflow code's CPU per cancellation: replay the recorded histories through the
    worker's sandbox, converter and interceptors, no server needed."""
    from tools.bench.replay import replay_table, run_replay

    try:
        report = asyncio.run(
            run_replay(tag=tag, names=history, rounds=rounds, profile=profile, bytecode=bytecode)
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console = _console(as_json)
    _write(report, as_json, out, lambda: console.print(replay_table(report)))

"""`python -m tools.chaos`: the reliability run (docs/reliability.md). The harness itself is
imported only when the command runs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tools.chaos import DEFAULT_COUNT


def chaos_command(
    count: Annotated[
        int,
        typer.Option(help="Cancellations to run (5000 for the long run)", min=1, max=20_000),
    ] = DEFAULT_COUNT,
    seed: Annotated[
        int | None, typer.Option(help="Replay a run: the same seed gives the same plan")
    ] = None,
    start_rate: Annotated[
        float, typer.Option(help="Cancellations requested per second", min=0.5)
    ] = 2.0,
    transient_rate: Annotated[
        float, typer.Option(help="Share of all provider calls that time out", min=0, max=0.5)
    ] = 0.05,
    hostile_share: Annotated[
        float,
        typer.Option(
            help="Share of the single-seller requests awaiting their seller sent hostile input",
            min=0,
            max=1,
        ),
    ] = 0.35,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the servers keep their data (default: a temp dir)")
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep data and logs even when all is well")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Also write the report as JSON to this file")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the tables as Markdown to this file")
    ] = None,
) -> None:
    """Run cancellations of every path against a real Temporal dev server and PostgreSQL while
    workers are killed, servers restarted and the provider fails; then check that nothing was
    lost or refunded twice. Exits 1 on any violation. All local, stops by itself."""
    # Imported here: `ordercancel worker` (the same CLI) has no use for the harness.
    from tools.chaos.report import markdown as to_markdown
    from tools.chaos.report import render
    from tools.chaos.run import ChaosConfig, run_chaos

    console = Console(width=None if sys.stdout.isatty() else 200)
    config = ChaosConfig(
        count=count,
        seed=seed,
        start_rate=start_rate,
        transient_rate=transient_rate,
        hostile_share=hostile_share,
        data_dir=data_dir,
        keep=keep,
    )
    result = asyncio.run(run_chaos(config, say=lambda line: console.print(line, markup=False)))
    render(console, result)
    if report is not None:
        report.write_text(result.to_json() + "\n")
    if markdown is not None:
        markdown.write_text(to_markdown(result))
    if not result.ok:
        raise typer.Exit(1)

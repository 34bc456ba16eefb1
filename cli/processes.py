"""The long-running processes: `ordercancel worker`, `ordercancel dev` (what `make run` runs)
and `ordercancel demo`."""

from __future__ import annotations

import structlog
import typer

from cli import console as ui
from cli.console import CommandError, LogFormat
from infra.stack import open_stack


def worker(log_format: LogFormat = None) -> None:
    """Run a worker on the `order-cancellation` task queue until SIGINT/SIGTERM (drains)."""
    from infra.metrics import worker_metrics_runtime
    from infra.tracing import SERVICE_WORKER, start_tracing
    from workers.worker import run_worker

    settings = ui.settings(log_format)
    start_tracing(SERVICE_WORKER)

    async def main() -> None:
        runtime, metrics_url = worker_metrics_runtime(settings.metrics_port, settings.metrics_host)
        if metrics_url:
            structlog.get_logger(__name__).info("metrics_serving", url=metrics_url)
        async with open_stack(settings, runtime=runtime) as stack:
            await run_worker(settings, stack.client, stack.pool)

    ui.run(main())


def _devstack() -> None:
    """devstack/ is part of a checkout, not of the production image."""
    try:
        import devstack  # noqa: F401
    except ImportError:
        ui.err_console.print(
            "[red]error:[/red] the dev stack is not installed here (it comes with a checkout:"
            " `make run`); point this at your servers with DATABASE_URL and TEMPORAL_ADDRESS"
        )
        raise typer.Exit(1) from None


def dev(
    demo: bool = typer.Option(True, help="Run the demo scenarios once started"),
    log_format: LogFormat = "console",
) -> None:
    """Start the whole stack (Temporal dev server + UI, PostgreSQL, worker, API), run the demo
    and keep serving until Ctrl-C. What `make run` runs."""
    _devstack()
    from devstack.dev import run_dev
    from infra.tracing import SERVICE_DEV, start_tracing

    settings = ui.settings(log_format, quiet=True)
    start_tracing(SERVICE_DEV)
    ui.run(run_dev(settings, console=ui.console, demo=demo))


def demo() -> None:
    """Run the demo scenarios against a running stack (`ordercancel dev` runs them itself)."""
    _devstack()
    from devstack.demo import run_demo

    settings = ui.settings("console")

    async def main() -> None:
        async with open_stack(settings) as stack:
            outcomes = await run_demo(
                stack.client, stack.pool, task_queue=settings.task_queue, console=ui.console
            )
        if any(o.error for o in outcomes):
            raise CommandError("some demo scenarios did not finish (see the table)")

    ui.run(main())

"""`ordercancel dev`: the whole stack in one foreground process tree, until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta

import structlog
from rich.console import Console

from api.commands import check_webhook_secrets
from api.keys import KeyConfigError
from devstack.demo import run_demo
from devstack.dev_api import print_banner, start_dev_api
from devstack.events import start_dev_events
from devstack.stack import open_dev_stack, record_dev_stack
from infra.metrics import (
    NO_API_METRICS,
    NO_DISPATCH_METRICS,
    ApiMetrics,
    DispatchMetrics,
    worker_metrics_runtime,
)
from infra.settings import Settings
from infra.stack import FLOOR_VARIABLE
from workers.worker import run_worker

log = structlog.get_logger(__name__)


# R19's floor for the dev stack only: the demo's silent seller and the README's "try it" use
# seller policies of seconds or minutes. ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR, when set, wins.
DEV_WINDOW_FLOOR = timedelta(seconds=2)


def dev_settings(settings: Settings) -> Settings:
    if FLOOR_VARIABLE in os.environ:
        return settings
    return settings.model_copy(update={"seller_response_window_floor": DEV_WINDOW_FLOOR})


async def run_dev(settings: Settings, *, console: Console, demo: bool = True) -> None:
    settings = dev_settings(settings)
    try:
        # A webhook secret the user configured is checked as `ordercancel api` checks it.
        check_webhook_secrets(settings)
    except KeyConfigError as err:
        raise RuntimeError(str(err)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runtime, metrics_url = worker_metrics_runtime(settings.metrics_port, settings.metrics_host)
    async with open_dev_stack(settings, runtime=runtime) as stack:
        worker = asyncio.create_task(run_worker(settings, stack.client, stack.pool, stop))
        api = await start_dev_api(
            settings,
            pool=stack.pool,
            client=stack.client,
            console=console,
            metrics=ApiMetrics.for_runtime(runtime) if runtime else NO_API_METRICS,
        )
        if api.url is not None:
            record_dev_stack(settings, api_url=api.url)
        # R16: the dispatcher and a demo subscriber printing what sellers and buyers are told;
        # its metrics on the worker's endpoint.
        events = await start_dev_events(
            settings,
            stack.pool,
            console=console,
            metrics=DispatchMetrics.for_runtime(runtime) if runtime else NO_DISPATCH_METRICS,
        )
        ui = stack.ui_url or "(Temporal UI of your own server)"
        if demo:
            await run_demo(
                stack.client,
                stack.pool,
                task_queue=settings.task_queue,
                console=console,
                ui_base=stack.ui_url,
            )
        console.print(
            f"\n[bold green]Serving.[/bold green] Temporal Web UI: {ui}\n"
            + (f"Worker metrics (Prometheus): {metrics_url}\n" if metrics_url else "")
            + "Try (in another terminal, after `source .venv/bin/activate`):\n"
            "  ordercancel status cancel-O-2001~S-7\n"
            "  ordercancel orders load devstack/demo-data/try-it.json\n"
            "  ordercancel request O-3001 S-1 --buyer B-3001 --reason out_of_stock\n"
            "  ordercancel sellers policy S-2 --window 2m\n"
            "  ordercancel decide cancel-O-3001~S-1 accept --seller S-1 --reason sorry\n"
            "  ordercancel events tail --follow        # the outbound events (R16)\n"
            "Ctrl-C stops everything; data stays in .data/ for the next start."
        )
        print_banner(console, api.banner)
        await stop.wait()
        console.print("stopping: draining the worker, then the servers")
        await api.stop()
        await events.stop()
        await worker
    log.info("dev_stopped")

"""`ordercancel orders load|schema`: checkout orders handed over by the order system."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import console as ui
from cli.console import console
from infra.stack import open_stack
from ledger.orders import load_orders, orders_json_schema, parse_orders_file

orders_app = typer.Typer(help="Load orders handed over by the order system.", no_args_is_help=True)


@orders_app.command("load")
def orders_load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
) -> None:
    """Load checkout orders from a JSON file (all or nothing; loading twice changes nothing)."""
    settings = ui.settings()

    async def main() -> None:
        orders = parse_orders_file(file.read_text())
        async with open_stack(settings) as stack:
            report = await load_orders(stack.pool, orders)
        console.print(f"{len(report.loaded)} orders loaded, {len(report.unchanged)} already loaded")

    ui.run(main())


@orders_app.command("schema")
def orders_schema() -> None:
    """Print the JSON Schema of the orders file."""
    sys.stdout.write(json.dumps(orders_json_schema(), indent=2) + "\n")

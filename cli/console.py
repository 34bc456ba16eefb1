"""What every command group of `ordercancel` shares: the consoles, settings with logging, and
one way to run a command and turn an expected failure into a one-line error and an exit code.

Exit codes: 0 done, 1 a refusal or a problem the user can act on (unreachable stack, ledger
error), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from domain.errors import LedgerError
from infra.logging import configure_logging
from infra.settings import Settings
from ledger.orders import OrdersFileError

# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
T = TypeVar("T")

LogFormat = Annotated[
    str | None,
    typer.Option("--log-format", help="json (default) or console", show_default=False),
]


class CommandError(Exception):
    """A refusal or a problem the user can act on: printed without a traceback, exit 1."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; an expected failure is one red line and exit 1."""
    try:
        return asyncio.run(coro)
    except (CommandError, RuntimeError, OrdersFileError, LedgerError) as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None


def bad_argument(message: str) -> typer.Exit:
    """Print a bad-argument error; the caller raises what this returns (exit 2)."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(2)


def settings(log_format: str | None = "console", *, quiet: bool = False) -> Settings:
    """Settings, with logging configured. `quiet`: warnings and errors only unless
    ORDERCANCEL_LOG_LEVEL says otherwise (the dev stack's console is for the demo table)."""
    loaded = Settings()
    level = "warning" if quiet and "ORDERCANCEL_LOG_LEVEL" not in os.environ else None
    configure_logging(log_format or loaded.log_format, level or loaded.log_level)  # type: ignore[arg-type]
    return loaded

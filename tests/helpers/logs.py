"""Capture what the service logs, exactly as `infra.logging.configure_logging` formats it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import structlog
from temporalio import activity, workflow

from infra.logging import configure_logging


class CapturedLogs:
    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    @property
    def text(self) -> str:
        return self._stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line, parsed: a line that is not one JSON object fails the caller's test."""
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


@contextmanager
def captured_logs(
    fmt: Literal["json", "console"] = "json", level: str = "info"
) -> Iterator[CapturedLogs]:
    """The service's logging configuration for the duration, its lines kept in memory.

    pytest's own handlers on the root logger stay in place; the configuration, the root level
    and the SDK logger flags are put back afterwards.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    saved_flags = (
        workflow.logger.workflow_info_on_message,
        activity.logger.activity_info_on_message,
    )
    configure_logging(fmt, level)
    formatter = root.handlers[0].formatter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root.handlers[:] = [*saved_handlers, handler]
    try:
        yield CapturedLogs(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
        workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message = (
            saved_flags
        )

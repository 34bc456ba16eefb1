"""Capture what the service logs, exactly as `infra.logging.configure_logging` formats it."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import structlog
from temporalio import activity, workflow

from infra import logging as service_logging
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
    saved_output = dataclasses.replace(service_logging.OUTPUT)
    saved_flags = (
        workflow.logger.workflow_info_on_message,
        activity.logger.activity_info_on_message,
    )
    stream = io.StringIO()
    configure_logging(fmt, level, stream=stream)
    (handler,) = root.handlers
    root.handlers[:] = [*saved_handlers, handler]
    try:
        yield CapturedLogs(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
        for each in dataclasses.fields(saved_output):
            setattr(service_logging.OUTPUT, each.name, getattr(saved_output, each.name))
        workflow.logger.workflow_info_on_message, activity.logger.activity_info_on_message = (
            saved_flags
        )

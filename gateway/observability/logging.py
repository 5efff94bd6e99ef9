"""Logging: structlog for our events, the same rendering for stdlib loggers (uvicorn's).

One stdlib handler on stdout renders both: JSON lines when stdout is not a terminal (or
``log_format=json``), coloured console lines on a terminal (or ``log_format=console``).
``merge_contextvars`` comes first so the request id bound per request is on every line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from gateway.settings import Settings


def _renderer(log_format: str, stream: TextIO) -> Any:
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    if log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=stream.isatty())
    return structlog.processors.JSONRenderer()


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Configure structlog and the root stdlib logger. Call once, from the CLI, before serving."""
    stream = stream or sys.stdout
    level = getattr(logging, settings.log_level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = _renderer(settings.log_format, stream)
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if isinstance(renderer, structlog.processors.JSONRenderer):
        final.append(structlog.processors.format_exc_info)
    final.append(renderer)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn installs its own handlers unless told otherwise; route its loggers to ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True

"""Logging: structlog for our events, the same rendering for stdlib loggers (uvicorn's).

One stdlib handler on stdout renders both: JSON lines when stdout is not a terminal (or
``log_format=json``), coloured console lines on a terminal (or ``log_format=console``).
``merge_contextvars`` comes first so the request id bound per request is on every line.

Third-party noise at start-up goes the same way: Python warnings become ``py.warnings`` log
lines (and known harmless ones are dropped), :func:`prints_to_log` turns the bare ``print``
of a library we load into log lines, and upstream's routine root-logger lines are debug lines.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import structlog

from gateway.settings import Settings


_HARMLESS_WARNINGS = (
    # diffusers, imported by upstream Chatterbox's S3Gen: asks for the optional PEFT package,
    # which nothing here uses
    r"`LoRACompatibleLinear` is deprecated",
    # torch, on upstream T3's attention context manager at the first request
    r"`torch.backends.cuda.sdp_kernel\(\)` is deprecated",
)


# Upstream Chatterbox logs through the root logger (``logging.info(...)``), so these are told
# apart by their text. Both are routine, not news: debug lines, not info or warnings.
_UPSTREAM_ROUTINE = (
    # S3Gen's flow module, each time one is built (at every start)
    "input frame rate=",
    # S3Gen on a voice's first use: the clip is not a whole number of 40 ms frames, so upstream
    # trims its reference tokens to the mel length (as it should)
    "Reference mel length is not equal to 2 * reference token length.",
)


class _UpstreamRoutine(logging.Filter):
    """Turns upstream's routine root-logger lines into debug lines (shown at log_level=debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or not isinstance(record.msg, str) or not record.msg.startswith(_UPSTREAM_ROUTINE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = record.msg.strip()
        return logging.getLogger().isEnabledFor(logging.DEBUG)


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
    handler.addFilter(_UpstreamRoutine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # warnings.warn() from libraries: a log line (once per place, Python's default), not stderr text
    logging.captureWarnings(True)
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # uvicorn installs its own handlers unless told otherwise; route its loggers to ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class _LinesToLog(io.TextIOBase):
    """A text stream whose complete lines, written by the thread that created it, become
    ``info`` events of ``logger``. Other threads' writes pass straight to ``fallback``: while
    ``sys.stdout`` is swapped, a server thread's own log line (a logger printing to stdout)
    must not be turned into another log line under that logger's write lock (a deadlock)."""

    def __init__(self, logger: Any, fallback: TextIO) -> None:
        self._logger = logger
        self._fallback = fallback
        self._pending = ""
        self._busy = threading.local()
        self._owner = threading.get_ident()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "active", False) or threading.get_ident() != self._owner:
            return self._fallback.write(text)  # a logger that prints to stdout, or another thread
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        self._busy.active = True
        try:
            self._logger.info("library_output", output=line.strip())
        finally:
            self._busy.active = False


@contextlib.contextmanager
def prints_to_log(logger_name: str) -> Iterator[None]:
    """While inside, ``print`` output (of a library being loaded) becomes log lines. Swaps
    ``sys.stdout`` for the whole process: keep it around a short, synchronous call."""
    stream = _LinesToLog(structlog.get_logger(logger_name), sys.stdout)
    with contextlib.redirect_stdout(stream):  # type: ignore[type-var]
        yield
    stream.flush()

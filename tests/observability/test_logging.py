from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway.observability.logging import configure_logging
from gateway.settings import Settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_with_the_bound_request_id(restore_logging: None) -> None:
    stream = io.StringIO()  # not a terminal: "auto" means JSON
    configure_logging(Settings(log_format="auto", log_level="info"), stream=stream)
    with structlog.contextvars.bound_contextvars(request_id="rid-1"):
        structlog.get_logger("gateway.test").info("hello", answer=42)
        logging.getLogger("uvicorn.error").warning("from the stdlib")
    structlog.get_logger("gateway.test").debug("below the level")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["hello", "from the stdlib"]
    assert lines[0]["request_id"] == lines[1]["request_id"] == "rid-1"
    assert lines[0]["answer"] == 42 and lines[0]["level"] == "info" and "timestamp" in lines[0]
    assert lines[1]["logger"] == "uvicorn.error"


def test_console_on_a_terminal(restore_logging: None) -> None:
    stream = _Terminal()
    configure_logging(Settings(log_format="auto"), stream=stream)
    structlog.get_logger("gateway.test").info("hello")
    text = stream.getvalue()
    assert "hello" in text and not text.lstrip().startswith("{")


def test_explicit_json_wins_over_a_terminal(restore_logging: None) -> None:
    stream = _Terminal()
    configure_logging(Settings(log_format="json"), stream=stream)
    structlog.get_logger("gateway.test").info("hello")
    assert json.loads(stream.getvalue().splitlines()[0])["event"] == "hello"

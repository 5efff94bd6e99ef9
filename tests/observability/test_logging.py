from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from gateway.observability.logging import configure_logging, prints_to_log
from gateway.settings import Settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
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


def test_library_warnings_and_prints_become_log_lines(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # pytest's own filters aside: Python's default
        configure_logging(Settings(log_format="json"), stream=stream)  # re-applies its filters
        warnings.warn("this API will change", FutureWarning, stacklevel=1)
        warnings.warn("`LoRACompatibleLinear` is deprecated and will be removed", FutureWarning, stacklevel=1)
    with prints_to_log("gateway.engine"):
        print("loaded PerthNet (Implicit) at step 250,000")
        print("no newline at the end", end="")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("py.warnings", "warning"), ("gateway.engine", "info"), ("gateway.engine", "info")
    ]
    assert "this API will change" in lines[0]["event"]
    assert [line["output"] for line in lines[1:]] == ["loaded PerthNet (Implicit) at step 250,000", "no newline at the end"]
    captured = capsys.readouterr()
    assert captured.out == "" and "LoRACompatibleLinear" not in captured.err


def test_other_threads_write_through_while_prints_become_log_lines(restore_logging: None) -> None:
    """A server thread logging (to stdout) while the engine loader swaps stdout must neither be
    turned into a library_output line nor deadlock on its logger's write lock."""
    import sys
    import threading

    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    real = io.StringIO()
    saved, sys.stdout = sys.stdout, real
    try:
        with prints_to_log("gateway.engine"):
            # a structlog PrintLogger made while stdout is swapped writes under a lock on that stream
            other = threading.Thread(target=lambda: structlog.PrintLogger().msg("server line"))
            other.start()
            other.join(timeout=10)
            assert not other.is_alive(), "a log line from another thread deadlocked"
            print("loader line")
    finally:
        sys.stdout = saved
    assert real.getvalue() == "server line\n"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["output"] for line in lines] == ["loader line"]


def test_upstreams_routine_lines_are_debug_lines(restore_logging: None) -> None:
    """Upstream S3Gen logs through the root logger at every start ("input frame rate=25") and
    as a warning on a voice's first use (a clip that is not a whole number of 40 ms frames):
    both routine, so debug lines; other root-logger lines keep their level."""
    import inspect

    from chatterbox.models.s3gen import flow, s3gen

    # the lines as upstream writes them (if upstream rewords them, this test says so)
    assert 'logging.info(f"input frame rate={self.input_frame_rate}")' in inspect.getsource(flow)
    assert '"Reference mel length is not equal to 2 * reference token length.\\n"' in inspect.getsource(s3gen)

    def upstream_lines() -> None:
        logging.info(f"input frame rate={25}")
        logging.warning("Reference mel length is not equal to 2 * reference token length.\n")
        logging.warning("something else upstream says")

    for log_level, expected in [
        ("info", [("warning", "something else upstream says")]),
        ("debug", [
            ("debug", "input frame rate=25"),
            ("debug", "Reference mel length is not equal to 2 * reference token length."),
            ("warning", "something else upstream says"),
        ]),
    ]:
        stream = io.StringIO()
        configure_logging(Settings(log_format="json", log_level=log_level), stream=stream)
        upstream_lines()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(line["level"], line["event"]) for line in lines] == expected, log_level

"""The host hand-off benchmark (``gateway.tools.bench_host``): every token of every stream
arrives through the real ThreadedLLM, and the table's figures follow from the run."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.tools import bench_host


def test_a_row_counts_every_hand_off(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "host.json"
    assert bench_host.main(["--paths", "thread", "--streams", "1,4", "--tokens", "30", "--repeats", "1",
                            "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"card", "date", "command"} <= set(doc) and "--streams 1,4" in doc["command"] and "cores" in doc["card"]
    one, four = doc["rows"]
    assert (one["streams"], four["streams"]) == (1, 4)
    assert one["steps"] == four["steps"] == 30  # every live stream gets its token each step
    for row in doc["rows"]:
        assert row["wall_us_per_handoff"] > 0 and row["cpu_us_per_handoff"] > 0
        handoffs_per_s = 1e6 / row["wall_us_per_handoff"]
        assert abs(row["ceiling_audio_s_per_s"] - handoffs_per_s / 25) <= 0.02 * handoffs_per_s / 25
    assert "| thread hand-off | 4 | 30 |" in capsys.readouterr().out


def test_the_tick_engine_ends_each_request_on_its_last_token() -> None:
    engine = bench_host.TickEngine(tokens=2)
    engine.add_request("a", None, None)
    engine.add_request("b", None, None)
    engine.abort_request(["b"])
    first, = engine.step()
    last, = engine.step()
    assert (first.finished, last.finished) == (False, True) and not engine.has_unfinished_requests()
    assert last.outputs[0].token_ids == [2]


def test_the_process_path_needs_vllm_and_says_so(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(bench_host, "vllm_installed", lambda: False)
    assert bench_host.main(["--paths", "process", "--streams", "1", "--tokens", "5", "--repeats", "1"]) == 2
    assert "skipped, vLLM is not installed" in capsys.readouterr().err
    assert bench_host.main(["--paths", "process,thread", "--streams", "1", "--tokens", "5", "--repeats", "1"]) == 0
    assert "| thread hand-off | 1 | 5 |" in capsys.readouterr().out  # the other path still runs


def test_a_folder_named_vllm_is_not_taken_for_vllm(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """pytest puts folders such as tests/engine on the path, where ``vllm`` is a test folder:
    the process path is offered only where vLLM itself is installed (its distribution)."""
    import importlib.metadata
    import sys

    (tmp_path / "vllm").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        importlib.metadata.version("vllm")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    assert bench_host.vllm_installed() is installed

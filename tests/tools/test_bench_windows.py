"""The window-schedule benchmark (``gateway.tools.bench_windows``): the windows it plans are
the served policy's, and a row's figures follow from the audio the served vocoder made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.settings import load_settings
from gateway.tools import bench_windows


def test_the_plan_is_the_served_policy_with_t3_ahead() -> None:
    settings = load_settings({}, {})
    default, before = bench_windows.policy_for(settings, 0), bench_windows.policy_for(settings, 100)
    assert [w.new_tokens for w in bench_windows.plan(default, 250, "early")] == [20, 230]
    assert [w.new_tokens for w in bench_windows.plan(default, 250, "late")] == [250]
    for arrival in bench_windows.ARRIVALS:  # the rule until 2026-12-05, whenever the first is planned
        assert [w.new_tokens for w in bench_windows.plan(before, 250, arrival)] == [20, 200, 30]
    assert [w.new_tokens for w in bench_windows.plan(default, 1000, "late")] == [20, 200, 200, 200, 380]
    assert all(w.final for w in bench_windows.plan(default, 250, "late"))


def test_rows_on_tiny_sizes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "windows.json"
    sizes = ["--setting", "stream_first_window_tokens=6", "--setting", "stream_window_tokens=8",
             "--setting", "stream_max_window_tokens=16"]
    assert bench_windows.main(["--final", "8,0", "--streams", "2", "--tokens", "30", "--flow-steps", "1",
                               "--prompt-tokens", "12", "--device", "cpu", *sizes, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"card", "date", "command", "rows"} <= set(doc)
    one_shot, split_early, split_late, early, late = doc["rows"]
    assert [r["first_window"] for r in doc["rows"]] == ["", "early", "late", "early", "late"]
    assert (split_early["windows"], split_late["windows"]) == ("6+16+8", "6+16+8")
    assert (early["windows"], late["windows"]) == ("6+24", "30")
    assert [r["windows_per_utterance"] for r in doc["rows"]] == [1, 3, 3, 2, 1]
    # frames: 2 per token of each window's flow input, the 12-token prompt each time
    assert late["flow_frames_per_audio_s"] == one_shot["flow_frames_per_audio_s"] < early["flow_frames_per_audio_s"]
    assert early["flow_frames_per_audio_s"] < split_early["flow_frames_per_audio_s"]
    assert one_shot["flow_frames_per_audio_s"] == pytest.approx(2 * (12 + 30) / (30 * 0.04), abs=0.1)
    for row in (split_early, split_late, early):
        assert 10 < row["snr_vs_one_shot_db"] < 200 and row["vocoder_s_per_audio_s"] > 0
    # a finished stream vocoded whole is the one-shot computation: the same audio
    assert late["identical_to_one_shot"] and late["snr_vs_one_shot_db"] is None
    assert not any(r["identical_to_one_shot"] for r in (split_early, split_late, early))
    assert one_shot["identical_to_one_shot"] is None  # the reference itself
    out_text = capsys.readouterr().out
    assert "| final <= 32 (default) | early | 6+24 |" in out_text


def test_unknown_arrivals_are_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        bench_windows.main(["--arrivals", "early,soon", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--arrivals" in capsys.readouterr().err


def test_mixed_arrivals_put_small_first_windows_beside_whole_utterances(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    assert bench_windows.main(["--final", "0", "--arrivals", "mixed", "--streams", "2", "--tokens", "30",
                               "--flow-steps", "1", "--prompt-tokens", "12", "--device", "cpu",
                               "--setting", "stream_first_window_tokens=6", "--setting", "stream_window_tokens=8",
                               "--setting", "stream_max_window_tokens=16", "--setting", "vocoder_split_min_rows=1",
                               "--json", str(out)]) == 0
    _, mixed = json.loads(out.read_text())["rows"]
    assert (mixed["first_window"], mixed["windows"], mixed["windows_per_utterance"]) == ("mixed", "30 / 6+24", 1.5)
    assert mixed["settings"]["vocoder_split_min_rows"] == 1 and 10 < mixed["snr_vs_one_shot_db"] < 200

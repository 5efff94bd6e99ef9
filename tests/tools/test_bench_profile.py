"""The vocoder profile stage (gateway/tools/bench_profile.py) at a few tokens on the CPU: every
part is timed, and the watermark twice, per row (upstream's call) and batched (the served one)."""

from __future__ import annotations

import pytest

from gateway.tools.bench_profile import stage_profile


@pytest.mark.slow
def test_the_tiny_profile_times_every_part_and_both_watermarks() -> None:
    rows = stage_profile([2], flow_steps=1, repeats=1, config_names=("before", "hift-fused"), knobs=False,
                         pipeline_batches=1, one_shot_batches=(1,), prompt_tokens=8, graph_max_frames=128, tiny=True)
    assert [(r["config"], r["window"].split(" (")[0], r["batch"]) for r in rows] == [
        (config, window, batch) for config in ("before", "hift-fused")
        for window, batch in (("first window", 2), ("regular window", 2), ("one-shot", 1))]
    assert all(r["HiFT ms"] > 0 for r in rows)
    for row in rows:
        per_row, batched = row["watermark (per row, serial) ms"], row["watermark (batched) ms"]
        assert per_row > 0 and batched > 0
        assert row["total ms"] > per_row  # the per-row watermark is in the total, the batched one beside it
        assert row["vocoder audio-s/s (no watermark)"] > 0 and 0 < row["gpu busy share"] <= 1


@pytest.mark.slow
def test_turbos_tiny_profile_times_its_mean_flow_vocoder() -> None:
    """``model`` chatterbox-turbo: S3Gen(meanflow=True) through the mean-flow solver, every
    part timed, and no fewer-steps knob row (its solve has two)."""
    rows = stage_profile([2], flow_steps=2, repeats=1, config_names=("after",), compile_mode="off", knobs=True,
                         pipeline_batches=1, one_shot_batches=(1,), knob_batches=(1,), prompt_tokens=8,
                         graph_max_frames=128, tiny=True, watermark=False, model="chatterbox-turbo")
    assert {r["config"] for r in rows} == {"after", "after, vocoder_prompt_tokens=150", "after, vocoder_prompt_tokens=100"}
    assert all(r["model"] == "chatterbox-turbo" and r["flow_steps"] == 2 for r in rows if r["config"] == "after")
    for row in rows:
        assert row["vocoder audio-s/s (no watermark)"] > 0 and row["CFM decoder ms"] > 0, row


def test_the_profile_stage_names_what_it_cannot_profile() -> None:
    with pytest.raises(ValueError, match="not 'chatterbox-multilingual'"):
        stage_profile([1], flow_steps=1, repeats=1, model="chatterbox-multilingual")

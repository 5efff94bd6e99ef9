"""The real-time listener behind the stall figures (server log line and metric, benchmark rows)."""

from __future__ import annotations

import pytest

from gateway.observability.playback import RealTimePlayer
from gateway.observability.request_record import RequestRecord


def test_a_real_time_player_counts_the_waits_after_the_first_audio() -> None:
    """First audio at 10 s: 0.8 s of audio, the next piece at 11.2 s (0.4 s of silence heard),
    then 2 s arriving early (no wait), then a piece 0.01 s late."""
    player = RealTimePlayer()
    for at, audio_s in ((10.0, 0.8), (11.2, 2.0), (11.5, 1.0), (14.21, 0.5)):
        player.arrive(at, audio_s)
    assert player.stalled_s == pytest.approx(0.41) and player.until == pytest.approx(14.71)


def test_the_first_piece_only_starts_the_clock() -> None:
    player = RealTimePlayer()
    player.arrive(5.0, 0.0)  # an empty first piece: the clock starts, nothing to play
    player.arrive(5.3, 1.0)
    assert player.stalled_s == pytest.approx(0.3)


def test_a_faster_speed_makes_the_same_samples_play_for_less_time(monkeypatch) -> None:
    clock = iter([100.0, 100.3])
    monkeypatch.setattr("gateway.observability.request_record.time.monotonic", lambda: next(clock))
    record = RequestRecord(sample_rate=24_000, speed=2.0)
    record.add_audio(24_000)  # 1 s of samples, heard in 0.5 s at speed 2
    record.add_audio(24_000)
    assert record.audio_seconds == 2.0 and record.stall_s == 0.0
    late = iter([100.0, 100.8])
    monkeypatch.setattr("gateway.observability.request_record.time.monotonic", lambda: next(late))
    record = RequestRecord(sample_rate=24_000, speed=2.0)
    record.add_audio(24_000)
    record.add_audio(24_000)
    assert record.stall_s == pytest.approx(0.3)

"""An upload cut by the request time limit (issue 20): it got no response at all, the voice was
created anyway (so a retry got 409), and its slot was given back while FFmpeg still ran. Now
it is a 504 in the envelope, before the response guard would drop it; nothing is created; the
slot is held until FFmpeg is gone. A real server on loopback; FFmpeg made slow by a wrapper
that sleeps before it runs the real binary (a machine too busy to start it in time)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import ffmpeg_children
from ops_support import live_server, tone_wav, wait_until



@pytest.fixture
def slow_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    real = ffmpeg_exe()
    wrapper = tmp_path / "bin" / "ffmpeg"  # named ffmpeg: the children scan sees it
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nsleep 30\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))
    ffmpeg_exe.cache_clear()
    yield wrapper
    ffmpeg_exe.cache_clear()


def test_an_upload_past_the_time_limit_is_a_504_and_creates_nothing(settings: Settings, slow_ffmpeg: Path) -> None:
    config = msgspec.structs.replace(settings, request_timeout_s=1.5)
    with live_server(config, FakeEngine(), guarded=True) as live:
        slots = live.services.upload_admission
        released_early: list[set[int]] = []
        watching = threading.Event()

        def watch() -> None:  # the slot must not be free while an FFmpeg child runs
            while not watching.wait(0.01):
                children = ffmpeg_children()
                if slots.in_flight == 0 and children:
                    released_early.append(children)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            answer = httpx.post(
                f"{live.base_url}/v1/audio/voices",
                data={"name": "late"},
                files={"audio_sample": ("late.wav", tone_wav(4.0), "audio/wav")},
                timeout=10,
            )
            took = time.monotonic() - started
        finally:
            watching.set()
            watcher.join()
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "timeout"
        # before the response guard would have dropped it (a stalled host's seconds allowed:
        # the wrapper holds FFmpeg back 30 s, so a deadline not enforced could not answer 504)
        assert took < 1.5 + 8.0, took
        # the slot is given back as the upload's worker thread ends (FFmpeg killed at the
        # deadline), which may be a moment after the 504 has left; never while FFmpeg runs.
        # FFmpeg gone long before the wrapper's 30 s: it was killed, so nothing can be created.
        assert wait_until(lambda: slots.in_flight == 0 and not ffmpeg_children(), timeout_s=15)
        assert not released_early, released_early
        assert httpx.get(f"{live.base_url}/v1/audio/voices/late", timeout=5).status_code == 404

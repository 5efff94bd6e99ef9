"""Shared fixtures: settings in a temporary cache, the app on the fake engine (in-process, with
its lifespan run on the test's own event loop), a real uvicorn server on loopback, and an
FFmpeg-based probe that decodes audio the way a client would."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from harness import InProcess, in_process, serve_on_loopback
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings

# --- settings and app -------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        engine="fake",
        cache_dir=str(tmp_path / "cache"),
        voices_dir=str(tmp_path / "user-voices"),
        max_speech_tokens=50,
        max_body_bytes=64 * 1024,
        log_format="json",
        # every test client is 127.0.0.1, one client: a test that drives several requests at
        # once must not meet its fair share (tests/speech/test_admission.py and
        # tests/http/test_fair_shares.py test the shares with their own settings)
        max_client_share=1.0,
    )


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_gateway(settings: Settings) -> Callable[..., Any]:
    """``async with make_gateway(engine, ready=False) as gw``: the app on any engine."""

    def make(engine: FakeEngine, *, ready: bool = True) -> Any:
        return in_process(settings, engine, ready=ready)

    return make


@pytest.fixture
async def gateway(settings: Settings, fake_engine: FakeEngine) -> AsyncIterator[InProcess]:
    async with in_process(settings, fake_engine) as ctx:
        yield ctx


# --- a real server on loopback ----------------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str
    port: int
    engine: FakeEngine

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(api_key="test", base_url=f"{self.base_url}/v1", max_retries=0)


@pytest.fixture
def live_engine() -> FakeEngine:
    # A little latency per piece, so streaming and disconnects are observable.
    return FakeEngine(piece_delay_s=0.02)


@pytest.fixture
def live_server(settings: Settings, live_engine: FakeEngine) -> Iterator[LiveServer]:
    app = create_app(settings, engine=live_engine)
    with serve_on_loopback(app) as base_url:
        yield LiveServer(base_url=base_url, port=int(base_url.rsplit(":", 1)[1]), engine=live_engine)


# --- decoding audio like a client -------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    codec: str
    sample_rate: int
    channels: int
    duration_s: float
    """From decoding every sample (streamed files carry no reliable length header)."""


def ffmpeg_binaries() -> tuple[str, str | None]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    return ffmpeg, shutil.which("ffprobe")


def probe_audio(data: bytes, response_format: str, tmp_path: Path) -> Probe:
    """Decode ``data`` with FFmpeg: codec, rate and channels from ffprobe, duration by
    counting decoded samples."""
    assert data, "no audio bytes"
    ffmpeg, ffprobe = ffmpeg_binaries()
    path = tmp_path / f"probe-{time.monotonic_ns()}.{response_format}"
    path.write_bytes(data)
    input_args = ["-f", "s16le", "-ar", "24000", "-ac", "1"] if response_format == "pcm" else []
    if ffprobe:
        out = subprocess.run(
            [ffprobe, "-v", "error", *input_args, "-show_streams", "-of", "json", str(path)],
            capture_output=True,
            check=True,
        )
        stream = json.loads(out.stdout)["streams"][0]
        codec, rate, channels = stream["codec_name"], int(stream["sample_rate"]), int(stream["channels"])
    else:  # imageio-ffmpeg ships no ffprobe: read the stream line ffmpeg prints
        info = subprocess.run([ffmpeg, "-hide_banner", *input_args, "-i", str(path)], capture_output=True, text=True)
        line = next(l for l in info.stderr.splitlines() if "Audio:" in l)
        fields = line.split("Audio:")[1].split(",")
        codec = fields[0].strip().split()[0]
        rate = int(fields[1].strip().split()[0])
        channels = 1 if "mono" in line else 2
    decoded = subprocess.run(
        [ffmpeg, "-v", "error", *input_args, "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"],
        capture_output=True,
        check=True,
    )
    return Probe(codec=codec, sample_rate=rate, channels=channels, duration_s=len(decoded.stdout) / 2 / rate)


EXPECTED_CODECS = {
    "mp3": ("mp3", 24000),
    "opus": ("opus", 48000),
    "aac": ("aac", 24000),
    "flac": ("flac", 24000),
    "wav": ("pcm_s16le", 24000),
    "pcm": ("pcm_s16le", 24000),
}


@pytest.fixture
def valid_audio(tmp_path: Path) -> Callable[[bytes, str], Probe]:
    """``valid_audio(data, response_format)`` asserts the bytes decode as that format (codec,
    rate, mono, some duration) and returns what FFmpeg found."""

    def check(data: bytes, response_format: str) -> Probe:
        probe = probe_audio(data, response_format, tmp_path)
        codec, rate = EXPECTED_CODECS[response_format]
        assert (probe.codec, probe.sample_rate, probe.channels) == (codec, rate, 1), probe
        assert probe.duration_s > 0, probe
        return probe

    return check


@pytest.fixture
def api_error() -> Callable[..., dict[str, Any]]:
    """``api_error(response, status, param=..., code=...)`` asserts the OpenAI error envelope."""
    return _api_error


def _api_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The response is the OpenAI error envelope with this status (and param/code if given)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error

"""The encoder's cost per route: ``python -m gateway.tools.encoder_bench``.

For each route available here (the system's ``ffmpeg`` process, the imageio-ffmpeg wheel's
static ``ffmpeg`` process, FFmpeg's libraries in-process through PyAV) and each codec
format, through the same code the server runs (``encode_audio`` and the route's module):

* first byte: from handing the encoder its first chunk (``--first-chunk-s`` of float32
  samples at 24 kHz, 0.8 s by default: a first streamed window) to its first output bytes,
  process start or codec set-up included; p50 and p95 over ``--runs`` runs after warm-up.
* CPU per audio-second: the CPU time of this process and its reaped children while
  encoding ``--seconds`` of audio in 0.8 s chunks, divided by those seconds (median of 3).

Prints a Markdown table. CPU-only; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from gateway.audio.encoder import encode_audio
from gateway.audio.ffmpeg_process import encode_with_ffmpeg
from gateway.audio.pyav_encoder import pyav_available

SAMPLE_RATE = 24_000
CHUNK_S = 0.8
FORMATS = ("mp3", "opus", "aac", "flac")

Encode = Callable[[AsyncIterator[np.ndarray], str], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Route:
    name: str
    detail: str
    encode: Encode


def available_routes() -> list[Route]:
    routes = []
    if pyav_available():
        import av  # only to name its FFmpeg build

        routes.append(
            Route(
                "in-process (PyAV)",
                f"av {av.__version__}, libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}",
                lambda chunks, fmt: encode_audio(chunks, response_format=fmt, sample_rate=SAMPLE_RATE, route="inprocess"),
            )
        )
    try:
        import imageio_ffmpeg

        static = imageio_ffmpeg.get_ffmpeg_exe()
        routes.append(Route("static ffmpeg process (imageio-ffmpeg)", static, _process_route(static)))
    except (ImportError, RuntimeError):
        pass
    system = shutil.which("ffmpeg")
    if system:
        routes.append(Route("system ffmpeg process", system, _process_route(system)))
    return routes


def _process_route(exe: str) -> Encode:
    return lambda chunks, fmt: encode_with_ffmpeg(
        chunks, response_format=fmt, sample_rate=SAMPLE_RATE, speed=1.0, exe=exe
    )


def _signal(seconds: float) -> np.ndarray:
    """Speech-like test audio: a gliding tone with a syllable-rate envelope, some noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 60 * np.sin(2 * np.pi * 0.7 * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(0).normal(0, 0.02, t.shape)
    return (0.3 * voiced * envelope + noise).astype(np.float32)


async def first_byte_s(route: Route, fmt: str, first_chunk: np.ndarray) -> float:
    """Seconds from the first chunk's hand-over to the first output bytes."""
    handed = 0.0
    release = asyncio.Event()

    async def source() -> AsyncIterator[np.ndarray]:
        nonlocal handed
        handed = time.perf_counter()
        yield first_chunk
        await release.wait()  # the rest of the utterance is "still being generated"

    out = route.encode(source(), fmt)
    try:
        async for data in out:
            if data:
                return time.perf_counter() - handed
        raise RuntimeError(f"{route.name} gave no bytes for {fmt}")
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await out.aclose()  # type: ignore[attr-defined]


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def cpu_ms_per_audio_s(route: Route, fmt: str, audio: np.ndarray) -> float:
    step = int(CHUNK_S * SAMPLE_RATE)

    async def source() -> AsyncIterator[np.ndarray]:
        for start in range(0, len(audio), step):
            yield audio[start : start + step]

    before = _cpu_s()
    size = 0
    async for data in route.encode(source(), fmt):
        size += len(data)
    assert size, f"{route.name} gave no bytes for {fmt}"
    return (_cpu_s() - before) * 1000 / (len(audio) / SAMPLE_RATE)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    first_chunk = _signal(args.first_chunk_s)
    audio = _signal(args.seconds)
    rows: list[dict[str, object]] = []
    for route in available_routes():
        for fmt in args.formats:
            for _ in range(args.warmup):
                await first_byte_s(route, fmt, first_chunk)
            firsts = [await first_byte_s(route, fmt, first_chunk) * 1000 for _ in range(args.runs)]
            cpu = statistics.median([await cpu_ms_per_audio_s(route, fmt, audio) for _ in range(3)])
            rows.append(
                {
                    "route": route.name,
                    "detail": route.detail,
                    "format": fmt,
                    "first_byte_p50_ms": statistics.median(firsts),
                    "first_byte_p95_ms": _pct(firsts, 0.95),
                    "cpu_ms_per_audio_s": cpu,
                }
            )
    return rows


def render(rows: list[dict[str, object]]) -> str:
    lines = [
        "| route | format | first byte p50 (ms) | first byte p95 (ms) | CPU ms per audio-s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['route']} | {r['format']} | {r['first_byte_p50_ms']:.1f} | "
            f"{r['first_byte_p95_ms']:.1f} | {r['cpu_ms_per_audio_s']:.1f} |"
        )
    details = sorted({(str(r["route"]), str(r["detail"])) for r in rows})
    lines += ["", *(f"- {name}: {detail}" for name, detail in details)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.tools.encoder_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--runs", type=int, default=30, help="timed first-byte runs per route and format")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--first-chunk-s", type=float, default=CHUNK_S)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio encoded per CPU measurement")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = asyncio.run(run(args))
    print(
        f"{_cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, Python {platform.python_version()}, "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(render(rows))


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()

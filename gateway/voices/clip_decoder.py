"""The child program that reads an uploaded voice clip, run by :mod:`gateway.voices.clip_probe`
as ``python -I clip_decoder.py '<json bounds>'`` inside the OS limits set there (address
space, CPU seconds, wall time, a lower priority).

It reads the clip with FFmpeg's own demuxers and decoders through PyAV and checks what they
parsed (numbers in structures, never text FFmpeg prints: a tag such as ``TITLE=Stream #0:0:
Audio: flac, 24000 Hz`` is only a tag here). Before any sample is resampled:

- the demuxer is the one the caller named, reading only the bytes given (a Python file
  object: no protocol, no other file, no URL);
- the first audio stream's declared rate and channel count are within bounds, and so is its
  declared duration when the container states one;
- every decoded frame has that same rate and channel count: a stream that changes either
  mid-way is refused (a FLAC frame header may declare 16 Hz after a 24 kHz STREAMINFO, and
  resampling 16 Hz to 24 kHz turns each sample into 1,500);
- decoding stops at the duration limit, and a stream that decodes to more samples than its
  codec can produce from the bytes given (:data:`MAX_SAMPLES_PER_BYTE`) is refused.

stdin: the clip. stdout: float32 little-endian mono samples at 24 kHz. stderr: one JSON line,
the verdict: ``{"codec", "sample_rate", "channels"}`` (exit 0) or ``{"refused": message}``
(exit :data:`REFUSED`); any other exit (a limit hit, a crash) means the clip was unreadable.
The standard library and PyAV only: the child must start fast and map little.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

REFUSED = 3
OUTPUT_RATE = 24_000
DURATION_SLACK_S = 0.5
"""Decoded audio may run this far past the limit (a last frame, a codec's priming samples):
the caller then refuses it by the samples it got."""
MAX_DECODE_ERRORS = 50
"""Packets that fail to decode and are skipped (as the FFmpeg command line does) before the
clip is refused."""

# Most samples (per channel) each codec can produce from one byte of input, generously: FLAC
# and ALAC code a constant block of up to 65,535 samples in ~10 bytes, Opus 120 ms in a 2-byte
# packet, Vorbis a 4,096-sample half-block in a few bytes, HE-AAC 2,048 samples in a couple of
# bytes, an MP3 frame 1,152 samples in 21 bytes at least, PCM at most one sample per byte.
MAX_SAMPLES_PER_BYTE: dict[str, float] = {
    "flac": 8192, "alac": 8192, "opus": 3072, "vorbis": 4096, "aac": 2048,
    "mp3": 64, "mp3float": 64, "mp2": 64, "mp2float": 64, "mp1": 64, "mp1float": 64,
}
PCM_SAMPLES_PER_BYTE = 1.0
ADPCM_SAMPLES_PER_BYTE = 4.0
OTHER_SAMPLES_PER_BYTE = 8192.0


class Refused(Exception):
    """The clip breaks a bound; the message is for the client."""


def samples_per_byte(codec: str) -> float:
    if codec.startswith("pcm_"):
        return PCM_SAMPLES_PER_BYTE
    if codec.startswith("adpcm_"):
        return ADPCM_SAMPLES_PER_BYTE
    return MAX_SAMPLES_PER_BYTE.get(codec, OTHER_SAMPLES_PER_BYTE)


def _check_rate_and_channels(rate: int, channels: int, bounds: dict[str, Any], what: str) -> None:
    if not bounds["min_rate"] <= rate <= bounds["max_rate"]:
        raise Refused(
            f"audio_sample has {what}a sample rate of {rate} Hz; "
            f"{bounds['min_rate']}-{bounds['max_rate']} Hz is accepted."
        )
    if not 1 <= channels <= bounds["max_channels"]:
        raise Refused(f"audio_sample has {what}{channels} channels; at most {bounds['max_channels']} are accepted.")


def decode(data: bytes, bounds: dict[str, Any], out: Any) -> dict[str, Any]:
    """Decode ``data`` to ``out`` (float32 mono 24 kHz bytes) as the module says; the verdict."""
    import av  # here, not at import: the module's constants are read by the parent too

    max_seconds = float(bounds["max_seconds"])
    try:
        container = av.open(io.BytesIO(data), mode="r", format=bounds["format"])
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise Refused("audio_sample could not be read as audio (its header is missing or damaged).") from exc
    with container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise Refused("audio_sample has no audio stream that could be read.")
        context = stream.codec_context
        rate, channels, codec = int(context.sample_rate or 0), int(context.channels or 0), context.name
        _check_rate_and_channels(rate, channels, bounds, "")
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > max_seconds + 1.0:
            raise Refused(
                f"audio_sample is {declared:.1f} s long; the limit is {max_seconds:g} s "
                "(the model uses only the first 10 s)."
            )
        most = min((max_seconds + DURATION_SLACK_S) * rate, samples_per_byte(codec) * len(data))
        resampler = av.AudioResampler(format="flt", layout="mono", rate=OUTPUT_RATE)
        decoded = errors = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                errors += 1
                if errors > MAX_DECODE_ERRORS:
                    raise Refused("audio_sample could not be decoded as audio (too many damaged packets).") from None
                continue
            for frame in frames:
                if frame.sample_rate != rate or frame.layout.nb_channels != channels:
                    raise Refused(
                        f"audio_sample changes from {rate} Hz, {channels} channel(s) to {frame.sample_rate} Hz, "
                        f"{frame.layout.nb_channels} channel(s) mid-stream; one format throughout is accepted."
                    )
                decoded += frame.samples
                if decoded > most:
                    if decoded > (max_seconds + DURATION_SLACK_S) * rate:
                        raise Refused(
                            f"audio_sample is longer than {max_seconds:g} s; the model uses only the first 10 s, "
                            "so trim it to 6-10 s of clean speech."
                        )
                    raise Refused(
                        f"audio_sample decodes to more audio than {len(data)} bytes of {codec} can hold."
                    )
                _write(resampler.resample(frame), out)
        _write(resampler.resample(None), out)
    return {"codec": codec, "sample_rate": rate, "channels": channels}


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _write(frames: list[Any], out: Any) -> None:
    for frame in frames:
        # packed float mono: one plane; its buffer may be padded past the samples
        out.write(memoryview(frame.planes[0])[: frame.samples * 4])


def main(argv: list[str]) -> int:
    bounds = json.loads(argv[1])
    data = sys.stdin.buffer.read()
    out = sys.stdout.buffer
    try:
        verdict = decode(data, bounds, out)
    except Refused as exc:
        verdict = {"refused": str(exc)}
    out.flush()
    sys.stderr.write(json.dumps(verdict) + "\n")
    return REFUSED if "refused" in verdict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

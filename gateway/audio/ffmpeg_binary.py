"""Which FFmpeg executable we run: the system's, else the one in the imageio-ffmpeg wheel.

Resolved lazily, once per process (the first encode or voice upload pays for the lookup),
so importing the gateway never touches the filesystem.
"""

from __future__ import annotations

import functools
import shutil

from gateway.errors import EncoderError


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the FFmpeg binary. Raises EncoderError when neither source has one."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise EncoderError(
            "FFmpeg not found: install it (e.g. `apt-get install ffmpeg`) or the imageio-ffmpeg package"
        ) from exc

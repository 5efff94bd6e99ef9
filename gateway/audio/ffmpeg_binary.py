"""Which FFmpeg executable we run: the static one in the imageio-ffmpeg wheel, else the system's.

The wheel's binary first: it is a dependency (so always there on the platforms it ships
for), the same build everywhere, and statically linked, so its first bytes come in ~13-18 ms
where a distribution's dynamically linked ``ffmpeg`` spends ~60-90 ms, mostly loading shared
libraries (2 cores; docs/benchmarks.md, encoder). The system's is the fallback where the wheel has no binary.

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
    try:
        import imageio_ffmpeg  # only when FFmpeg is first needed: it looks up its binary

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        pass
    system = shutil.which("ffmpeg")
    if system:
        return system
    raise EncoderError(
        "FFmpeg not found: install the imageio-ffmpeg package or FFmpeg (e.g. `apt-get install ffmpeg`)"
    )

#!/usr/bin/env bash
# On the development machine, before a GPU visit: build .gpu/ (git-ignored), everything that
# install.sh's steps carry to the offline GPU machine, from ../shared/gpu and PyPI:
#
#   .gpu/p1, .gpu/p2          vLLM 0.24.0, slimmed, in two parts (../shared/gpu/README.md)
#   .gpu/chatterbox-deps      the upstream Chatterbox code and its audio dependencies (cp312)
#   .gpu/extra                the gateway's own dependencies the machine lacks (cp312 wheels,
#                             at the versions of this checkout's .venv where it has them)
#   .gpu/extra_av             PyAV (FFmpeg's libraries in-process: the default encoder)
#   .gpu/ffmpeg.xz            the static FFmpeg of the imageio-ffmpeg wheel, xz'd
#
#   bash gateway/tools/gpu/prepare.sh        # ~1-2 min; what exists already is kept
#
# Then the device calls: install.sh p1, p2, deps (+ ffmpeg, av), then the work (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/../../.."
SHARED=${SHARED:-../shared/gpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu
for part in "$SHARED/vllm-0.24.0/p1" "$SHARED/vllm-0.24.0/p2" "$SHARED/chatterbox-deps"; do
  [ -d ".gpu/$(basename "$part")" ] || cp -r "$part" .gpu/
done

# The GPU machine has Python 3.12 with torch, transformers, numpy, scipy; vLLM's bundle brings
# msgspec, openai, pydantic and the like. What the server, its tests and its tools import
# beyond that (gateway/ imports; websockets: the voice-agent routes and tools/agent_bench.py;
# py-spy: the benchmark's --http-py-spy-s, its binary lands in /root/site3/bin):
EXTRA=(anyio certifi click distro faker ffmpeg-python future h11 httpcore httpcore2 httpx idna
       iniconfig jiter litestar litestar-htmx markdown-it-py mdurl multidict multipart packaging
       pluggy polyfactory prometheus-client py-spy pygments pytest pytest-asyncio pyyaml rich rich-click
       structlog truststore uvicorn websockets)
pinned() {  # NAME==VERSION as this checkout's .venv has it, else NAME
  "$PY" - "$@" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
}
download() {  # download DIR NAME...
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" $(pinned "$@")
}
[ -d .gpu/extra ] || download .gpu/extra "${EXTRA[@]}"
[ -d .gpu/extra_av ] || download .gpu/extra_av av
if [ ! -f .gpu/ffmpeg.xz ]; then
  exe=$("$PY" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')
  xz -T2 -6 -c "$exe" > .gpu/ffmpeg.xz.part && mv .gpu/ffmpeg.xz.part .gpu/ffmpeg.xz
fi
du -sh .gpu/* | sort -k2
for dir in .gpu/p1 .gpu/p2 .gpu/chatterbox-deps .gpu/extra .gpu/extra_av; do  # each carry <= 64 MiB
  size=$(du -sm "$dir" | cut -f1)
  [ "$size" -lt 64 ] || { echo "prepare.sh: $dir is ${size} MiB, over what one call carries" >&2; exit 1; }
done

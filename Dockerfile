# GPU image: CUDA 13 runtime, torch 2.11 (cu130 wheels from PyPI), vLLM 0.24.
# No distribution FFmpeg: audio is encoded in-process by the FFmpeg libraries inside the `av`
# wheel (1-5 ms to the first bytes); voice uploads and the `--audio-encoder ffmpeg` fallback
# run the static FFmpeg inside the imageio-ffmpeg wheel (~13-18 ms to the first bytes, against
# ~60-90 ms for a distribution's dynamically linked one). Both wheels come with `pip install`.
# Weights are downloaded from the Hugging Face Hub on first start into the /cache volume
# (pinned revision; see README), or pre-fetched with `chatterbox-gateway download`; the vLLM
# engine keeps its compile caches there too (/cache/compile), so a new container starts warm.
#
#   docker build -t chatterbox-gateway .
#   docker run --gpus all -p 8000:8000 -v chatterbox-cache:/cache chatterbox-gateway
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (cached layer), then the package itself. setup.py holds the package list
# and its data (the built-in voices, the playground, the API docs assets).
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
COPY voices ./voices
RUN pip install '.[gpu]'

ENV CHATTERBOX_HOST=0.0.0.0 \
    CHATTERBOX_PORT=8000 \
    CHATTERBOX_CACHE_DIR=/cache \
    CHATTERBOX_BUILTIN_VOICES_DIR=/app/voices \
    CHATTERBOX_ENGINE=auto
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
CMD ["chatterbox-gateway", "serve"]

#!/usr/bin/env bash
# Issue 17's GPU visit (Turbo and Multilingual on the vLLM engine): part 1 or part 2, one
# device call each, results under $OUT/part1 or $OUT/part2. Run from the repository root of
# the checkout on the GPU machine, after vLLM's install (../shared/gpu/README.md: p1, p2) and
# the extras of docs/benchmarks.md ("GPU end-to-end tests through HTTP"):
#
#   bash gateway/tools/gpu/families.sh part1            # <= 9 min
#   bash gateway/tools/gpu/families.sh part2            # <= 9.5 min
#   PYTHON=.venv/bin/python bash gateway/tools/gpu/families.sh part1 --dry-run   # CPU, here
#
# What each part runs and writes: gateway/tools/gpu/families.py. This wrapper only sets the
# environment up (each step is idempotent and cheap; a missing piece is reported, not fatal).
set -u
cd "$(dirname "$0")/../../.." || exit 1
PY=${PYTHON:-python3}
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

if [ "$DRY" = 0 ]; then
  [ -f /root/vllm_env.sh ] && . /root/vllm_env.sh || echo "families.sh: no /root/vllm_env.sh (vLLM not installed?)"
  # upstream Chatterbox code and its audio dependencies (carried as .gpu/chatterbox-deps)
  if ! PYTHONPATH=/root/site2:${PYTHONPATH:-} "$PY" -c "import chatterbox" 2>/dev/null; then
    if [ -d .gpu/chatterbox-deps ]; then
      "$PY" -m pip install -q --no-index --no-deps --target /root/site2 .gpu/chatterbox-deps/*.whl
    else
      echo "families.sh: chatterbox is not importable and .gpu/chatterbox-deps was not carried"
    fi
  fi
  # the gateway's own dependencies (litestar, uvicorn, pytest, httpx, ...) and FFmpeg, when
  # carried as .gpu/extra and .gpu/ffmpeg.xz (docs/benchmarks.md says how they are made)
  if ! PYTHONPATH=/root/site3:${PYTHONPATH:-} "$PY" -c "import litestar, uvicorn, structlog" 2>/dev/null; then
    if [ -d .gpu/extra ]; then
      "$PY" -m pip install -q --no-index --no-deps --target /root/site3 .gpu/extra/*.whl
    else
      echo "families.sh: litestar/uvicorn/structlog missing and .gpu/extra was not carried"
    fi
  fi
  if [ ! -x /root/bin/ffmpeg ] && [ -f .gpu/ffmpeg.xz ]; then
    mkdir -p /root/bin && xz -T8 -dc .gpu/ffmpeg.xz > /root/bin/ffmpeg && chmod +x /root/bin/ffmpeg
  fi
  # vLLM's engine-core processes are spawned and load our plugin through its entry point
  D=/root/ep/chatterbox_gateway-0.1.0.dist-info
  mkdir -p "$D"
  printf 'Metadata-Version: 2.1\nName: chatterbox-gateway\nVersion: 0.1.0\n' > "$D/METADATA"
  printf '[vllm.general_plugins]\nchatterbox_t3 = gateway.engine.vllm.t3.plugin:register\n' > "$D/entry_points.txt"
  export PATH=/root/bin:$PATH
  export PYTHONPATH=/root/site2:/root/site3:/root/site4:$PWD:/root/ep:${PYTHONPATH:-}  # site4: PyAV (install.sh av)
  # one directory for vLLM's, inductor's and Triton's compile caches: part 2 reuses part 1's,
  # and the driver packs it into $OUT for a later visit (carry it back as .gpu/compile-cache.tar.xz
  # or its .partN files: cache.sh)
  export CB_COMPILE_CACHE=${CB_COMPILE_CACHE:-/root/cb-compile}
  . gateway/tools/gpu/cache.sh
  gpu_cache_unpack .gpu/compile-cache.tar.xz "$CB_COMPILE_CACHE"
  export VLLM_CACHE_ROOT=$CB_COMPILE_CACHE/vllm TORCHINDUCTOR_CACHE_DIR=$CB_COMPILE_CACHE/inductor \
         TRITON_CACHE_DIR=$CB_COMPILE_CACHE/triton
  # the dummy checkpoints (3 x 3 GB) and vLLM model dirs: written once, shared by both parts
  export CHATTERBOX_CACHE_DIR=${CHATTERBOX_CACHE_DIR:-/root/cb-cache}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
exec "$PY" -m gateway.tools.gpu.families "$@"

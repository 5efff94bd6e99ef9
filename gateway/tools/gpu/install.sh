#!/usr/bin/env bash
# Set up the offline GPU machine in steps, one device call each (each call carries at most
# 64 MiB; files outside the repo survive between calls only while the machine stays warm).
# The carried folders are made on the development machine: docs/benchmarks.md says how.
#
#   bash gateway/tools/gpu/install.sh p1       carry [".gpu/p1"]            (vLLM bundle, part 1)
#   bash gateway/tools/gpu/install.sh p2       carry [".gpu/p2"]            (part 2 + install, ~60 s)
#   bash gateway/tools/gpu/install.sh deps     carry [".gpu/chatterbox-deps", ".gpu/extra"]
#   bash gateway/tools/gpu/install.sh ffmpeg   carry [".gpu/ffmpeg.xz"]
#   bash gateway/tools/gpu/install.sh av       carry [".gpu/extra_av"]
#   bash gateway/tools/gpu/install.sh check    what is installed
# Then, in the same call or a later one: `. gateway/tools/gpu/env.sh` and run the work.
set -euo pipefail
cd "$(dirname "$0")/../../.."
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
for step in "$@"; do
  t0=$(date +%s)
  case "$step" in
    p1) mkdir -p /root/gpustash && cp .gpu/p1/* /root/gpustash/ ;;
    p2) cp .gpu/p2/* /root/gpustash/ && bash /root/gpustash/install.sh 2>&1 | tail -5 ;;
    deps)
      pipi /root/site2 .gpu/chatterbox-deps/*.whl
      pipi /root/site3 .gpu/extra/*.whl
      # vLLM's engine-core process is spawned and loads our plugin through its entry point
      D=/root/ep/chatterbox_gateway-0.1.0.dist-info; mkdir -p $D
      printf 'Metadata-Version: 2.1\nName: chatterbox-gateway\nVersion: 0.1.0\n' > $D/METADATA
      printf '[vllm.general_plugins]\nchatterbox_t3 = gateway.engine.vllm.t3.plugin:register\n' > $D/entry_points.txt ;;
    ffmpeg) mkdir -p /root/bin && xz -T0 -dc .gpu/ffmpeg.xz > /root/bin/ffmpeg && chmod +x /root/bin/ffmpeg ;;
    # a target of its own: pip --target --upgrade replaces a whole existing folder, and av's
    # console script would replace /root/site3/bin (py-spy's)
    av) pipi /root/site4 .gpu/extra_av/*.whl ;;
    check)
      . gateway/tools/gpu/env.sh
      python3 -c 'import vllm, litestar, chatterbox, structlog; print("vllm", vllm.__version__, "litestar ok, chatterbox ok")' || true
      python3 -c 'import av; print("av", av.__version__)' || echo "av: missing"
      ffmpeg -hide_banner -version 2>/dev/null | sed -n 1p || echo "ffmpeg: missing"  # sed reads to the end: no SIGPIPE under pipefail
      nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
  echo "install step $step: $(( $(date +%s) - t0 )) s"
done

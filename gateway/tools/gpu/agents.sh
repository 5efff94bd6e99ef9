#!/usr/bin/env bash
# One device call after the install (gateway/tools/gpu/install.sh p1 p2 deps): issue 18's
# contention probe (pure PyTorch, ~40 s, before vLLM holds the card), then issue 19's voice-agent
# benchmark on the vLLM engine: a server on dummy weights, `agent_bench` with pcm and mp3
# (30 samples each), the server's log. Results under $OUT/agents (or ./gpu-out/agents). The
# compile caches stay on the machine for speed.sh (which packs them into $OUT).
#
#   bash gateway/tools/gpu/agents.sh            # ~5 min with a cold compile cache; carry
#                                               # .gpu/speed-cache.tar.xz (8 MB) to start warmer
#   AGENTS_PROBE=0 bash gateway/tools/gpu/agents.sh   # the agents only (166 s warm, 2026-12-04)
set -u
cd "$(dirname "$0")/../../.." || exit 1
. gateway/tools/gpu/env.sh
# the compile caches and the dummy checkpoint where speed.sh keeps them: a later
# `speed.sh part3|part4` in the same warm visit starts its servers warm
export VLLM_CACHE_ROOT=/root/speed-cache/vllm TORCHINDUCTOR_CACHE_DIR=/root/speed-cache/inductor \
       TRITON_CACHE_DIR=/root/speed-cache/triton
mkdir -p /root/speed-cache
if [ -f .gpu/speed-cache.tar.xz ] && [ ! -f /root/speed-cache/.unpacked ]; then  # as speed.sh does
  tar -xJf .gpu/speed-cache.tar.xz -C /root/speed-cache && touch /root/speed-cache/.unpacked
fi
out=${OUT:-$PWD/gpu-out}/agents
mkdir -p "$out"

if [ "${AGENTS_PROBE:-1}" = 1 ]; then
  echo "== contention probe (issue 18)"
  timeout 120 python3 -m gateway.tools.gpu.contention --seconds 4 --json "$out/contention.json" 2>&1 | tail -6
  timeout 90 python3 -m gateway.tools.gpu.contention --batch 64 --seconds 3 --json "$out/contention_b64.json" 2>&1 | tail -6
fi

echo "== vLLM server"
python3 -m gateway serve --engine vllm --load-format dummy --models chatterbox --max-client-share 1 \
  --cache-dir /root/speed-gateway-cache --port 8000 > "$out/server.log" 2>&1 &
server=$!
t0=$(date +%s)
until curl -sf http://127.0.0.1:8000/ready > /dev/null; do
  if ! kill -0 "$server" 2> /dev/null || [ $(( $(date +%s) - t0 )) -gt 400 ]; then
    echo "server did not become ready"; tail -30 "$out/server.log"; kill "$server" 2> /dev/null; exit 1
  fi
  sleep 2
done
echo "ready after $(( $(date +%s) - t0 )) s"

echo "== agent_bench (issue 19)"
for fmt in pcm_24000 mp3_44100_128; do
  timeout 150 python3 -m gateway.tools.agent_bench --base-url http://127.0.0.1:8000 --repeats 20 \
    --after-first close --output-format "$fmt" --json "$out/agent_bench_${fmt}.json" 2>&1 | tail -12
done

kill -INT "$server"; wait "$server"
tail -5 "$out/server.log"

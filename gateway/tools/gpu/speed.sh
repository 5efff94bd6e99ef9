#!/usr/bin/env bash
# Issue 18's GPU measurements, in two calls of at most ~9 minutes each, on the GPU machine
# after vLLM is installed (the p1/p2 calls of ../shared/gpu/README.md), from the checkout:
#
#   bash gateway/tools/gpu/speed.sh part1   # vocoder parity (eager / compiled / graphed, fp32
#                                           # and bf16), knob trade-offs, the profile before/after
#   bash gateway/tools/gpu/speed.sh part2   # T3 per step; then one server (serve --engine vllm,
#                                           # dummy weights, the issue's flags): timeline, HTTP
#                                           # rows at 1/32/128 streams, the 64 x 60 s load test
#   bash gateway/tools/gpu/speed.sh part3   # A/B of where vLLM's engine core runs: the same
#                                           # server flags with --vllm-engine-core process, then
#                                           # thread (timeline, HTTP rows at 1 and 32 streams)
#   bash gateway/tools/gpu/speed.sh part4   # A/B of the repetition penalty's path (vllm_penalty):
#                                           # T3 per step with vLLM's sampler path, then with the
#                                           # resident one (same seeded tokens?), then a server
#                                           # with --vllm-penalty resident (timeline, 1 and 32)
#   DRY_RUN=1 bash gateway/tools/gpu/speed.sh part1|part2|part3|part4   # the same steps on this CPU, tiny
#
# Every step runs under its own `timeout` and writes its own files, so a failing step loses
# only itself; `$OUT/pN/status.txt` lists each step's exit code and seconds. What comes back
# (at most 8 files, each well under 16 MiB, no deeper than $OUT/a/b):
#   part1: $OUT/p1/parity_fp32.json  $OUT/p1/parity_bf16.json  $OUT/p1/profile.json
#          $OUT/p1/logs.tar.xz (every step's output, status.txt, nvidia-smi)  $OUT/cache.tar.xz
#   part2: $OUT/p2/t3step.json  $OUT/p2/http.json (rows, timeline, load test)
#          $OUT/p2/logs.tar.xz (outputs, server.log, t3_profile_chatterbox_sampler.txt, status.txt)  $OUT/cache.tar.xz
#   part3: $OUT/p3/http_process.json  $OUT/p3/http_thread.json  $OUT/p3/logs.tar.xz  $OUT/cache.tar.xz
#   part4: $OUT/p4/t3step_sampler.json  $OUT/p4/t3step_resident.json  $OUT/p4/http_resident.json
#          $OUT/p4/logs.tar.xz  $OUT/cache.tar.xz
# Compile caches (inductor, Triton, vLLM's torch.compile) live under $SPEED_CACHE and come back
# as $OUT/cache.tar.xz; carry it to a later visit as .gpu/speed-cache.tar.xz and it is
# unpacked first (engine start and the estimator's compile then skip their cold compiles).
# Environment: OUT (required on the GPU), PY (default python3), SPEED_CACHE (default
# /root/speed-cache), SERVER_ARGS (extra serve flags for part 2, default the compiled
# estimator), DRY_RUN=1.
set -uo pipefail

PART="${1:-}"
case "$PART" in part1|part2|part3|part4) ;; *) echo "usage: $0 part1|part2|part3|part4" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$ROOT"
DRY="${DRY_RUN:-0}"

if [ "$DRY" = 1 ]; then
  OUT="${OUT:-/tmp/speed-out}"
  PY="${PY:-/work/main/.venv/bin/python}"
  SPEED_CACHE="${SPEED_CACHE:-/tmp/speed-cache}"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  : "${OUT:?set OUT to the device tool output folder}"
  PY="${PY:-python3}"
  SPEED_CACHE="${SPEED_CACHE:-/root/speed-cache}"
  # The install of ../shared/gpu/README.md and docs/benchmarks.md ("How the GPU runs were
  # made"), each part done only if it is not there yet: vLLM's environment, the Chatterbox
  # wheels, our other dependencies, and the plugin's entry point for vLLM's own processes.
  [ -f /root/vllm_env.sh ] && . /root/vllm_env.sh
  if [ ! -d /root/site2 ] && ls .gpu/chatterbox-deps/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /root/site2 .gpu/chatterbox-deps/*.whl
  fi
  if [ ! -d /root/site3 ] && ls .gpu/extra/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /root/site3 .gpu/extra/*.whl .gpu/extra_av/*.whl 2>/dev/null \
      || "$PY" -m pip install -q --no-index --no-deps --target /root/site3 .gpu/extra/*.whl
  fi
  EP=/root/ep/chatterbox_gateway-0.1.0.dist-info
  if [ ! -f "$EP/entry_points.txt" ]; then
    mkdir -p "$EP"
    printf 'Metadata-Version: 2.1\nName: chatterbox-gateway\nVersion: 0.1.0\n' > "$EP/METADATA"
    printf '[vllm.general_plugins]\nchatterbox_t3 = gateway.engine.vllm.t3.plugin:register\n' > "$EP/entry_points.txt"
  fi
  export PYTHONPATH="/root/site2:/root/site3:$ROOT:/root/ep${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/root/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export TORCHINDUCTOR_CACHE_DIR="$SPEED_CACHE/inductor" TRITON_CACHE_DIR="$SPEED_CACHE/triton"
export VLLM_CACHE_ROOT="$SPEED_CACHE/vllm"
mkdir -p "$SPEED_CACHE"
if [ -f .gpu/speed-cache.tar.xz ] && [ ! -f "$SPEED_CACHE/.unpacked" ]; then
  tar -xJf .gpu/speed-cache.tar.xz -C "$SPEED_CACHE" && touch "$SPEED_CACHE/.unpacked"
  echo "compile caches unpacked from .gpu/speed-cache.tar.xz"
fi

DIR="$OUT/${PART/part/p}"
LOGS="$(mktemp -d)"
mkdir -p "$DIR"
STATUS="$LOGS/status.txt"
: > "$STATUS"

# step NAME SECONDS COMMAND...: run under `timeout`, output to $LOGS/NAME.log; never stops the part.
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$STATUS"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (stopped by its time limit)"
  echo "=== $name: exit $rc$note after $((SECONDS - t0)) s" | tee -a "$STATUS"
  tail -n 25 "$LOGS/$name.log"
}

pack_cache() {
  # The compile caches, as small as they can travel: xz on every core, the largest part
  # (vLLM's) left out when it is too big to come back.
  local parts=""
  for part in "$@"; do
    [ -d "$SPEED_CACHE/$part" ] && [ "$(du -sm "$SPEED_CACHE/$part" | cut -f1)" -le 300 ] && parts="$parts $part"
  done
  [ -n "$parts" ] || return 0
  (cd "$SPEED_CACHE" && tar -cf - $parts | xz -T0 -3 > "$OUT/cache.tar.xz")
  [ "$(stat -c %s "$OUT/cache.tar.xz")" -le 15728640 ]
}

finish() {
  ( nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true )
  pack_cache inductor triton vllm || pack_cache inductor triton || pack_cache inductor \
    || { echo "the compile caches do not fit in 15 MiB: not returned" | tee -a "$STATUS"; rm -f "$OUT/cache.tar.xz"; }
  du -sh "$SPEED_CACHE"/* 2>/dev/null | tee -a "$STATUS"
  tar -cJf "$DIR/logs.tar.xz" -C "$LOGS" . 2>/dev/null
  ls -la "$DIR" "$OUT"
  cat "$STATUS"
}
trap finish EXIT

echo "part $PART: dry run $DRY, python $PY, out $DIR, cache $SPEED_CACHE" | tee -a "$STATUS"
"$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$STATUS"

if [ "$PART" = part1 ]; then
  if [ "$DRY" = 1 ]; then
    SIZES="--sizes tiny --compile off"
    PROFILE="--profile-batches 1,2 --profile-oneshot-batches 1 --profile-knob-batches 1 --profile-repeats 1
             --profile-pipeline-batches 2 --flow-steps 1 --profile-prompt-tokens 12 --profile-compile off --profile-tiny"
    LIMITS=(900 900 1500)
  else
    SIZES="--sizes real --compile dynamic"
    PROFILE="--profile-batches 1,8,32,64 --profile-oneshot-batches 1,32 --profile-knob-batches 1,32
             --profile-repeats 2 --profile-pipeline-batches 4 --profile-compile dynamic"
    LIMITS=(120 150 220)
  fi
  # 1. parity in fp32 (exact-ish): batched/alone, padding, HiFT, graphs, compiled, compiled in graphs
  step parity_fp32 "${LIMITS[0]}" "$PY" -m gateway.tools.parity_vocoder --dtype fp32 $SIZES --json "$DIR/parity_fp32.json"
  # 2. the same in bf16 (as served), then what the speed knobs do to the audio
  step parity_bf16 "${LIMITS[1]}" "$PY" -m gateway.tools.parity_vocoder --dtype bf16 $SIZES --knobs --json "$DIR/parity_bf16.json"
  # 3. the profile: before/after at batch 1/8/32/64, pipelined GPU busy share, knob rows
  step profile "${LIMITS[2]}" "$PY" -m gateway.tools.benchmark --stages profile $PROFILE --json "$DIR/profile.json"
elif [ "$PART" = part3 ]; then
  # vLLM's engine core in its own process (AsyncLLM) against a thread of the server (one CUDA
  # context with the vocoder): docs/operations.md, gateway/engine/vllm/engine_thread.py. The
  # same flags otherwise; first audio is the question, so 1 and 32 streams and the timeline.
  if [ "$DRY" = 1 ]; then
    SERVER="--server-engine fake --http-concurrency 1,4 --http-window-s 3 --timeline-runs 2 --server-ready-s 60"
    LIMIT=200
  else
    SERVER="--server-engine vllm --http-concurrency 1,32 --http-window-s 20 --timeline-runs 5 --server-ready-s 240
            --server-cache-dir /root/speed-gateway-cache"
    LIMIT=290
  fi
  for core in process thread; do
    step "server_$core" "$LIMIT" "$PY" -m gateway.tools.benchmark --stages timeline,http --models chatterbox \
      --voice alloy --http-format pcm --server-log "$LOGS/server_$core.log" \
      --server-args="--vllm-engine-core $core ${SERVER_ARGS:-}" $SERVER --json "$DIR/http_$core.json"
  done
elif [ "$PART" = part4 ]; then
  # the repetition penalty in vLLM's sampler against our device-resident processor
  # (gateway/engine/vllm/t3/penalty_rows.py): T3 per step for each (their seeded rows'
  # tokens_sha must be equal), then a server with the resident one
  if [ "$DRY" = 1 ]; then
    echo "=== t3step: skipped (dry run: no vLLM on this machine)" | tee -a "$STATUS"
    SERVER="--server-engine fake --http-concurrency 1,4 --http-window-s 3 --timeline-runs 2 --server-ready-s 60"
    LIMIT=200
  else
    for penalty in sampler resident; do
      step "t3step_$penalty" 150 "$PY" -m gateway.tools.benchmark --stages t3step --t3step-penalty "$penalty" \
        --json "$DIR/t3step_$penalty.json"
    done
    mv "$DIR"/t3_profile_*.txt "$LOGS/" 2>/dev/null
    SERVER="--server-engine vllm --http-concurrency 1,32 --http-window-s 20 --timeline-runs 5 --server-ready-s 240
            --server-cache-dir /root/speed-gateway-cache"
    LIMIT=290
  fi
  step server_resident "$LIMIT" "$PY" -m gateway.tools.benchmark --stages timeline,http --models chatterbox \
    --voice alloy --http-format pcm --server-log "$LOGS/server_resident.log" \
    --server-args="--vllm-penalty resident ${SERVER_ARGS:-}" $SERVER --json "$DIR/http_resident.json"
else
  if [ "$DRY" = 1 ]; then
    echo "=== t3step: skipped (dry run: no vLLM on this machine)" | tee -a "$STATUS"
    SERVER="--server-engine fake --http-concurrency 1,4 --http-window-s 3 --timeline-runs 2 --loadtest-s 4
            --loadtest-concurrency 4 --server-ready-s 60"
    LIMIT=300
  else
    # 1. T3 per decode step (batch 1 and 32, sampler parts on and off) and a profiled decode
    step t3step 120 "$PY" -m gateway.tools.benchmark --stages t3step --json "$DIR/t3step.json"
    SERVER="--server-engine vllm --http-concurrency 1,32,128 --http-window-s 30 --timeline-runs 5 --loadtest-s 60
            --loadtest-concurrency 64 --server-ready-s 300 --server-cache-dir /root/speed-gateway-cache"
    LIMIT=420
  fi
  # 2. one server for the rest: the timeline, the HTTP rows, the load test (JSON rewritten after each)
  step live_server "$LIMIT" "$PY" -m gateway.tools.benchmark --stages timeline,http,loadtest --models chatterbox \
    --voice alloy --http-format pcm --server-log "$LOGS/server.log" \
    --server-args="${SERVER_ARGS:---vocoder-compile dynamic}" $SERVER --json "$DIR/http.json"
  mv "$DIR"/t3_profile_*.txt "$LOGS/" 2>/dev/null
  [ -f "$DIR/loadtest.json" ] && mv "$DIR/loadtest.json" "$LOGS/"
  [ -f "$LOGS/server.log" ] && [ "$(stat -c %s "$LOGS/server.log")" -gt 50000000 ] && \
    tail -c 20000000 "$LOGS/server.log" > "$LOGS/server.tail.log" && rm "$LOGS/server.log"
fi

# Source after gateway/tools/gpu/install.sh: vLLM's offline environment, our wheels, FFmpeg,
# the plugin's entry point, and every compile cache under one folder ($GPU_CACHE) that a run
# can tar back through $OUT (`gpu_cache_pack`) and a later visit carry again as
# .gpu/compile-cache.tar or .tar.xz (families.sh's, unpacked here too when present).
. /root/vllm_env.sh
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PATH=/root/bin:/root/site3/bin:$PATH  # ffmpeg; py-spy (from .gpu/extra)
export PYTHONPATH=/root/site2:/root/site3:/root/site4:$_repo:/root/ep:$PYTHONPATH  # site4: PyAV (install.sh av)
export PYTHONUNBUFFERED=1
# as families.sh runs vLLM: spawned engine-core processes, PyTorch's sampler (no FlashInfer JIT offline)
export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
export GPU_CACHE=/root/gpu-cache
export VLLM_CACHE_ROOT=$GPU_CACHE/vllm TORCHINDUCTOR_CACHE_DIR=$GPU_CACHE/inductor TRITON_CACHE_DIR=$GPU_CACHE/triton
mkdir -p "$GPU_CACHE"
for _cache in "$_repo/.gpu/compile-cache.tar" "$_repo/.gpu/compile-cache.tar.xz"; do
  if [ -f "$_cache" ] && [ ! -e "$GPU_CACHE/.unpacked" ]; then
    tar -xf "$_cache" -C "$GPU_CACHE" && touch "$GPU_CACHE/.unpacked"  # tar finds the compression itself
  fi
done
gpu_cache_pack() {  # gpu_cache_pack DEST.tar[.xz]: the compile caches, for the next visit (xz by the name)
  XZ_OPT=${XZ_OPT:--T0} tar --exclude=.unpacked -caf "$1" -C "$GPU_CACHE" . 2>/dev/null && ls -la "$1"  # xz on every core: inside a call's limit
}

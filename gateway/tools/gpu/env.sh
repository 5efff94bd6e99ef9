# Source after gateway/tools/gpu/install.sh: vLLM's offline environment, our wheels, FFmpeg,
# the plugin's entry point, and every compile cache under one folder ($GPU_CACHE) that a run
# can tar back through $OUT (`gpu_cache_pack $OUT/compile-cache.tar.xz`, in parts
# when over 15 MiB) and a later visit carry again as .gpu/compile-cache.tar.xz or its parts
# (families.sh's too): cache.sh.
. /root/vllm_env.sh
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
export PATH=/root/bin:/root/site3/bin:$PATH  # ffmpeg; py-spy (from .gpu/extra)
export PYTHONPATH=/root/site2:/root/site3:/root/site4:$_repo:/root/ep:$PYTHONPATH  # site4: PyAV (install.sh av)
export PYTHONUNBUFFERED=1
# as families.sh runs vLLM: spawned engine-core processes, PyTorch's sampler (no FlashInfer JIT offline)
export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
export GPU_CACHE=/root/gpu-cache
export VLLM_CACHE_ROOT=$GPU_CACHE/vllm TORCHINDUCTOR_CACHE_DIR=$GPU_CACHE/inductor TRITON_CACHE_DIR=$GPU_CACHE/triton
. "$_repo/gateway/tools/gpu/cache.sh"
gpu_cache_unpack "$_repo/.gpu/compile-cache.tar.xz" "$GPU_CACHE"
# gpu_cache_pack $OUT/compile-cache.tar.xz: these caches for the next visit (cache.sh)

"""How the vLLM engines of one server share the GPU, and what the start log reports of it.

One vLLM engine (a T3 architecture's ``AsyncLLM``, its engine core a process of its own) per
loaded family shares the card with the vocoders, the voice encoders and the watermarker of
the gateway's own process. vLLM sizes an engine's KV cache either from a share of the whole
card (``gpu_memory_utilization``: it profiles its own peak and takes the rest of its share)
or to an exact size (``kv_cache_memory_bytes``). With several engines on one card only the
exact sizes are safe: each profile assumes no other process changes its memory meanwhile, and
vLLM refuses to start unless ``gpu_memory_utilization`` of the card is still free, which the
second engine would not find. So (:func:`kv_cache_plan`):

* one engine: as before, ``vllm_kv_cache_memory_bytes`` if set, else
  ``vllm_gpu_memory_utilization`` of the card for its weights, activations and KV cache;
* several: the engines together get ``vllm_kv_cache_memory_bytes`` of KV cache if set, else
  ``vllm_gpu_memory_utilization`` of the card less :data:`ENGINE_OVERHEAD_BYTES` per engine
  (its weights, the profile run's activations, its CUDA graphs), split in equal bytes: an
  engine whose tokens cost less (Turbo: 96 KiB, the Llama T3s: 240 KiB with their CFG
  stream) holds more of them, which suits the family served at the highest concurrency.
  Each then passes vLLM's start check with :data:`EXACT_KV_UTILIZATION`.

The plan is logged at start (``vllm_kv_cache_plan``), with each part's time and memory.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings import Settings, SettingsError

GIB = 1 << 30
ENGINE_OVERHEAD_BYTES = 4 * GIB
"""Per vLLM engine besides its KV cache: bf16 weights (Llama T3 ~1.05 GB, GPT-2 ~0.65 GB),
the activation peak of its profile run, its CUDA graph pool; vLLM logs the actual figures."""
EXACT_KV_UTILIZATION = 0.01
"""What an engine with an exact KV size declares as its share: vLLM then only checks that
this much of the card is free when it starts (the share itself is not used)."""


@dataclass(frozen=True, slots=True)
class KvShare:
    """One engine's memory setting."""

    model: str
    bytes_per_token: int
    kv_cache_bytes: int | None
    """Exact KV cache size; None: vLLM sizes it from ``gpu_memory_utilization``."""
    gpu_memory_utilization: float

    @property
    def tokens(self) -> int | None:
        """Tokens (prompt rows and speech) the KV cache holds, all sequences together."""
        return None if self.kv_cache_bytes is None else self.kv_cache_bytes // self.bytes_per_token

    def engine_kwargs(self) -> dict[str, Any]:
        """The memory arguments of this engine's ``AsyncEngineArgs``."""
        if self.kv_cache_bytes is None:
            return {"gpu_memory_utilization": self.gpu_memory_utilization}
        return {"kv_cache_memory_bytes": self.kv_cache_bytes, "gpu_memory_utilization": self.gpu_memory_utilization}

    def describe(self) -> dict[str, Any]:
        if self.kv_cache_bytes is None:
            return {"gpu_memory_utilization": self.gpu_memory_utilization}
        return {"kv_cache_gib": round(self.kv_cache_bytes / GIB, 2), "kv_tokens": self.tokens}


def kv_cache_plan(settings: Settings, bytes_per_token: Mapping[str, int], total_memory: int) -> dict[str, KvShare]:
    """Each engine's share (see the module docstring). ``bytes_per_token``: model -> KV bytes
    of one token, in load order; ``total_memory``: the card's bytes. SettingsError when a
    share cannot hold one sequence of ``vllm_max_model_len`` tokens."""
    models = list(bytes_per_token)
    exact = settings.vllm_kv_cache_memory_bytes or None
    if len(models) == 1:
        model = models[0]
        util = EXACT_KV_UTILIZATION if exact else settings.vllm_gpu_memory_utilization
        return {model: KvShare(model, bytes_per_token[model], exact, util)}
    if exact is not None:
        total_kv, source = exact, f"vllm_kv_cache_memory_bytes {exact}"
    else:
        total_kv = int(settings.vllm_gpu_memory_utilization * total_memory) - ENGINE_OVERHEAD_BYTES * len(models)
        source = (f"vllm_gpu_memory_utilization {settings.vllm_gpu_memory_utilization} of "
                  f"{total_memory / GIB:.1f} GiB less {ENGINE_OVERHEAD_BYTES // GIB} GiB per engine")
    each = max(total_kv, 0) // len(models)
    plan = {}
    for model in models:
        needed = bytes_per_token[model] * settings.vllm_max_model_len
        if each < needed:
            raise SettingsError(
                f"{len(models)} vLLM engines ({', '.join(models)}) share {max(total_kv, 0) / GIB:.2f} GiB of KV "
                f"cache ({source}); {model} needs at least {needed / GIB:.2f} GiB for one sequence of "
                f"vllm_max_model_len {settings.vllm_max_model_len} tokens. Raise vllm_gpu_memory_utilization "
                "or vllm_kv_cache_memory_bytes, or load fewer models.")
        plan[model] = KvShare(model, bytes_per_token[model], each, EXACT_KV_UTILIZATION)
    return plan


def device_memory() -> tuple[int, int]:
    """(used, total) bytes of the current CUDA device, every process included."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free, total


def process_reserved() -> int:
    """Bytes this process's CUDA caching allocator holds."""
    import torch

    return int(torch.cuda.memory_reserved())


def gpu_memory_by_pid(timeout_s: float = 5.0) -> dict[int, int]:
    """Bytes each process uses on the GPUs (``nvidia-smi``); empty when it cannot tell."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used: dict[int, int] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1]) * (1 << 20)
    return used


def engine_core_pids(llm: Any) -> list[int]:
    """The process ids of an ``AsyncLLM``'s engine core (vLLM internals: empty if they moved)."""
    try:
        return [p.pid for p in llm.engine_core.resources.engine_manager.processes if p.pid]
    except AttributeError:
        return []

"""T3 on vLLM alone: decode throughput (``--stages t3``), and its time per decode step with
what runs outside its CUDA graph (``--stages t3step``).

Our T3 model alone (offline ``LLM``, dummy weights, CFG on, 188-row prompt embeddings, the
engine core in this process so the profiler sees it), at batch 1 and 32, for sampling
settings that switch vLLM's per-step work on and off: the served settings (temperature 0.8,
min_p 0.05, repetition penalty 1.2), no repetition penalty, and greedy without either. The
difference between rows is what that part of the sampler costs per step. Then one profiled
decode at batch 1 with the served settings: the operators by their own host time and by
device time, written to ``profile_path`` (what runs eagerly between graph replays: sampler,
penalties, logits, input preparation).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _served_t3(text_tokens: int, max_seqs: int, gpu_memory_utilization: float,
               penalty: str = "sampler") -> tuple[Any, dict, float]:
    """(our T3 on an offline vLLM ``LLM`` with dummy weights, one prompt of 188 rows with
    ``text_tokens`` text tokens, seconds the engine took to start). ``penalty``: the
    ``vllm_penalty`` setting (``resident`` loads our logits processor)."""
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from vllm import LLM

    from gateway.engine.vllm.t3.config import write_model_dir
    from gateway.engine.vllm.t3.penalty_rows import engine_kwargs
    from gateway.engine.vllm.t3.plugin import register
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    register()
    torch.manual_seed(0)
    builder = T3PromptBuilder()
    cond = T3Cond(speaker_emb=torch.randn(1, 256), cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150)),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    text = [255] + torch.randint(1, 704, (text_tokens,)).tolist() + [0]
    prompt = builder.build(builder.conditioning(cond), text, 0.5).vllm_prompt()
    model_dir = write_model_dir(Path(tempfile.mkdtemp()) / "t3")
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, enable_prompt_embeds=True, dtype="bfloat16",
              load_format="dummy", max_model_len=1024, max_num_seqs=max_seqs,
              gpu_memory_utilization=gpu_memory_utilization, seed=0, **engine_kwargs(penalty))
    return llm, prompt, time.perf_counter() - t0


def stage_t3(tokens: int, concurrency: list[int], text_tokens: int) -> list[dict]:
    """Offline vLLM decode throughput of the T3 model with CFG, dummy weights."""
    from vllm import SamplingParams

    llm, prompt, _ = _served_t3(text_tokens, max(concurrency), 0.5)
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, top_p=1.0, min_p=0.05,
                        repetition_penalty=1.2, detokenize=False)
    out = []
    llm.generate([prompt], sp, use_tqdm=False)  # warm
    for n in concurrency:
        t0 = time.perf_counter()
        res = llm.generate([dict(prompt) for _ in range(n)], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        made = sum(len(r.outputs[0].token_ids) for r in res)
        out.append({"stage": "t3", "concurrency": n, "wall_s": round(dt, 3), "tokens": made,
                    "tokens_per_s": round(made / dt), "audio_s_per_s": round(made / dt / 25, 1)})
        print(out[-1], flush=True)
    return out


def stage_t3_step(tokens: int = 250, batches: tuple[int, ...] = (1, 32), text_tokens: int = 150,
                  profile_path: Path | None = None, profile_tokens: int = 40, penalty: str = "sampler") -> list[dict]:
    """``penalty``: ``sampler`` (vLLM's penalty path, as served by default) or ``resident``
    (``vllm_penalty = "resident"``: the engine loads our processor and the penalised variants
    go through it). Run once each, in two processes, to compare: the rows' ``tokens_sha`` of
    the seeded variant must match between the two (the same arithmetic, the same tokens)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    from vllm import SamplingParams

    from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG

    llm, prompt, init_s = _served_t3(text_tokens, max(batches), 0.3, penalty)
    common = {"max_tokens": tokens, "ignore_eos": True, "detokenize": False}
    served = {"repetition_penalty": 1.2} if penalty == "sampler" else {"extra_args": {EXTRA_ARG: 1.2}}
    variants = {
        f"served: temperature 0.8, min_p 0.05, repetition 1.2 ({penalty})": SamplingParams(
            temperature=0.8, top_p=1.0, min_p=0.05, **served, **common),
        f"served, seeded ({penalty})": SamplingParams(temperature=0.8, top_p=1.0, min_p=0.05, seed=7, **served,
                                                      **common),
        "no repetition penalty": SamplingParams(temperature=0.8, top_p=1.0, min_p=0.05, **common),
        "greedy, no penalty, no min_p": SamplingParams(temperature=0.0, **common),
    }
    llm.generate([prompt], variants["greedy, no penalty, no min_p"], use_tqdm=False)  # warm
    out: list[dict] = []
    for name, sp in variants.items():
        for n in batches:
            llm.generate([dict(prompt) for _ in range(n)], sp, use_tqdm=False)  # this batch shape's first run
            t0 = time.perf_counter()
            res = llm.generate([dict(prompt) for _ in range(n)], sp, use_tqdm=False)
            wall = time.perf_counter() - t0
            made = sum(len(r.outputs[0].token_ids) for r in res)
            row = {"stage": "t3step", "sampling": name, "batch": n, "ms_per_step": round(wall / tokens * 1000, 3),
                   "tokens_per_s": round(made / wall), "engine_init_s": round(init_s, 1), "penalty_path": penalty}
            if "seeded" in name:  # every request the same seed: the same tokens on either path
                ids = [t for r in res for t in r.outputs[0].token_ids]
                row["tokens_sha"] = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
            out.append(row)
            print(row, flush=True)
    if profile_path is not None:
        out.append(_profile(llm, prompt, SamplingParams(temperature=0.8, top_p=1.0, min_p=0.05, **served,
                                                        max_tokens=profile_tokens, ignore_eos=True, detokenize=False),
                            profile_path))
    return out


def _profile(llm, prompt, sampling, path: Path) -> dict:
    """One profiled decode: the operator tables (host self time, device time) to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate([prompt], sampling, use_tqdm=False)
        wall = time.perf_counter() - t0
        torch.cuda.synchronize()
    events = prof.key_averages()
    text = ("# host self time\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n# device time\n" + events.table(sort_by="self_cuda_time_total", row_limit=40))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    steps = sampling.max_tokens
    return {"stage": "t3step", "sampling": "profiled (served)", "batch": 1, "ms_per_step": round(wall / steps * 1000, 3),
            "profile": str(path)}

"""T3 on vLLM alone: decode throughput (``--stages t3``), and its time per decode step with
what runs outside its CUDA graph (``--stages t3step``).

Our T3 model alone (offline ``LLM``, dummy weights, CFG on, 188-row prompt embeddings, the
engine core in this process so the profiler sees it), at batch 1 and 32, for sampling
settings that switch vLLM's per-step work on and off: the served settings (temperature 0.8,
min_p 0.05, repetition penalty 1.2), no repetition penalty, and greedy without either. The
difference between rows is what that part of the sampler costs per step. Then one profiled
decode with the served settings (``profile_batch`` rows, 1 by default): the operators by their
own host time and by device time, written to ``profile_path`` (what runs eagerly between graph
replays: sampler, penalties, logits, input preparation). With ``py_spy_s``, py-spy samples
this process for that long while the served settings decode at the largest batch back to back:
where vLLM's Python time of a step goes (scheduler, input preparation, sampler, output
handling), which at 256 rows is most of a step (Turbo: 12.7 ms against ~4-5 ms of GPU work).

``model`` picks the family: ``chatterbox`` (the Llama T3 above) or ``chatterbox-turbo``
(GPT-2 medium over Turbo's 376 voice rows, no CFG, its served sampling: temperature 0.8,
top-k 1000, top-p 0.95, repetition penalty 1.2, no min-p). Turbo's row says whether its T3
alone keeps up with a load: 1000 audio-s/s is 25000 tokens/s, 10.2 ms a step at 256 rows.
The setup (model directory, prompt, sampling variants) is built without vLLM
(:func:`t3step_setup`), so it is tested on a CPU; only the timing needs the GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


T3STEP_MODELS = ("chatterbox", "chatterbox-turbo")
"""The families the t3step stage times."""


@dataclass(frozen=True, slots=True)
class T3StepSetup:
    """What the timed engine serves, built without vLLM."""

    model_dir: Path
    prompt: dict
    """One request's vLLM prompt (embeddings)."""
    served: dict[str, Any]
    """``SamplingParams`` fields of the family's served sampling (the repetition penalty on
    the path ``penalty`` names)."""
    unpenalised: dict[str, Any]
    """The same without the repetition penalty, on vLLM's sampler."""
    seeded: dict[str, Any]
    """The served sampling of a seeded request (its ``seed`` left out): ``fused`` sends those
    to vLLM's sampler, so their tokens match the ``sampler`` path's."""


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "extra_args")


def t3step_setup(model: str, text_tokens: int, directory: Path, penalty: str = "sampler") -> T3StepSetup:
    """The family's T3 as the t3step stage serves it: a vLLM model directory (config only: the
    engine loads dummy weights), one prompt with ``text_tokens`` text tokens and a random
    voice, and the sampling the engine sends for the family's default controls."""
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    from gateway.engine.base import GenerationParams
    from gateway.engine.vllm.t3.families import LlamaFamilyT3, TurboFamilyT3
    from gateway.models.families import FAMILIES

    if model not in T3STEP_MODELS:
        raise ValueError(f"t3step times {', '.join(T3STEP_MODELS)}, not {model!r}")
    family = FAMILIES[model]
    torch.manual_seed(0)
    front: LlamaFamilyT3 | TurboFamilyT3
    if model == "chatterbox-turbo":
        from gateway.engine.vllm.t3.turbo import TurboPromptBuilder, write_turbo_model_dir

        turbo = TurboPromptBuilder()
        hp = turbo.hp
        cond = T3Cond(speaker_emb=torch.randn(1, hp.speaker_embed_size),
                      cond_prompt_speech_tokens=torch.randint(0, 6561, (1, hp.speech_cond_prompt_len)))
        text = torch.randint(1, hp.text_tokens_dict_size, (text_tokens,)).tolist()
        prompt = turbo.build(turbo.conditioning(cond), text).vllm_prompt(torch.bfloat16)  # as served
        front = TurboFamilyT3(family, turbo)
        model_dir = write_turbo_model_dir(directory / "turbo")
    else:
        from gateway.engine.vllm.t3.config import write_model_dir
        from gateway.engine.vllm.t3.prompt import T3PromptBuilder

        llama = T3PromptBuilder()
        cond = T3Cond(speaker_emb=torch.randn(1, 256), cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150)),
                      emotion_adv=0.5 * torch.ones(1, 1, 1))
        text = [255] + torch.randint(1, 704, (text_tokens,)).tolist() + [0]
        prompt = llama.build(llama.conditioning(cond), text, 0.5).vllm_prompt(torch.bfloat16)  # as served
        front = LlamaFamilyT3(family, llama)
        model_dir = write_model_dir(directory / "t3")
    params = GenerationParams(**family.defaults)
    sampling = front.sampling(params, max_tokens=1, seed=None, fixed_length=False)

    def fields(path: str, seed: int | None = None) -> dict[str, Any]:
        path = "fused" if path == "fused-eager" else path  # the same requests, the processor without its kernel
        made = dataclasses.replace(sampling, penalty_path=path, seed=seed).vllm_fields()
        return {k: made[k] for k in _SAMPLING_FIELDS if made[k] is not None}

    unpenalised = {k: v for k, v in fields("sampler").items() if k != "repetition_penalty"}
    return T3StepSetup(model_dir, prompt, fields(penalty), unpenalised, fields(penalty, seed=7))


def _served_t3(text_tokens: int, max_seqs: int, gpu_memory_utilization: float,
               penalty: str = "sampler", model: str = "chatterbox", cascade: bool = False
               ) -> tuple[Any, T3StepSetup, float]:
    """(the family's T3 on an offline vLLM ``LLM`` with dummy weights, its setup, seconds the
    engine took to start). ``penalty``: the ``vllm_penalty`` setting (``resident`` loads our
    logits processor); ``cascade``: ``vllm_cascade_attention``."""
    from vllm import LLM

    from gateway.engine.vllm.t3.penalty_rows import engine_kwargs
    from gateway.engine.vllm.t3.plugin import register

    register()
    setup = t3step_setup(model, text_tokens, Path(tempfile.mkdtemp()), penalty)
    t0 = time.perf_counter()
    llm = LLM(model=str(setup.model_dir), skip_tokenizer_init=True, enable_prompt_embeds=True, dtype="bfloat16",
              load_format="dummy", max_model_len=1024, max_num_seqs=max_seqs,
              gpu_memory_utilization=gpu_memory_utilization, seed=0, disable_cascade_attn=not cascade,
              **engine_kwargs(penalty))
    return llm, setup, time.perf_counter() - t0


def stage_t3(tokens: int, concurrency: list[int], text_tokens: int) -> list[dict]:
    """Offline vLLM decode throughput of the T3 model with CFG, dummy weights."""
    from vllm import SamplingParams

    llm, setup, _ = _served_t3(text_tokens, max(concurrency), 0.5)
    prompt = setup.prompt
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True, detokenize=False, **setup.served)
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
                  profile_path: Path | None = None, profile_tokens: int = 40, penalty: str = "sampler",
                  model: str = "chatterbox", profile_batch: int = 1, py_spy_s: float = 0.0,
                  py_spy_dir: Path | None = None, cascade: bool = False) -> list[dict]:
    """``penalty``: ``sampler`` (vLLM's penalty path, as served by default), ``resident``
    (``vllm_penalty = "resident"``: the engine loads our processor and the penalised variants
    go through it) or ``fused`` (the served variant drawn by our fused processor, the seeded one
    left to vLLM's sampler beside it, as the server does). Run once each, in separate
    processes, to compare: the rows' ``tokens_sha`` of the seeded variant must match between
    them (the same arithmetic, the same tokens; with ``fused``, rows it leaves alone).
    ``model``: the family (module docstring). ``cascade``: vLLM's cascade attention on
    (``vllm_cascade_attention``; every row here shares the prompt, as one voice's requests do);
    run once each, in two processes, to compare."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    from vllm import SamplingParams

    llm, setup, init_s = _served_t3(text_tokens, max(batches), 0.3, penalty, model, cascade)
    prompt = setup.prompt
    common = {"max_tokens": tokens, "ignore_eos": True, "detokenize": False}
    served = ", ".join(f"{k} {v}" for k, v in setup.seeded.items() if k != "extra_args")
    variants = {
        f"served: {served} ({penalty})": SamplingParams(**setup.served, **common),
        f"served, seeded ({penalty})": SamplingParams(**setup.seeded, seed=7, **common),
        "no repetition penalty": SamplingParams(**setup.unpenalised, **common),
        "greedy, no penalty, no min_p": SamplingParams(temperature=0.0, **common),
    }
    llm.generate([prompt], variants["greedy, no penalty, no min_p"], use_tqdm=False)  # warm
    waits = output_ids_wait(llm)
    out: list[dict] = []
    for name, sp in variants.items():
        for n in batches:
            llm.generate([dict(prompt) for _ in range(n)], sp, use_tqdm=False)  # this batch shape's first run
            t0, cpu0 = time.perf_counter(), time.thread_time()
            res = llm.generate([dict(prompt) for _ in range(n)], sp, use_tqdm=False)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
            made = sum(len(r.outputs[0].token_ids) for r in res)
            row = {"stage": "t3step", "model": model, "sampling": name, "batch": n,
                   "ms_per_step": round(wall / tokens * 1000, 3),
                   # the engine core steps in this thread: its host work a step (scheduler, input
                   # preparation, the sampler's host part); near ms_per_step = the host bounds T3
                   "cpu_ms_per_step": round(cpu / tokens * 1000, 3), "tokens_per_s": round(made / wall),
                   "audio_s_per_s": round(made / wall / 25, 1), "engine_init_s": round(init_s, 1),
                   "penalty_path": penalty, "cascade_attention": cascade, "waits_for_output_ids": waits}
            if "seeded" in name:  # every request the same seed: the same tokens on either path
                ids = [t for r in res for t in r.outputs[0].token_ids]
                row["tokens_sha"] = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
            out.append(row)
            print(row, flush=True)
    if profile_path is not None:
        out.append(_profile(llm, prompt, SamplingParams(**setup.served, max_tokens=profile_tokens, ignore_eos=True,
                                                        detokenize=False), profile_path, model, profile_batch))
    if py_spy_s > 0:
        out.append(_py_spy_row(llm, prompt, variants[f"served: {served} ({penalty})"], max(batches), py_spy_s,
                               py_spy_dir or Path(tempfile.gettempdir()), model))
    return out


def output_ids_wait(llm: Any) -> bool | str:
    """Whether vLLM's input batch waits each step for the last step's tokens to reach the host
    before the logits processors run (``logitsprocs_need_output_token_ids``: vLLM sets it for
    any custom processor; the plugin clears it for ours, ``fused_rows.spare_output_ids``), or
    why that could not be read."""
    try:
        return bool(llm.collective_rpc(_needs_output_ids)[0])
    except Exception as exc:  # noqa: BLE001 - a diagnostic column: say what stopped it
        return f"unknown: {type(exc).__name__}: {exc}"[:200]


def _needs_output_ids(worker: Any) -> bool:
    return worker.model_runner.input_batch.logitsprocs_need_output_token_ids


def _py_spy_row(llm, prompt, sampling, batch: int, seconds: float, directory: Path, model: str) -> dict:
    """py-spy on this process (the engine core runs in it) while ``batch`` rows decode with
    ``sampling`` back to back for ``seconds``: the summary and the raw stacks' files."""
    import asyncio
    import threading

    from gateway.tools import py_spy

    result: dict[str, Any] = {}
    sampler = threading.Thread(target=lambda: result.update(summary=asyncio.run(py_spy.profile(
        os.getpid(), seconds, directory, f"t3step_{model}_{batch}"))), name="py-spy")
    steps = 0
    t0 = time.perf_counter()
    sampler.start()
    while sampler.is_alive():
        res = llm.generate([dict(prompt) for _ in range(batch)], sampling, use_tqdm=False)
        steps += max(len(r.outputs[0].token_ids) for r in res)
    wall = time.perf_counter() - t0
    summary = result.get("summary", {"error": "py-spy did not report"})
    print(py_spy.table(summary, f"t3step {model} x {batch}"), flush=True)
    return {"stage": "t3step", "model": model, "sampling": "py-spy (served)", "batch": batch,
            "ms_per_step": round(wall / max(steps, 1) * 1000, 3), "py_spy": summary}


def _profile(llm, prompt, sampling, path: Path, model: str = "chatterbox", batch: int = 1) -> dict:
    """One profiled decode of ``batch`` rows: the operator tables (host self time, device
    time) to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate([dict(prompt) for _ in range(batch)], sampling, use_tqdm=False)
        wall = time.perf_counter() - t0
        torch.cuda.synchronize()
    events = prof.key_averages()
    text = ("# host self time\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n# device time\n" + events.table(sort_by="self_cuda_time_total", row_limit=40))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    steps = sampling.max_tokens
    return {"stage": "t3step", "model": model, "sampling": "profiled (served)", "batch": batch,
            "ms_per_step": round(wall / steps * 1000, 3), "profile": str(path)}

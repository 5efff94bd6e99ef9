"""Parity of Turbo and Multilingual on the vLLM engine's parts, on the GPU (a stage of
``python -m gateway.tools.parity``; alone: ``python -m gateway.tools.parity_families``).

T3, per family, on random weights written as the family's checkpoint file and loaded by our
``load_weights``, greedy, three requests of different texts (and CFG weights, exaggerations)
decoded in ONE vLLM batch:

* Multilingual: upstream ``T3(T3Config.multilingual()).inference`` (its alignment analyzer
  off: neither engine runs it, docs/models.md) against our Llama plugin with the wide id
  layout (text ids up to 2453 through the side channel), repetition penalty 2.0 (upstream's
  default for this model).
* Turbo: upstream ``T3.inference_turbo`` (greedy through ``top_k=1``, which leaves its
  repetition penalty no say; vLLM runs without one) against the GPT-2 vLLM model fed
  ``TurboPromptBuilder`` rows. The random speech head gives the start-of-speech id a large
  negative bias, so the reference never picks the id the served model masks.

Each in fp32 (``enforce_eager``; batched == one at a time must hold exactly) and bf16 (as
served: compiled, CUDA graphs), judged by the near-tie criterion of ``parity_t3``. In bf16
also the same seed twice, sampled as served, each time prefilling the whole prompt (what a
seeded request does, ``T3Sampling.vllm_fields``): the tokens must be equal; the detail says
where a third run that reads the prompt from vLLM's prefix cache parts from them. The vLLM
workers (a process per family and dtype) start together while the references decode: each
has an exact KV cache (``kv_cache_memory_bytes``) and so never profiles the card, which the
others share.

Vocoder: Turbo's S3Gen (``S3Gen(meanflow=True)``, random weights, its (t, r) time mixer
randomised so that a solver ignoring ``r`` would fail) through the original's vocoder parity
set (``parity_vocoder``) with 2 steps: one-shot == upstream ``S3Gen(meanflow=True).inference``
with the same noise (fp32), batched == alone, CUDA-graph solve == eager, padding, streamed
windows vs one-shot with and without the watermark; fp32, then bf16.

``--dry-run`` (CPU, no vLLM; what the GPU script's dry run calls): 2-layer T3s, and in place
of vLLM a CPU stand-in that decodes from the same prompt rows and placeholder ids the served
model gets, through the upstream backbone (Turbo: GPT-2 over the rows; Multilingual: the
conditional and unconditional streams mixed ``(1 + w) h_c - w h_u`` as ``model.py`` does);
the vocoder at tiny sizes. It proves the tool and our prompt path here; only a GPU run is a
parity result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.models.families import MULTILINGUAL, TURBO
from gateway.tools.parity_t3 import (
    first_mismatch,
    llama_teacher_forced,
    near_tie_verdict,
    tie_bound,
    turbo_teacher_forced,
)

MTL_CASES = ((0.5, 0.5, 24), (0.0, 0.5, 40), (1.0, 0.3, 12))  # (cfg_weight, exaggeration, text length)
TURBO_CASES = (24, 40, 12)  # text lengths
MTL_PENALTY = 2.0
SEED = 11
"""The seeded-twice check's seed (any: what matters is that it is the same both times)."""
WORKER_KV_BYTES = 2 << 30
"""Each parity worker's exact KV cache: 8 requests of 1024 tokens need well under this."""
WORKER_TIMEOUT_S = 420
"""A worker that has not finished by then (compile, capture, two decodes) is stopped: a failed check."""
Result = tuple[str, bool, str]


def _randomise(t3: Any, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in t3.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif p.dim() >= 2:
                # speech head wider than the rest: logits with a real spread, as trained ones have
                p.normal_(0.0, 0.5 if name == "speech_head.weight" else 0.02)
        t3.speech_head.weight[6561].zero_()
        if t3.speech_head.bias is not None:  # Turbo's head has a bias: never the start id
            t3.speech_head.bias[6561] = -1e4
        else:  # the Llama head decodes over 8194 ids; the served model masks 6561 and >= 6563
            t3.speech_head.weight[6563:].zero_()


@contextlib.contextmanager
def _tiny_backbones() -> Iterator[dict[str, str]]:
    """Two-layer versions of the families' backbones (``--dry-run``), registered for the run."""
    from chatterbox.models.t3 import llama_configs

    names = {TURBO: "parity_tiny_gpt2", MULTILINGUAL: "parity_tiny_llama"}
    llama_configs.LLAMA_CONFIGS[names[TURBO]] = {**llama_configs.GPT2_MEDIUM_CONFIG, "n_layer": 2}
    llama_configs.LLAMA_CONFIGS[names[MULTILINGUAL]] = {**llama_configs.LLAMA_CONFIGS["Llama_520M"],
                                                        "num_hidden_layers": 2}
    try:
        yield names
    finally:
        for name in names.values():
            llama_configs.LLAMA_CONFIGS.pop(name, None)


def _family_t3(family: str, seed: int, backbone: str | None = None) -> Any:
    from chatterbox.models.t3 import T3

    from gateway.engine.checkpoint.modules import t3_config
    from gateway.models.families import FAMILIES

    hp = t3_config(FAMILIES[family])
    if backbone:
        hp.llama_config_name = backbone
    t3 = T3(hp).eval()
    _randomise(t3, seed)
    return t3


def _voice(seed: int, prompt_len: int, exaggeration: float = 0.5) -> Any:
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    g = torch.Generator().manual_seed(seed)
    return T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, prompt_len), generator=g),
                  emotion_adv=exaggeration * torch.ones(1, 1, 1))


def _text(seed: int, n: int, vocab: int, framed: bool) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1, vocab, (n,), generator=g).tolist()
    return [255, *body, 0] if framed else body


def _cases(family: str) -> list[tuple[Any, list[int], float]]:
    """(voice, text ids, CFG weight) per request."""
    if family == TURBO:
        return [(_voice(400 + i, 375), _text(300 + i, n, 50276, framed=False), 0.0) for i, n in enumerate(TURBO_CASES)]
    return [(_voice(100 + i, 150, ex), _text(200 + i, n, 2454, framed=True), w) for i, (w, ex, n) in enumerate(MTL_CASES)]


def _describe(family: str, i: int) -> str:
    if family == TURBO:
        return f"text {TURBO_CASES[i]}"
    w, ex, n = MTL_CASES[i]
    return f"cfg {w} exag {ex} text {n}"


# --- the reference --------------------------------------------------------------------------


class _NoAlignment:
    """Upstream's ``AlignmentStreamAnalyzer`` made a no-op: its ``step`` returns the logits."""

    def __init__(self, *_: Any, eos_idx: int, **__: Any) -> None:
        self.eos_idx = eos_idx

    def step(self, logits: Any, next_token: Any = None) -> Any:
        return logits


@contextlib.contextmanager
def _without_alignment_analyzer() -> Iterator[None]:
    """Upstream ``T3.inference`` builds a multilingual model's alignment analyzer on every call
    (it reads attention of layer 9 and may force or forbid the stop token); neither engine
    runs it (docs/models.md), so the reference runs upstream's loop with a no-op one."""
    from chatterbox.models.t3 import t3 as upstream

    original, upstream.AlignmentStreamAnalyzer = upstream.AlignmentStreamAnalyzer, _NoAlignment
    try:
        yield
    finally:
        upstream.AlignmentStreamAnalyzer = original


def reference(family: str, t3: Any, n_tokens: int, dev: str) -> tuple[list[list[int]], list]:
    """Upstream's greedy tokens per case and, teacher-forced, (top-2 margins, raw log-probs)."""
    import torch

    tokens, forced = [], []
    with torch.inference_mode():
        for voice, text_ids, w in _cases(family):
            if family == TURBO:
                text = torch.tensor([text_ids], device=dev)
                toks = t3.inference_turbo(voice.to(device=dev), text, temperature=1.0, top_k=1, top_p=1.0,
                                          repetition_penalty=1.0, max_gen_len=n_tokens - 1)[0].tolist()
                tokens.append(toks)
                forced.append(turbo_teacher_forced(t3, voice.to(device=dev), text, toks))
                continue
            text = torch.tensor([text_ids] * 2, device=dev)
            with _without_alignment_analyzer():
                toks = t3.inference(t3_cond=voice.to(device=dev), text_tokens=text, max_new_tokens=n_tokens,
                                    temperature=1e-6, top_p=1.0, min_p=0.0, repetition_penalty=MTL_PENALTY,
                                    cfg_weight=w)[0].tolist()
            toks = toks[:-1] if toks and toks[-1] == 6562 else toks
            tokens.append(toks)
            forced.append(llama_teacher_forced(t3, voice.to(device=dev), text, toks, w, MTL_PENALTY))
    return tokens, forced


# --- the served side --------------------------------------------------------------------------


def _prompts(family: str, state: dict) -> list[Any]:
    """The requests as the engine builds them (our prompt builders over the checkpoint's tensors)."""
    from gateway.engine.checkpoint.modules import t3_config
    from gateway.models.families import FAMILIES

    if family == TURBO:
        from gateway.engine.vllm.t3.turbo import TurboPromptBuilder

        builder = TurboPromptBuilder.from_state_dict(state)
        return [builder.build(builder.conditioning(voice), text) for voice, text, _ in _cases(family)]
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    builder = T3PromptBuilder.from_state_dict(state, t3_config(FAMILIES[family]))
    return [builder.build(builder.conditioning(voice), text, w) for voice, text, w in _cases(family)]


def _penalty(family: str) -> float:
    return 1.0 if family == TURBO else MTL_PENALTY


def _vllm_worker(family: str, model_dir: str, dtype: str, n_tokens: int, out: str) -> None:
    """One vLLM engine (own process, so its GPU memory is gone when it exits)."""
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    from gateway.engine.vllm.t3.plugin import register

    register()
    prompts = [p.vllm_prompt() for p in _prompts(family, load_file(str(Path(model_dir) / "model.safetensors")))]
    t0 = time.perf_counter()
    # fp32 is the exactness run (eager saves the compile; same kernels); bf16 is served as is.
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True, dtype=dtype, max_model_len=1024,
              max_num_seqs=8, kv_cache_memory_bytes=WORKER_KV_BYTES, gpu_memory_utilization=0.01, seed=0,
              load_format="safetensors", enforce_eager=dtype == "float32")
    init_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, min_tokens=1 if family == TURBO else 0,
                        repetition_penalty=_penalty(family), stop_token_ids=[6562], detokenize=False, logprobs=5)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    toks = [[t for t in o.outputs[0].token_ids if t != 6562] for o in outs]
    logprobs = [[[[tid, lp.logprob] for tid, lp in step.items()] for step in o.outputs[0].logprobs] for o in outs]
    single = [[t for t in llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids if t != 6562] for p in prompts]
    result = {"tokens": toks, "single": single, "logprobs": logprobs, "init_s": init_s}
    if dtype == "bfloat16":  # as served; the prompt is in the prefix cache by now (the runs above)
        def seeded(read_cache: bool) -> list[int]:
            fields = seeded_fields(family, n_tokens)
            fields["skip_reading_prefix_cache"] = not read_cache
            outs = llm.generate([prompts[0]], SamplingParams(**fields), use_tqdm=False)
            return [t for t in outs[0].outputs[0].token_ids if t != 6562]

        result["seeded"] = {"full": seeded(False), "cached": seeded(True), "full_again": seeded(False)}
    Path(out).write_text(json.dumps(result))


def seeded_fields(family: str, n_tokens: int) -> dict[str, Any]:
    """``SamplingParams`` of a seeded request with the family's served defaults, as the
    engine builds them (``T3Sampling.vllm_fields``: a seeded request skips the cache read)."""
    from gateway.engine.base import GenerationParams
    from gateway.engine.vllm.t3.families import T3Sampling
    from gateway.models.families import FAMILIES, TOP_K

    p = GenerationParams(**FAMILIES[family].defaults)
    return T3Sampling(max_tokens=n_tokens, temperature=p.temperature, top_p=p.top_p,
                      min_p=0.0 if family == TURBO else p.min_p, repetition_penalty=p.repetition_penalty,
                      top_k=TOP_K.get(family, 0), seed=SEED).vllm_fields()


def seed_verdict(seeded: dict[str, list[int]]) -> tuple[bool, str]:
    """(passed, detail): the same seed twice, whole prompt each time, gives the same tokens."""
    full, again, cached = seeded["full"], seeded["full_again"], seeded["cached"]
    at, cache_at = first_mismatch(full, again), first_mismatch(full, cached)
    detail = (f"{len(full)} tokens, " + ("equal" if at is None else f"parting at token {at}")
              + "; a third run reading the prompt from the prefix cache: "
              + ("equal" if cache_at is None else f"parts at token {cache_at}"))
    return at is None and bool(full), detail


def standin_decode(family: str, t3: Any, n_tokens: int) -> dict[str, Any]:
    """``--dry-run``'s CPU stand-in for the vLLM worker: greedy from the served prompt rows
    through the upstream backbone, as the served model computes (module docstring)."""
    import torch

    prompts = _prompts(family, {k: v for k, v in t3.state_dict().items()})
    tokens, logprobs = [], []
    with torch.inference_mode():
        for prompt, (_, text_ids, w) in zip(prompts, _cases(family)):
            if family == TURBO:
                step_logits = _turbo_standin(t3, prompt.embeds, n_tokens)
            else:
                step_logits = _llama_standin(t3, prompt, text_ids, w, n_tokens)
            tokens.append([t for t, _ in step_logits])
            logprobs.append([[[int(i), float(v)] for v, i in zip(*torch.topk(lp, 5))] for _, lp in step_logits])
    # greedy and cache-free: the seeded runs are the first request's tokens (the plumbing, not a result)
    seeded = {"full": tokens[0], "cached": tokens[0], "full_again": tokens[0]}
    return {"tokens": tokens, "single": tokens, "logprobs": logprobs, "init_s": 0.0, "seeded": seeded}


def _turbo_standin(t3: Any, embeds: Any, n_tokens: int) -> list[tuple[int, Any]]:
    import torch

    from gateway.engine.reference.t3_decode import cache_kwarg

    kw = cache_kwarg(t3.tfmr)  # transformers 5.x: "cache" (the old name warns every call)
    out = t3.tfmr(inputs_embeds=embeds[None], use_cache=True)
    steps = []
    for k in range(n_tokens):
        logits = t3.speech_head(out[0][0, -1]).float()
        logits[6561] = float("-inf")
        tok = int(torch.argmax(logits))
        if tok == 6562 and k > 0:
            break
        steps.append((tok, torch.log_softmax(logits, -1)))
        out = t3.tfmr(inputs_embeds=t3.speech_emb(torch.tensor([[tok]])), use_cache=True, **{kw: getattr(out, kw)})
    return steps


def _llama_standin(t3: Any, prompt: Any, text_ids: list[int], w: float, n_tokens: int) -> list[tuple[int, Any]]:
    import torch

    cond = prompt.embeds.clone()
    lo = prompt.n_cond
    cond[lo:lo + prompt.n_text] += t3.text_emb(torch.tensor(text_ids))  # the model adds them for the cond stream
    from gateway.engine.reference.t3_decode import cache_kwarg

    kw = cache_kwarg(t3.tfmr)
    out = t3.tfmr(inputs_embeds=torch.stack([cond, prompt.embeds]), use_cache=True)
    seen = {6561}
    steps = []
    for k in range(n_tokens):
        h = out.last_hidden_state[:, -1].float()
        raw = t3.speech_head.float()((1 + w) * h[0] - w * h[1])
        raw[6561] = float("-inf")
        raw[6563:] = float("-inf")
        penalised = raw.clone()
        idx = torch.tensor(sorted(seen))
        vals = penalised[idx]
        penalised[idx] = torch.where(vals < 0, vals * MTL_PENALTY, vals / MTL_PENALTY)
        tok = int(torch.argmax(penalised))
        if tok == 6562:
            break
        steps.append((tok, torch.log_softmax(raw, -1)))
        seen.add(tok)
        row = t3.speech_emb(torch.tensor([tok])) + t3.speech_pos_emb.emb(torch.tensor([k + 1]))
        out = t3.tfmr(inputs_embeds=row[None].expand(2, -1, -1), use_cache=True, **{kw: getattr(out, kw)})
    return steps


# --- the checks --------------------------------------------------------------------------------


def check_t3(families: tuple[str, ...], n_tokens: int = 150, seed: int = 0, dry_run: bool = False) -> list[Result]:
    """T3 parity of each family, fp32 and bf16 (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    from gateway.engine.vllm.t3.families import write_model_dir
    from gateway.models.families import FAMILIES

    dev = "cpu" if dry_run else "cuda"
    results: list[Result] = []
    # Removed at the end: each run writes full-size embedding tables (~1 GiB), and a tool
    # run again and again (CI, a parity sweep) must not fill the disk.
    with tempfile.TemporaryDirectory(prefix="families-parity-") as tmp, _tiny_backbones() as tiny:
        work = Path(tmp)
        models: dict[str, Any] = {}
        workers: dict[tuple[str, str], tuple[subprocess.Popen | None, Path]] = {}
        for family in families:
            t3 = _family_t3(family, seed, tiny[family] if dry_run else None)
            weights = work / family / FAMILIES[family].t3_file
            weights.parent.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in t3.state_dict().items()}, str(weights))
            model_dir = write_model_dir(work / family / "model", FAMILIES[family], weights)
            models[family] = t3
            for dtype in ("float32", "bfloat16"):
                out = work / family / f"{dtype}.json"
                proc = None
                if not dry_run:  # all start now: they compile while the references decode
                    proc = subprocess.Popen([sys.executable, "-m", "gateway.tools.parity_families", "--worker",
                                             family, str(model_dir), dtype, str(n_tokens), str(out)])
                workers[(family, dtype)] = (proc, out)
        for family in families:
            t0 = time.perf_counter()
            t3 = models[family].to(dev)
            ref_tokens, forced = reference(family, t3, n_tokens, dev)
            print(f"reference {family}: {time.perf_counter() - t0:.1f} s, lengths {[len(t) for t in ref_tokens]}",
                  flush=True)
            standin = standin_decode(family, t3, n_tokens) if dry_run else None  # one decode serves both rows
            for dtype in ("float32", "bfloat16"):
                proc, out = workers[(family, dtype)]
                if standin is not None:
                    out.write_text(json.dumps(standin))
                    dtype_name = f"{dtype} (dry run: CPU stand-in for vLLM)"
                else:
                    try:
                        proc.wait(timeout=WORKER_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    dtype_name = dtype
                results += _judge(family, dtype, dtype_name, proc.returncode if proc else 0, out, ref_tokens, forced)
            models[family] = t3.cpu()
            if dev == "cuda":
                torch.cuda.empty_cache()
    return results


def batch_verdict(refs: list, batched: list, single: list, forced: list, logprobs: list) -> tuple[bool, str]:
    """(passed, detail) of batched == one at a time in fp32. vLLM's kernels are not batch
    invariant (a GEMM of 3 rows may tile unlike one of 1), so a request may leave the other
    path's tokens only where the logits themselves cannot tell two tokens apart: at the first
    step the two paths differ, both must still follow the reference, and the reference's top-2
    margin there must be within the per-case near-tie bound (``tie_bound``, measured on the
    batched decode's logits). Anywhere else, a difference is a bug (state crossing rows)."""
    notes = []
    for i, (ref, a, b, (margins, ref_lp), lps) in enumerate(zip(refs, batched, single, forced, logprobs)):
        at = first_mismatch(a, b)
        if at is None:
            continue
        if ref[:at] != a[:at] or at >= len(margins):
            return False, f"; request {i}: the paths part at token {at}, off the reference"
        bound = tie_bound(ref_lp, lps, at, {tok[at] for tok in (ref, a, b) if at < len(tok)})[0]
        if margins[at] > bound:
            return False, f"; request {i}: the paths part at token {at}, ref top-2 margin {margins[at]:.4f} > {bound:.4f}"
        notes.append(f"request {i} parts at token {at} on a near tie ({margins[at]:.4f} <= {bound:.4f})")
    return True, "".join(f"; {n}" for n in notes)


def _judge(family: str, dtype: str, name: str, code: int, out: Path, ref_tokens: list, forced: list) -> list[Result]:
    label = f"{family} T3 vLLM {name}"
    if code != 0 or not out.exists():
        return [(f"{label} runs", False, f"worker exit {code}")]
    got = json.loads(out.read_text())
    results = []
    same = sum(a == b for a, b in zip(got["tokens"], got["single"]))
    ok, why = batch_verdict(ref_tokens, got["tokens"], got["single"], forced, got["logprobs"])
    results.append((f"{label}: batched == one at a time", ok or dtype != "float32",
                    f"{same}/{len(ref_tokens)} requests identical{why}"
                    + ("" if dtype == "float32" else " (bf16: not required, see near-tie criterion)")
                    + f"; engine init {got['init_s']:.0f} s"))
    for i, (ref, mine, (margins, ref_lp), lps) in enumerate(zip(ref_tokens, got["tokens"], forced, got["logprobs"])):
        ok, detail = near_tie_verdict(ref, mine, margins, ref_lp, lps)
        results.append((f"{label} case {i}", ok, f"{_describe(family, i)}: {detail}"))
    if dtype == "bfloat16":
        if "seeded" not in got:
            results.append((f"{label}: the same seed twice", False, "the worker recorded no seeded runs"))
        else:
            ok, detail = seed_verdict(got["seeded"])
            results.append((f"{label}: the same seed twice", ok, detail))
    return results


def meanflow_s3gen(device: str, seed: int = 0) -> Any:
    """Turbo's S3Gen with random weights, its (t, r) time mixer randomised (upstream's init
    ignores r: a solver that got r wrong would still pass)."""
    import torch
    from chatterbox.models.s3gen import S3Gen

    torch.manual_seed(seed)
    s3gen = S3Gen(meanflow=True).to(device).eval()
    mixer = s3gen.flow.decoder.estimator.time_embed_mixer
    with torch.no_grad():
        mixer.weight.normal_(0.0, mixer.weight.shape[1] ** -0.5)
    return s3gen


def check_vocoder(s3gen: Any, dtype: Any, dry_run: bool = False, seed: int = 0) -> list[Result]:
    """Turbo's mean-flow S3Gen through the vocoder parity set in ``dtype`` (module docstring).
    Run fp32 before bf16: the flow is cast in place."""
    import dataclasses

    from gateway.tools import parity_vocoder

    device = "cpu" if dry_run else "cuda"
    sizes = dataclasses.replace(parity_vocoder.TINY if dry_run else parity_vocoder.REAL, flow_steps=2)
    return [(f"mean-flow vocoder {str(dtype).removeprefix('torch.')}: {r.name}", r.passed,
             f"SNR {r.value:.1f} dB (>= {r.tolerance:.0f}); {r.detail}")
            for r in parity_vocoder.run(device, dtype, sizes, s3gen=s3gen, seed=seed)]


def run_checks(families: tuple[str, ...] = (MULTILINGUAL, TURBO), *, tokens: int = 150, t3: bool = True,
               vocoder: bool = True, dry_run: bool = False,
               on_stage: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """For ``python -m gateway.tools.parity``: every check of this module, each stage on its own
    (one crashing does not hide the others' results; ``on_stage`` sees the results so far after
    each, so a run cut short keeps what it finished)."""
    import torch

    results: list[Result] = []
    shared: dict[str, Any] = {}

    def vocoder_in(dtype: Any) -> list[Result]:
        if "s3gen" not in shared:
            shared["s3gen"] = meanflow_s3gen("cpu" if dry_run else "cuda")
        return check_vocoder(shared["s3gen"], dtype, dry_run)

    wanted_vocoder = vocoder and TURBO in families
    stages = [("families T3", lambda: check_t3(families, tokens, dry_run=dry_run), t3),
              ("mean-flow vocoder float32", lambda: vocoder_in(torch.float32), wanted_vocoder),
              ("mean-flow vocoder bfloat16", lambda: vocoder_in(torch.bfloat16), wanted_vocoder and not dry_run)]
    for name, fn, wanted in stages:
        if not wanted:
            continue
        try:
            found = fn()
        except Exception as exc:  # noqa: BLE001 - reported as a failed check, the next stage still runs
            import traceback

            traceback.print_exc()
            found = [(f"{name} checks", False, f"crashed: {exc!r}"[:300])]
        for row in found:  # now, not only at the end: a later stage may be cut short
            print(f"| {row[0]} | {'PASS' if row[1] else 'FAIL'} | {row[2]} |", flush=True)
        results += found
        if on_stage is not None:
            on_stage(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _vllm_worker(argv[1], argv[2], argv[3], int(argv[4]), argv[5])
        return 0
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.parity_families", description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=f"{MULTILINGUAL},{TURBO}")
    ap.add_argument("--tokens", type=int, default=150, help="greedy speech tokens per T3 request")
    ap.add_argument("--skip-t3", action="store_true")
    ap.add_argument("--skip-vocoder", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, no vLLM: the tool's plumbing (module docstring)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    families = tuple(f for f in args.families.split(",") if f)

    def write(results: list[Result]) -> None:
        if args.json:
            args.json.write_text(json.dumps([{"check": n, "passed": ok, "detail": d} for n, ok, d in results],
                                            indent=1))

    results = run_checks(families, tokens=args.tokens, t3=not args.skip_t3, vocoder=not args.skip_vocoder,
                         dry_run=args.dry_run, on_stage=write)
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    ok = bool(results) and all(r[1] for r in results)
    print("\nFAMILIES PARITY", "PASS" if ok else "FAIL", "(dry run)" if args.dry_run else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

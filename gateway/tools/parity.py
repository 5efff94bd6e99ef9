"""All parity checks of the fast engine, on the GPU: ``python -m gateway.tools.parity``.

T3: the same random T3 weights are loaded by upstream ``T3.inference`` (fp32, HF
transformers) and by our vLLM model (through ``t3_cfg.safetensors`` and ``load_weights``);
several requests with different CFG weights, exaggerations and texts decode greedily in ONE
vLLM batch, so per-request CFG and positions are checked under continuous batching.

* Tokens: vLLM (fp32, and bf16 as served) must give the reference's greedy speech tokens,
  except that a run may part from it at a near tie. A teacher-forced fp32 pass of the
  reference gives, at every step, its top-2 margin (after the repetition penalty) and its raw
  log-probabilities; vLLM returns its own top-5 raw log-probabilities. The error of vLLM's
  logit differences on the matched steps, and on the diverging step over the tokens neither
  side chose there, is the measured precision (bf16 keeps 8 mantissa bits; vLLM's fp32
  matmuls may use TF32), and a divergence passes only where the reference's margin is within
  twice that error (``parity_t3``). In fp32 every request must also decode
  identically batched and alone.

Upstream decodes over all 8194 ids; the served model masks ids that are no speech token
(6561, >= 6563). So that both decode over the same set, the random weights give those ids
a zero speech-head row (logit exactly 0, never the argmax among 6562 random logits).

Long context (issue 9: attention planned for the heads the kernels run), bf16 on vLLM's
default attention backend (FlashAttention on Hopper), ``enforce_eager`` so that every step
lets FlashAttention choose its own splits: one request decoding past 900 tokens, then a mixed
batch: 16 requests running past 300 tokens when 32 new requests with long texts arrive
(steps of far more than 256 tokens). Passes if the engine survives and every request ends
with its full length of valid speech ids.

The new families (Multilingual's and Turbo's T3, Turbo's mean-flow vocoder) come from
``gateway.tools.parity_families`` (``--skip-families`` to leave them out).

Vocoder checks (batched vs one-at-a-time S3Gen, streamed vs one-shot) come from
``gateway.tools.parity_vocoder`` when present. Prints a pass/fail table; exit status 1 on
any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.tools.parity_t3 import llama_teacher_forced, near_tie_verdict

CASES = (  # (cfg_weight, exaggeration, text length)
    (0.5, 0.5, 24), (0.0, 0.5, 40), (1.0, 0.3, 12), (0.3, 0.8, 60),
)


def _random_t3(seed: int):
    import torch
    from chatterbox.models.t3 import T3

    torch.manual_seed(seed)
    t3 = T3().eval()
    with torch.no_grad():
        for name, p in t3.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1.0, 0.1)  # RMSNorm gains
            elif p.dim() >= 2:
                # speech head wider than the rest: logits with a real spread, as trained ones have
                p.normal_(0.0, 0.5 if name == "speech_head.weight" else 0.02)
        t3.speech_head.weight[6561].zero_()
        t3.speech_head.weight[6563:].zero_()
    return t3


def _conds(seed: int, exaggeration: float):
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    g = torch.Generator().manual_seed(seed)
    return T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
                  emotion_adv=exaggeration * torch.ones(1, 1, 1))


def _text(seed: int, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [255] + torch.randint(1, 704, (n,), generator=g).tolist() + [0]


def _reference(t3, n_tokens: int, penalty: float, dev: str = "cuda") -> tuple[list[list[int]], list]:
    """Upstream greedy tokens per case and, teacher-forced, (top-2 margin after the
    repetition penalty, raw log-probabilities over the servable ids) at each step."""
    import torch

    t3 = t3.to(dev)
    tokens_out, margins_out = [], []
    for i, (w, ex, n_text) in enumerate(CASES):
        cond = _conds(100 + i, ex).to(device=dev)
        text = torch.tensor([_text(200 + i, n_text)] * 2, device=dev)
        # temperature -> 0 makes upstream's multinomial the argmax (greedy).
        out = t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=n_tokens, temperature=1e-6,
                           top_p=1.0, min_p=0.0, repetition_penalty=penalty, cfg_weight=w)
        toks = out[0].tolist()
        if toks and toks[-1] == 6562:
            toks = toks[:-1]
        tokens_out.append(toks)
        margins_out.append(llama_teacher_forced(t3, _conds(100 + i, ex).to(device=dev), text, toks, w, penalty))
    t3.cpu()
    return tokens_out, margins_out


def _vllm_worker(model_dir: str, dtype: str, n_tokens: int, penalty: float, out: str) -> None:
    """One vLLM engine (own process, so its GPU memory is gone when it exits)."""
    from vllm import LLM, SamplingParams

    from gateway.engine.vllm.t3.plugin import register
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    register()
    builder = T3PromptBuilder.from_checkpoint(Path(model_dir) / "model.safetensors")
    prompts = []
    for i, (w, ex, n_text) in enumerate(CASES):
        rows = builder.conditioning(_conds(100 + i, ex))
        prompts.append(builder.build(rows, _text(200 + i, n_text), w).vllm_prompt())
    t0 = time.perf_counter()
    # fp32 is the exactness run (eager saves the compile; same kernels); bf16 is served as is.
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True, dtype=dtype,
              max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.25, seed=0,
              load_format="safetensors", enforce_eager=dtype == "float32")
    init_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, repetition_penalty=penalty,
                        stop_token_ids=[6562], detokenize=False, logprobs=5)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    toks = [[t for t in o.outputs[0].token_ids if t != 6562] for o in outs]
    # raw (pre-penalty) log-probabilities of the top tokens at each step
    logprobs = [[[[tid, lp.logprob] for tid, lp in step.items()] for step in o.outputs[0].logprobs] for o in outs]
    # The same requests one at a time: batching must not change any request's tokens.
    single = [[t for t in llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids if t != 6562]
              for p in prompts]
    Path(out).write_text(json.dumps({"tokens": toks, "single": single, "init_s": init_s, "logprobs": logprobs}))


def _long_worker(model_dir: str, out: str) -> None:
    """The long-context runs (own process); writes what each request produced."""
    from vllm import LLM, SamplingParams

    from gateway.engine.vllm.t3.plugin import register
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    register()
    builder = T3PromptBuilder.from_checkpoint(Path(model_dir) / "model.safetensors")

    def prompt(i: int, n_text: int) -> dict:
        return builder.build(builder.conditioning(_conds(300 + i % 4, 0.5)), _text(400 + i, n_text), 0.5).vllm_prompt()

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True, dtype="bfloat16",
              max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.3, seed=0,
              load_format="safetensors", enforce_eager=True)
    init_s = time.perf_counter() - t0

    def sp(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.2, max_tokens=n, min_tokens=n,
                              detokenize=False)

    t0 = time.perf_counter()
    long = llm.generate([prompt(0, 60)], sp(950), use_tqdm=False)[0].outputs[0].token_ids
    long_s = time.perf_counter() - t0
    engine = llm.llm_engine
    for i in range(16):
        engine.add_request(f"old{i}", prompt(i, 30), sp(600))
    lengths: dict[str, list[int]] = {}
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        if steps == 320:  # the old ones are past 300 tokens of context
            for j in range(32):
                engine.add_request(f"new{j}", prompt(100 + j, 220), sp(200))
        for o in engine.step():
            if o.finished:
                lengths[o.request_id] = list(o.outputs[0].token_ids)
        steps += 1
    Path(out).write_text(json.dumps({"init_s": init_s, "long": list(long), "long_s": long_s, "steps": steps,
                                     "mixed_s": time.perf_counter() - t0, "mixed": lengths}))


def check_long(seed: int) -> list[tuple[str, bool, str]]:
    with tempfile.TemporaryDirectory(prefix="t3-long-") as work:  # a full-size checkpoint: never left behind
        return _check_long(Path(work), seed)


def _check_long(work: Path, seed: int) -> list[tuple[str, bool, str]]:
    from safetensors.torch import save_file

    from gateway.engine.vllm.t3.config import write_model_dir

    t3 = _random_t3(seed)
    model_dir = write_model_dir(work / "model")
    save_file({k: v.contiguous() for k, v in t3.state_dict().items()}, str(model_dir / "model.safetensors"))
    del t3
    out = work / "long.json"
    proc = subprocess.run([sys.executable, "-m", "gateway.tools.parity", "--long-worker", str(model_dir), str(out)])
    if proc.returncode != 0 or not out.exists():
        return [("T3 vLLM bf16 long context runs", False, f"worker exit {proc.returncode}")]
    got = json.loads(out.read_text())

    def valid(toks: list[int], n: int) -> bool:
        return len(toks) == n and all(0 <= t < 6561 or t == 6562 for t in toks)

    mixed = got["mixed"]
    old_ok = sum(valid(mixed.get(f"old{i}", []), 600) for i in range(16))
    new_ok = sum(valid(mixed.get(f"new{j}", []), 200) for j in range(32))
    return [
        ("T3 vLLM bf16 eager: one request decodes 950 tokens", valid(got["long"], 950),
         f"{len(got['long'])} tokens in {got['long_s']:.1f} s (context ~1050 rows); engine init {got['init_s']:.0f} s"),
        ("T3 vLLM bf16 eager: 32 new long prompts join 16 requests at 300+ tokens", old_ok == 16 and new_ok == 32,
         f"{old_ok}/16 running requests reached 600 tokens, {new_ok}/32 new ones 200; {got['steps']} steps in "
         f"{got['mixed_s']:.1f} s"),
    ]


def check_t3(n_tokens: int, penalty: float, seed: int) -> list[tuple[str, bool, str]]:
    """Criterion per request: vLLM's greedy tokens equal the reference's, or the first
    difference falls on a near tie: a step where the reference's own top-2 margin is at most
    twice the largest logit-difference error measured on the steps before it and, without
    the contested tokens, on that step (``parity_t3``).
    Batched == one at a time must hold exactly in fp32 (per-request CFG/positions under
    continuous batching); bf16 kernels differ by batch shape, so bf16 is held to the same
    near-tie criterion only."""
    with tempfile.TemporaryDirectory(prefix="t3-parity-") as work:  # a full-size checkpoint: never left behind
        return _check_t3(Path(work), n_tokens, penalty, seed)


def _check_t3(work: Path, n_tokens: int, penalty: float, seed: int) -> list[tuple[str, bool, str]]:
    import torch
    from safetensors.torch import save_file

    from gateway.engine.vllm.t3.config import write_model_dir

    results: list[tuple[str, bool, str]] = []
    t3 = _random_t3(seed)
    model_dir = write_model_dir(work / "model")
    save_file({k: v.contiguous() for k, v in t3.state_dict().items()}, str(model_dir / "model.safetensors"))
    t0 = time.perf_counter()
    ref_tokens, ref_forced = _reference(t3, n_tokens, penalty)
    print(f"reference T3: {time.perf_counter() - t0:.1f} s, lengths {[len(t) for t in ref_tokens]}", flush=True)
    del t3
    torch.cuda.empty_cache()
    for dtype in ("float32", "bfloat16"):
        out = work / f"{dtype}.json"
        proc = subprocess.run([sys.executable, "-m", "gateway.tools.parity", "--vllm-worker", str(model_dir),
                               dtype, str(n_tokens), str(penalty), str(out)])
        if proc.returncode != 0 or not out.exists():
            results.append((f"T3 vLLM {dtype} runs", False, f"worker exit {proc.returncode}"))
            continue
        got = json.loads(out.read_text())
        same = sum(a == b for a, b in zip(got["tokens"], got["single"]))
        results.append((f"T3 vLLM {dtype}: batched == one at a time",
                        same == len(CASES) or dtype != "float32",
                        f"{same}/{len(CASES)} requests identical"
                        + ("" if dtype == "float32" else " (bf16: not required, see near-tie criterion)")
                        + f"; engine init {got['init_s']:.0f} s"))
        for i, (ref, mine, (margins, ref_lp), lps) in enumerate(
                zip(ref_tokens, got["tokens"], ref_forced, got["logprobs"])):
            w, ex, n_text = CASES[i]
            ok, detail = near_tie_verdict(ref, mine, margins, ref_lp, lps)
            results.append((f"T3 vLLM {dtype} case {i}", ok, f"cfg {w} exag {ex} text {n_text}: {detail}"))
    return results


def check_vocoder() -> list[tuple[str, bool, str]]:
    try:
        from gateway.tools import parity_vocoder
    except ImportError as exc:
        return [("vocoder parity module", False, f"not importable: {exc}")]
    return list(parity_vocoder.run_checks())


def _check_families(tokens: int) -> list[tuple[str, bool, str]]:
    from gateway.tools import parity_families

    return parity_families.run_checks(tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--vllm-worker":
        _vllm_worker(argv[1], argv[2], int(argv[3]), float(argv[4]), argv[5])
        return 0
    if argv and argv[0] == "--long-worker":
        _long_worker(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=200, help="greedy speech tokens per T3 request")
    ap.add_argument("--repetition-penalty", type=float, default=1.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-t3", action="store_true")
    ap.add_argument("--skip-vocoder", action="store_true")
    ap.add_argument("--skip-long", action="store_true", help="skip the long-context / mixed-batch T3 runs")
    ap.add_argument("--skip-families", action="store_true", help="leave out Turbo's and Multilingual's T3")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # vLLM forks its engine process by default; a fork after torch used its CPU thread
    # pool (prompt building) hangs the child, so start it fresh.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    results: list[tuple[str, bool, str]] = []
    stages = [("T3", lambda: check_t3(args.tokens, args.repetition_penalty, args.seed), args.skip_t3),
              ("T3 long context", lambda: check_long(args.seed), args.skip_long),
              ("vocoder", check_vocoder, args.skip_vocoder),
              ("T3 families", lambda: _check_families(args.tokens), args.skip_families)]
    for name, fn, skip in stages:
        if skip:
            continue
        try:
            found = fn()
            results += found
            for name, ok, detail in found:  # now, not only at the end: a later stage may be cut short
                print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |", flush=True)
        except Exception as exc:  # one broken stage must not hide the others' results
            import traceback

            traceback.print_exc()
            results.append((f"{name} checks", False, f"crashed: {exc!r}"[:300]))
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    ok = bool(results) and all(r[1] for r in results)
    print("\nPARITY", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Parity of the new families' vLLM T3 with upstream, on the GPU (a stage of
``python -m gateway.tools.parity``; alone: ``python -m gateway.tools.parity_families``).

* Multilingual: upstream ``T3(T3Config.multilingual())`` with random weights against our Llama
  plugin with the wide id layout (text ids up to 2453 through the side channel); greedy, CFG
  per request, several requests in one batch. Same criterion as the original's check in
  ``parity``: equal tokens, or a first difference at a near tie of the reference.
* Turbo: upstream ``T3.inference_turbo`` (greedy through ``top_k=1``; the repetition penalty
  then cannot change the argmax, so vLLM runs without one) against the Turbo vLLM model fed
  ``TurboPromptBuilder`` rows. The random speech head gives the start-of-speech id a large
  negative bias, so the reference never picks the id the served model masks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MTL_CASES = ((0.5, 0.5, 24), (0.0, 0.5, 40), (1.0, 0.3, 12))
TURBO_CASES = (24, 40, 12)  # text lengths


def _randomise(t3, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in t3.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.5 if name == "speech_head.weight" else 0.02)
        t3.speech_head.weight[6561].zero_()
        if t3.speech_head.bias is not None:
            t3.speech_head.bias[6561] = -1e4
        else:
            t3.speech_head.weight[6563:].zero_()


def _family_t3(family: str, seed: int):
    from chatterbox.models.t3 import T3

    from gateway.engine.checkpoint.modules import t3_config
    from gateway.models.families import FAMILIES

    t3 = T3(t3_config(FAMILIES[family])).eval()
    _randomise(t3, seed)
    return t3


def _voice(seed: int, prompt_len: int, exaggeration: float = 0.5):
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


def _reference_turbo(t3, n_tokens: int) -> list[list[int]]:
    out = []
    for i, n_text in enumerate(TURBO_CASES):
        import torch

        text = torch.tensor([_text(300 + i, n_text, 50276, framed=False)], device="cuda")
        toks = t3.inference_turbo(_voice(400 + i, 375).to(device="cuda"), text, temperature=1.0, top_k=1,
                                  top_p=1.0, repetition_penalty=1.0, max_gen_len=n_tokens - 1)[0].tolist()
        out.append(toks)
    return out


def _reference_mtl(t3, n_tokens: int, penalty: float) -> list[list[int]]:
    import torch

    out = []
    for i, (w, ex, n_text) in enumerate(MTL_CASES):
        text = torch.tensor([_text(200 + i, n_text, 2454, framed=True)] * 2, device="cuda")
        toks = t3.inference(t3_cond=_voice(100 + i, 150, ex).to(device="cuda"), text_tokens=text,
                            max_new_tokens=n_tokens, temperature=1e-6, top_p=1.0, min_p=0.0,
                            repetition_penalty=penalty, cfg_weight=w)[0].tolist()
        out.append(toks[:-1] if toks and toks[-1] == 6562 else toks)
    return out


def _worker(family: str, model_dir: str, dtype: str, n_tokens: int, penalty: float, out: str) -> None:
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    from gateway.engine.vllm.t3.plugin import register

    register()
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    if family == "chatterbox-turbo":
        from gateway.engine.vllm.t3.turbo import TurboPromptBuilder

        builder = TurboPromptBuilder.from_state_dict(state)
        prompts = [builder.build(builder.conditioning(_voice(400 + i, 375)), _text(300 + i, n, 50276, framed=False)).vllm_prompt()
                   for i, n in enumerate(TURBO_CASES)]
        penalty = 1.0
    else:
        from gateway.engine.checkpoint.modules import t3_config
        from gateway.engine.vllm.t3.prompt import T3PromptBuilder
        from gateway.models.families import FAMILIES

        builder = T3PromptBuilder.from_state_dict(state, t3_config(FAMILIES[family]))
        prompts = [builder.build(builder.conditioning(_voice(100 + i, 150, ex)), _text(200 + i, n, 2454, framed=True), w).vllm_prompt()
                   for i, (w, ex, n) in enumerate(MTL_CASES)]
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True, dtype=dtype, max_model_len=2048,
              max_num_seqs=16, gpu_memory_utilization=0.25, seed=0, load_format="safetensors",
              enforce_eager=dtype == "float32")
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, repetition_penalty=penalty, stop_token_ids=[6562],
                        detokenize=False)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    toks = [[t for t in o.outputs[0].token_ids if t != 6562] for o in outs]
    Path(out).write_text(json.dumps({"tokens": toks}))


def check(family: str, n_tokens: int = 100, penalty: float = 1.2, seed: int = 0) -> list[tuple[str, bool, str]]:
    import torch
    from safetensors.torch import save_file

    from gateway.engine.vllm.t3.config import write_model_dir
    from gateway.engine.vllm.t3.turbo import write_turbo_model_dir

    work = Path(tempfile.mkdtemp(prefix=f"{family}-parity-"))
    t3 = _family_t3(family, seed).to("cuda")
    turbo = family == "chatterbox-turbo"
    model_dir = write_turbo_model_dir(work / "model") if turbo else write_model_dir(work / "model", text_vocab_size=2454)
    save_file({k: v.contiguous().cpu() for k, v in t3.state_dict().items()}, str(model_dir / "model.safetensors"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = _reference_turbo(t3, n_tokens) if turbo else _reference_mtl(t3, n_tokens, penalty)
    print(f"reference {family}: {time.perf_counter() - t0:.1f} s, lengths {[len(t) for t in ref]}", flush=True)
    del t3
    torch.cuda.empty_cache()
    results = []
    for dtype in ("float32", "bfloat16"):
        out = work / f"{dtype}.json"
        proc = subprocess.run([sys.executable, "-m", "gateway.tools.parity_families", "--worker", family, str(model_dir),
                               dtype, str(n_tokens), str(penalty), str(out)])
        if proc.returncode != 0 or not out.exists():
            results.append((f"{family} T3 vLLM {dtype} runs", False, f"worker exit {proc.returncode}"))
            continue
        got = json.loads(out.read_text())["tokens"]
        for i, (a, b) in enumerate(zip(ref, got)):
            same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
            equal = same is None and len(a) == len(b)
            # fp32 must match; bf16 may part at a near tie (reported, judged by the fp32 run)
            results.append((f"{family} T3 vLLM {dtype} case {i}", equal or dtype != "float32",
                            f"equal for {len(a) if equal else same}/{len(a)} greedy tokens"))
    return results


def run_checks() -> list[tuple[str, bool, str]]:
    return check("chatterbox-multilingual") + check("chatterbox-turbo")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker(argv[1], argv[2], argv[3], int(argv[4]), float(argv[5]), argv[6])
        return 0
    results = run_checks()
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

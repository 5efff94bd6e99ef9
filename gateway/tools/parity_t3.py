"""What every T3 parity check shares (``tools/parity.py`` for the original,
``tools/parity_families.py`` for Turbo and Multilingual): the teacher-forced reference pass
and the near-tie criterion (docs/benchmarks.md, "The tolerance, and why").

Greedy decoding of random weights meets near ties (two logits closer than the arithmetic's
error) every few dozen steps; after one, two decodes condition on different tokens and
legitimately part. So a served run passes if its tokens equal the reference's up to a step
where the reference's own top-2 margin (after its logits processors) is at most twice the
largest error of the served logit *differences* measured on the matched steps before it (the
served engine's top-5 raw log-probabilities against the teacher-forced fp32 reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def llama_teacher_forced(t3: Any, cond: Any, text: Any, toks: list[int], w: float, penalty: float) -> tuple[list[float], Any]:
    """The Llama T3's (original, Multilingual) reference pass over its own greedy tokens:
    per step, the top-2 margin after CFG and the repetition penalty, and the raw (CFG-mixed)
    log-probabilities over the ids the served model can produce."""
    import torch

    with torch.inference_mode():
        embeds, _ = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text,
                                            speech_tokens=torch.full((2, 1), 6561, device=text.device),
                                            cfg_weight=max(w, 1e-3))
        # upstream feeds a second start row (position 0), then token k at position k + 1
        speech = torch.tensor([6561] + toks[:-1], device=text.device)
        rows = t3.speech_emb(speech) + t3.speech_pos_emb.emb(torch.arange(len(speech), device=text.device))
        seq = torch.cat([embeds, rows[None].expand(2, -1, -1)], dim=1)
        hidden = t3.tfmr(inputs_embeds=seq).last_hidden_state[:, embeds.shape[1]:]
        logits = t3.speech_head(hidden)  # [2, steps, V]
        mixed = logits[0] + w * (logits[0] - logits[1])
        margins = []
        seen = {6561}
        for step in range(len(toks)):
            row = mixed[step].clone()
            idx = torch.tensor(sorted(seen), device=row.device)
            vals = row[idx]
            row[idx] = torch.where(vals < 0, vals * penalty, vals / penalty)
            top = torch.topk(row, 2).values
            margins.append(float(top[0] - top[1]))
            seen.add(toks[step])
        raw = mixed.clone()
        raw[:, 6561] = float("-inf")
        raw[:, 6563:] = float("-inf")
    return margins, torch.log_softmax(raw.float(), dim=-1).cpu()


def turbo_teacher_forced(t3: Any, cond: Any, text: Any, toks: list[int]) -> tuple[list[float], Any]:
    """Turbo's (GPT-2, no CFG) reference pass over its own greedy tokens: per step, the top-2
    margin of the raw logits (greedy through top-k 1: no processor changes the argmax) and
    their log-probabilities over the ids the served model can produce (6561 masked)."""
    import torch

    with torch.inference_mode():
        start = torch.full((1, 1), 6561, device=text.device)
        embeds, _ = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text, speech_tokens=start, cfg_weight=0.0)
        rows = t3.speech_emb(torch.tensor([toks[:-1]], device=text.device))  # GPT-2 adds its positions
        seq = torch.cat([embeds, rows], dim=1)
        hidden = t3.tfmr(inputs_embeds=seq)[0][:, embeds.shape[1] - 1:]
        logits = t3.speech_head(hidden)[0]  # [steps, 6563]: the start row predicts token 0
        logits[:, 6561] = float("-inf")
        top = torch.topk(logits, 2, dim=-1).values
        margins = (top[:, 0] - top[:, 1]).tolist()
    return margins, torch.log_softmax(logits.float(), dim=-1).cpu()


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logit_error(ref_logprobs: Any, mine: list, upto: int) -> float:
    """Largest error, over steps < ``upto``, of the differences between the top token's
    log-probability and the others' (the normalisation cancels): the precision of the
    served logits, measured, not assumed."""
    worst = 0.0
    for step in range(min(upto, len(mine))):
        pairs = mine[step]
        if len(pairs) < 2:
            continue
        top_id, top_lp = max(pairs, key=lambda p: p[1])
        for tid, lp in pairs:
            if lp == float("-inf"):
                continue
            ref_diff = float(ref_logprobs[step, top_id] - ref_logprobs[step, tid])
            worst = max(worst, abs((top_lp - lp) - ref_diff))
    return worst


def near_tie_verdict(ref: list[int], mine: list[int], margins: list[float], ref_logprobs: Any,
                     logprobs: list) -> tuple[bool, str]:
    """(passed, detail) of one served decode against the reference (module docstring)."""
    at = first_mismatch(ref, mine)
    err = logit_error(ref_logprobs, logprobs, len(ref) if at is None else at)
    what = f"max logit-diff error {err:.4f}"
    if at is None:
        return True, what + f"; all {len(ref)} tokens equal"
    m = margins[at] if at < len(margins) else float("inf")
    return m <= 2 * err, what + (f"; equal for {at}/{len(ref)} tokens, then a near tie: ref top-2 margin "
                                 f"{m:.4f} (must be <= {2 * err:.4f})")

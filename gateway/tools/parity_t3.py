"""What every T3 parity check shares (``tools/parity.py`` for the original,
``tools/parity_families.py`` for Turbo and Multilingual): the teacher-forced reference pass
and the near-tie criterion (docs/benchmarks.md, "The tolerance, and why").

Greedy decoding of random weights meets near ties (two logits closer than the arithmetic's
error) every few dozen steps; after one, two decodes condition on different tokens and
legitimately part. So a served run passes if its tokens equal the reference's up to a step
where the reference's own top-2 margin (after its logits processors) is at most twice the
largest error of the served logit *differences* (the served engine's top-5 raw
log-probabilities against the teacher-forced fp32 reference), measured on the matched steps
before it and on the diverging step itself.

The diverging step conditions both sides on the same tokens, so its logits are as comparable
as any matched step's; but the pair the two sides disagree on is not evidence of precision
(its error exceeds the margin by construction, so counting it would excuse any divergence).
There the error is measured over the other tokens both sides rank, the contested ones left
out: the reference's token, the served token, and the served raw top. This is what decides a
divergence at the very first step, where no matched step exists: with fewer than two
uncontested tokens nothing is measured there and the bound stays at the matched steps' (0 at
step 0), i.e. the run fails rather than assume an error.
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


def _step_error(ref_row: Any, pairs: list, skip: frozenset[int] = frozenset()) -> tuple[float, int]:
    """(largest error of the differences between the served top token's log-probability and
    the others', how many tokens it was measured over) at one step, ``skip`` left out. The
    normalisation cancels in a difference; tokens either side gives no probability are left
    out too."""
    kept = [(int(tid), lp) for tid, lp in pairs
            if int(tid) not in skip and lp != float("-inf") and float(ref_row[int(tid)]) != float("-inf")]
    if len(kept) < 2:
        return 0.0, 0
    top_id, top_lp = max(kept, key=lambda p: p[1])
    worst = max(abs((top_lp - lp) - float(ref_row[top_id] - ref_row[tid])) for tid, lp in kept)
    return worst, len(kept)


def logit_error(ref_logprobs: Any, mine: list, upto: int) -> float:
    """Largest error, over steps < ``upto``, of the differences between the top token's
    log-probability and the others' (the normalisation cancels): the precision of the
    served logits, measured, not assumed."""
    return max((_step_error(ref_logprobs[step], mine[step])[0] for step in range(min(upto, len(mine)))), default=0.0)


def diverging_step_error(ref_logprobs: Any, mine: list, at: int, contested: set[int]) -> tuple[float, int]:
    """(error, tokens measured) at the first diverging step ``at`` over the tokens both sides
    rank there, ``contested`` and the served raw top left out (module docstring); (0, 0) where
    either side has no log-probabilities at that step or fewer than two tokens remain."""
    if at >= len(mine) or at >= len(ref_logprobs) or not mine[at]:
        return 0.0, 0
    served_top = int(max(mine[at], key=lambda p: p[1])[0])
    return _step_error(ref_logprobs[at], mine[at], frozenset(contested | {served_top}))


def tie_bound(ref_logprobs: Any, logprobs: list, at: int, contested: set[int]) -> tuple[float, float, float, int]:
    """(bound, matched steps' error, diverging step's error, tokens it was measured over) for a
    divergence at step ``at`` between ``contested`` tokens: the reference's top-2 margin there
    must be at most ``bound``, twice the served logits' measured error (module docstring)."""
    err = logit_error(ref_logprobs, logprobs, at)
    at_err, at_tokens = diverging_step_error(ref_logprobs, logprobs, at, contested)
    return 2 * max(err, at_err), err, at_err, at_tokens


def near_tie_verdict(ref: list[int], mine: list[int], margins: list[float], ref_logprobs: Any,
                     logprobs: list) -> tuple[bool, str]:
    """(passed, detail) of one served decode against the reference (module docstring)."""
    at = first_mismatch(ref, mine)
    if at is None:
        err = logit_error(ref_logprobs, logprobs, len(ref))
        return True, f"max logit-diff error {err:.4f}; all {len(ref)} tokens equal"
    contested = {tok[at] for tok in (ref, mine) if at < len(tok)}
    bound, err, at_err, at_tokens = tie_bound(ref_logprobs, logprobs, at, contested)
    m = margins[at] if at < len(margins) else float("inf")
    return m <= bound, (f"max logit-diff error {max(err, at_err):.4f} (matched steps {err:.4f}, diverging step "
                        f"{at_err:.4f} over {at_tokens} uncontested tokens); equal for {at}/{len(ref)} tokens, "
                        f"then a near tie: ref top-2 margin {m:.4f} (must be <= {bound:.4f})")

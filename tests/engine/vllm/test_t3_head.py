"""T3's speech head as the served model runs it (``layout.head_logits``, called by the vLLM
model's ``compute_logits`` outside the CUDA graph): one fp32 ``addmm`` with the unproducible
ids masked by a bias row, equal to the head and masking it replaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateway.engine.vllm.t3.layout import SPEECH_VOCAB, START_SPEECH, STOP_SPEECH, head_logits, speech_logit_mask


def _before(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What compute_logits did until now: a cast of the weight every step, then two writes."""
    logits = F.linear(hidden.float(), weight.float())
    logits[:, START_SPEECH] = float("-inf")
    logits[:, STOP_SPEECH + 1:] = float("-inf")
    return logits


def test_one_addmm_gives_the_masked_logits() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(SPEECH_VOCAB, 64, generator=g) * 0.5
    hidden = torch.randn(5, 64, generator=g) * 4
    mask = speech_logit_mask()
    got, expected = head_logits(hidden, weight, mask), _before(hidden, weight)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    producible = torch.isfinite(mask).nonzero().flatten()
    assert producible[0] == 0 and producible[-1] == STOP_SPEECH and len(producible) == STOP_SPEECH


def test_a_bf16_hidden_state_is_mixed_in_fp32() -> None:
    weight = torch.randn(SPEECH_VOCAB, 16)
    hidden = torch.randn(2, 16).bfloat16()
    assert head_logits(hidden, weight, speech_logit_mask()).dtype == torch.float32

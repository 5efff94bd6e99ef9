"""How a T3 request's prompt is laid out, and the side channel that carries its per-request
numbers (prompt length, CFG weight, text token ids) into the graph-captured forward pass.

A prompt is ``[conditioning rows][text rows][BOS][BOS]`` (``len(cond) + len(text) + 2`` rows),
exactly as upstream ``T3.inference`` builds it (its ``prepare_input_embeds`` ends with the
start-of-speech row and the decode loop prepends a second one).

The rows themselves travel as prompt embeddings. Their *placeholder token ids* carry three
facts vLLM would otherwise lose, all in the id range the sampler can never produce
(``>= 6563``, masked), so the repetition penalty is unaffected by them:

* cond rows: the first two hold the CFG weight code as two base-800 digits
  (``7300 + digit``); the rest are ``8100``;
* text rows: ``6563 + text_token`` (the uncond stream needs the text embedding removed);
* the two BOS rows: ``6561``, the speech start token, as upstream penalises it.

The model turns those ids into M-RoPE style positions (``get_mrope_input_positions``), a
``[3, n]`` tensor per request, plus one per-request delta that vLLM adds to every later
(decode) position. vLLM keeps these positions in int32, so all of it fits 31 bits: row 0 is
``p | L << 11 | w_code << 21`` with ``p < 2048`` the real position, ``L < 1024`` the prompt
length and ``w_code = round(200 w) < 1024`` the CFG weight in steps of 0.005 (so 0.3, 0.5,
0.25 are exact). Each decode row thus knows its speech position ``p - L + 1`` and its
request's CFG weight with no per-request Python state in ``forward``.
Rows 1 and 2 equal row 0 for generated tokens and are negative for prompt rows
(``-1``: conditioning/BOS, ``-(2 + t)``: text token ``t``).

Text vocabularies larger than the 737 ids between 6563 and the CFG digits (Multilingual:
2454) get an :class:`IdLayout` whose CFG digits and filler move up past the text ids, and
whose logits are that much wider (``logits_width``; the extra columns are masked like every
id >= 6563), so every placeholder id stays a valid vocabulary id for vLLM's penalties. The
English layout (704 text ids) is exactly the one above: its logits stay 8194 wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

START_SPEECH = 6561
STOP_SPEECH = 6562
SPEECH_VOCAB = 8194
TEXT_ID_BASE = 6563
COND_DIGIT_BASE = 7300
COND_DIGITS = 800
COND_FILLER = 8100
CFG_SCALE = 200
"""The CFG weight travels as ``round(200 w)``: steps of 0.005."""

POS_BITS = 11
POS_MASK = (1 << POS_BITS) - 1
MAX_POSITIONS = 1 << POS_BITS
"""Positions must stay below this: it bounds ``max_model_len``."""
LEN_BITS = 10
LEN_MASK = (1 << LEN_BITS) - 1
MAX_PROMPT = 1 << LEN_BITS
"""Prompt rows (conditioning + text + 2) must stay below this."""
W_SHIFT = POS_BITS + LEN_BITS
MAX_CFG_CODE = (1 << (31 - W_SHIFT)) - 1
"""Largest CFG code (the weight 5.115): the three fields fill the 31 bits of an int32."""
MAX_TEXT_VOCAB = COND_DIGIT_BASE - TEXT_ID_BASE


@dataclass(frozen=True, slots=True)
class IdLayout:
    """Where the placeholder ids of a T3 with ``text_vocab`` text ids lie."""

    text_vocab: int = 704

    @property
    def cond_digit_base(self) -> int:
        return max(COND_DIGIT_BASE, TEXT_ID_BASE + self.text_vocab)

    @property
    def cond_filler(self) -> int:
        return self.cond_digit_base + COND_DIGITS

    @property
    def logits_width(self) -> int:
        """``vocab_size`` of the vLLM model: the speech vocabulary, or wider to hold every id."""
        return max(SPEECH_VOCAB, self.cond_filler + 1)


ENGLISH = IdLayout()


def cfg_code(cfg_weight: float) -> int:
    """The CFG weight as it travels in the side channel: an integer in steps of 1/CFG_SCALE."""
    code = round(float(cfg_weight) * CFG_SCALE)
    if not 0 <= code <= MAX_CFG_CODE:
        raise ValueError(f"cfg_weight {cfg_weight} outside [0, {MAX_CFG_CODE / CFG_SCALE}]")
    return code


def placeholder_ids(n_cond: int, text_tokens: list[int], cfg_weight: float, layout: IdLayout = ENGLISH) -> list[int]:
    """The prompt's placeholder token ids (see the module docstring)."""
    if n_cond < 2:
        raise ValueError("a T3 prompt has at least two conditioning rows (speaker, emotion)")
    if any(not 0 <= t < layout.text_vocab for t in text_tokens):
        raise ValueError(f"text token ids must lie in [0, {layout.text_vocab})")
    code = cfg_code(cfg_weight)
    base = layout.cond_digit_base
    cond = [base + code // COND_DIGITS, base + code % COND_DIGITS]
    cond += [layout.cond_filler] * (n_cond - 2)
    ids = cond + [TEXT_ID_BASE + t for t in text_tokens] + [START_SPEECH, START_SPEECH]
    if len(ids) >= MAX_PROMPT:
        raise ValueError(f"prompt of {len(ids)} rows is too long (limit {MAX_PROMPT - 1})")
    return ids


def prompt_length(ids: list[int]) -> int:
    """Length of the original prompt inside ``ids`` (which may continue with generated tokens
    after a preemption): the prompt ends at its first pair of BOS rows."""
    for i in range(len(ids) - 1):
        if ids[i] == START_SPEECH and ids[i + 1] == START_SPEECH:
            return i + 2
    raise ValueError("not a T3 prompt: no pair of start-of-speech rows")


def mrope_positions(ids: list[int], layout: IdLayout = ENGLISH) -> tuple[torch.Tensor, int]:
    """``(positions [3, len(ids)], delta)`` for vLLM's M-RoPE hook (see the module docstring)."""
    n = len(ids)
    length = prompt_length(ids)
    base = layout.cond_digit_base
    code = (ids[0] - base) * COND_DIGITS + (ids[1] - base)
    if not (0 <= ids[0] - base < COND_DIGITS and 0 <= ids[1] - base < COND_DIGITS):
        raise ValueError("not a T3 prompt: the first two rows do not carry the CFG weight")
    delta = (length << POS_BITS) | (code << W_SHIFT)
    row0 = torch.arange(n, dtype=torch.int64) + delta
    kind = row0.clone()
    for i in range(length):
        t = ids[i] - TEXT_ID_BASE
        kind[i] = -(2 + t) if 0 <= t < layout.text_vocab else -1
    return torch.stack((row0, kind, kind)), delta


@dataclass(frozen=True, slots=True)
class DecodedPositions:
    position: torch.Tensor
    """Real (RoPE) position of each row, int64 [N]."""
    is_generated: torch.Tensor
    """True for rows that are generated speech tokens (they need a speech position), bool [N]."""
    speech_index: torch.Tensor
    """Learned speech position of a generated row (``p - L + 1``), clamped, int64 [N]."""
    is_text: torch.Tensor
    text_token: torch.Tensor
    """Text token of a text prompt row, clamped, int64 [N]."""
    cfg_weight: torch.Tensor
    """The row's request CFG weight, float32 [N]."""


def decode_positions(
    positions: torch.Tensor, *, max_position: int, speech_positions: int, text_vocab: int
) -> DecodedPositions:
    """Inverse of :func:`mrope_positions`, in tensor ops only (CUDA-graph safe). Every index
    is clamped: padded rows of a captured graph hold stale values."""
    v = positions[0]
    kind = positions[1]
    p = (v & POS_MASK).clamp(max=max_position - 1)
    length = (v >> POS_BITS) & LEN_MASK
    code = v >> W_SHIFT
    is_gen = kind >= 0
    speech_index = (p - length + 1).clamp(0, speech_positions - 1)
    is_text = kind <= -2
    text_token = (-kind - 2).clamp(0, text_vocab - 1)
    cfg = code.clamp(0, MAX_CFG_CODE).to(torch.float32) / CFG_SCALE
    return DecodedPositions(p, is_gen, speech_index, is_text, text_token, cfg)


def speech_logit_mask(speech_vocab: int = SPEECH_VOCAB) -> torch.Tensor:
    """(speech_vocab,) fp32: 0 for the ids T3 may produce (speech tokens 0..6560 and the stop
    token), ``-inf`` for the start token and every id past the stop token."""
    mask = torch.zeros(speech_vocab, dtype=torch.float32)
    mask[START_SPEECH] = float("-inf")
    mask[STOP_SPEECH + 1:] = float("-inf")
    return mask


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` with the masked ids at ``-inf``, all in fp32, as one ``addmm``
    (the speech head runs outside vLLM's CUDA graph, every step)."""
    return torch.addmm(mask, hidden.float(), weight.float().t())

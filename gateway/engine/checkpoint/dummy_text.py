"""Tokenizer files for dummy checkpoints of Turbo and Multilingual: valid for the upstream
loaders, laid out like the real ones, made here (no tokenizer can be downloaded).

- Turbo: a GPT-2 style byte-level BPE (``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``) of exactly 50257 entries (``<|endoftext|>`` last), then the 19
  paralinguistic tags as added tokens 50257..50275 (``added_tokens.json``), as in
  ``ResembleAI/chatterbox-turbo``, and the fast ``tokenizer.json`` transformers converts
  them into. The merges are letter pairs, not GPT-2's: ids differ from
  the real tokenizer, the structure (and the tags' ids) do not.
- Multilingual: a grapheme tokenizer (``tokenizers`` BPE, like the English one) of exactly
  2454 entries: the special tokens, ``[START]`` = 255, the 23 ``[xx]`` language tokens, the
  ``[cj_*]`` Cangjie code tokens, ASCII and the letters of the supported scripts; and a small
  ``Cangjie5_TC.json`` table (word, tab, code) for the commonest CJK ideographs.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.models.families import MULTILINGUAL_LANGUAGES, TURBO_TAGS

GPT2_BASE_VOCAB = 50257
MULTILINGUAL_VOCAB = 2454
START_TEXT_ID = 255
_SPECIAL = ("[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]")
_CJK_FIRST = 0x4E00
CANGJIE_ENTRIES = 400


def write_turbo_tokenizer(directory: Path) -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    first = ["Ġ", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    order = first + [c for c in alphabet if c not in first]
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = []
    for a, b in itertools.product(order, order):
        if len(vocab) == GPT2_BASE_VOCAB - 1:
            break
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = GPT2_BASE_VOCAB - 1
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {tag: GPT2_BASE_VOCAB + i for i, tag in enumerate(TURBO_TAGS)}
    (directory / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 8196, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    # transformers converts vocab + merges into a fast tokenizer on every load (~10 s on
    # CPU); the converted one, saved as tokenizer.json, loads in a fraction of that.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))


def grapheme_tokenizer_json(tokens: Iterable[str], size: int, specials: Sequence[str], pair_alphabet: str) -> str:
    """A ``tokenizers`` BPE tokenizer.json of exactly ``size`` entries laid out like upstream's
    grapheme tokenizers: ``tokens`` in order (``[STOP]`` first), ``[START]`` at id 255, then
    letter pairs of ``pair_alphabet`` as merges until ``size``; ``specials`` are added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in tokens:
        if len(vocab) == START_TEXT_ID:
            vocab["[START]"] = START_TEXT_ID
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    pairs = ((a, b) for a in pair_alphabet for b in pair_alphabet)
    while len(vocab) < size:
        if len(vocab) == START_TEXT_ID:
            vocab["[START]"] = START_TEXT_ID
            continue
        a, b = next(pairs)
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    assert len(vocab) == size and vocab["[START]"] == START_TEXT_ID and vocab["[STOP]"] == 0
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t) for t in (*specials, "[START]")])
    return tokenizer.to_str()


def multilingual_tokenizer_json() -> str:
    specials = [*_SPECIAL, *(f"[{code}]" for code in MULTILINGUAL_LANGUAGES)]
    specials += [f"[cj_{c}]" for c in string.ascii_lowercase + string.digits + "."]
    letters = [*string.printable[:94]]
    ranges = ((0xC0, 0x17F), (0x300, 0x36F), (0x391, 0x3CE), (0x400, 0x44F), (0x5D0, 0x5EA), (0x620, 0x64A),
              (0x900, 0x97F), (0x3041, 0x3096), (0x30A1, 0x30FA), (0x1100, 0x1112), (0x1161, 0x1175), (0x11A8, 0x11C2))  # fmt: skip
    letters += [chr(c) for start, end in ranges for c in range(start, end + 1)]
    return grapheme_tokenizer_json([*specials, *letters], MULTILINGUAL_VOCAB, specials, string.ascii_letters)


def cangjie_table_json() -> str:
    """``["<ideograph>\\t<code>", ...]``: pseudo Cangjie codes (letters a-y) for the
    :data:`CANGJIE_ENTRIES` first CJK ideographs, some codes shared (upstream numbers those)."""
    entries = []
    for i in range(CANGJIE_ENTRIES):
        code = string.ascii_lowercase[i % 25] + string.ascii_lowercase[(i // 25) % 25] * (1 + i % 2)
        entries.append(f"{chr(_CJK_FIRST + i)}\t{code}")
    return json.dumps(entries, ensure_ascii=False)

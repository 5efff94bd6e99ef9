"""Dummy weights as a real checkpoint directory: the upstream architecture, random values.

Like vLLM's ``load_format="dummy"``, but written to disk once so that dummy mode then runs the
very loading code real weights go through (:func:`gateway.engine.checkpoint.components.load_components`).
The directory holds all of :data:`~gateway.engine.checkpoint.layout.CHECKPOINT_FILES`:

- ``t3_cfg.safetensors``, ``s3gen.safetensors``, ``ve.safetensors``: the modules built with
  ``torch.manual_seed(dummy_seed)`` (same seed, same weights, on any machine);
- ``tokenizer.json``: a valid English tokenizer of 704 entries laid out like the real one
  (``[STOP]`` = 0, ``[START]`` = 255, ``[SPACE]``, ``[UNK]``, printable ASCII, letter pairs);
- ``conds.pt``: the built-in voice, computed by these random modules from a synthetic
  4-second voiced clip, so dummy mode has a checkpoint voice as real weights do.

It lives in ``<cache_dir>/dummy/`` keyed by seed and upstream package version, is written to a
temporary directory and renamed into place (concurrent writers cannot leave half of one), and
is reused on later starts: ~20 s and 3.2 GB once, then nothing.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gateway.engine.checkpoint.layout import CHECKPOINT_FILES, validate_checkpoint_dir
from gateway.settings import Settings

ENGLISH_VOCAB_SIZE = 704
START_TEXT_ID = 255
SPECIAL_TOKENS = ("[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]")
DUMMY_CLIP_SECONDS = 4.0
"""Short on purpose: S3Gen's cost grows with the reference length, and tests run on CPU."""


def dummy_checkpoint_path(settings: Settings) -> Path:
    try:
        upstream = version("videopython-chatterbox")
    except PackageNotFoundError:
        upstream = "unknown"
    return Path(settings.cache_dir) / "dummy" / f"seed{settings.dummy_seed}-chatterbox-{upstream}"


def materialize_dummy_checkpoint(settings: Settings) -> Path:
    """The dummy checkpoint directory for ``settings.dummy_seed``, written if not there yet."""
    target = dummy_checkpoint_path(settings)
    if all((target / name).is_file() for name in CHECKPOINT_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _write_checkpoint(staging, settings.dummy_seed)
        if target.exists():  # a stale partial directory; a complete one was returned above
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not all((target / name).is_file() for name in CHECKPOINT_FILES):
                raise  # nobody else finished one either
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return validate_checkpoint_dir(target)


def tokenizer_json() -> str:
    """A ``tokenizers`` BPE tokenizer.json with exactly :data:`ENGLISH_VOCAB_SIZE` entries."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for char in string.printable[:94]:  # digits, letters, punctuation (no whitespace)
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    pairs = ((a, b) for a in string.ascii_lowercase for b in string.ascii_lowercase)
    while len(vocab) < ENGLISH_VOCAB_SIZE:
        if len(vocab) == START_TEXT_ID:
            vocab["[START]"] = START_TEXT_ID
            continue
        a, b = next(pairs)
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    assert len(vocab) == ENGLISH_VOCAB_SIZE and vocab["[START]"] == START_TEXT_ID and vocab["[STOP]"] == 0
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t) for t in (*SPECIAL_TOKENS, "[START]")])
    return tokenizer.to_str()


def synthetic_clip(seed: int, seconds: float = DUMMY_CLIP_SECONDS, sample_rate: int = 24_000):
    """A voiced, syllable-like test signal: harmonics of a gliding pitch under a 4 Hz envelope."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 110 + 30 * np.sin(2 * np.pi * 0.7 * t) + rng.uniform(-5, 5)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) ** 2
    wav = 0.2 * voiced * envelope + 0.003 * rng.standard_normal(t.size)
    return (wav / np.abs(wav).max() * 0.5).astype(np.float32)


def _write_checkpoint(directory: Path, seed: int) -> None:
    import torch
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.voice_encoder import VoiceEncoder
    from safetensors.torch import save_file

    from gateway.engine.checkpoint.components import conditionals_from_wav, save_conditionals

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t3, s3gen, ve = T3().eval(), S3Gen().eval(), VoiceEncoder().eval()
    for name, module in (("t3_cfg", t3), ("s3gen", s3gen), ("ve", ve)):
        state = {key: value.contiguous() for key, value in module.state_dict().items()}
        save_file(state, str(directory / f"{name}.safetensors"))
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    conds = conditionals_from_wav(s3gen, ve, t3, synthetic_clip(seed), torch.device("cpu"))
    save_conditionals(conds, directory / "conds.pt")
    (directory / "README.txt").write_text(
        f"Dummy Chatterbox checkpoint: upstream architecture, random weights (torch seed {seed}).\n"
        "Made by chatterbox-gateway for tests and benchmarks; its speech is noise.\n",
        encoding="utf-8",
    )

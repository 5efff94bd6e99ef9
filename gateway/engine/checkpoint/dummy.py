"""Dummy weights as a real checkpoint directory: the upstream architecture, random values.

Like vLLM's ``load_format="dummy"``, but written to disk once so that dummy mode then runs the
very loading code real weights go through (:func:`gateway.engine.checkpoint.components.load_components`).
One directory per model family holds all of the family's ``checkpoint_files``, in the formats
upstream loads them from:

- T3, S3Gen, voice encoder: the family's modules (:mod:`~gateway.engine.checkpoint.modules`)
  built under ``torch.manual_seed(dummy_seed)`` (same seed, same weights, on any machine);
- tokenizer files: the original's ``tokenizer.json`` is a valid English tokenizer of 704
  entries laid out like the real one (``[STOP]`` = 0, ``[START]`` = 255, ``[SPACE]``,
  ``[UNK]``, printable ASCII, letter pairs); Turbo's and Multilingual's are in
  :mod:`~gateway.engine.checkpoint.dummy_text`;
- ``conds.pt``: the built-in voice, computed by these random modules from a synthetic
  4-second voiced clip, so dummy mode has a checkpoint voice as real weights do.

It lives in ``<cache_dir>/dummy/`` keyed by seed, family and upstream package version, is
written to a temporary directory and renamed into place (concurrent writers cannot leave half
of one), and is reused on later starts. Once per seed: original ~20 s and 3.0 GB, Turbo
~25 s and 2.5 GB (GPT-2 keeps its unused 50276-row token table, as upstream's file does),
Multilingual ~20 s and 3.0 GB (fp32, as upstream). Turbo's ``ve.safetensors`` is the
original's (a hard link when the original's dummy exists: the same file name, format and
architecture); S3Gen is not shared (Turbo's is the mean-flow variant, Multilingual's is
stored as ``s3gen.pt``, a format upstream reads differently).
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gateway.engine.checkpoint.layout import validate_checkpoint_dir
from gateway.models.families import FAMILIES, ORIGINAL, Family
from gateway.settings import Settings

ENGLISH_VOCAB_SIZE = 704
START_TEXT_ID = 255
SPECIAL_TOKENS = ("[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]")
DUMMY_CLIP_SECONDS = 4.0
"""Short on purpose: S3Gen's cost grows with the reference length, and tests run on CPU."""


def dummy_checkpoint_path(settings: Settings, family: Family = FAMILIES[ORIGINAL]) -> Path:
    try:
        upstream = version("videopython-chatterbox")
    except PackageNotFoundError:
        upstream = "unknown"
    return Path(settings.cache_dir) / "dummy" / f"seed{settings.dummy_seed}-{family.id}-{upstream}"


def materialize_dummy_checkpoint(settings: Settings, family: Family = FAMILIES[ORIGINAL]) -> Path:
    """The dummy checkpoint directory of ``family`` for ``settings.dummy_seed``, written if
    not there yet."""
    files = family.checkpoint_files
    target = dummy_checkpoint_path(settings, family)
    if all((target / name).is_file() for name in files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _write_checkpoint(staging, settings.dummy_seed, family, dummy_checkpoint_path(settings))
        if target.exists():  # a stale partial directory; a complete one was returned above
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not all((target / name).is_file() for name in files):
                raise  # nobody else finished one either
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return validate_checkpoint_dir(target, family)


def tokenizer_json() -> str:
    """A ``tokenizers`` BPE tokenizer.json with exactly :data:`ENGLISH_VOCAB_SIZE` entries."""
    from gateway.engine.checkpoint.dummy_text import grapheme_tokenizer_json

    tokens = [*SPECIAL_TOKENS, *string.printable[:94]]  # digits, letters, punctuation (no whitespace)
    return grapheme_tokenizer_json(tokens, ENGLISH_VOCAB_SIZE, SPECIAL_TOKENS, string.ascii_lowercase)


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


def _write_checkpoint(directory: Path, seed: int, family: Family, original_dir: Path) -> None:
    import torch

    from gateway.engine.checkpoint import dummy_text
    from gateway.engine.checkpoint.components import conditionals_from_wav, save_conditionals
    from gateway.engine.checkpoint.modules import build_s3gen, build_t3, build_voice_encoder, save_state

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t3, s3gen, ve = build_t3(family).eval(), build_s3gen(family).eval(), build_voice_encoder().eval()
    save_state(t3, directory / family.t3_file)
    save_state(s3gen, directory / family.s3gen_file)
    shared_ve = original_dir / FAMILIES[ORIGINAL].ve_file
    if family.ve_file == shared_ve.name and family.id != ORIGINAL and _linked(shared_ve, directory / family.ve_file):
        ve = _load_voice_encoder(shared_ve)
    else:
        save_state(ve, directory / family.ve_file)
    write_tokenizer(directory, family)
    if family.front_end == "gpt2":
        del t3.tfmr.wte  # as the loader does after loading the file (which keeps it)
    conds = conditionals_from_wav(s3gen, ve, t3, synthetic_clip(seed), torch.device("cpu"), family=family)
    save_conditionals(conds, directory / "conds.pt")
    (directory / "README.txt").write_text(
        f"Dummy {family.id} checkpoint: upstream architecture, random weights (torch seed {seed}).\n"
        "Made by chatterbox-gateway for tests and benchmarks; its speech is noise.\n",
        encoding="utf-8",
    )


def write_tokenizer(directory: Path, family: Family) -> None:
    """The family's text tokenizer files, as its dummy checkpoint holds them."""
    from gateway.engine.checkpoint import dummy_text

    if family.front_end == "gpt2":
        dummy_text.write_turbo_tokenizer(directory)
    elif family.front_end == "multilingual":
        (directory / family.tokenizer_files[0]).write_text(dummy_text.multilingual_tokenizer_json(), encoding="utf-8")
        (directory / "Cangjie5_TC.json").write_text(dummy_text.cangjie_table_json(), encoding="utf-8")
    else:
        (directory / family.tokenizer_files[0]).write_text(tokenizer_json(), encoding="utf-8")


def _linked(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # absent, or another file system: write our own
        return False
    return True


def _load_voice_encoder(path: Path):  # noqa: ANN202 - upstream type, imported lazily
    from gateway.engine.checkpoint.modules import build_voice_encoder, load_state

    ve = build_voice_encoder()
    ve.load_state_dict(load_state(path))
    return ve.eval()

"""What a checkpoint directory holds, and the check that one is complete.

Shared by every way of getting weights (:mod:`gateway.engine.checkpoint.weights` for the Hub
and local directories, :mod:`gateway.engine.checkpoint.dummy` for random ones), so the dummy
path is validated exactly like a real download.
"""

from __future__ import annotations

from pathlib import Path

from gateway.errors import WeightsUnavailableError
from gateway.models.families import FAMILIES, ORIGINAL, Family

CHECKPOINT_FILES = FAMILIES[ORIGINAL].checkpoint_files
"""The original's files (upstream ``ChatterboxTTS.from_pretrained``); every family declares
its own in :mod:`gateway.models.families`."""

WHAT_TO_DO = (
    "Run `chatterbox-gateway download` (with the same --models) on a machine that can reach the "
    "Hugging Face Hub (it fills the cache under --cache-dir), or pass --load-format local with "
    "--model-path DIR (and --turbo-model-path / --multilingual-model-path for those models) holding "
    "each model's files (the original's: " + ", ".join(CHECKPOINT_FILES) + "; docs/models.md lists "
    "the others), or start with --load-format dummy for random weights (tests and benchmarks only: "
    "the speech is noise)."
)


def validate_checkpoint_dir(path: Path, family: Family = FAMILIES[ORIGINAL]) -> Path:
    """``path`` resolved, if it is a directory holding every checkpoint file of ``family``."""
    if not path.is_dir():
        raise WeightsUnavailableError(f"model path {str(path)!r} is not a directory. " + WHAT_TO_DO)
    missing = [name for name in family.checkpoint_files if not (path / name).is_file()]
    if missing:
        raise WeightsUnavailableError(
            f"model path {str(path)!r} lacks {', '.join(missing)} ({family.id}). " + WHAT_TO_DO
        )
    return path.resolve()

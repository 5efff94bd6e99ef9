"""What a checkpoint directory holds, and the check that one is complete.

Shared by every way of getting weights (:mod:`gateway.engine.checkpoint.weights` for the Hub
and local directories, :mod:`gateway.engine.checkpoint.dummy` for random ones), so the dummy
path is validated exactly like a real download.
"""

from __future__ import annotations

from pathlib import Path

from gateway.errors import WeightsUnavailableError

CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
"""The files upstream ``ChatterboxTTS.from_pretrained`` fetches and ``from_local`` reads."""

WHAT_TO_DO = (
    "Run `chatterbox-gateway download` on a machine that can reach the Hugging Face Hub "
    "(it fills the cache under --cache-dir), or pass --model-path DIR --load-format local with a "
    "directory holding " + ", ".join(CHECKPOINT_FILES) + ", or start with --load-format dummy "
    "for random weights (tests and benchmarks only: the speech is noise)."
)


def validate_checkpoint_dir(path: Path) -> Path:
    """``path`` resolved, if it is a directory holding every checkpoint file."""
    if not path.is_dir():
        raise WeightsUnavailableError(f"model path {str(path)!r} is not a directory. " + WHAT_TO_DO)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise WeightsUnavailableError(
            f"model path {str(path)!r} lacks {', '.join(missing)}. " + WHAT_TO_DO
        )
    return path.resolve()

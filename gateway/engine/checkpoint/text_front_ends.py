"""Text -> T3 text ids, per family, with upstream's tokenizers (``chatterbox.models.tokenizers``
and Turbo's GPT-2 tokenizer through ``transformers.AutoTokenizer``).

- english (original): ``EnTokenizer``; ids framed by start/stop text tokens.
- gpt2 (Turbo): GPT-2 BPE with the paralinguistic tags as added tokens; no framing (upstream
  ``inference_turbo`` feeds the ids as they are).
- multilingual: ``MTLTokenizer``: lower-cased, NFKD, the language's front end (zh: pkuseg
  word segmentation and Cangjie codes; ja: kana via pykakasi; ko: jamo; he: diacritics via
  dicta-onnx; ru: stress marks via russian-text-stresser), a ``[xx]`` language prefix; framed
  by start/stop.

Upstream's Chinese converter reaches the network when built (``hf_hub_download`` of the
Cangjie table, pkuseg's model download). We read the table from the checkpoint directory and
use pkuseg only when its model is already installed (``$PKUSEG_HOME``, default
``~/.pkuseg``); without it Chinese is tokenized without word boundaries. Hebrew and Russian
front ends need packages that fetch models of their own; without them upstream (and we) skip
that step with a warning. Nothing here downloads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol

import structlog

from gateway.models.families import Family

START_TEXT = 255
STOP_TEXT = 0
_PATCH_LOCK = threading.Lock()


class TextFrontEnd(Protocol):
    tokenizer: Any

    def ids(self, text: str, language: str) -> list[int]:
        """The T3 text ids of one chunk, framed as the family's T3 expects."""

    def count(self, text: str, language: str) -> int:
        """Text tokens of ``text`` without framing (usage accounting, chunk limits)."""


class EnglishFrontEnd:
    def __init__(self, directory: Path, family: Family) -> None:
        from chatterbox.models.tokenizers import EnTokenizer

        self.tokenizer = EnTokenizer(str(directory / family.tokenizer_files[0]))

    def ids(self, text: str, language: str) -> list[int]:
        return [START_TEXT, *self.tokenizer.encode(text), STOP_TEXT]

    def count(self, text: str, language: str) -> int:
        return len(self.tokenizer.encode(text))


class Gpt2FrontEnd:
    def __init__(self, directory: Path, family: Family) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    def ids(self, text: str, language: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def count(self, text: str, language: str) -> int:
        return len(self.ids(text, language))


class MultilingualFrontEnd:
    def __init__(self, directory: Path, family: Family) -> None:
        from chatterbox.models.tokenizers import tokenizer as upstream

        converter = _local_cangjie_converter(upstream, directory / "Cangjie5_TC.json")
        with _PATCH_LOCK:  # MTLTokenizer builds its converter by this module-level name
            original, upstream.ChineseCangjieConverter = upstream.ChineseCangjieConverter, converter
            try:
                self.tokenizer = upstream.MTLTokenizer(str(directory / family.tokenizer_files[0]))
            finally:
                upstream.ChineseCangjieConverter = original

    def ids(self, text: str, language: str) -> list[int]:
        return [START_TEXT, *self.tokenizer.encode(text, language_id=language), STOP_TEXT]

    def count(self, text: str, language: str) -> int:
        return len(self.tokenizer.encode(text, language_id=language))


def _local_cangjie_converter(upstream: Any, table: Path) -> Any:
    """Upstream's ``ChineseCangjieConverter`` with its table read from ``table`` and pkuseg
    used only when its model is installed."""
    base = upstream.ChineseCangjieConverter

    class LocalCangjieConverter(base):  # type: ignore[misc, valid-type]
        def _load_cangjie_mapping(self, model_dir: Any = None) -> None:
            fetch, upstream.hf_hub_download = upstream.hf_hub_download, lambda **_: str(table)
            try:
                super()._load_cangjie_mapping(model_dir)
            finally:
                upstream.hf_hub_download = fetch

        def _init_segmenter(self) -> None:
            home = Path(os.path.expanduser(os.getenv("PKUSEG_HOME", "~/.pkuseg")))
            if (home / "spacy_ontonotes").is_dir():
                super()._init_segmenter()
                return
            structlog.get_logger("gateway.engine").warning(
                "chinese_segmenter_missing", pkuseg_home=str(home), effect="Chinese without word boundaries"
            )
            self.segmenter = None

    return LocalCangjieConverter


_FRONT_ENDS = {"english": EnglishFrontEnd, "gpt2": Gpt2FrontEnd, "multilingual": MultilingualFrontEnd}


def load_front_end(directory: Path, family: Family) -> TextFrontEnd:
    return _FRONT_ENDS[family.front_end](directory, family)

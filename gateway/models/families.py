"""The model registry: every Chatterbox family we can serve, declared as data.

A family says where its weights are (Hub repository, pinned revision, checkpoint files), how
its text is read (front end, languages, paralinguistic tags), which request controls it
honours, its generation defaults (upstream's ``generate()`` defaults) and what it costs.
Nothing here imports torch: the HTTP layer reads this module to validate requests and to
list models, the engines read it to load and drive the upstream classes.

Facts from upstream ``chatterbox`` 0.1.7 (``tts.py``, ``tts_turbo.py``, ``mtl_tts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

ORIGINAL = "chatterbox"
TURBO = "chatterbox-turbo"
MULTILINGUAL = "chatterbox-multilingual"

FrontEnd = Literal["english", "gpt2", "multilingual"]

ALL_CONTROLS = ("exaggeration", "cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty", "seed")

TURBO_TAGS: tuple[str, ...] = (
    # Turbo's added tokens (ids 50257..50275 after GPT-2's 50257), in id order: ten delivery
    # tags, then nine vocal sounds.
    "[angry]", "[fear]", "[surprised]", "[whispering]", "[advertisement]", "[dramatic]",
    "[narration]", "[crying]", "[happy]", "[sarcastic]",
    "[clear throat]", "[sigh]", "[shush]", "[cough]", "[groan]", "[sniff]", "[gasp]",
    "[chuckle]", "[laugh]",
)  # fmt: skip
"""The paralinguistic tags: ``added_tokens.json`` of ``ResembleAI/chatterbox-turbo``."""

MULTILINGUAL_LANGUAGES: tuple[str, ...] = (
    "ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja", "ko", "ms", "nl",
    "no", "pl", "pt", "ru", "sv", "sw", "tr", "zh",
)  # fmt: skip
"""ISO 639-1 codes of upstream ``mtl_tts.SUPPORTED_LANGUAGES``."""


@dataclass(frozen=True, slots=True)
class Family:
    id: str
    description: str
    hub_repo: str
    hub_revision: str
    """A commit of ``hub_repo``, never a branch: the bytes we load do not move."""
    t3_file: str
    s3gen_file: str
    ve_file: str
    tokenizer_files: tuple[str, ...]
    extra_files: tuple[str, ...] = ()
    """Needed by the text front end besides the tokenizer (Multilingual: Cangjie table)."""
    optional_files: tuple[str, ...] = ()
    """Downloaded when the repository has them; a checkpoint directory may lack them."""
    front_end: FrontEnd = "english"
    languages: tuple[str, ...] = ("en",)
    tags: tuple[str, ...] = ()
    """Paralinguistic tags its tokenizer knows; other families have them removed."""
    honoured: tuple[str, ...] = ALL_CONTROLS
    defaults: MappingProxyType[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Upstream ``generate()`` defaults for the controls a request leaves out."""
    cfg: bool = True
    """T3 runs a conditional/unconditional pair (classifier-free guidance)."""
    meanflow: bool = False
    """S3Gen's distilled mean-flow decoder (a fixed, small number of steps, no flow CFG)."""
    flow_steps: int | None = None
    """Fixed S3Gen steps; None: the ``flow_steps`` setting."""
    silence_tail_tokens: int = 0
    """S3Gen silence tokens appended to each chunk's speech before vocoding (upstream Turbo's
    ``generate()``: 3, ~0.12 s); the audio holds them, usage never counts them."""
    clip_loudness_lufs: float | None = None
    """Reference clips are loudness-normalised to this before conditioning (Turbo)."""
    prompt_clip_seconds: int = 6
    """Seconds of the reference clip (16 kHz) turned into T3's speech prompt."""
    cost: str = ""

    @property
    def checkpoint_files(self) -> tuple[str, ...]:
        """Every file a checkpoint directory of this family must hold."""
        return (self.ve_file, self.t3_file, self.s3gen_file, *self.tokenizer_files, *self.extra_files, "conds.pt")

    @property
    def ignored(self) -> tuple[str, ...]:
        """Controls a request may send that this family accepts and ignores."""
        return tuple(name for name in ALL_CONTROLS if name not in self.honoured)

    @property
    def multilingual(self) -> bool:
        return len(self.languages) > 1


_ORIGINAL_DEFAULTS = MappingProxyType(
    {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8, "top_p": 1.0, "min_p": 0.05, "repetition_penalty": 1.2}
)

FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {
        ORIGINAL: Family(
            id=ORIGINAL,
            description="The original English Chatterbox: Llama T3 (0.5B) with CFG and exaggeration, 10-step S3Gen.",
            hub_repo="ResembleAI/chatterbox",
            hub_revision="5bb1f6ee58e50c3b8d408bc82a6d3740c2db6e18",
            t3_file="t3_cfg.safetensors",
            s3gen_file="s3gen.safetensors",
            ve_file="ve.safetensors",
            tokenizer_files=("tokenizer.json",),
            defaults=_ORIGINAL_DEFAULTS,
            cost="T3 runs twice per token (CFG); S3Gen runs `flow_steps` flow steps, each twice (flow CFG).",
        ),
        TURBO: Family(
            id=TURBO,
            description="Chatterbox Turbo (English): GPT-2 medium T3 (350M) without CFG, 2-step mean-flow S3Gen, "
            "paralinguistic tags such as [laugh] and [cough].",
            hub_repo="ResembleAI/chatterbox-turbo",
            hub_revision="749d1c1a46eb10492095d68fbcf55691ccf137cd",
            t3_file="t3_turbo_v1.safetensors",
            s3gen_file="s3gen_meanflow.safetensors",
            ve_file="ve.safetensors",
            tokenizer_files=("vocab.json", "merges.txt", "tokenizer_config.json"),
            optional_files=("added_tokens.json", "special_tokens_map.json", "tokenizer.json"),
            front_end="gpt2",
            tags=TURBO_TAGS,
            honoured=("temperature", "top_p", "repetition_penalty", "seed"),
            defaults=MappingProxyType({"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.2}),
            cfg=False,
            meanflow=True,
            flow_steps=2,
            silence_tail_tokens=3,
            clip_loudness_lufs=-27.0,
            prompt_clip_seconds=15,
            cost="T3 runs once per token (no CFG, 24 layers); S3Gen runs 2 mean-flow steps without CFG: "
            "the cheapest family.",
        ),
        MULTILINGUAL: Family(
            id=MULTILINGUAL,
            description="Chatterbox Multilingual: the original's Llama T3 with a 23-language text vocabulary "
            "and a language prefix, 10-step S3Gen.",
            hub_repo="ResembleAI/chatterbox",
            hub_revision="5bb1f6ee58e50c3b8d408bc82a6d3740c2db6e18",
            t3_file="t3_mtl23ls_v2.safetensors",
            s3gen_file="s3gen.pt",
            ve_file="ve.pt",
            tokenizer_files=("grapheme_mtl_merged_expanded_v1.json",),
            extra_files=("Cangjie5_TC.json",),
            front_end="multilingual",
            languages=MULTILINGUAL_LANGUAGES,
            defaults=MappingProxyType({**_ORIGINAL_DEFAULTS, "repetition_penalty": 2.0}),
            cost="As the original (CFG in T3 and S3Gen); its text front end adds per-language work "
            "(Chinese segmentation and Cangjie codes, Japanese kana, Korean jamo).",
        ),
    }
)

TOP_K: MappingProxyType[str, int] = MappingProxyType({TURBO: 1000})
"""Top-k sampling where upstream applies it (Turbo only; not a request control)."""


def family(model_id: str) -> Family:
    """The family with this canonical id (KeyError for others: callers resolve names first)."""
    return FAMILIES[model_id]

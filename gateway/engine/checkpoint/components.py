"""The upstream Chatterbox modules of one model family, loaded from a checkpoint directory,
and what both engines do with them outside the decode loop: voice conditionals, per-request
T3 conditioning, text tokens.

Everything here is upstream code (``chatterbox`` package: T3, S3Gen, VoiceEncoder, the
tokenizers, T3Cond, Conditionals, the Perth watermarker) driven the way upstream
``from_local`` / ``prepare_conditionals`` / ``generate`` of ``ChatterboxTTS``,
``ChatterboxTurboTTS`` and ``ChatterboxMultilingualTTS`` drive it, as reusable functions
rather than methods of one engine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chatterbox.models.s3gen import S3GEN_SR, S3Gen
from chatterbox.models.s3tokenizer import S3_SR
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.tts import Conditionals

try:  # transformers >= 5.x keeps it here; older releases in modeling_utils
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers.modeling_utils import no_init_weights

from gateway.engine.checkpoint.modules import build_s3gen, build_t3, build_voice_encoder, load_state
from gateway.engine.checkpoint.text_front_ends import TextFrontEnd, load_front_end
from gateway.errors import InvalidRequestError
from gateway.models.families import FAMILIES, ORIGINAL, Family
from gateway.observability.logging import prints_to_log

DEC_COND_SECONDS = 10
"""Seconds of the clip (at 24 kHz) S3Gen takes as its reference (upstream)."""
MIN_CLIP_SECONDS = 2.0
"""Shorter clips give the voice encoder too little to embed."""
MAX_CLIP_SECONDS = 60.0
"""Longer clips are cut here (only the voice encoder looks past the first 10 s)."""
MAX_CLIP_FILE_BYTES = 64 << 20
"""Largest clip file read whole for FFmpeg's decoders (formats libsndfile cannot read)."""
MAX_FOLDER_CLIP_SECONDS = 600.0
"""Longest such clip decoded (then cut to :data:`MAX_CLIP_SECONDS`); longer ones are refused."""


@dataclass(frozen=True, slots=True)
class Components:
    t3: T3
    s3gen: S3Gen
    ve: VoiceEncoder
    tokenizer: Any
    """The family's upstream tokenizer (``front_end.tokenizer``)."""
    watermarker: Any
    """A ``perth.PerthImplicitWatermarker`` (``apply_watermark(wav, sample_rate=)``)."""
    builtin_conditionals: Conditionals | None
    """The checkpoint's own voice (``conds.pt``), on ``device``."""
    device: torch.device
    family: Family = FAMILIES[ORIGINAL]
    front_end: TextFrontEnd | None = None
    """Text -> T3 ids for this family (None only in hand-built test objects: English)."""


def resolve_device(setting: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_components(checkpoint_dir: Path, device: str | torch.device, family: Family = FAMILIES[ORIGINAL]) -> Components:
    """Every module of one family's checkpoint directory, in eval mode on ``device`` (fp32,
    as upstream)."""
    device = torch.device(device)
    # T3 and the voice encoder are loaded strictly, so skipping their random init (7 s for
    # T3 on CPU) is safe: every parameter is overwritten or load_state_dict raises.
    with no_init_weights():
        t3 = build_t3(family)
        ve = build_voice_encoder()
    t3_state = load_state(checkpoint_dir / family.t3_file)
    if "model" in t3_state:  # upstream accepts this wrapped layout too
        t3_state = t3_state["model"][0]
    t3.load_state_dict(t3_state)
    del t3_state
    if t3.is_gpt:
        del t3.tfmr.wte  # as upstream: T3 feeds embeddings, GPT-2's token table is never used
    ve.load_state_dict(load_state(checkpoint_dir / family.ve_file))

    s3gen = build_s3gen(family)
    result = s3gen.load_state_dict(load_state(checkpoint_dir / family.s3gen_file), strict=False)
    # Upstream loads non-strictly because published checkpoints lack two derived buffers.
    unexpected_missing = set(result.missing_keys) - set(S3Gen.ignore_state_dict_missing)
    if unexpected_missing:
        raise RuntimeError(f"{family.s3gen_file} lacks {sorted(unexpected_missing)[:5]}")

    t3.to(device).eval()
    ve.to(device).eval()
    s3gen.to(device).eval()
    front_end = load_front_end(checkpoint_dir, family)
    builtin = None
    if (checkpoint_dir / "conds.pt").is_file():
        builtin = load_conditionals(checkpoint_dir / "conds.pt", device)
    watermarker = load_watermarker(device)
    return Components(t3, s3gen, ve, front_end.tokenizer, watermarker, builtin, device, family, front_end)


def load_watermarker(device: str | torch.device) -> Any:
    """Perth's implicit watermarker on ``device`` with its network frozen (eval mode, no
    parameter requiring a gradient).

    Upstream's ``apply_watermark`` runs the network without ``torch.no_grad``: with trainable
    parameters each call records an autograd graph, and the activations it saves for a
    backward pass that never comes stayed alive after the call returned (a CUDA memory
    snapshot of a 60 s load test on an H100: ~90 passes' encoder activations, +380 MiB; on
    the CPU every call's). Frozen, no graph is recorded and nothing outlives the call."""
    import perth

    with prints_to_log("gateway.engine"):  # perth prints "loaded PerthNet ..." on load
        watermarker = perth.PerthImplicitWatermarker(device=str(device))
    watermarker.perth_net.eval().requires_grad_(False)
    return watermarker


def load_clip(path: Path) -> np.ndarray:
    """A reference clip as mono float32 at 24 kHz, at most :data:`MAX_CLIP_SECONDS` long.

    What libsndfile reads (WAV, FLAC, Ogg, MP3) is read as upstream reads it
    (``librosa.load``). The other formats a voices folder may hold (AAC/M4A/MP4, WebM,
    Opus in Matroska, ...) are decoded with FFmpeg's libraries through PyAV, in the same
    bounded child as an upload (:func:`gateway.voices.clip_probe.decode_clip`): librosa's
    fallback for them (audioread) needs a system FFmpeg or GStreamer and is deprecated."""
    import librosa
    import soundfile

    try:
        soundfile.info(str(path))
    except Exception:  # noqa: BLE001 - libsndfile cannot read it: FFmpeg's decoders may
        wav = _decode_with_ffmpeg_libraries(path)
    else:
        try:
            wav, _ = librosa.load(str(path), sr=S3GEN_SR, mono=True, duration=MAX_CLIP_SECONDS)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for a bad file
            raise InvalidRequestError(f"the voice clip cannot be decoded as audio ({type(exc).__name__})",
                                      param="voice") from None
    seconds = len(wav) / S3GEN_SR
    if seconds < MIN_CLIP_SECONDS:
        raise InvalidRequestError(
            f"the voice clip is {seconds:.1f} s long; at least {MIN_CLIP_SECONDS:g} s is needed", param="voice"
        )
    return wav.astype(np.float32, copy=False)


def _decode_with_ffmpeg_libraries(path: Path) -> np.ndarray:
    from gateway.voices.clip_files import CLIP_SAMPLE_RATE, sniff_container
    from gateway.voices.clip_probe import DecodeLimits, decode_clip

    assert CLIP_SAMPLE_RATE == S3GEN_SR
    size = path.stat().st_size
    if size > MAX_CLIP_FILE_BYTES:
        raise InvalidRequestError(f"the voice clip is {size / 2**20:.0f} MiB; a clip file may have at most "
                                  f"{MAX_CLIP_FILE_BYTES >> 20} MiB (10 s of speech is what the model uses)",
                                  param="voice")
    data = path.read_bytes()
    container = sniff_container(data)
    if container is None:
        raise InvalidRequestError("the voice clip cannot be decoded as audio (not a supported audio file)",
                                  param="voice")
    try:
        # a folder's clip may be longer than an upload may be: decoded (bounded by its bytes
        # and the child's limits), then cut as librosa cuts the others
        samples = decode_clip(data, container, DecodeLimits(), max_seconds=MAX_FOLDER_CLIP_SECONDS)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"the voice clip cannot be decoded as audio ({exc.message})", param="voice") from None
    return samples[: int(MAX_CLIP_SECONDS * S3GEN_SR)]


@torch.inference_mode()
def conditionals_from_wav(
    s3gen: S3Gen,
    ve: VoiceEncoder,
    t3: T3,
    wav_24k: np.ndarray,
    device: torch.device,
    exaggeration: float = 0.5,
    family: Family = FAMILIES[ORIGINAL],
) -> Conditionals:
    """Upstream ``prepare_conditionals`` of ``family`` on audio already loaded at 24 kHz."""
    import librosa

    if family.clip_loudness_lufs is not None:
        wav_24k = normalise_loudness(wav_24k, family.clip_loudness_lufs)
    ref_16k = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)
    gen_ref = s3gen.embed_ref(wav_24k[: DEC_COND_SECONDS * S3GEN_SR], S3GEN_SR, device=device)
    prompt_tokens = None
    if prompt_len := t3.hp.speech_cond_prompt_len:
        prompt_tokens, _ = s3gen.tokenizer.forward([ref_16k[: family.prompt_clip_seconds * S3_SR]], max_len=prompt_len)
        prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)
    speaker = torch.from_numpy(ve.embeds_from_wavs([ref_16k], sample_rate=S3_SR))
    speaker = speaker.mean(axis=0, keepdim=True).to(device)
    t3_cond = T3Cond(
        speaker_emb=speaker,
        cond_prompt_speech_tokens=prompt_tokens,
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    ).to(device=device)
    return Conditionals(t3_cond, gen_ref)


def normalise_loudness(wav: np.ndarray, target_lufs: float) -> np.ndarray:
    """Upstream Turbo's ``norm_loudness``: gain to ``target_lufs`` integrated loudness; the
    clip unchanged when its loudness cannot be measured (silence)."""
    import pyloudnorm

    try:
        loudness = pyloudnorm.Meter(S3GEN_SR).integrated_loudness(wav)
    except ValueError:  # shorter than one gating block
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if not np.isfinite(gain) or gain <= 0.0:
        return wav
    return (wav * gain).astype(np.float32)


def compute_conditionals(components: Components, clip_path: Path, exaggeration: float = 0.5) -> Conditionals:
    """Voice conditionals from a clip (blocking: seconds on CPU; run it in a worker thread)."""
    wav = load_clip(clip_path)
    return conditionals_from_wav(
        components.s3gen, components.ve, components.t3, wav, components.device, exaggeration, components.family
    )


def save_conditionals(conditionals: Conditionals, path: Path) -> None:
    """Upstream ``Conditionals.save``, written atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        conditionals.save(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_conditionals(path: Path, device: str | torch.device) -> Conditionals:
    """Upstream ``Conditionals.load`` (tensors only, ``weights_only``), moved to ``device``."""
    return Conditionals.load(path, map_location="cpu").to(torch.device(device))


def request_t3_cond(conditionals: Conditionals, exaggeration: float) -> T3Cond:
    """A fresh T3Cond for one request: the voice's tensors with this request's exaggeration.

    Upstream ``T3.prepare_conditioning`` caches the prompt embedding *in* the T3Cond it is
    given, so the cached voice object is never handed to T3 itself.
    """
    cond = conditionals.t3
    device = cond.speaker_emb.device
    return T3Cond(
        speaker_emb=cond.speaker_emb,
        clap_emb=cond.clap_emb,
        cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens,
        cond_prompt_speech_emb=None,
        emotion_adv=torch.full((1, 1, 1), float(exaggeration), dtype=cond.speaker_emb.dtype, device=device),
    )


def text_token_ids(tokenizer: Any, t3: T3, text: str) -> torch.Tensor:
    """(1, n + 2) long tensor: start-of-text, the text's tokens, end-of-text (as upstream)."""
    ids = tokenizer.encode(text)
    return torch.tensor([[t3.hp.start_text_token, *ids, t3.hp.stop_text_token]], dtype=torch.long)


def count_text_tokens(tokenizer: Any, text: str) -> int:
    """Text tokens of ``text`` (usage accounting), without the start/stop tokens."""
    return len(tokenizer.encode(text))


def max_text_tokens(t3: T3) -> int:
    """Most text tokens one chunk may have (T3's learned text positions, minus start/stop)."""
    return t3.hp.max_text_tokens


def chunk_text_ids(components: Components, text: str, language: str) -> torch.Tensor:
    """(1, n) long tensor: one chunk's T3 text ids, framed as the family expects."""
    front_end = components.front_end
    if front_end is None:  # hand-built English components
        return text_token_ids(components.tokenizer, components.t3, text)
    return torch.tensor([front_end.ids(text, language)], dtype=torch.long)


def count_chunk_tokens(components: Components, text: str, language: str) -> int:
    """Text tokens of one chunk (usage accounting, the T3 text limit), without framing."""
    if components.front_end is None:
        return count_text_tokens(components.tokenizer, text)
    return components.front_end.count(text, language)

"""One vocoder loop for every stream: S3Gen run on batches of token windows.

What an engine calls (event-loop thread only)::

    vocoder = Vocoder(s3gen, settings, device="cuda", flow_dtype=torch.bfloat16)
    await vocoder.start()
    stream = vocoder.open_stream(voice.key, ref_dict)   # ref_dict = Conditionals.gen
    stream.push([1234, 87, ...])      # speech tokens as T3 yields them (ids >= 6561 dropped)
    stream.finish()                   # no more tokens: the tail is flushed (finalize=True)
    async for samples in stream.audio():   # float32 numpy arrays, 24 kHz, in order
        ...
    stream.cancel()                   # or close the audio() iterator: pending windows dropped
    samples = await vocoder.vocode(voice.key, ref_dict, tokens)  # whole utterance, one window
    await vocoder.close()

``open_stream(..., one_shot=True)`` vocodes the whole utterance as one window once it is
finished (non-streaming requests: identical to upstream ``S3Gen.inference`` given the same
noise, still batched with other streams). Otherwise the stream is cut into windows by
:mod:`gateway.engine.vocoder_windows` (a small first window for a fast first byte, then
larger ones, joined by left context, lookahead and a crossfade).

One asyncio task collects the ready windows of ALL streams (first windows first, then the
longest-waiting), up to ``settings.vocoder_max_batch`` rows and ``max_batch_tokens`` padded
flow tokens, and runs them as one batch on a dedicated worker thread (torch releases the
GIL). A stream has at most one window in flight; a cancelled stream's results are dropped.
A stream whose reference dict cannot be prepared fails alone (``EngineError`` from
``audio()``); a batch that fails fails its streams and the loop keeps serving.
``Vocoder.stats`` counts batches and rows for the metrics layer; ``on_batch`` is called with
each batch's row count, padded tokens and seconds. The engine still applies the watermark
(``settings.watermark``) to what ``audio()`` yields, as upstream does after S3Gen.

Batching (:class:`S3GenBatch`) goes through upstream submodules, never ``S3Gen.inference``
(batch 1 only, and its ``finalize=False`` path fails on a mask length mismatch in
``CausalMaskedDiffWithXvec.inference``):

* Flow: each row is ``[voice prompt tokens | left context | window | lookahead]``, right
  padded to a bucketed length (a multiple of ``bucket_tokens``: a bounded set of shapes for
  compile/graphs). The Conformer encoder runs with key-padding masks; the one place where
  padding would leak is the pre-lookahead conv (a lone row reads ``F.pad`` zeros past its
  end, a padded row would read the embedded padding), so padded positions are zeroed before
  it. The CFM estimator is causal-conv + masked attention, so right padding cannot leak.
  Rows may use different voices (prompt lengths).
* Noise: upstream draws fresh ``randn_like`` noise per call (its ``rand_noise`` buffer is
  set to None), which makes batched != alone and streamed != one-shot. We use fixed noise
  tapes (:class:`NoiseTapes`): CFM noise indexed by [prompt frame | absolute stream frame],
  and the HiFT NSF source noise indexed by absolute stream sample, with the harmonic phases
  carried across windows. Streams are therefore deterministic and position-consistent.
* HiFT: non-causal convs and an iSTFT cannot be padded without leaking, so rows are grouped
  by exact mel length (windows of one size share it) and each group runs as a batch. The
  NSF excitation is computed here from upstream's SineGen parameters so that its noise comes
  from the tape; then ``HiFTGenerator.decode`` runs unchanged. HiFT always runs in fp32
  (cumulative phase, ``exp`` magnitudes and the iSTFT are precision sensitive; cuFFT has no
  bf16); the flow encoder and CFM estimator run in ``flow_dtype`` (bf16/fp16 on CUDA).
* Per voice (LRU keyed by the voice key): prompt token ids, the prompt mel on the device
  in the flow dtype, and the normalised and projected x-vector.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gateway.engine.base import SAMPLE_RATE
from gateway.engine.vocoder_windows import (
    SAMPLES_PER_FRAME,
    TOKEN_MEL_RATIO,
    SeamState,
    Window,
    WindowPolicy,
    next_window,
)
from gateway.errors import EngineError, EngineUnavailableError
from gateway.settings import Settings

SPEECH_VOCAB_SIZE = 6561
"""Valid S3 speech token ids are below this; T3's start/stop ids (6561, 6562) are not."""
MEL_BINS = 80


def _pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at valid positions, (B, max_len)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class StageTimer:
    """Wall time per named part of S3GenBatch's work (profiling only; off by default).

    With a CUDA device every section synchronises before and after, so each part's time is
    its own kernels' time, not the launch time; this serialises the GPU, so a timer belongs
    in a profiling run, never in serving (``S3GenBatch.timer`` is None there).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.seconds.clear()


@dataclass(frozen=True, slots=True)
class NoiseTapes:
    """Fixed noise, so a stream's audio does not depend on batching or windowing."""

    flow: torch.Tensor
    """(80, n) initial CFM noise: columns [0, prompt frames) for the prompt, then
    ``prompt frames + absolute stream frame`` (as a one-shot call slices one long draw)."""
    hift_phase: torch.Tensor
    """(harmonics,) initial phase of each NSF harmonic, the fundamental at 0 (as upstream)."""
    hift: torch.Tensor
    """(harmonics, n) unit normal NSF noise indexed by absolute stream sample."""

    @classmethod
    def generate(cls, seed: int, *, flow_frames: int, hift_samples: int, harmonics: int,
                 device: torch.device | str) -> NoiseTapes:
        gen = torch.Generator().manual_seed(seed)
        flow = torch.randn(MEL_BINS, flow_frames, generator=gen)
        phase = (torch.rand(harmonics, generator=gen) * 2 - 1) * math.pi
        phase[0] = 0.0
        hift = torch.randn(harmonics, hift_samples, generator=gen)
        return cls(flow.to(device), phase.to(device), hift.to(device))

    def flow_noise(self, prompt_frames: int, first_frame: int, frames: int) -> torch.Tensor:
        """(80, prompt_frames + frames) noise for a row whose generated part starts at
        absolute stream frame ``first_frame`` (the tape wraps around)."""
        dev = self.flow.device
        idx = torch.cat([torch.arange(prompt_frames, device=dev),
                         prompt_frames + first_frame + torch.arange(frames, device=dev)])
        return self.flow[:, idx % self.flow.shape[1]]

    def hift_noise(self, starts: Sequence[int], samples: int) -> torch.Tensor:
        """(rows, harmonics, samples) source noise from each row's absolute start sample."""
        dev = self.hift.device
        idx = torch.tensor(list(starts), device=dev)[:, None] + torch.arange(samples, device=dev)[None, :]
        return self.hift[:, idx % self.hift.shape[1]].permute(1, 0, 2)


@dataclass(frozen=True, slots=True)
class VoiceRef:
    """A voice's S3Gen reference, prepared once for the device and dtype."""

    prompt_tokens: torch.Tensor
    """(P,) int64 prompt speech token ids, on the CPU (rows are assembled there)."""
    prompt_feat: torch.Tensor
    """(80, 2P) prompt mel, on the device, flow dtype (the CFM's condition)."""
    speaker: torch.Tensor
    """(80,) normalised x-vector through ``spk_embed_affine_layer``, device, flow dtype."""

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_tokens.shape[0])


@dataclass(frozen=True, slots=True)
class FlowRow:
    voice: VoiceRef
    tokens: Sequence[int]
    """Stream tokens ``[context_start, input_end)`` of the window."""
    context_start: int
    new_tokens: int
    """Tokens whose mel this row commits: the last ones before the lookahead."""
    final: bool


@dataclass(frozen=True, slots=True)
class HiftRow:
    mel: torch.Tensor
    """(80, F) fp32: carried frames of the previous window, then this window's new frames."""
    start_frame: int
    """Absolute stream frame of ``mel[:, 0]``."""
    phase: torch.Tensor | None
    """(harmonics,) phase in cycles at the first sample; None at the stream start (zeros)."""
    carry: int
    """Trailing frames carried into the next window (the phase there is returned); 0: none."""


class S3GenBatch:
    """S3Gen (flow encoder + CFM decoder + HiFT) on padded batches of rows. Blocking; run it
    on one worker thread. Casts ``s3gen.flow`` to ``flow_dtype`` and HiFT to fp32 in place."""

    def __init__(self, s3gen: torch.nn.Module, *, device: torch.device | str, flow_dtype: torch.dtype,
                 flow_steps: int, tapes: NoiseTapes, bucket_tokens: int = 16) -> None:
        self.flow = s3gen.flow.to(device=device, dtype=flow_dtype)
        self.hift = s3gen.mel2wav.to(device=device, dtype=torch.float32)
        self.trim_fade = s3gen.trim_fade.detach().float().cpu().numpy()
        self.device = torch.device(device)
        self.dtype = flow_dtype
        self.flow_steps = flow_steps
        self.tapes = tapes
        self.bucket_tokens = bucket_tokens
        self.timer: StageTimer | None = None
        """Set to a :class:`StageTimer` to time the flow encoder, CFM decoder and HiFT."""
        self.lookahead = int(self.flow.pre_lookahead_len)
        enc = self.flow.encoder
        # _encode reproduces UpsampleConformerEncoder.forward for full-context inference only.
        if enc.static_chunk_size or enc.use_dynamic_chunk or enc.global_cmvn is not None or not enc.normalize_before:
            raise ValueError("unsupported flow encoder configuration for batched inference")
        if self.flow.token_mel_ratio != TOKEN_MEL_RATIO:
            raise ValueError("S3Gen token/mel ratio differs from the window planner's")

    def _section(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.timer is None else self.timer.section(name)

    def bucket(self, tokens: int) -> int:
        return -(-tokens // self.bucket_tokens) * self.bucket_tokens

    @torch.inference_mode()
    def prepare_voice(self, ref_dict: Mapping[str, Any]) -> VoiceRef:
        tokens = torch.as_tensor(ref_dict["prompt_token"]).reshape(-1).long().cpu()
        if ref_dict.get("prompt_token_len") is not None:
            tokens = tokens[: int(torch.as_tensor(ref_dict["prompt_token_len"]).reshape(-1)[0])]
        feat = torch.as_tensor(ref_dict["prompt_feat"]).reshape(-1, MEL_BINS)
        # Upstream assumes 2 prompt frames per prompt token (embed_ref trims tokens to match).
        n = min(int(tokens.shape[0]), feat.shape[0] // TOKEN_MEL_RATIO)
        xvec = torch.as_tensor(ref_dict["embedding"]).reshape(1, -1).to(self.device, self.dtype)
        speaker = self.flow.spk_embed_affine_layer(F.normalize(xvec, dim=1))[0]
        return VoiceRef(
            prompt_tokens=tokens[:n].clone(),
            prompt_feat=feat[: TOKEN_MEL_RATIO * n].T.contiguous().to(self.device, self.dtype),
            speaker=speaker.contiguous(),
        )

    def _encode(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """UpsampleConformerEncoder.forward through its submodules, padding made leak-free."""
        enc = self.flow.encoder
        masks = _pad_mask(lengths, x.size(1)).unsqueeze(1)
        x, pos_emb, masks = enc.embed(x, masks)
        # A lone row's pre-lookahead conv reads F.pad zeros past its end; make a padded row
        # read the same zeros instead of its embedded padding.
        x = x * masks.transpose(1, 2).to(x.dtype)
        x = enc.pre_lookahead_layer(x)
        x = enc.forward_layers(x, masks, pos_emb, masks)
        x, lengths = enc.up_layer(x.transpose(1, 2).contiguous(), lengths)
        x = x.transpose(1, 2).contiguous()
        masks = _pad_mask(lengths, x.size(1)).unsqueeze(1)
        x, pos_emb, masks = enc.up_embed(x, masks)
        x = enc.forward_up_layers(x, masks, pos_emb, masks)
        return enc.after_norm(x)

    @torch.inference_mode()
    def run_flow(self, rows: Sequence[FlowRow], *, pad_to: int = 0) -> list[torch.Tensor]:
        """Each row's new mel frames, (80, 2 * new_tokens) fp32 on the device."""
        lengths = [r.voice.prompt_len + len(r.tokens) for r in rows]
        width = self.bucket(max(max(lengths), pad_to))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.voice.prompt_len
            ids[i, :p] = r.voice.prompt_tokens
            ids[i, p:lengths[i]] = torch.as_tensor(list(r.tokens), dtype=torch.long)
        with self._section("flow encoder"):
            ids = ids.to(self.device, non_blocking=True)
            lens = torch.tensor(lengths, device=self.device)
            valid = _pad_mask(lens, width).unsqueeze(-1).to(self.dtype)
            h = self._encode(self.flow.input_embedding(ids) * valid, lens)
            mu = self.flow.encoder_proj(h).transpose(1, 2).contiguous()  # (B, 80, 2 * width)
        frames = [TOKEN_MEL_RATIO * (n - (0 if r.final else self.lookahead)) for n, r in zip(lengths, rows)]
        mel_width = mu.shape[2]
        with self._section("CFM inputs"):  # per-row Python loop: shows in the profile if it grows
            cond = torch.zeros(len(rows), MEL_BINS, mel_width, device=self.device, dtype=self.dtype)
            noise = torch.zeros_like(cond)
            for i, r in enumerate(rows):
                pf = TOKEN_MEL_RATIO * r.voice.prompt_len
                cond[i, :, :pf] = r.voice.prompt_feat
                noise[i, :, :frames[i]] = self.tapes.flow_noise(pf, TOKEN_MEL_RATIO * r.context_start,
                                                                frames[i] - pf)
            mask = _pad_mask(torch.tensor(frames, device=self.device), mel_width).unsqueeze(1).to(self.dtype)
            spks = torch.stack([r.voice.speaker for r in rows])
        # noised_mels covering every frame replaces the decoder's own randn draw entirely.
        with self._section("CFM decoder"):
            feat, _ = self.flow.decoder(mu=mu, mask=mask, spks=spks, cond=cond,
                                        n_timesteps=self.flow_steps, noised_mels=noise)
        return [feat[i, :, frames[i] - TOKEN_MEL_RATIO * r.new_tokens: frames[i]].float()
                for i, r in enumerate(rows)]

    def _excitation(self, f0: torch.Tensor, starts: Sequence[int],
                    phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NSF source (SourceModuleHnNSF with SineGen's parameters) for (B, 1, S) f0 in
        Hz, its noise from the tape and its phase continued from ``phase`` (B, H) cycles."""
        src = self.hift.m_source
        gen = src.l_sin_gen
        harmonics = torch.arange(1, gen.harmonic_num + 2, device=f0.device, dtype=f0.dtype)
        cycles = torch.cumsum(f0 * harmonics[None, :, None] / gen.sampling_rate, dim=-1) + phase[:, :, None]
        theta = 2 * np.pi * (cycles % 1)
        sine = gen.sine_amp * torch.sin(theta + self.tapes.hift_phase[None, :, None])
        uv = (f0 > gen.voiced_threshold).to(f0.dtype)
        noise_amp = uv * gen.noise_std + (1 - uv) * gen.sine_amp / 3
        waves = sine * uv + noise_amp * self.tapes.hift_noise(starts, f0.shape[-1])
        merged = src.l_tanh(src.l_linear(waves.transpose(1, 2)))
        return merged.transpose(1, 2), cycles

    @torch.inference_mode()
    def run_hift(self, rows: Sequence[HiftRow]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each row's waveform (F * 480,) fp32 and the phase at its carried frames."""
        with self._section("HiFT"):
            return self._run_hift(rows)

    def _run_hift(self, rows: Sequence[HiftRow]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(rows)  # type: ignore[list-item]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.mel.shape[1], []).append(i)
        harmonics = self.hift.m_source.l_sin_gen.harmonic_num + 1
        for frames, idx in groups.items():
            mel = torch.stack([rows[i].mel for i in idx]).float()
            phase = torch.stack([torch.zeros(harmonics, device=self.device) if rows[i].phase is None
                                 else rows[i].phase for i in idx])
            f0 = self.hift.f0_upsamp(self.hift.f0_predictor(mel)[:, None])  # (b, 1, S)
            starts = [rows[i].start_frame * SAMPLES_PER_FRAME for i in idx]
            source, cycles = self._excitation(f0, starts, phase)
            wav = self.hift.decode(x=mel, s=source)
            for j, i in enumerate(idx):
                carry = rows[i].carry
                nxt = None if not carry else cycles[j, :, (frames - carry) * SAMPLES_PER_FRAME - 1] % 1
                out[i] = (wav[j], nxt)
        return out


@dataclass(slots=True)
class VocoderStats:
    """Counters the metrics layer reads (monotonic except the ``last_*`` gauges)."""

    batches: int = 0
    rows: int = 0
    first_window_rows: int = 0
    windows_dropped: int = 0
    busy_s: float = 0.0
    audio_s: float = 0.0
    last_batch_rows: int = 0
    last_batch_padded_tokens: int = 0
    rows_per_batch: dict[int, int] = field(default_factory=dict)
    """Histogram: batch size -> batches of that size."""


@dataclass(frozen=True, slots=True)
class _Job:
    """One stream's window as handed to the worker thread (a snapshot, never mutated)."""

    stream: VocoderStream
    voice_key: str
    window: Window
    tokens: tuple[int, ...]
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    start_frame: int
    carry: int


@dataclass(frozen=True, slots=True)
class _Result:
    audio: np.ndarray
    hift_frames: int
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    prompt_tokens: int


class VocoderStream:
    """One utterance's tokens in, its audio out. Use from the event-loop thread."""

    def __init__(self, vocoder: Vocoder, voice_key: str, ref_dict: Mapping[str, Any], one_shot: bool) -> None:
        self._vocoder = vocoder
        self.voice_key = voice_key
        self._ref_dict = ref_dict
        self.one_shot = one_shot
        self._tokens: list[int] = []
        self._finished = False
        self._closed = False
        self._in_flight = False
        self._committed = 0
        self._index = 0
        self._idle_since = next(vocoder._tickets)  # queue position: lower waits longer
        self._prompt_tokens = 250  # budgeting guess (a 10 s prompt) until the voice is prepared
        self._seam = SeamState()
        self._mel_tail: torch.Tensor | None = None
        self._phase: torch.Tensor | None = None
        self._queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()

    @property
    def tokens_vocoded(self) -> int:
        return self._committed

    def push(self, tokens: Iterable[int]) -> None:
        """Append speech tokens; ids outside the speech vocabulary are dropped (as upstream
        ``drop_invalid_tokens`` does). Ignored once the stream is cancelled or failed (T3 may
        still be delivering deltas); an error after ``finish()``."""
        if self._finished:
            raise RuntimeError("push after finish()")
        if self._closed:
            return
        self._tokens.extend(t for t in map(int, tokens) if 0 <= t < SPEECH_VOCAB_SIZE)
        self._vocoder._wake.set()

    def finish(self) -> None:
        if self._closed:
            return
        self._finished = True
        if not self._tokens:
            self._end(None)
        self._vocoder._wake.set()

    def cancel(self) -> None:
        """Drop this stream's pending and in-flight windows; audio() ends."""
        if not self._closed:
            self._vocoder.stats.windows_dropped += int(self._in_flight)
            self._end(None)

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """The stream's samples in order; closing this iterator early cancels the stream."""
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    # --- vocoder side -------------------------------------------------------------------
    def _next_window(self) -> Window | None:
        if self._closed or self._in_flight:
            return None
        return next_window(self._vocoder.policy, available=len(self._tokens), committed=self._committed,
                           finished=self._finished, index=self._index, one_shot=self.one_shot)

    def _deliver(self, window: Window, result: _Result, carry: int) -> None:
        self._in_flight = False
        self._idle_since = next(self._vocoder._tickets)
        if self._closed:  # cancelled while in flight: the result is dropped
            return
        start = self._seam.samples_emitted
        audio = self._seam.join(result.audio, hift_frames=result.hift_frames, carry=carry)
        fade = self._vocoder._trim_fade
        if start < fade.shape[0] and audio.size:
            n = min(fade.shape[0] - start, audio.shape[0])
            audio[:n] *= fade[start:start + n]  # upstream's fade-in against reference spill-over
        self._committed, self._index = window.end, window.index + 1
        self._mel_tail, self._phase = result.mel_tail, result.phase
        if audio.size:
            self._queue.put_nowait(audio)
        if window.final:
            self._end(None)

    def _end(self, item: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(item)
        self._vocoder._streams.discard(self)


class Vocoder:
    """The vocoder loop shared by all streams of one engine."""

    def __init__(self, s3gen: torch.nn.Module, settings: Settings, *, device: torch.device | str = "cpu",
                 flow_dtype: torch.dtype = torch.float32, policy: WindowPolicy | None = None,
                 max_batch_tokens: int = 32768, bucket_tokens: int = 16, noise_seed: int = 0,
                 max_prompt_frames: int = 1000,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        self.settings = settings
        self.policy = policy or WindowPolicy(first_tokens=settings.stream_first_window_tokens,
                                             tokens=settings.stream_window_tokens,
                                             max_tokens=settings.stream_max_window_tokens)
        self.max_batch_rows = settings.vocoder_max_batch
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self.stats = VocoderStats()
        frames = TOKEN_MEL_RATIO * settings.max_speech_tokens
        tapes = NoiseTapes.generate(
            noise_seed, flow_frames=max_prompt_frames + frames,
            hift_samples=frames * SAMPLES_PER_FRAME,
            harmonics=s3gen.mel2wav.m_source.l_sin_gen.harmonic_num + 1, device=device)
        self.batch = S3GenBatch(s3gen, device=device, flow_dtype=flow_dtype, flow_steps=settings.flow_steps,
                                tapes=tapes, bucket_tokens=bucket_tokens)
        if self.policy.lookahead != self.batch.lookahead:
            raise ValueError(f"window lookahead must be the flow's pre-lookahead ({self.batch.lookahead})")
        self._trim_fade = self.batch.trim_fade
        self._voices: OrderedDict[str, VoiceRef] = OrderedDict()  # worker thread only
        self._streams: set[VocoderStream] = set()
        self._tickets = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocoder")
        self._task = asyncio.create_task(self._loop(), name="vocoder-loop")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for stream in list(self._streams):
            stream._end(EngineUnavailableError("the vocoder was shut down"))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)

    def open_stream(self, voice_key: str, ref_dict: Mapping[str, Any], *, one_shot: bool = False) -> VocoderStream:
        if self._task is None:
            raise EngineUnavailableError("the vocoder is not running")
        stream = VocoderStream(self, voice_key, ref_dict, one_shot)
        self._streams.add(stream)
        return stream

    async def vocode(self, voice_key: str, ref_dict: Mapping[str, Any], tokens: Sequence[int]) -> np.ndarray:
        """A whole utterance as one window (batched with whatever else is running)."""
        stream = self.open_stream(voice_key, ref_dict, one_shot=True)
        stream.push(tokens)
        stream.finish()
        parts = [a async for a in stream.audio()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    # --- the loop -----------------------------------------------------------------------
    def _collect(self) -> list[tuple[VocoderStream, Window]]:
        ready = [(s, w) for s in self._streams if (w := s._next_window()) is not None]
        ready.sort(key=lambda sw: (sw[1].index > 0, sw[0]._idle_since))  # first windows, then FIFO
        chosen: list[tuple[VocoderStream, Window]] = []
        longest = 0
        for stream, window in ready:
            if len(chosen) >= self.max_batch_rows:
                break
            cost = self.batch.bucket(window.input_tokens + stream._prompt_tokens)
            if chosen and (len(chosen) + 1) * max(longest, cost) > self.max_batch_tokens:
                continue
            longest = max(longest, cost)
            chosen.append((stream, window))
        return chosen

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chosen = self._collect()
            if not chosen:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = []
            for stream, window in chosen:
                stream._in_flight = True
                seam = stream._seam
                jobs.append(_Job(
                    stream, stream.voice_key, window,
                    tuple(stream._tokens[window.context_start:window.input_end]),
                    stream._mel_tail, stream._phase, seam.hift_start_frame(),
                    seam.carry_for(window.new_mel_frames, mel_overlap=self.policy.mel_overlap, final=window.final)))
            refs = {s.voice_key: s._ref_dict for s, _ in chosen}
            t0 = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_jobs, jobs, refs)
            except Exception as exc:  # the whole batch failed: fail its streams, keep serving
                outcomes = [exc] * len(jobs)
            done = [(j, r) for j, r in zip(jobs, outcomes) if isinstance(r, _Result)]
            if done:
                self._count([j for j, _ in done], [r for _, r in done], time.perf_counter() - t0)
            for job, outcome in zip(jobs, outcomes):
                if isinstance(outcome, _Result):
                    job.stream._prompt_tokens = outcome.prompt_tokens
                    try:
                        job.stream._deliver(job.window, outcome, job.carry)
                        continue
                    except Exception as exc:  # never let one stream's seam stop the loop
                        outcome = exc
                job.stream._in_flight = False
                job.stream._end(EngineError(f"vocoder failed: {outcome}"))

    def _count(self, jobs: list[_Job], results: list[_Result], seconds: float) -> None:
        st = self.stats
        st.batches += 1
        st.rows += len(jobs)
        st.first_window_rows += sum(j.window.index == 0 for j in jobs)
        st.busy_s += seconds
        st.audio_s += sum(j.window.new_mel_frames for j in jobs) * SAMPLES_PER_FRAME / SAMPLE_RATE
        st.last_batch_rows = len(jobs)
        st.last_batch_padded_tokens = len(jobs) * self.batch.bucket(
            max(len(j.tokens) + r.prompt_tokens for j, r in zip(jobs, results)))
        st.rows_per_batch[len(jobs)] = st.rows_per_batch.get(len(jobs), 0) + 1
        if self.on_batch is not None:
            self.on_batch(len(jobs), st.last_batch_padded_tokens, seconds)

    def _voice(self, key: str, ref_dict: Mapping[str, Any]) -> VoiceRef:
        voice = self._voices.get(key)
        if voice is None:
            voice = self._voices[key] = self.batch.prepare_voice(ref_dict)
            while len(self._voices) > self.settings.voice_cache_size:
                self._voices.popitem(last=False)
        self._voices.move_to_end(key)
        return voice

    def _run_jobs(self, jobs: list[_Job], refs: Mapping[str, Mapping[str, Any]]) -> list[_Result | Exception]:
        """Worker thread: flow for all rows at once, then HiFT grouped by length. A row whose
        voice cannot be prepared fails alone; the others still run."""
        outcomes: list[_Result | Exception] = []
        voices: list[VoiceRef | None] = []
        for job in jobs:
            try:
                voices.append(self._voice(job.voice_key, refs[job.voice_key]))
            except Exception as exc:  # a malformed reference: that stream's problem only
                voices.append(None)
                outcomes.append(exc)
            else:
                outcomes.append(None)  # type: ignore[arg-type]
        live = [i for i, v in enumerate(voices) if v is not None]
        if not live:
            return outcomes
        mels = self.batch.run_flow([
            FlowRow(voices[i], jobs[i].tokens, jobs[i].window.context_start, jobs[i].window.new_tokens,  # type: ignore[arg-type]
                    jobs[i].window.final) for i in live])
        rows = [HiftRow(mel if jobs[i].mel_tail is None else torch.cat([jobs[i].mel_tail, mel], dim=1),
                        jobs[i].start_frame, jobs[i].phase, jobs[i].carry) for i, mel in zip(live, mels)]
        waves = self.batch.run_hift(rows)
        with self.batch._section("host copy"):
            # One device-to-host copy (one synchronisation) for the whole batch, not one per row.
            flat = torch.cat([wav for wav, _ in waves]).cpu().numpy()
            host = np.split(flat, np.cumsum([wav.shape[0] for wav, _ in waves[:-1]]))
        for i, row, audio, (_, phase) in zip(live, rows, host, waves):
            frames, carry = row.mel.shape[1], jobs[i].carry
            tail = row.mel[:, frames - carry:] if carry else None
            outcomes[i] = _Result(audio, frames, tail, phase, voices[i].prompt_len)  # type: ignore[union-attr]
        return outcomes

"""S3Gen (flow encoder + CFM decoder + HiFT) run on padded batches of token-window rows.

What the vocoder loop (:mod:`gateway.engine.vllm.vocoder`) calls, on its worker thread::

    batch = S3GenBatch(s3gen, device=..., flow_dtype=..., flow_steps=..., tapes=NoiseTapes.generate(...))
    voice = batch.prepare_voice(ref_dict)            # S3GenVoice, once per voice
    mels = batch.run_flow([FlowRow(voice, tokens, context_start, new_tokens, final), ...])
    waves = batch.run_hift([HiftRow(mel, start_frame, phase, carry), ...])

Batching goes through upstream submodules, never ``S3Gen.inference`` (batch 1 only, and its
``finalize=False`` path fails on a mask length mismatch in
``CausalMaskedDiffWithXvec.inference``):

* Flow: each row is ``[voice prompt tokens | left context | window | lookahead]``, right
  padded to a bucketed length (a multiple of ``bucket_tokens``: a bounded set of shapes for
  compile/graphs). The Conformer encoder runs with key-padding masks; the one place where
  padding would leak is the pre-lookahead conv (a lone row reads ``F.pad`` zeros past its
  end, a padded row would read the embedded padding), so padded positions are zeroed before
  it. The CFM estimator is causal-conv + masked attention, so right padding cannot leak.
  Rows may use different voices (prompt lengths). The CFM solve of a batch whose rows need
  very different widths (a stream's first window beside a whole utterance) is split into
  solves by width, so a narrow row is not solved at the widest row's width. With CUDA graphs
  one cost search over runs in width order (:func:`row_chunks`) decides both where such a
  split pays and where a graph's power-of-two row count would pad a solve (35 rows as 32 + 3,
  not as 64); eager solves (the CPU) group by width steps (:func:`width_groups`).
* Noise: upstream draws fresh ``randn_like`` noise per call (its ``rand_noise`` buffer is
  set to None), which makes batched != alone and streamed != one-shot. We use fixed noise
  tapes (:class:`NoiseTapes`): CFM noise indexed by [prompt frame | absolute stream frame],
  and the HiFT NSF source noise indexed by absolute stream sample, with the harmonic phases
  carried across windows. Streams are therefore deterministic and position-consistent.
* HiFT: non-causal convs and an iSTFT cannot be padded without leaking, so rows are grouped
  by exact mel length (windows of one size share it) and each group runs as a batch. The
  NSF excitation is computed here from upstream's SineGen parameters so that its noise comes
  from the tape; then HiFT's decode runs through upstream's layers without a host
  synchronisation and without cuFFT (:mod:`~gateway.engine.vllm.hift_decode`). HiFT always
  runs in fp32 (cumulative phase, ``exp`` magnitudes and the iSTFT are precision sensitive);
  the flow encoder and CFM estimator run in ``flow_dtype`` (bf16/fp16 on CUDA).
* Per voice (:class:`S3GenVoice`, which the vocoder keeps in an LRU keyed by the voice key):
  prompt token ids, the prompt mel on the device in the flow dtype, and the normalised and
  projected x-vector.
* No waiting on the device: a batch is launched without one host synchronisation. What the
  host builds (token ids, lengths, noise indices) goes up through pinned memory
  asynchronously (``upload``), nothing is read back while launching, and the audio comes
  down as one asynchronous copy into pinned memory (``download``) that the caller waits for
  when it wants the samples, so the next batch can be launched while the GPU still runs this
  one. A :class:`BatchClock` records CUDA events between the parts: their device times (and
  the GPU's busy share) are read after that one wait, never in between.
* CUDA graphs: the flow encoder and HiFT replay graphs
  (:class:`~gateway.engine.vllm.graph_calls.GraphCalls`, captured by the vocoder at start)
  for the shapes they were captured at, a batch's rows padded up to a captured row bucket
  with rows that are computed and dropped (rows never mix); the CFM solve has its own
  (:class:`~gateway.engine.vllm.cfm_solver.CfmSolver`).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gateway.engine.vllm import gpu_serial
from gateway.engine.vllm.cfm_solver import CfmSolver, GraphBuckets, drain
from gateway.engine.vllm.graph_calls import GraphCalls
from gateway.engine.vllm.hift_decode import hift_decode, spectra_on_device
from gateway.engine.vllm.meanflow_solver import flow_solver
from gateway.engine.vllm.vocoder_windows import SAMPLES_PER_FRAME, TOKEN_MEL_RATIO

MEL_BINS = 80

SPLIT_MIN_ROWS = 8
"""A batch's CFM solve is split by width only into solves of at least this many rows: below
it a solve costs about what padding its rows into a wider one does (H200 profile, 2026-12-03,
first windows' CFM: 47 ms at 1 row, 138 at 8, then 14-17 ms a row: a solve has a floor of tens
of ms, then grows with its rows)."""

DEFAULT_LADDER = GraphBuckets.plan(max_rows=1, max_frames=8192, min_frames=512).frames
"""Width steps (mel frames) that rows are grouped by when the solver has no graph buckets."""


def width_groups(frames: Sequence[int], ladder: Sequence[int], min_rows: int) -> list[list[int]]:
    """Positions of rows needing ``frames`` mel frames each, grouped for separate CFM solves
    (each at its widest row's width): by the step of ``ladder`` that holds a row (the graph
    buckets' widths; rows wider than the ladder together), narrowest first, a group of fewer
    than ``min_rows`` rows joining the next wider one (the widest group stays as it is).
    ``min_rows`` 0: one group. Rows are independent in a solve, so the split changes no row."""
    positions = list(range(len(frames)))
    if min_rows <= 0 or len(frames) < 2 * min_rows:
        return [positions] if positions else []
    steps: dict[float, list[int]] = {}
    for p in positions:
        i = bisect.bisect_left(ladder, frames[p])
        steps.setdefault(ladder[i] if i < len(ladder) else math.inf, []).append(p)
    groups: list[list[int]] = []
    pending: list[int] = []
    for step in sorted(steps):
        pending += steps[step]
        if len(pending) >= min_rows:
            groups.append(pending)
            pending = []
    if pending:
        groups.append(pending)
    return groups


GRAPH_OVERHEAD_ROWS = 3
"""What one CFM solve through a CUDA graph costs beyond its rows, in rows of its width: the
H200 profile (2026-12-03) timed a first window's graph solve at 47 ms for 1 row, 138 for 8,
then 14-17 ms a row."""

EAGER_OVERHEAD_ROWS = 20
"""The same for an eager solve (no graph holds it): its ~10,000 kernel launches cost ~300 ms
more than a graph's replay (343 against 49 ms for one first window, H200 2026-12-01)."""


def row_chunks(buckets: GraphBuckets | None, frames: Sequence[int]) -> list[list[int]]:
    """Positions of ``frames`` (the widths of one solve's rows) cut into consecutive runs in
    width order, one solve each, at the least estimated cost: each run costs the cells of the
    graph holding it (its rows padded to the graph's row count, its widest row to the graph's
    width) plus a solve's overhead. A graph's rows are powers of two: 35 rows would run as 64
    (29 rows of arithmetic for nothing); as 32 + 3 (two replays) they cost ~40% less. Without
    graph buckets (eager, on the CPU) nothing is padded: one run."""
    n = len(frames)
    if buckets is None or n < 2:
        return [list(range(n))]
    order = sorted(range(n), key=lambda p: frames[p])
    sizes = set(buckets.rows)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        width = frames[order[i - 1]]  # the run's widest row: runs are in width order
        for k in {min(s, i) for s in sizes} | {i}:
            shape = buckets.fit(k, width)
            if shape is None:
                cost = (k + EAGER_OVERHEAD_ROWS) * width + 1.0  # + 1: of equal costs, fewer solves
            else:
                cost = (shape[0] + GRAPH_OVERHEAD_ROWS) * shape[1] + 1.0
            if best[i - k] + cost < best[i]:
                best[i], cut[i] = best[i - k] + cost, i - k
    runs: list[list[int]] = []
    i = n
    while i > 0:
        runs.append(order[cut[i]:i])
        i = cut[i]
    return runs[::-1]


def graphed(solver: CfmSolver, rows: int, frames: int) -> bool:
    """Whether a solve of ``rows`` rows of at most ``frames`` frames replays a CUDA graph."""
    return solver.buckets is not None and solver.buckets.fit(rows, frames) is not None


def solve_cells(solver: CfmSolver, rows: int, frames: int) -> int:
    """Rows x frames a solve of ``rows`` rows of at most ``frames`` frames computes: its CUDA
    graph's padded shape when one holds it, else its own."""
    shape = solver.buckets.fit(rows, frames) if solver.buckets is not None else None
    return shape[0] * shape[1] if shape is not None else rows * frames


def _pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at valid positions, (B, max_len)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _take_rows(t: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """Rows ``idx`` of ``t`` without an index tensor (which would be a host-to-device copy):
    a view when they are consecutive, else one concatenation of slices."""
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return t[idx[0]: idx[0] + len(idx)]
    return torch.cat([t[i: i + 1] for i in idx])


class BatchClock:
    """When each part of one batch ended, on the device's own clock (CUDA events recorded in
    stream order, read only after the batch's final wait), or the host's on the CPU, where
    every part runs synchronously. ``mark`` costs one event record: always on."""

    def __init__(self, device: torch.device, *, sync: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.sync = sync and self.cuda
        """Wait for the device at every mark (``gpu_serial_debug``): a fault names its part."""
        self._marks: list[tuple[str, Any]] = []
        self.mark("start")

    def mark(self, name: str) -> Any:
        """Record the end of ``name``; returns its CUDA event (None on the CPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
            if self.sync:
                gpu_serial.synchronize(f"vocoder: {name}")
            return event
        self._marks.append((name, time.perf_counter()))
        return None

    def ends(self, done_at: float) -> list[tuple[str, float]]:
        """(part, host ``perf_counter`` time it ended), the start first. On CUDA the device
        times are anchored at ``done_at``, the host time the last event was seen complete."""
        if not self.cuda:
            return list(self._marks)
        last = self._marks[-1][1]
        return [(name, done_at - event.elapsed_time(last) / 1000) for name, event in self._marks]

    def busy_s(self) -> float:
        """Seconds from the batch's first to its last mark on the device (its kernels and the
        gaps between them: the time the batch occupied the GPU's stream)."""
        (_, first), (_, last) = self._marks[0], self._marks[-1]
        return first.elapsed_time(last) / 1000 if self.cuda else last - first


class HostCopy:
    """Device tensors on their way to host memory: one asynchronous copy into pinned memory
    (CUDA) started at construction; :meth:`wait` blocks until it landed (the batch's one
    synchronisation) and returns the arrays."""

    def __init__(self, tensors: Sequence[torch.Tensor], clock: BatchClock | None = None) -> None:
        self.sizes = [int(t.shape[0]) for t in tensors]
        flat = torch.cat(list(tensors)) if tensors else torch.zeros(0)
        self.clock = clock
        self.done_at = 0.0
        self._event: Any = None
        if flat.device.type == "cuda":
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            # The clock's last event is the one waited for: once it completed, every event of
            # the batch has, and their times can be read.
            self._event = clock.mark("host copy") if clock is not None else torch.cuda.Event()
            if clock is None:
                self._event.record()
        else:
            self._host = flat
            if clock is not None:
                clock.mark("host copy")

    @property
    def event(self) -> Any:
        """The CUDA event recorded after the copy (None on the CPU): another stream that waits
        for it waits for the whole batch."""
        return self._event

    def done(self) -> bool:
        """Whether the copy, and so every kernel queued before it on its stream, has run (never
        blocks; on the CPU the work ran as it was queued)."""
        return self._event is None or self._event.query()

    def wait(self) -> list[np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        self.done_at = time.perf_counter()
        flat = self._host.numpy().copy()  # own memory: the pinned block goes back to its cache
        return np.split(flat, np.cumsum(self.sizes[:-1])) if self.sizes else []


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

    def flow_index(self, prompt_frames: int, first_frame: int, frames: int) -> np.ndarray:
        """Tape columns (host int64) of the noise for a row whose generated part starts at
        absolute stream frame ``first_frame``: ``prompt_frames + frames`` of them (the tape
        wraps around)."""
        idx = np.concatenate([np.arange(prompt_frames), prompt_frames + first_frame + np.arange(frames)])
        return idx % self.flow.shape[1]

    def hift_noise(self, starts: Sequence[int] | torch.Tensor, samples: int) -> torch.Tensor:
        """(rows, harmonics, samples) source noise from each row's absolute start sample
        (``starts``: ints, or an int64 tensor already on the tape's device)."""
        dev = self.hift.device
        first = starts if torch.is_tensor(starts) else torch.tensor(list(starts), device=dev)
        idx = first[:, None] + torch.arange(samples, device=dev)[None, :]
        return self.hift[:, idx % self.hift.shape[1]].permute(1, 0, 2)


@dataclass(frozen=True, slots=True)
class S3GenVoice:
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
    voice: S3GenVoice
    tokens: Sequence[int]
    """Stream tokens ``[context_start, input_end)`` of the window."""
    context_start: int
    new_tokens: int
    """Tokens whose mel this row commits: the last ones before the lookahead."""
    final: bool
    first: bool = False
    """The stream's first window (solved with ``first_window_steps`` when those are set)."""


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
    on one worker thread. Casts ``s3gen.flow`` to ``flow_dtype`` and HiFT to fp32 in place.

    ``first_window_steps`` (0: ``flow_steps``) solves rows marked ``first`` with that many
    Euler steps; ``prompt_tokens`` (0: all) keeps only the last that many tokens of each
    voice's prompt; ``compile`` compiles the CFM estimator's blocks and ``attention`` picks
    its attention kernel (``CfmSolver``); ``hift_kernels = "fused"`` runs a copy of HiFT with
    its weight norms folded and its Snakes one kernel each (``hift_kernels.py``). The first
    two change the audio (measured trade-offs, docs/operations.md); the others do not."""

    def __init__(self, s3gen: torch.nn.Module, *, device: torch.device | str, flow_dtype: torch.dtype,
                 flow_steps: int, tapes: NoiseTapes, bucket_tokens: int = 16, first_window_steps: int = 0,
                 prompt_tokens: int = 0, compile: str = "off", attention: str = "sdpa",
                 split_min_rows: int = SPLIT_MIN_ROWS, hift_kernels: str = "upstream") -> None:
        self.flow = s3gen.flow.to(device=device, dtype=flow_dtype)
        self.hift = s3gen.mel2wav.to(device=device, dtype=torch.float32)
        if hift_kernels == "fused":  # a copy: s3gen's own HiFT stays upstream's (reference paths, parity)
            from gateway.engine.vllm import hift_kernels as fused

            self.hift = fused.fused_hift(self.hift)
            fused.warm_up(device)
        elif hift_kernels != "upstream":
            raise ValueError(f"hift_kernels is upstream or fused, not {hift_kernels!r}")
        self.spectra = spectra_on_device(self.hift, device)
        """HiFT's STFT and inverse STFT as matrix products: no cuFFT plan in a captured graph."""
        self.trim_fade = s3gen.trim_fade.detach().float().cpu().numpy()
        self.device = torch.device(device)
        self.dtype = flow_dtype
        self.flow_steps = flow_steps
        self.tapes = tapes
        self.bucket_tokens = bucket_tokens
        self.prompt_tokens = prompt_tokens
        self.split_min_rows = split_min_rows
        """The CFM solve is split by width into solves of at least this many rows (0: never)."""
        self.timer: StageTimer | None = None
        """Set to a :class:`StageTimer` to time the flow encoder, CFM decoder and HiFT."""
        self.cfm_frames = 0
        """Mel frames of real rows the CFM solves computed (cumulative; worker thread writes)."""
        self.cfm_solved_frames = 0
        """The frames those solves computed, graph padding (rows and width) included."""
        self.cfm_eager_frames = 0
        """Of ``cfm_frames``, those solved outside a CUDA graph (no graph holds the solve's rows
        and width, or none were captured, as on the CPU): each such solve launches its kernels
        one by one from the worker thread."""
        self.hift_frames = 0
        """Mel frames of real rows HiFT vocoded (cumulative; worker thread writes)."""
        self.hift_eager_frames = 0
        """Of ``hift_frames``, those vocoded outside a CUDA graph (no graph of the rows' length:
        final windows, filled ones, or none captured, as on the CPU)."""
        self.lookahead = int(self.flow.pre_lookahead_len)
        self.cfm = flow_solver(self.flow.decoder, steps=flow_steps, device=self.device, dtype=flow_dtype,
                               compile=compile, attention=attention)
        """The CFM solve (the original's CFG Euler, or Turbo's mean-flow): eager with per-batch
        masks, or CUDA graphs once ``cfm.capture`` ran."""
        self.first_cfm = self.cfm
        """The solve of first windows: ``cfm`` unless ``first_window_steps`` differ."""
        if first_window_steps and first_window_steps != flow_steps:
            self.first_cfm = flow_solver(self.flow.decoder, steps=first_window_steps, device=self.device,
                                         dtype=flow_dtype, compile=compile, attention=attention)
        enc = self.flow.encoder
        # _encode reproduces UpsampleConformerEncoder.forward for full-context inference only.
        if enc.static_chunk_size or enc.use_dynamic_chunk or enc.global_cmvn is not None or not enc.normalize_before:
            raise ValueError("unsupported flow encoder configuration for batched inference")
        if self.flow.token_mel_ratio != TOKEN_MEL_RATIO:
            raise ValueError("S3Gen token/mel ratio differs from the window planner's")
        self.harmonics = int(self.hift.m_source.l_sin_gen.harmonic_num) + 1
        self.encoder_graphs = GraphCalls("flow encoder", self._mu)
        """The flow encoder per (rows, width in tokens): eager, or CUDA graphs once captured."""
        self.hift_graphs = GraphCalls("HiFT", self._hift_group)
        """HiFT (f0, NSF source, decode) per (rows, mel frames): eager, or CUDA graphs."""

    def section(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a part of a batch under ``name`` when a profile timer is set (else nothing)."""
        return contextlib.nullcontext() if self.timer is None else self.timer.section(name)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device without waiting for the GPU: staged in pinned memory and
        copied asynchronously (a pageable copy, e.g. ``torch.tensor(..., device=...)``, waits
        for every kernel queued before it)."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def bucket(self, tokens: int) -> int:
        """The padded flow width (tokens, prompt included) of a row of ``tokens``: a multiple
        of ``bucket_tokens``, or the width of the smallest captured CFM graph that holds it."""
        width = -(-tokens // self.bucket_tokens) * self.bucket_tokens
        frames = self.cfm.frames_for(TOKEN_MEL_RATIO * width)
        return -(-frames // TOKEN_MEL_RATIO)

    @torch.inference_mode()
    def prepare_voice(self, ref_dict: Mapping[str, Any]) -> S3GenVoice:
        tokens = torch.as_tensor(ref_dict["prompt_token"]).reshape(-1).long().cpu()
        if ref_dict.get("prompt_token_len") is not None:
            tokens = tokens[: int(torch.as_tensor(ref_dict["prompt_token_len"]).reshape(-1)[0])]
        feat = torch.as_tensor(ref_dict["prompt_feat"]).reshape(-1, MEL_BINS)
        # Upstream assumes 2 prompt frames per prompt token (embed_ref trims tokens to match).
        n = min(int(tokens.shape[0]), feat.shape[0] // TOKEN_MEL_RATIO)
        # The knob keeps the prompt's end: the part nearest to the speech that follows it.
        first = n - min(n, self.prompt_tokens) if self.prompt_tokens else 0
        xvec = torch.as_tensor(ref_dict["embedding"]).reshape(1, -1).to(self.device, self.dtype)
        speaker = self.flow.spk_embed_affine_layer(F.normalize(xvec, dim=1))[0]
        return S3GenVoice(
            prompt_tokens=tokens[first:n].clone(),
            prompt_feat=feat[TOKEN_MEL_RATIO * first: TOKEN_MEL_RATIO * n].T.contiguous().to(self.device, self.dtype),
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

    def _mu(self, ids: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor]:
        """The flow's condition ``mu``, (B, 80, 2 * width), for (B, width) token ids of which
        the first ``lens`` are valid per row (what :attr:`encoder_graphs` captures)."""
        valid = _pad_mask(lens, ids.shape[1]).unsqueeze(-1).to(self.dtype)
        h = self._encode(self.flow.input_embedding(ids) * valid, lens)
        return (self.flow.encoder_proj(h).transpose(1, 2).contiguous(),)

    def capture_encoder(self, shapes: Sequence[tuple[int, int]], pool: tuple[int, int] | None) -> float:
        """CUDA graphs of the flow encoder for each (rows, width in tokens); seconds taken."""
        dev = self.device
        return self.encoder_graphs.capture(
            [((r, w), (torch.zeros(r, w, dtype=torch.long, device=dev), torch.full((r,), w, device=dev)))
             for r, w in shapes], pool)

    def run_flow(self, rows: Sequence[FlowRow], *, pad_to: int = 0, clock: BatchClock | None = None
                 ) -> list[torch.Tensor]:
        """Each row's new mel frames, (80, 2 * new_tokens) fp32 on the device."""
        return drain(self.flow_stepwise(rows, pad_to=pad_to, clock=clock))

    @torch.inference_mode()
    def flow_stepwise(self, rows: Sequence[FlowRow], *, pad_to: int = 0, clock: BatchClock | None = None
                      ) -> Generator[None, None, list[torch.Tensor]]:
        """:meth:`run_flow` as a generator that yields between the CFM solves' Euler steps
        (:meth:`CfmSolver.solve_stepwise`): each resumption queues one more step."""
        lengths = [r.voice.prompt_len + len(r.tokens) for r in rows]
        width = self.bucket(max(max(lengths), pad_to))
        # A captured encoder graph's rows: the extra rows are whole rows of token 0, discarded.
        padded = self.encoder_graphs.fit(len(rows), width)
        ids = torch.zeros(padded or len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.voice.prompt_len
            ids[i, :p] = r.voice.prompt_tokens
            ids[i, p:lengths[i]] = torch.as_tensor(list(r.tokens), dtype=torch.long)
        with self.section("flow encoder"):
            ids = self.upload(ids)
            lens = self.upload(torch.tensor(lengths + [width] * (ids.shape[0] - len(rows))))
            key = None if padded is None else (padded, width)
            (mu,) = self.encoder_graphs.run(key, (ids, lens), len(rows))  # (B, 80, 2 * width)
        if clock is not None:
            clock.mark("flow encoder")
        frames = [TOKEN_MEL_RATIO * (n - (0 if r.final else self.lookahead)) for n, r in zip(lengths, rows)]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(self.first_cfm if r.first else self.cfm), []).append(i)
        out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for same_solver in groups.values():
            solver = self.first_cfm if rows[same_solver[0]].first else self.cfm
            widths = [frames[i] for i in same_solver]
            if solver.buckets is None:
                # eager (the CPU): nothing is padded; narrow rows apart when there are enough
                parts = width_groups(widths, DEFAULT_LADDER, self.split_min_rows)
            else:
                # one cost search over runs in width order decides both where a width split
                # pays and where the graphs' power-of-two row counts would pad (row_chunks);
                # split_min_rows 0: cut only for row counts, every run at the widest width
                by_width = widths if self.split_min_rows else [max(widths)] * len(widths)
                parts = row_chunks(solver.buckets, by_width)
            for part in parts:
                idx = [same_solver[p] for p in part]
                real, widest = sum(frames[i] for i in idx), max(frames[i] for i in idx)
                self.cfm_frames += real
                self.cfm_solved_frames += solve_cells(solver, len(idx), widest)
                if not graphed(solver, len(idx), widest):
                    self.cfm_eager_frames += real
                feat = yield from self._solve(solver, [rows[i] for i in idx], _take_rows(mu, idx),
                                              [frames[i] for i in idx])
                for j, i in enumerate(idx):
                    out[i] = feat[j, :, frames[i] - TOKEN_MEL_RATIO * rows[i].new_tokens: frames[i]].float()
        if clock is not None:
            clock.mark("CFM")
        return out

    def _solve(self, solver: CfmSolver, rows: Sequence[FlowRow], mu: torch.Tensor, frames: Sequence[int]
               ) -> Generator[None, None, torch.Tensor]:
        """The CFM solve of ``rows`` (one solver) over the frames they use. Frames past every
        row's end are masked padding, which the causal estimator cannot leak: trimming them
        is exact, and lets a graph bucket fit the group rather than the whole batch."""
        width = max(frames)
        with self.section("CFM inputs"):
            # One noise gather and one mask for the group, built on the host, uploaded async.
            index = np.zeros((len(rows), width), dtype=np.int64)
            valid = np.zeros((len(rows), 1, width), dtype=np.float32)
            for j, r in enumerate(rows):
                pf = TOKEN_MEL_RATIO * r.voice.prompt_len
                index[j, :frames[j]] = self.tapes.flow_index(pf, TOKEN_MEL_RATIO * r.context_start, frames[j] - pf)
                valid[j, :, :frames[j]] = 1.0
            mask = self.upload(torch.from_numpy(valid)).to(self.dtype)
            noise = self.tapes.flow[:, self.upload(torch.from_numpy(index))].permute(1, 0, 2).to(self.dtype)
            noise = noise.contiguous() * mask
            cond = torch.zeros_like(noise)
            for j, r in enumerate(rows):
                cond[j, :, :TOKEN_MEL_RATIO * r.voice.prompt_len] = r.voice.prompt_feat
            spks = torch.stack([r.voice.speaker for r in rows])
        # The tape's noise covers every frame: it replaces upstream's own randn draw entirely.
        with self.section("CFM decoder"):
            return (yield from solver.solve_stepwise(noise, mu[:, :, :width], mask, spks, cond))

    def _excitation(self, f0: torch.Tensor, starts: torch.Tensor,
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
    def run_hift(self, rows: Sequence[HiftRow], *, clock: BatchClock | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each row's waveform (F * 480,) fp32 and the phase at its carried frames."""
        with self.section("HiFT"):
            out = self._run_hift(rows)
        if clock is not None:
            clock.mark("HiFT")
        return out

    def _hift_group(self, mel: torch.Tensor, starts: torch.Tensor, phase: torch.Tensor,
                    carry_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT of (B, 80, F) fp32 mel rows of one length (what :attr:`hift_graphs` captures):
        (B, F * 480) waveforms and (B, H) the NSF phase (cycles mod 1) at each row's sample
        ``carry_at`` (-1: before the first, i.e. ``phase``); ``starts``: each row's absolute
        first sample, ``phase`` its (B, H) starting phase in cycles."""
        f0 = self.hift.f0_upsamp(self.hift.f0_predictor(mel)[:, None])  # (B, 1, S)
        source, cycles = self._excitation(f0, starts, phase)
        at = carry_at.clamp(min=0)[:, None, None].expand(-1, cycles.shape[1], 1)
        # carry_at -1: the next window starts where this one did, at this one's own phase.
        nxt = torch.where(carry_at[:, None] < 0, phase, torch.gather(cycles, 2, at)[:, :, 0])
        return hift_decode(self.hift, mel, source, self.spectra), nxt % 1

    def capture_hift(self, shapes: Sequence[tuple[int, int]], pool: tuple[int, int] | None) -> float:
        """CUDA graphs of HiFT for each (rows, mel frames); seconds taken."""
        dev, h = self.device, self.harmonics
        zeros = {"device": dev, "dtype": torch.long}
        return self.hift_graphs.capture(
            [((r, f), (torch.zeros(r, MEL_BINS, f, device=dev), torch.zeros(r, **zeros),
                       torch.zeros(r, h, device=dev), torch.zeros(r, **zeros))) for r, f in shapes], pool)

    def _run_hift(self, rows: Sequence[HiftRow]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(rows)  # type: ignore[list-item]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.mel.shape[1], []).append(i)
        for frames, idx in groups.items():
            # A captured graph's rows: the extra rows are silent mel, discarded.
            padded = self.hift_graphs.fit(len(idx), frames)
            extra = (padded or len(idx)) - len(idx)
            zero_phase = torch.zeros(self.harmonics, device=self.device)
            silent = [torch.zeros(MEL_BINS, frames, device=self.device)] * extra
            mel = torch.stack([rows[i].mel.float() for i in idx] + silent)
            phase = torch.stack([zero_phase if rows[i].phase is None else rows[i].phase for i in idx]
                                + [zero_phase] * extra)
            starts = [rows[i].start_frame * SAMPLES_PER_FRAME for i in idx] + [0] * extra
            carry_at = [(frames - rows[i].carry) * SAMPLES_PER_FRAME - 1 if rows[i].carry else 0 for i in idx]
            host = torch.tensor([starts, carry_at + [0] * extra])
            index = self.upload(host)
            key = None if padded is None else (padded, frames)
            eager = self.hift_graphs.eager_runs
            wav, nxt = self.hift_graphs.run(key, (mel, index[0], phase, index[1]), len(idx))
            self.hift_frames += len(idx) * frames
            if self.hift_graphs.eager_runs != eager:  # no captured graph of this length
                self.hift_eager_frames += len(idx) * frames
            for j, i in enumerate(idx):
                out[i] = (wav[j], nxt[j] if rows[i].carry else None)
        return out

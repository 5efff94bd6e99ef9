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
:mod:`gateway.engine.vllm.vocoder_windows` (a small first window for a fast first byte, then
larger ones, joined by left context, lookahead and a crossfade).

One asyncio task collects the ready windows of ALL streams (first windows first, then the
longest-waiting), up to ``settings.vocoder_max_batch`` rows and ``max_batch_tokens`` padded
flow tokens, and runs them as one batch (:class:`gateway.engine.vllm.s3gen_batch.S3GenBatch`) on a
dedicated worker thread (torch releases the GIL), in two phases: ``launch_batch`` queues the
batch's work on the device without waiting for it (no host synchronisation), and
``finish_batch`` waits for its audio. Up to ``pipeline_depth`` (2) batches are in flight, so
the next batch is planned and launched while the GPU still runs the current one, and the GPU
never idles while the host delivers audio and builds inputs. A stream has at most one window
in flight (a batch in flight holds other streams' windows than the one launched after it);
a cancelled stream's results are dropped. A stream whose reference dict cannot be prepared
fails alone (``EngineError`` from ``audio()``); a batch that fails fails its streams and the
loop keeps serving.
With ``vocoder_first_window_lane_rows`` a second loop of the same kind (``first_lane``: its
own worker thread on a high-priority CUDA stream, its own S3GenBatch and CUDA graphs of
first-window widths) plans streams' first windows and this one every other window, from one
set of streams: a new stream's first window runs beside the regular batches instead of
queueing behind them; a first window done wakes this loop for the stream's next window.
With ``vocoder_first_window_preempt`` as well, this loop queues each batch's CFM solve one
Euler step at a time (stepped CUDA graphs), at most :data:`PREEMPT_QUEUED_STEPS` ahead of the
device, and the steps it queues after the lane launched a batch wait for that batch on the
device: the first window shares the card with two steps of a regular batch, not all ten.
``Vocoder.stats`` counts batches and rows for the metrics layer; ``on_batch`` is called with
each batch's row count, padded tokens and seconds. The engine still applies the watermark
(``settings.watermark``) to what ``audio()`` yields, as upstream does after S3Gen.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np
import torch

from gateway.engine.base import SAMPLE_RATE
from gateway.engine.vllm import gpu_serial
from gateway.engine.vllm.cfm_solver import GraphBuckets, drain
from gateway.engine.vllm.graph_calls import capture_stream
from gateway.engine.vllm.s3gen_batch import (
    BatchClock,
    FlowRow,
    HiftRow,
    HostCopy,
    NoiseTapes,
    S3GenBatch,
    S3GenVoice,
)
from gateway.engine.vllm.t3_pause import T3Pause, t3_may_pause
from gateway.engine.vllm.vocoder_stream import PROMPT_TOKENS_GUESS, VocoderStream, WindowJob, WindowResult
from gateway.engine.vllm.vocoder_windows import SAMPLES_PER_FRAME, TOKEN_MEL_RATIO, Window, WindowPolicy
from gateway.errors import EngineUnavailableError
from gateway.observability.timeline import Timeline
from gateway.settings import Settings

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
    flow_frames: int = 0
    """Mel frames the flow solved, voice prompts included (padding not)."""
    cfm_frames: int = 0
    """Mel frames of real rows the CFM solves computed (lookahead tokens' frames not)."""
    cfm_solved_frames: int = 0
    """The frames those solves computed with their graphs' padding (width and rows)."""
    cfm_eager_frames: int = 0
    """Of ``cfm_frames``, those solved outside a CUDA graph."""
    hift_frames: int = 0
    """Mel frames of real rows HiFT vocoded."""
    hift_eager_frames: int = 0
    """Of ``hift_frames``, those vocoded outside a CUDA graph."""
    whole_windows: int = 0
    """Streamed utterances vocoded as one window (T3 finished them before their first)."""
    device_busy_s: float = 0.0
    """Seconds the device's stream was occupied by vocoder batches (CUDA events from each
    batch's first to its last kernel; on the CPU the worker's time): over a wall-clock span,
    the GPU's busy share."""


@dataclass(slots=True)
class _Launched:
    """A batch whose work is queued on the device (``launch_batch``), its audio not yet read."""

    jobs: list[WindowJob]
    outcomes: list[WindowResult | Exception | None]
    rows: dict[int, tuple[HiftRow, torch.Tensor | None, int]]
    """Row index -> (its HiFT row, the phase at its carried frames, the voice's prompt tokens)."""
    copy: HostCopy
    clock: BatchClock
    launch_s: float = 0.0
    cfm: tuple[int, int, int] = (0, 0, 0)
    """The batch's CFM frames: of real rows, solved (padding included), and of real rows
    solved outside a CUDA graph."""
    hift: tuple[int, int] = (0, 0)
    """The batch's HiFT frames of real rows, and of those vocoded outside a CUDA graph."""


@dataclass(slots=True)
class _Feeding:
    """A batch whose launch goes on a step at a time (``vocoder_first_window_preempt``): its
    launch generator (:meth:`Vocoder._launch_steps`), resumed by the loop once the device is
    within :data:`PREEMPT_QUEUED_STEPS` of what is queued."""

    jobs: list[WindowJob]
    steps: Generator[None, None, _Launched]
    pause_t3: bool
    queued: deque[Any] = field(default_factory=deque)
    """CUDA events recorded after each step queued (none on the CPU), oldest first."""
    waited: Any = None
    """The lane's batch event this batch's steps last waited for."""
    host_s: float = 0.0
    """Worker seconds spent queueing it so far."""


def with_own_flow(s3gen: torch.nn.Module) -> Any:
    """What :class:`Vocoder` needs of ``s3gen`` (flow, HiFT, trim fade), with a copy of the
    flow: the vocoder casts its flow to the serving dtype in place, and ``S3Gen.embed_ref``
    (preparing a voice from a clip) runs in the dtype of ``s3gen.flow``, which must stay fp32."""
    return SimpleNamespace(flow=copy.deepcopy(s3gen.flow), mel2wav=s3gen.mel2wav, trim_fade=s3gen.trim_fade)


HIFT_GRAPH_FRAMES = 8192
"""Most mel frames (rows x frames) of one captured HiFT call: ~1.5 GiB of fp32 activations at
the bound, which the CFM's pool already holds (HiFT's 30 graphs added 12-32 MiB to it on an
H200, 2026-12-04)."""


LATENCY_WEIGHT = 0.2
"""Weight of the newest window in the vocoder's moving average of window latency."""

URGENT_LATENCIES = 1.0
"""With ``vocoder_first_apart``, a later window joins a batch of first windows when its
listener would run out within this many of the vocoder's recent window latencies (waiting for
the next batch it would go silent). The CPU model (docs/benchmarks.md, twentieth session): 1.0
and 2.0 alike for p95 first audio (755 / 761 ms), 1.0 better at p50 (544 / 669)."""


PREEMPT_QUEUED_STEPS = 2
"""``vocoder_first_window_preempt``: Euler steps of a regular batch queued on the device ahead
of its progress. A first-window batch the lane launches runs beside at most these; then the
regular batch's next steps wait for it. Two keep the device busy while the loop queues the
next step (one would leave a gap each step, the loop's round trip)."""


ENCODER_GRAPH_ATTENTION = 1 << 24
"""Most ``rows x frames^2`` of one captured flow encoder call. Its relative-position attention
holds (rows, 8 heads, frames, 2 frames) scores: ~0.5 GiB a tensor at this bound, ~6 alive at
once (~3 GiB of graph pool, estimated; the start log's ``encoder_hift_graph_gib`` measures
it). Unbounded (every CFM bucket, up to 32 rows x 1536 frames) the encoder graphs took 14.4
GiB on an H200 (2026-12-04) against the CFM's 2.0."""


def encoder_graph_shapes(cfm_shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(rows, width in tokens) of the flow encoder calls worth capturing: the CFM buckets' (a
    batch's encoder width is its CFM bucket's frames / 2) within
    :data:`ENCODER_GRAPH_ATTENTION`; wider batches run eager (their launch cost is small
    beside their arithmetic)."""
    return sorted({(r, f // TOKEN_MEL_RATIO) for r, f in cfm_shapes if r * f * f <= ENCODER_GRAPH_ATTENTION})


def hift_graph_shapes(policy: WindowPolicy, max_rows: int) -> list[tuple[int, int]]:
    """(rows, mel frames) of the HiFT calls worth capturing: a stream's first window (its new
    frames only; grown, ``first_grow_after_s``, in the later windows' sizes) and its later
    windows (the carried ``mel_overlap`` frames, then the new ones: every size
    ``WindowPolicy.size`` can give), rows a power of two up to ``max_rows``,
    at most :data:`HIFT_GRAPH_FRAMES` frames a call. Final windows (any length) run eager."""
    sizes = {policy.size(index) for index in range(1, 18)}
    sizes |= {k * policy.tokens for k in range(1, policy.cap // policy.tokens + 1)}
    frames = {TOKEN_MEL_RATIO * policy.first_tokens} | {policy.mel_overlap + TOKEN_MEL_RATIO * n for n in sizes}
    if policy.first_grow_after_s > 0:  # a first window that grew: its new frames only, no carry
        frames |= {TOKEN_MEL_RATIO * k * policy.tokens for k in range(1, policy.cap // policy.tokens + 1)}
    if policy.early_s > 0:  # later windows gone early (the carry, then their new frames)
        frames |= {policy.mel_overlap + TOKEN_MEL_RATIO * n for n in policy.early_sizes}
    rows = sorted({min(1 << k, max_rows) for k in range(max_rows.bit_length() + 1)})
    return [(r, f) for f in sorted(frames) for r in rows if r * f <= HIFT_GRAPH_FRAMES]


def served_policy(settings: Settings) -> WindowPolicy:
    """The window schedule the settings ask for (``stream_*`` settings)."""
    return WindowPolicy(first_tokens=settings.stream_first_window_tokens, tokens=settings.stream_window_tokens,
                        max_tokens=settings.stream_max_window_tokens,
                        final_merge_tokens=settings.stream_final_window_tokens,
                        first_grow_after_s=settings.stream_first_window_grow_after_s,
                        early_s=settings.stream_early_window_s)


SCHEDULE_PADDING = 0.1
"""A window width of the schedule whose solve the geometric graph widths would pad by more
than this share gets a graph width of its own (:func:`cfm_buckets`)."""


def schedule_frames(policy: WindowPolicy, prompt_tokens: int) -> list[int]:
    """The CFM widths (mel frames) of a stream's windows under ``policy`` for a voice prompt of
    ``prompt_tokens`` tokens: its first window, then each later window size (left context
    included, the lookahead not: non-final windows solve up to their last committed token)."""
    sizes = sorted({policy.size(index) for index in range(1, 18)})
    tokens = [prompt_tokens + policy.first_tokens] + [prompt_tokens + policy.left_context + n for n in sizes]
    return [TOKEN_MEL_RATIO * n for n in tokens]


GRAPH_MIN_FRAMES = 512
"""The narrowest CFM graph width (frames): a voice prompt alone is ~500 (10 s)."""


def cfm_buckets(policy: WindowPolicy, settings: Settings, *, max_rows: int, max_cells: int,
                max_frames: int | None = None) -> GraphBuckets:
    """The CFM graph shapes: the geometric widths, plus the widths of the window schedule for a
    full voice prompt (upstream's 10 s, or ``vocoder_prompt_tokens``) that those would pad by
    more than :data:`SCHEDULE_PADDING`. A stream's every window but its last has one of those
    widths, and under load (where the solve is arithmetic, not launches) padding is paid in
    full: a regular window's 650 frames ran at 800 (33% more attention, 23% more of the rest)."""
    top = settings.vocoder_graph_max_frames if max_frames is None else max_frames
    low = min(GRAPH_MIN_FRAMES, top)
    geometric = GraphBuckets.plan(max_rows=max_rows, max_frames=top, min_frames=low, max_cells=max_cells)
    prompt = min(PROMPT_TOKENS_GUESS, settings.vocoder_prompt_tokens or PROMPT_TOKENS_GUESS)
    extra = [f for f in schedule_frames(policy, prompt) if geometric.padding(f) > SCHEDULE_PADDING]
    return GraphBuckets.plan(max_rows=max_rows, max_frames=top, min_frames=low, max_cells=max_cells, extra_frames=extra)


def worker_stream(device: torch.device, priority: str, green: Any = None) -> None:
    """The vocoder worker thread's initializer: with ``vocoder_stream_priority = "high"`` on a
    GPU, the thread's CUDA work goes to a high-priority stream of its own (non-blocking with
    respect to the default stream; the current stream is per thread); with ``green`` (a CUDA
    green context, ``vocoder_sms``) to that context's stream, whose kernels keep to its SMs.
    What the start queued on the default stream (graph captures, noise tapes) is waited for
    first, once."""
    from gateway.engine.vllm.engine_thread import STREAM_PRIORITIES

    if device.type != "cuda" or (priority == "default" and green is None):
        return
    torch.cuda.synchronize(device)
    if green is not None:
        torch.cuda.set_stream(green.Stream())
        return
    torch.cuda.set_stream(torch.cuda.Stream(device, priority=STREAM_PRIORITIES[priority]))


MIN_T3_SMS = 8
"""SMs ``vocoder_sms`` must leave to the rest of the process (the driver's granularity on Hopper)."""


def green_context(device: torch.device, sms: int) -> Any:
    """A CUDA green context of ``sms`` SMs on ``device`` for the vocoder (``vocoder_sms``), None
    for 0 or a CPU device. Raises ``EngineUnavailableError`` where the card cannot have one (a
    PyTorch or driver without green contexts, or a partition that leaves the rest of the card
    fewer than :data:`MIN_T3_SMS` SMs)."""
    if sms <= 0 or device.type != "cuda":
        return None
    from torch.cuda import green_contexts

    total = torch.cuda.get_device_properties(device).multi_processor_count
    if sms > total - MIN_T3_SMS:
        raise EngineUnavailableError(f"vocoder_sms {sms} leaves fewer than {MIN_T3_SMS} of this GPU's {total} SMs "
                                     "to T3 and the rest")
    if not green_contexts.SUPPORTED:
        raise EngineUnavailableError("vocoder_sms needs PyTorch built with CUDA green contexts (CUDA 12.8+)")
    try:
        return green_contexts.GreenContext.create(sms, device.index or 0)
    except RuntimeError as exc:  # e.g. a driver older than 12.8
        raise EngineUnavailableError(f"vocoder_sms: no green context of {sms} SMs: {exc}") from exc


class Vocoder:
    """The vocoder loop shared by all streams of one engine."""

    def __init__(self, s3gen: torch.nn.Module, settings: Settings, *, device: torch.device | str = "cpu",
                 flow_dtype: torch.dtype = torch.float32, policy: WindowPolicy | None = None,
                 max_batch_tokens: int = 32768, bucket_tokens: int = 16, noise_seed: int = 0,
                 max_prompt_frames: int = 1000, pipeline_depth: int = 2, flow_steps: int | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 parent: Vocoder | None = None) -> None:
        self.lane = parent is not None
        """This loop is ``parent``'s first-window lane (``vocoder_first_window_lane_rows``): it
        plans only streams' first windows, with graphs of their widths only, from the parent's
        streams, into the parent's stats."""
        self._parent = parent
        # (the settings refuse preemption without a lane; a lane's own settings turn it off)
        self.preempt = settings.vocoder_first_window_preempt and not settings.gpu_serial_debug
        """This (main) loop queues its batches' CFM steps one at a time, after the lane's batches
        (``vocoder_first_window_preempt``)."""
        self._lane_event: Any = None
        """The CUDA event of the lane's latest batch (its audio copied out), set by the lane's
        worker under the launch lock; this loop's next steps wait for it."""
        self.settings = settings
        self.serial = settings.gpu_serial_debug
        """Diagnostics (``gpu_serial_debug``): each batch alone on the GPU, a fault named by its part."""
        self.pipeline_depth = 1 if self.serial else max(1, pipeline_depth)
        """Batches in flight at most (1: each batch's audio is read before the next launches)."""
        self.policy = policy or served_policy(settings)
        self.max_batch_rows = settings.vocoder_max_batch
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self.stats = VocoderStats()
        frames = TOKEN_MEL_RATIO * settings.max_speech_tokens
        tapes = NoiseTapes.generate(
            noise_seed, flow_frames=max_prompt_frames + frames,
            hift_samples=frames * SAMPLES_PER_FRAME,
            harmonics=s3gen.mel2wav.m_source.l_sin_gen.harmonic_num + 1, device=device)
        # flow_steps: a family's fixed step count (Turbo's distilled 2), which no knob changes
        self.batch = S3GenBatch(s3gen, device=device, flow_dtype=flow_dtype,
                                flow_steps=flow_steps or settings.flow_steps, tapes=tapes, bucket_tokens=bucket_tokens,
                                first_window_steps=0 if flow_steps else settings.vocoder_first_window_flow_steps,
                                prompt_tokens=settings.vocoder_prompt_tokens, compile=settings.vocoder_compile,
                                attention=settings.vocoder_attention,
                                split_min_rows=settings.vocoder_split_min_rows,
                                hift_kernels=settings.vocoder_hift_kernels)
        self.green = green_context(self.batch.device, settings.vocoder_sms)
        """The CUDA green context the worker runs batches on (``vocoder_sms``), None: the whole card."""
        if settings.vocoder_cuda_graphs and torch.device(device).type == "cuda":
            self._capture(max_batch_tokens)
        if self.policy.lookahead != self.batch.lookahead:
            raise ValueError(f"window lookahead must be the flow's pre-lookahead ({self.batch.lookahead})")
        self.trim_fade = self.batch.trim_fade
        """Upstream's fade-in against reference spill-over, applied to each stream's first samples."""
        self._voices: OrderedDict[str, S3GenVoice] = OrderedDict()  # worker thread only
        self._streams: set[VocoderStream] = set()
        self._tickets = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed_batches = 0
        """Batches failed in a row (reset by a success): a sticky device fault fails them all."""
        self._dead: BaseException | None = None
        self._t3_pause: T3Pause | None = None
        self._launch_lock = threading.Lock()
        """Held while a batch is launched: with a first-window lane, its worker and this loop's
        launch one at a time (S3Gen's eager modules keep caches, e.g. the flow encoder's
        positional encodings, that two threads must not grow at once); their work still runs
        side by side on the device (a launch queues it and returns)."""
        self._on_settled: Callable[[], None] | None = None
        """Called after this loop hands a batch's results (or failure) to its streams."""
        self._on_saturated: Callable[[], None] | None = None
        """Called when this loop has ``pipeline_depth`` batches in flight (it plans no more)."""
        self._in_flight: deque[_Launched] = deque()
        """Batches launched and not yet being finished (the loop's task only)."""
        self._window_latency_s = 0.0
        """``window_latency_s``: 0.0 until a window has been delivered."""
        if parent is not None:
            self._streams = parent._streams  # one set of streams, two loops planning from it
            self.stats = parent.stats
            self._launch_lock = parent._launch_lock
            # a first window done makes the stream's next window due, which the parent plans;
            # a full lane leaves its overflow of first windows to the parent (a burst of new
            # streams is not queued in batches of the lane's few rows one after another)
            self._on_settled = self._on_saturated = parent._wake.set
        self.first_lane: Vocoder | None = None
        """The loop that runs streams' first windows (``vocoder_first_window_lane_rows``), None:
        this one runs every window."""
        rows = settings.vocoder_first_window_lane_rows
        if rows > 0 and parent is None:
            self.first_lane = type(self)(  # a subclass (a benchmark's stand-in) gets a lane of its kind
                s3gen, msgspec.structs.replace(settings, vocoder_max_batch=rows, vocoder_first_window_lane_rows=0,
                                               vocoder_first_window_preempt=False, vocoder_sms=0),
                device=device, flow_dtype=flow_dtype, policy=self.policy, max_batch_tokens=max_batch_tokens,
                bucket_tokens=bucket_tokens, noise_seed=noise_seed, max_prompt_frames=max_prompt_frames,
                pipeline_depth=pipeline_depth, flow_steps=flow_steps, on_batch=on_batch, parent=self)

    @property
    def t3_pause(self) -> T3Pause | None:
        """T3's engine thread pauses while batches with first windows run, when set (the engine
        sets it with ``t3_first_window_pause_ms``; :mod:`gateway.engine.vllm.t3_pause`); the
        first-window lane's batches take it when there is one."""
        return self._t3_pause

    @t3_pause.setter
    def t3_pause(self, pause: T3Pause | None) -> None:
        self._t3_pause = pause
        if self.first_lane is not None:
            self.first_lane.t3_pause = pause

    def first_window_top(self) -> int:
        """The widest flow input (mel frames) a first window of a full voice prompt needs: the
        first-window solver's graphs, and all of the first-window lane's, go up to it."""
        step = self.batch.bucket_tokens  # a row's flow width is rounded up to these before a graph is chosen
        tokens = PROMPT_TOKENS_GUESS + self.policy.first_tokens + self.policy.lookahead
        widest = TOKEN_MEL_RATIO * -(-tokens // step) * step
        return min(self.settings.vocoder_graph_max_frames, max(widest, GRAPH_MIN_FRAMES))

    def lane_takes(self, stream: VocoderStream, window: Window) -> bool:
        """Whether the first-window lane (this loop, when it is one) runs ``window``: a
        streamed first window within the lane's graph widths (a first window grown under load,
        or a whole utterance, goes to the main lane)."""
        if window.index != 0 or stream.one_shot:
            return False
        return TOKEN_MEL_RATIO * self.batch.bucket(stream.cost_tokens(window)) <= self.first_window_top()

    @property
    def saturated(self) -> bool:
        """This loop has as many batches in flight as it runs at once: it plans no more now."""
        return len(self._in_flight) >= self.pipeline_depth

    def _plans(self, stream: VocoderStream, window: Window) -> bool:
        """Whether this loop plans ``window`` (with a first-window lane the two split them:
        the lane's first windows, the main loop the rest, and the lane's too while the lane
        is saturated)."""
        if self.lane:
            return self.lane_takes(stream, window)
        lane = self.first_lane
        return lane is None or lane.saturated or not lane.lane_takes(stream, window)

    def _capture(self, max_batch_tokens: int) -> None:
        """CUDA graphs for the CFM solves: every bucket for regular windows; for first windows
        solved with their own step count, the buckets a first window fits (voice prompt up
        to 10 s plus the window), in the same memory pool (the solves never run at once)."""
        # On the green context's stream (``vocoder_sms``): a graph captured elsewhere runs on
        # the whole card wherever it is replayed (graph_calls).
        with capture_stream(self.green.Stream() if self.green is not None else None):
            self._capture_all(max_batch_tokens)

    def _capture_all(self, max_batch_tokens: int) -> None:
        settings = self.settings
        cells = TOKEN_MEL_RATIO * max_batch_tokens
        top = self.first_window_top()
        # stepped (one Euler step a graph) where this loop queues its solves a step at a time
        self.batch.cfm.capture(cfm_buckets(self.policy, settings, max_rows=self.max_batch_rows, max_cells=cells,
                                           max_frames=top if self.lane else None), stepped=self.preempt)
        first = self.batch.first_cfm
        if first is not self.batch.cfm:
            first.capture(cfm_buckets(self.policy, settings, max_rows=self.max_batch_rows, max_cells=cells,
                                      max_frames=top), pool=self.batch.cfm.pool)
        # The flow encoder at the widths the CFM buckets give a batch (S3GenBatch.bucket), and
        # HiFT at the mel lengths of the windows the policy makes, in the same pool.
        pool = self.batch.cfm.pool
        self.batch.capture_encoder(encoder_graph_shapes(self.batch.cfm.buckets.shapes()), pool)
        self.batch.capture_hift(hift_graph_shapes(self.policy, self.max_batch_rows), pool)

    async def start(self) -> None:
        if self._task is not None:
            return
        # the first-window lane: a high-priority stream of its own, so its kernels go before the
        # main lane's waiting ones (and, with vocoder_sms, the whole card)
        priority = "high" if self.lane else self.settings.vocoder_stream_priority
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocoder-first" if self.lane else "vocoder",
                                            initializer=worker_stream, initargs=(self.batch.device, priority, self.green))
        self._dead = None
        self._task = asyncio.create_task(self._loop(), name="vocoder-first-lane" if self.lane else "vocoder-loop")
        self._task.add_done_callback(self._loop_ended)
        if self.first_lane is not None:
            await self.first_lane.start()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop never returns: if it raised, no window will ever run again, so every open
        stream ends now with a clean error (not a wait forever) and readiness turns red."""
        if task.cancelled() or task is not self._task:
            return
        exc = task.exception()
        self._dead = exc or RuntimeError("the vocoder loop ended")
        for stream in list(self._streams):
            stream.end(EngineUnavailableError(f"the vocoder stopped: {self._dead}"))

    def check_health(self) -> None:
        """Raise :class:`EngineUnavailableError` when the vocoder cannot serve: its loop died,
        or its last ``vocoder_unhealthy_after_failures`` batches all failed (a sticky CUDA
        fault in S3Gen fails every batch)."""
        if self._task is None:
            raise EngineUnavailableError("the vocoder is not running")
        if self._dead is not None:
            raise EngineUnavailableError(f"the vocoder loop died: {self._dead}")
        if self._failed_batches >= self.settings.vocoder_unhealthy_after_failures:
            raise EngineUnavailableError(f"the vocoder's last {self._failed_batches} batches failed")
        if self.first_lane is not None:
            self.first_lane.check_health()

    async def close(self) -> None:
        if self.first_lane is not None:
            await self.first_lane.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a loop that died was reported when it did
                pass
        for stream in list(self._streams):
            stream.end(EngineUnavailableError("the vocoder was shut down"))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)

    # --- what streams use (StreamHost) --------------------------------------------------
    def wake(self) -> None:
        self._wake.set()
        if self.first_lane is not None:
            self.first_lane.wake()

    def next_ticket(self) -> int:
        return next(self._tickets)

    def forget(self, stream: VocoderStream) -> None:
        self._streams.discard(stream)

    def count_dropped(self) -> None:
        self.stats.windows_dropped += 1

    @property
    def window_latency_s(self) -> float:
        """A moving average (the last ~5 windows weigh most) of the time from a window ready
        to its audio delivered: what a stream's early window (``stream_early_window_s``)
        expects to wait."""
        return self._window_latency_s

    def note_window_latency(self, seconds: float) -> None:
        prev = self._window_latency_s
        self._window_latency_s = seconds if prev == 0.0 else prev + LATENCY_WEIGHT * (seconds - prev)

    def flow_room(self, tokens: int) -> int:
        if not self.settings.vocoder_fill_graphs or self.batch.cfm.buckets is None:
            return 0  # eager solves run at the rows' own widths: nothing is padded
        width = self.batch.bucket(tokens)
        if self.batch.cfm.buckets.frames_for(TOKEN_MEL_RATIO * width) is None:
            return 0  # wider than every graph: eager
        return max(0, width - tokens)

    @property
    def open_streams(self) -> int:
        """Streams not yet ended."""
        return len(self._streams)

    def open_stream(self, voice_key: str, ref_dict: Mapping[str, Any], *, one_shot: bool = False,
                    trace: Timeline | None = None) -> VocoderStream:
        if self._task is None or self._dead is not None:
            raise EngineUnavailableError("the vocoder is not running")
        stream = VocoderStream(self, voice_key, ref_dict, one_shot, trace)
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
    def plan_batch(self, now: float | None = None) -> list[tuple[VocoderStream, Window]]:
        """The streams and windows the next batch takes (``now``: monotonic time, for aging)."""
        now = time.monotonic() if now is None else now
        ready = [(s, w) for s in self._streams if (w := s.ready_window(now)) is not None and self._plans(s, w)]
        # First windows first (time to first audio), then FIFO; but a later window that has
        # waited ``vocoder_max_later_wait_s`` joins the first ones (aging): a stream already
        # playing must not starve and underrun while new streams keep arriving.
        bound = self.settings.vocoder_max_later_wait_s

        def waits(sw: tuple[VocoderStream, Window]) -> bool:  # a later window not yet aged
            return sw[1].index > 0 and now - (sw[0].ready_since or now) < bound

        ready.sort(key=lambda sw: (waits(sw), sw[0].idle_since))
        if self.settings.vocoder_first_apart and any(self._quick_first(s, w) for s, w in ready):
            # a batch of first windows (and the later ones whose listener would otherwise go
            # silent) only: the first byte waits for a small solve, not for the regular
            # windows' batch, which goes next. Aging does not decide here: under load every
            # later window has waited past the bound, and all of them joined (a 30-row batch
            # at 32 streams on an H100, 2026-12-06: no gain). No later window starves: its
            # listener's audio runs down until it is urgent
            ready = [sw for sw in ready if sw[1].index == 0 or self._urgent(sw[0], now)]
        chosen: list[tuple[VocoderStream, Window]] = []
        longest = 0
        for stream, window in ready:
            if len(chosen) >= self.max_batch_rows:
                break
            cost = self.batch.bucket(stream.cost_tokens(window))
            if chosen and (len(chosen) + 1) * max(longest, cost) > self.max_batch_tokens:
                continue
            longest = max(longest, cost)
            chosen.append((stream, window))
        return chosen

    def _urgent(self, stream: VocoderStream, now: float) -> bool:
        """A later window whose listener has less audio left than :data:`URGENT_LATENCIES` of
        the vocoder's recent window latencies (waiting for the next batch it would go silent);
        one of a stream not yet heard is urgent."""
        left = stream.listener_left_s(now)
        return left is None or left < URGENT_LATENCIES * self._window_latency_s

    def _quick_first(self, stream: VocoderStream, window: Window) -> bool:
        """A streamed request's small first window (its first byte waits for it)."""
        return self.policy.quick_first(window) and not stream.one_shot

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight = self._in_flight = deque()
        feeding: _Feeding | None = None  # a batch being launched a step at a time (``preempt``)
        while True:
            if feeding is not None:
                if in_flight and in_flight[0].copy.done():
                    await self._finish(loop, in_flight.popleft())  # its audio is ready: hand it over now
                    continue
                if len(feeding.queued) >= PREEMPT_QUEUED_STEPS:  # the device is that far behind: wait
                    await asyncio.to_thread(feeding.queued.popleft().synchronize)
                feeding = await self._feed(loop, feeding)
                continue
            chosen = [] if self.saturated else self.plan_batch()
            if chosen:
                feeding = await self._launch(loop, chosen)
                continue  # launch another batch (other streams) before waiting for this one
            if in_flight:
                await self._finish(loop, in_flight.popleft())
                continue
            self._wake.clear()
            await self._wake.wait()

    # A batch is launched, fed and finished in coroutines of their own, not in the loop's body:
    # a local of the loop would keep the last batch (its rows' mels, and through their tails
    # the windows before) alive for as long as the loop idles after it.

    async def _launch(self, loop: asyncio.AbstractEventLoop,
                      chosen: list[tuple[VocoderStream, Window]]) -> _Feeding | None:
        """Launch the planned batch on the worker thread: the batch still to be fed a step at
        a time (``preempt``), or None once it is queued whole or has failed."""
        jobs = [stream.take(window) for stream, window in chosen]
        refs = {stream.voice_key: stream.ref_dict for stream, _ in chosen}
        pause = self._pause_t3(jobs)
        t0 = time.perf_counter()
        try:
            launched = await loop.run_in_executor(self._executor, self.launch_batch, jobs, refs, pause)
        except Exception as exc:  # the whole batch failed: fail its streams, keep serving
            self._failed_launch(jobs, pause, exc)
            return None
        if isinstance(launched, _Feeding):
            return launched
        launched.launch_s = time.perf_counter() - t0
        self._in_launched(launched)
        return None

    async def _feed(self, loop: asyncio.AbstractEventLoop, feeding: _Feeding) -> _Feeding | None:
        """Queue the next step of a batch being launched a step at a time: the batch while
        steps remain, None once it is queued whole or has failed."""
        try:
            fed = await loop.run_in_executor(self._executor, self.feed, feeding)
        except Exception as exc:  # the batch failed while being queued: as a failed launch
            self._failed_launch(feeding.jobs, feeding.pause_t3, exc)
            return None
        if isinstance(fed, _Launched):
            self._in_launched(fed)
            return None
        return feeding

    def _failed_launch(self, jobs: list[WindowJob], pause: bool, exc: Exception) -> None:
        """A batch failed before all of it was queued: its streams fail, the loop serves on."""
        if pause:
            self.t3_pause.release()  # type: ignore[union-attr]
        self._failed_batches += 1
        self._settle(jobs, [exc] * len(jobs))

    def _in_launched(self, launched: _Launched) -> None:
        self._in_flight.append(launched)
        if self.saturated and self._on_saturated is not None:
            self._on_saturated()

    async def _finish(self, loop: asyncio.AbstractEventLoop, launched: _Launched) -> None:
        """Wait for a launched batch's audio and hand it to its streams."""
        t0 = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._executor, self.finish_batch, launched)
        except Exception as exc:  # noqa: BLE001 - the device failed this batch
            self._failed_batches += 1
            outcomes = [exc] * len(launched.jobs)
        else:
            self._failed_batches = 0
            seconds = launched.launch_s + time.perf_counter() - t0
            done = [(j, r) for j, r in zip(launched.jobs, outcomes) if isinstance(r, WindowResult)]
            if done:
                self._count([j for j, _ in done], [r for _, r in done], seconds, launched.clock,
                            launched.cfm, launched.hift)
        self._settle(launched.jobs, outcomes)

    def _pause_t3(self, jobs: Sequence[WindowJob]) -> bool:
        """Hold T3's next steps for this batch (taken, not launched yet) when it carries a
        first window and no stream T3 decodes for would feel the pause."""
        pause = self.t3_pause
        if pause is None or not any(job.window.index == 0 for job in jobs):
            return False
        if not t3_may_pause(self._streams, pause.max_s, time.monotonic()):
            return False
        pause.hold()
        return True

    def _settle(self, jobs: Sequence[WindowJob], outcomes: Sequence[WindowResult | Exception]) -> None:
        try:
            self._hand_over(jobs, outcomes)
        finally:
            if self._on_settled is not None:
                self._on_settled()

    def _hand_over(self, jobs: Sequence[WindowJob], outcomes: Sequence[WindowResult | Exception]) -> None:
        for job, outcome in zip(jobs, outcomes):
            if isinstance(outcome, WindowResult):
                try:
                    job.stream.deliver(job, outcome)
                    continue
                except Exception as exc:  # never let one stream's seam stop the loop
                    outcome = exc
            job.stream.fail(outcome)

    def _count(self, jobs: list[WindowJob], results: list[WindowResult], seconds: float,
               clock: BatchClock | None = None, cfm: tuple[int, int, int] = (0, 0, 0),
               hift: tuple[int, int] = (0, 0)) -> None:
        st = self.stats
        st.batches += 1
        if clock is not None:
            st.device_busy_s += clock.busy_s()
        st.rows += len(jobs)
        st.first_window_rows += sum(j.window.index == 0 for j in jobs)
        st.whole_windows += sum(j.window.index == 0 and j.window.final and not j.stream.one_shot for j in jobs)
        st.flow_frames += sum(TOKEN_MEL_RATIO * (r.prompt_tokens + len(j.tokens)) for j, r in zip(jobs, results))
        st.cfm_frames += cfm[0]
        st.cfm_solved_frames += cfm[1]
        st.cfm_eager_frames += cfm[2]
        st.hift_frames += hift[0]
        st.hift_eager_frames += hift[1]
        st.busy_s += seconds
        st.audio_s += sum(j.window.new_mel_frames for j in jobs) * SAMPLES_PER_FRAME / SAMPLE_RATE
        st.last_batch_rows = len(jobs)
        st.last_batch_padded_tokens = len(jobs) * self.batch.bucket(
            max(len(j.tokens) + r.prompt_tokens for j, r in zip(jobs, results)))
        st.rows_per_batch[len(jobs)] = st.rows_per_batch.get(len(jobs), 0) + 1
        if self.on_batch is not None:
            self.on_batch(len(jobs), st.last_batch_padded_tokens, seconds)

    def _voice(self, key: str, ref_dict: Mapping[str, Any]) -> S3GenVoice:
        voice = self._voices.get(key)
        if voice is None:
            voice = self._voices[key] = self.batch.prepare_voice(ref_dict)
            while len(self._voices) > self.settings.voice_cache_size:
                self._voices.popitem(last=False)
        self._voices.move_to_end(key)
        return voice

    def launch_batch(self, jobs: list[WindowJob], refs: Mapping[str, Mapping[str, Any]],
                     pause_t3: bool = False) -> _Launched | _Feeding:
        """Worker thread: queue the batch's work on the device (flow for all rows at once,
        then HiFT grouped by length, then the copy of the audio to host memory) without
        waiting for any of it. A row whose voice cannot be prepared fails alone.
        ``pause_t3``: T3 is held (:meth:`_pause_t3`) until this work is done on the device.
        With ``preempt`` the batch is queued up to its CFM's first step and returned as a
        :class:`_Feeding` that :meth:`feed` goes on with."""
        if self.preempt:
            return self.feed(_Feeding(jobs, self._launch_steps(jobs, refs), pause_t3))
        with self._launch_lock, gpu_serial.serial(self.serial, "vocoder batch"):
            launched = self._launch_batch(jobs, refs)
            self._launched(launched, pause_t3)
        return launched

    def _launch_batch(self, jobs: list[WindowJob], refs: Mapping[str, Mapping[str, Any]]) -> _Launched:
        """The whole launch at once (:meth:`_launch_steps` run to its end)."""
        return drain(self._launch_steps(jobs, refs))

    def feed(self, feeding: _Feeding) -> _Launched | _Feeding:
        """Worker thread: queue the next step of a batch being launched a step at a time (or,
        after its last CFM step, the rest of it: HiFT and the copy); the finished launch once
        all is queued. A step queued after the lane launched a batch waits for that batch on
        the device. Each call holds the launch lock only while it queues: between two calls the
        lane may launch."""
        t0 = time.perf_counter()
        cuda = self.batch.device.type == "cuda"
        try:
            with self._launch_lock:
                lane_event = self._lane_event
                if cuda and lane_event is not None and lane_event is not feeding.waited:
                    torch.cuda.current_stream().wait_event(lane_event)
                    feeding.waited = lane_event
                try:
                    next(feeding.steps)
                except StopIteration as done:
                    launched: _Launched = done.value
                    self._launched(launched, feeding.pause_t3)
                    launched.launch_s = feeding.host_s + time.perf_counter() - t0
                    return launched
                if cuda:
                    step = torch.cuda.Event()
                    step.record()
                    feeding.queued.append(step)
        except BaseException:
            feeding.steps.close()
            raise
        feeding.host_s += time.perf_counter() - t0
        return feeding

    def _launched(self, launched: _Launched, pause_t3: bool) -> None:
        """A batch is all queued (launch lock held): T3's pause ends with it, and a lane's batch
        becomes what the main loop's next steps wait for."""
        if pause_t3 and self.t3_pause is not None:
            self.t3_pause.until(launched.copy.done)  # the batch's last event: its audio copied out
        if self._parent is not None and self._parent.preempt and launched.copy.event is not None:
            self._parent._lane_event = launched.copy.event

    def _launch_steps(self, jobs: list[WindowJob], refs: Mapping[str, Mapping[str, Any]]
                      ) -> Generator[None, None, _Launched]:
        """The batch's launch as a generator that yields between its CFM solves' Euler steps."""
        started = time.perf_counter()
        for job in jobs:
            if job.trace is not None:
                job.trace.mark(f"vocoder batch launched ({len(jobs)} rows)", at=started)
        clock = BatchClock(self.batch.device, sync=self.serial)
        outcomes: list[WindowResult | Exception | None] = []
        voices: list[S3GenVoice | None] = []
        for job in jobs:
            try:
                voices.append(self._voice(job.voice_key, refs[job.voice_key]))
            except Exception as exc:  # a malformed reference: that stream's problem only
                voices.append(None)
                outcomes.append(exc)
            else:
                outcomes.append(None)
        live = [i for i, v in enumerate(voices) if v is not None]
        if not live:
            return _Launched(jobs, outcomes, {}, HostCopy([], clock), clock)
        before = (self.batch.cfm_frames, self.batch.cfm_solved_frames, self.batch.cfm_eager_frames,
                  self.batch.hift_frames, self.batch.hift_eager_frames)
        mels = yield from self.batch.flow_stepwise([
            FlowRow(voices[i], jobs[i].tokens, jobs[i].window.context_start, jobs[i].window.new_tokens,  # type: ignore[arg-type]
                    jobs[i].window.final, first=self._quick_first(jobs[i].stream, jobs[i].window))
            for i in live], clock=clock)
        hift_rows = [HiftRow(mel if jobs[i].mel_tail is None else torch.cat([jobs[i].mel_tail, mel], dim=1),
                             jobs[i].start_frame, jobs[i].phase, jobs[i].carry) for i, mel in zip(live, mels)]
        waves = self.batch.run_hift(hift_rows, clock=clock)
        # One device-to-host copy for the whole batch, asynchronous: waited for in finish_batch.
        copy = HostCopy([wav for wav, _ in waves], clock)
        rows = {i: (row, phase, voices[i].prompt_len)  # type: ignore[union-attr]
                for i, row, (_, phase) in zip(live, hift_rows, waves)}
        cfm = (self.batch.cfm_frames - before[0], self.batch.cfm_solved_frames - before[1],
               self.batch.cfm_eager_frames - before[2])
        hift = (self.batch.hift_frames - before[3], self.batch.hift_eager_frames - before[4])
        return _Launched(jobs, outcomes, rows, copy, clock, cfm=cfm, hift=hift)

    def finish_batch(self, launched: _Launched) -> list[WindowResult | Exception]:
        """Worker thread: wait for the batch's audio (its one synchronisation) and hand each
        row its result."""
        with self.batch.section("host copy"):
            host = launched.copy.wait()
        outcomes = launched.outcomes
        for (i, (row, phase, prompt_len)), audio in zip(launched.rows.items(), host):
            frames, carry = row.mel.shape[1], launched.jobs[i].carry
            tail = row.mel[:, frames - carry:] if carry else None
            outcomes[i] = WindowResult(audio, frames, tail, phase, prompt_len)
        traced = [job.trace for job in launched.jobs if job.trace is not None]
        if traced:
            ends = launched.clock.ends(launched.copy.done_at)[1:]
            for trace in traced:
                for part, at in ends:
                    trace.mark(f"vocoder: {part}", at=at)
        return outcomes  # type: ignore[return-value]


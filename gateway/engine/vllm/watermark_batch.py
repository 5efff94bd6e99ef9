"""The Perth watermark of many streams' chunks in one pass, computing what each chunk's own
``PerthImplicitWatermarker.apply_watermark`` computes.

Upstream watermarks one utterance at a time. Served, every stream's every window is one
call: resample to 32 kHz (librosa/soxr, on the CPU), STFT, a 7-layer convolutional encoder
over the magnitude frames, inverse STFT, a copy back, resample to 24 kHz. On the GPU that is
a few dozen small kernels and a host sync per chunk: the profile (docs/benchmarks.md) timed
117-406 ms of it for a batch of 32-64 windows, serial, and with Turbo's 2-step flow the
watermark costs more than the flow does.

:func:`mark_batch` does the same arithmetic for a list of chunks:

* the resampling is upstream's (``librosa.resample``, soxr), on a thread pool (soxr releases
  the GIL), so every chunk is resampled exactly as alone; or, with ``resample = "device"``
  (``watermark_resample``), on the device: a windowed-sinc resampler with librosa's
  ``kaiser_best`` filter (:data:`KAISER_BEST`, torchaudio's polyphase convolution), per group
  of equal-length chunks, both ways, so a pass does no audio work on the host at all. Not
  soxr's filter, so not upstream's samples: on a real voice (``voices/aria.flac``, 3 s, the
  package's Perth weights, the CPU) the watermarked audio is 67.8 dB from soxr's path (the
  watermark itself lies 17.1 dB under the speech) and Perth's detector finds it in every
  frame on both (tests);
* STFT and inverse STFT run per group of equal-length chunks (streams at the same point of the
  window schedule have equal lengths), each chunk with its own edges;
* the encoder runs once over all chunks' frames, zero-padded to the longest: after every
  layer the padded frames are set back to zero, which is exactly the zero padding each
  ``Conv1d(padding=3)`` gives a chunk at its own end, so a frame's result does not depend on
  its neighbours in the batch; the mask of where the watermark may go (a frame's energy
  against the chunk's loudest frame) is taken over the chunk's own frames;
* one copy back to the host for the whole batch, and no other wait for the device: the
  chunks go up through pinned memory, and the inverse STFT (:func:`istft`) skips
  ``torch.istft``'s read-back of its window envelope, so on a stream the vocoder also uses a
  pass waits for the vocoder's queued batches once, not twice per group of lengths.

A batch of one chunk is upstream's own call (on the GPU 4.9 ms against the pass's 6.7 for a
3.3 s window, docs/benchmarks.md: at one stream every window is alone).

Equal to the per-chunk call up to the order of floating-point sums (tests: SNR > 100 dB on
the CPU).

Which CUDA stream the pass runs on (``watermark_stream``, :func:`work_stream`): by default
the default stream, which the vocoder's batches use too, so the pass's one wait (its copy
back; upstream's call for a lone window has three) also waits for whatever vocoder batch was
queued before it. A stream of its own (``own``, ``high``) spares it that wait, but
every served run with it on an H200 (2026-12-04 at 128 streams, 2026-12-05 at 32) ended in
an illegal memory access and a segfault, while the rows before it (up to 256 streams) and a
run with the vocoder's and the watermark's device work serialised (``gpu_serial_debug``) did
not: until the cause is found it is an option, not the default (docs/benchmarks.md). With
the default stream the served rows ran clean at 32 and 128 streams (an H100, 2026-12-05).
A third fault (an H100, 2026-12-06, Turbo at 256 streams) had what all three had: vLLM's
engine core in a process and the vocoder on the default stream; with the thread core and the
vocoder on a stream of its own every run was clean, so the settings allow a stream of its own
only there.

:class:`WatermarkBatcher` feeds it from the event loop: ``await apply(samples)``
queues a chunk, one worker thread takes whatever is queued (up to ``max_rows``) and answers
each caller; a caller that is cancelled meanwhile is simply not answered. A pass takes at
most ``max_rows`` chunks and ``max_batch_s`` seconds of audio (the device memory it needs
grows with both). With ``first_apart`` the chunks a caller marks ``first`` (a stream's first
window: its first audio waits for it) go in a pass of their own ahead of the others taken
with them, so a first window waits for a pass over other first windows, not over seconds of
other streams' audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.engine.vllm import gpu_serial

RESAMPLE_THREADS = 4
RESAMPLE_MODES = ("soxr", "device")
"""``watermark_resample``: upstream's soxr on the host, or the sinc resampler on the device."""
KAISER_BEST = {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
               "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492}
"""librosa's (resampy's) ``kaiser_best`` windowed-sinc filter in torchaudio's terms: 64 zero
crossings a side, the pass band to 94.8% of Nyquist, a Kaiser window of beta 14.77."""
MAX_ROWS = 64
MAX_BATCH_S = 240.0
"""Most audio one pass takes (seconds, all rows): its spectrograms and activations on the
device grow with it (~5.5 MB per second of audio, measured on the CPU); a longer row still goes, alone."""


STREAM_PRIORITIES = {"own": 0, "high": -1}
"""``watermark_stream`` values that make a stream of its own, by CUDA priority (lower numbers
run first; 0 is the default streams')."""


def work_stream(watermarker: Any, kind: str = "default") -> Any:
    """The CUDA stream for the watermark's device work (see the module docstring): None for
    ``default`` (the current stream) or when Perth is not on a GPU; else a stream of its
    own, of high priority for ``high`` (the GPU schedules the pass's waiting kernels before
    the vocoder's)."""
    import torch

    device = watermarker.perth_net.device  # perth's: a torch.device or its name
    if kind == "default" or not isinstance(device, (str, torch.device)) or torch.device(device).type != "cuda":
        return None
    return torch.cuda.Stream(torch.device(device), priority=STREAM_PRIORITIES[kind])


def mark_batch(watermarker: Any, signals: list[np.ndarray], sample_rate: int, pool: ThreadPoolExecutor | None = None,
               stream: Any = None, resample: str = "soxr") -> list[np.ndarray]:
    """Each of ``signals`` (float32, ``sample_rate``) watermarked as
    ``watermarker.apply_watermark(signal, sample_rate=sample_rate)`` would; its device work on
    ``stream`` when given (:func:`work_stream`); ``resample``: soxr on the host (upstream's) or
    ``device`` (:data:`KAISER_BEST`, see the module docstring)."""
    import torch
    from librosa import resample as soxr

    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample is one of {RESAMPLE_MODES}, not {resample!r}")
    net = watermarker.perth_net
    rate = net.hp.sample_rate
    if not signals:
        return []
    on_device = resample == "device" and sample_rate != rate

    def to_net(x: np.ndarray) -> np.ndarray:
        return soxr(x, orig_sr=sample_rate, target_sr=rate) if sample_rate != rate else x

    def from_net(x: np.ndarray) -> np.ndarray:
        return soxr(x, orig_sr=rate, target_sr=sample_rate) if sample_rate != rate else x

    on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    if len(signals) == 1 and not on_device:  # upstream's own call: alone, the pass's bookkeeping only costs (GPU: 6.7 vs 4.9 ms)
        with on_stream:
            return [np.asarray(watermarker.apply_watermark(signals[0], sample_rate=sample_rate), dtype=np.float32)]
    mapper = pool.map if pool is not None else map
    device = net.device
    prepared = signals if on_device else list(mapper(to_net, signals))
    with torch.inference_mode(), on_stream:
        mags: list[Any] = [None] * len(prepared)
        phases: list[Any] = [None] * len(prepared)
        for rows in _groups_by_length(prepared):
            batch = _upload(torch.from_numpy(np.stack([prepared[i] for i in rows])).float(), device)
            if on_device:
                batch = resampler(sample_rate, rate, batch.device)(batch)
            mag, phase = net.ap.signal_to_magphase(batch)  # (n, F, T), as one chunk's (F, T) each
            for j, i in enumerate(rows):
                mags[i], phases[i] = mag[j], phase[j]
        marked = _encode(net, mags)
        outputs: list[Any] = [None] * len(prepared)
        lengths = [int(m.shape[-1]) for m in mags]
        for rows in _groups_by_length(lengths):
            mag = torch.stack([marked[i] for i in rows])
            wave = _magphase_to_signal(net, mag, torch.stack([phases[i] for i in rows]))
            if on_device:
                wave = resampler(rate, sample_rate, wave.device)(wave)
            for j, i in enumerate(rows):
                outputs[i] = wave[j]
        sizes = [int(o.shape[-1]) for o in outputs]
        host = torch.cat(outputs).cpu().numpy()  # one copy (and one wait for the device) per batch
    pieces = np.split(host, np.cumsum(sizes)[:-1])
    return [p.astype(np.float32, copy=False) for p in pieces] if on_device else list(mapper(from_net, pieces))


_resamplers: dict[tuple[int, int, str], Any] = {}
_resamplers_lock = threading.Lock()


def resampler(orig: int, new: int, device: Any) -> Any:
    """The :data:`KAISER_BEST` resampler from ``orig`` to ``new`` Hz on ``device`` (a module
    holding its filter, built once per device: ``(..., samples)`` in, ``(..., ceil(samples *
    new / orig))`` out, as ``librosa.resample``'s lengths)."""
    key = (orig, new, str(device))
    with _resamplers_lock:
        module = _resamplers.get(key)
        if module is None:
            from torchaudio.transforms import Resample

            module = _resamplers[key] = Resample(orig, new, **KAISER_BEST).to(device)
    return module


def _upload(host: Any, device: Any) -> Any:
    """A CPU tensor on ``device`` without a wait: staged in pinned memory and copied
    asynchronously on the current stream (a pageable copy waits for every kernel queued on
    it before, on the default stream the vocoder's batches)."""
    import torch

    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _magphase_to_signal(net: Any, mag: Any, phase: Any) -> Any:
    """Perth's ``ap.magphase_to_signal`` (its torchaudio ``InverseSpectrogram``: ``torch.istft``,
    centred, unnormalised) for (B, F, T) without its host wait: ``torch.istft`` reads its
    window envelope's minimum back to the host (the overlap-add check, a synchronisation with
    everything queued on the stream). Perth's Hann window at a hop of n_fft / 6.4 passes that
    check at every frame count, so the envelope is divided by as ``torch.istft`` does after
    it: the same operations, equal to float rounding (tested against ``torch.istft``)."""
    from perth.perth_net.perth_net_implicit.utils import magphase_to_cx

    spec = magphase_to_cx(net.ap.hp, mag, phase)
    inverse = net.ap.inv_spectrogram
    return istft(spec, inverse.window, inverse.n_fft, inverse.hop_length)


def istft(spec: Any, window: Any, n_fft: int, hop: int) -> Any:
    """``torch.istft(spec, n_fft, hop, window=window, center=True)`` for a (B, n_fft // 2 + 1, T)
    complex ``spec`` and an ``n_fft``-long window, with no host synchronisation: inverse real
    DFT per frame, windowed, overlap-added, divided by the window's summed squares, the
    centring padding cut off."""
    import torch
    import torch.nn.functional as F

    b, _, frames = spec.shape
    chunks = torch.fft.irfft(spec.transpose(1, 2), n=n_fft) * window  # (B, T, n_fft)
    length = n_fft + hop * (frames - 1)
    fold = {"output_size": (1, length), "kernel_size": (1, n_fft), "stride": (1, hop)}
    signal = F.fold(chunks.transpose(1, 2), **fold).reshape(b, length)
    envelope = F.fold(window.pow(2).expand(1, frames, n_fft).transpose(1, 2), **fold).reshape(1, length)
    start, end = n_fft // 2, length - n_fft // 2
    return signal[:, start:end] / envelope[:, start:end]


def _groups_by_length(items: list[Any]) -> list[list[int]]:
    """Indices grouped by ``len`` (or by the value, for ints), in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item if isinstance(item, int) else len(item), []).append(i)
    return list(groups.values())


def _encode(net: Any, mags: list[Any]) -> list[Any]:
    """Perth's ``Encoder.forward`` for chunks of different frame counts at once."""
    import torch

    encoder = net.encoder
    longest = max(int(m.shape[-1]) for m in mags)
    batch = torch.stack([torch.nn.functional.pad(m, (0, longest - int(m.shape[-1]))) for m in mags])  # (B, F, T)
    frames = torch.arange(longest, device=batch.device)
    ends = _upload(torch.tensor([int(m.shape[-1]) for m in mags]), batch.device)  # no wait for the device
    valid = frames[None, :] < ends[:, None]
    keep = valid[:, None, :].to(batch.dtype)
    energy = batch.sum(dim=1).masked_fill(~valid, float("-inf"))  # (B, T), the chunk's own frames
    threshold = energy.max(dim=1).values * 0.05  # perth's magmask(p=0.05)
    mask = (energy > threshold[:, None]).to(batch.dtype)[:, None]
    x = batch[:, : encoder.subband]
    for layer in encoder.layers:
        x = layer(x) * keep  # a chunk's own end: zeros beyond it, as its conv padding gives it
    out = batch.clone()
    out[:, : encoder.subband] += x * mask
    return [out[i, :, : int(m.shape[-1])] for i, m in enumerate(mags)]


@dataclass
class _Item:
    samples: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    first: bool = False


class WatermarkBatcher:
    """Every stream's watermark calls batched by one worker thread (see the module docstring).
    ``apply`` from the event loop; ``close`` once, after the last call."""

    def __init__(self, watermarker: Any, sample_rate: int, *, max_rows: int = MAX_ROWS,
                 max_batch_s: float = MAX_BATCH_S, resample_threads: int = RESAMPLE_THREADS,
                 serial: bool = False, stream: str = "default", first_apart: bool = False,
                 resample: str = "soxr") -> None:
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample is one of {RESAMPLE_MODES}, not {resample!r}")
        self._watermarker = watermarker
        self._resample = resample
        self._first_apart = first_apart
        self._serial = serial
        """``gpu_serial_debug``: each pass alone on the GPU, ended by a synchronisation."""
        self._rate = sample_rate
        self._max_rows = max_rows
        self._max_samples = int(max_batch_s * sample_rate)
        self._next: _Item | None = None
        """Taken from the queue but over the last batch's bound: the next batch's first."""
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(resample_threads, thread_name_prefix="watermark-resample")
        self._stream = work_stream(watermarker, stream)
        self._closed = False
        self.batches = 0
        self.rows = 0
        self.busy_s = 0.0
        """Seconds the worker spent in passes (resampling, device work and the wait for it)."""
        self.audio_s = 0.0
        """Seconds of audio watermarked."""
        self._thread = threading.Thread(target=self._run, name="watermark", daemon=True)
        self._thread.start()

    async def apply(self, samples: np.ndarray, *, first: bool = False) -> np.ndarray:
        """``samples`` (float32 at the batcher's rate) watermarked. ``first``: a stream's first
        window (with ``first_apart``, marked in a pass of first windows only)."""
        if self._closed:
            raise RuntimeError("the watermark batcher is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.put(_Item(np.asarray(samples, dtype=np.float32), future, loop, first))
        return await future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        while True:  # queued behind the stop (a call that raced the close): answered, not left waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.loop.call_soon_threadsafe(_fail, item.future, RuntimeError("the watermark batcher is closed"))

    def _run(self) -> None:
        while True:
            first, self._next = (self._next, None) if self._next is not None else (self._queue.get(), None)
            if first is None:
                return
            items = [first]
            size = first.samples.size
            stop = False
            while len(items) < self._max_rows:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if size + item.samples.size > self._max_samples:
                    self._next = item  # over the bound: it opens the next batch
                    break
                items.append(item)
                size += item.samples.size
            items = [i for i in items if not i.future.cancelled()]  # their callers left
            for batch in self._passes(items):
                self._mark(batch)
            if stop:
                return

    def _passes(self, items: list[_Item]) -> list[list[_Item]]:
        """The passes one take of the queue is marked in: one, or with ``first_apart`` the
        first windows' ahead of the rest's."""
        if not self._first_apart:
            return [items] if items else []
        firsts = [i for i in items if i.first]
        rest = [i for i in items if not i.first]
        return [batch for batch in (firsts, rest) if batch]

    def _mark(self, items: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            with gpu_serial.serial(self._serial, "watermark pass"):
                marked = mark_batch(self._watermarker, [i.samples for i in items], self._rate, self._pool,
                                    self._stream, self._resample)
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the failure
            for item in items:
                item.loop.call_soon_threadsafe(_fail, item.future, exc)
            return
        self.batches += 1
        self.rows += len(items)
        self.busy_s += time.perf_counter() - t0
        self.audio_s += sum(i.samples.size for i in items) / self._rate
        for item, out in zip(items, marked):
            item.loop.call_soon_threadsafe(_answer, item.future, out)


def _answer(future: asyncio.Future[np.ndarray], value: np.ndarray) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[np.ndarray], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

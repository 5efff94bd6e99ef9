"""A function of tensors captured as CUDA graphs, one per padded input shape.

The vocoder's flow encoder and HiFT run as hundreds of small kernels per batch; launched from
Python on a loaded server (the GIL shared with vLLM's output handling and the event loop)
their launch time, not their arithmetic, is what a batch waits for. :class:`GraphCalls`
captures such a function once per shape key at start (``(rows, width)``: rows a bucket the
caller pads to with rows of its own choosing, width exact) and replays it with the inputs
copied into the graph's static buffers; a key it did not capture runs the function eagerly.

Outputs are cloned out of the graph: graphs share one memory pool with the CFM solver's
(:mod:`gateway.engine.vllm.cfm_solver`; they run one at a time on the vocoder's one worker
thread, in stream order), so a later replay may reuse an earlier one's output memory.

A graph keeps to the SMs of the CUDA context it was captured in, wherever it is replayed: one
captured on an ordinary stream runs on the whole card even when replayed on a green
context's stream (measured on an H100, 2026-12-05: a 16-SM green stream ran an eager product
in 10.1 ms, the same product's graph captured outside in 1.4 ms, captured on the green stream
in 9.8 ms). :func:`capture_stream` therefore names the stream captures happen on
(``vocoder_sms``: the vocoder's green context's).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Key = tuple[int, int]
"""(rows, width) of a captured call."""


_capture = threading.local()


@contextlib.contextmanager
def capture_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Graphs captured by this thread inside the block are captured (and warmed up) on
    ``stream``: a green context's keeps their kernels to its SMs. None: PyTorch's own capture
    stream, the whole card."""
    before = getattr(_capture, "stream", None)
    _capture.stream = stream
    try:
        yield
    finally:
        _capture.stream = before


def capture_graph(fn: Callable[..., Any], args: Sequence[torch.Tensor], pool: tuple[int, int] | None, *,
                  error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn(*args)`` captured as a CUDA graph in ``pool`` after one warm-up call on a side
    stream (library handles, kernel selection, lazily built buffers); returns the graph and
    the outputs of the captured call (its static output buffers). Both on the
    :func:`capture_stream` when one is set."""
    device = args[0].device
    stream = getattr(_capture, "stream", None)
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=error_mode):
        outputs = fn(*args)
    return graph, outputs


class _Captured:
    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
                 pool: tuple[int, int] | None) -> None:
        self.inputs = [t.clone() for t in inputs]
        self.graph, self.outputs = capture_graph(fn, self.inputs, pool, error_mode="thread_local")

    def run(self, inputs: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tuple(out[:rows].clone() for out in self.outputs)


class GraphCalls:
    """``fn(*inputs) -> tuple of tensors``, every input and output batched on dim 0, captured
    per ``(rows, width)`` key. Blocking; one worker thread only (static buffers)."""

    def __init__(self, name: str, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.name = name
        self.fn = fn
        self._graphs: dict[Key, _Captured] = {}
        self._rows: dict[int, list[int]] = {}
        """width -> captured row buckets, ascending."""
        self.graph_bytes = 0
        self.replays = 0
        self.eager_runs = 0

    @property
    def keys(self) -> list[Key]:
        return sorted(self._graphs)

    def capture(self, examples: Iterable[tuple[Key, Sequence[torch.Tensor]]], pool: tuple[int, int] | None) -> float:
        """Capture ``fn`` on each example's inputs (already padded to its key's shape), the
        largest first; returns seconds taken."""
        items = sorted(examples, key=lambda item: -item[0][0] * item[0][1])
        if not items:
            return 0.0
        device = items[0][1][0].device
        t0 = time.perf_counter()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        for key, inputs in items:
            self._graphs[key] = _Captured(self.fn, inputs, pool)
            bisect.insort(self._rows.setdefault(key[1], []), key[0])
        torch.cuda.synchronize(device)
        self.graph_bytes += torch.cuda.memory_reserved(device) - before
        seconds = time.perf_counter() - t0
        log.info("captured %d %s graphs in %.1f s (%.0f MiB)", len(items), self.name, seconds,
                 (torch.cuda.memory_reserved(device) - before) / 2**20)
        return seconds

    def clear(self) -> None:
        self._graphs.clear()
        self._rows.clear()

    def fit(self, rows: int, width: int) -> int | None:
        """The captured row bucket that holds ``rows`` rows of ``width``, or None (eager)."""
        buckets = self._rows.get(width)
        if not buckets:
            return None
        i = bisect.bisect_left(buckets, rows)
        return buckets[i] if i < len(buckets) else None

    def run(self, key: Key | None, inputs: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` sliced to the first ``rows`` rows: replayed when ``key`` (the shape
        ``inputs`` were padded to) was captured, else eager."""
        graph = self._graphs.get(key) if key is not None else None
        if graph is None:
            self.eager_runs += 1
            return tuple(out[:rows] for out in self.fn(*inputs))
        self.replays += 1
        return graph.run(inputs, rows)

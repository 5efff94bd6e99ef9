"""vLLM's engine core in a thread of this process (``vllm_engine_core = "thread"``), behind the
part of ``AsyncLLM``'s surface the engine uses: ``generate`` (an async iterator of
``RequestOutput`` deltas that aborts its request when it is closed or cancelled),
``check_health`` and ``shutdown``.

Why: ``AsyncLLM`` always runs the engine core in a process of its own, so T3's decode and the
vocoder's S3Gen are two CUDA contexts on one GPU, and without MPS the GPU time-slices between
contexts instead of running their kernels side by side. In the server the first window's CFM
took 117 ms against ~40 ms alone while T3 kept decoding (docs/benchmarks.md, issue 18). Here
vLLM's ``LLMEngine`` runs in-process (its ``InprocClient``), stepped by one thread on a CUDA
stream of its own (a non-blocking one: the legacy default stream the vocoder and encoders use
would otherwise serialise with it), so both share one context. With
``vllm_engine_stream_priority = "high"`` that stream is of high priority: T3's waiting kernels go
before the vocoder's (:func:`own_cuda_stream`).

The cost is the GIL: the engine thread's host work per step (scheduling, input preparation,
output processing) now competes with the event loop and the vocoder's thread, which a
separate process never did. Which wins is a GPU measurement (``gateway/tools/gpu/speed.sh``
runs both); the default stays ``process``.

Threading: every call into the ``LLMEngine`` happens on the engine thread. Other threads talk
to it through a command queue (add, abort, stop); a step's outputs go back to their requests'
asyncio queues with one ``call_soon_threadsafe`` per event loop (a wake-up of the loop, a write
to its self-pipe: one per step, not one per request and step). The thread blocks on the queue
while no request is unfinished, and otherwise steps the engine, taking new commands between
steps. When the thread ends (shut down, or an exception in the engine), every open request gets
:class:`EngineThreadDied`, and so do ``check_health`` and new requests: none is left waiting.
vLLM keeps one distributed state per process, so one such engine per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.engine.vllm.t3_pause import T3Pause
from gateway.observability.timeline import Timeline

log = structlog.get_logger("gateway.engine")

STOP_TIMEOUT_S = 60.0
"""How long ``shutdown`` waits for the thread to finish its step and shut the engine down."""


class EngineThreadDied(RuntimeError):
    """The engine thread ended by an exception (the vLLM engine is unusable)."""


@dataclass(slots=True)
class StepClock:
    """The engine thread's steps: how many, their wall time and the thread's CPU time in them
    (``engine.step()`` and handing its outputs to the event loops; written by the engine
    thread only, read at a metrics scrape). Wall time well above CPU time is time the thread
    waited: for the GPU (T3's kernels, slowed by what else runs on the card) or for the GIL."""

    steps: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: Any
    params: Any
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[tuple[str, Any]]
    trace: Timeline | None = None
    """The request's first-audio timeline, if it keeps one: the engine thread marks its part
    (:data:`TRACE_STAGES`) up to the step that gave the request its first output."""

    def deliver(self, kind: str, value: Any) -> None:
        """From the engine thread: hand one item to the request's event loop."""
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, (kind, value))


TRACE_STAGES = ("t3 engine took it", "t3 added to vLLM", "t3 first step began", "t3 output step began",
                "t3 output step ended")
"""What the engine thread marks on a traced request's timeline, in this order: the thread took
the add command from its queue (after the step it was in, or a T3 pause), vLLM's
``add_request`` returned (its input processing), the first step after that began (a pause
before it shows as the gap), the step whose outputs held the request's first tokens began and
ended. The request's next mark, ``t3 tokens: 1``, is its event loop receiving them. With the
engine core in a process (``AsyncLLM``) vLLM's side has no such marks."""


class ThreadedLLM:
    """A vLLM ``LLMEngine`` stepped by a thread of its own; see the module docstring.

    ``make_engine`` runs on that thread (the engine's CUDA work, its graph capture included,
    belongs to it) and returns an object with ``LLMEngine``'s ``add_request``, ``step``,
    ``abort_request``, ``has_unfinished_requests`` and ``engine_core.shutdown``. The
    constructor returns once it has, or raises what it raised."""

    def __init__(self, make_engine: Callable[[], Any], *, name: str = "vllm-engine",
                 stream: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._traced: dict[str, _Request] = {}  # engine thread only: traced requests before their first output
        self._traced_new: list[_Request] = []  # engine thread only: traced requests added since the last step
        self._started = threading.Event()
        self._lock = threading.Lock()  # orders "closed" against every command put on the queue
        self._closed = False
        self._ended: str | None = None  # why the thread ended: the error's text, or "shut down"
        self._stream = stream or own_cuda_stream
        self._start_error: BaseException | None = None
        self._engine: Any = None
        self.clock = StepClock()
        self.pause: T3Pause | None = None
        """Held by the vocoder while a batch of first windows runs (``t3_first_window_pause_ms``):
        the thread waits it out before its next step (:mod:`gateway.engine.vllm.t3_pause`)."""
        self._thread = threading.Thread(target=self._run, args=(make_engine,), name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    @classmethod
    def from_vllm_config(cls, config: Any, *, priority: str = "normal") -> ThreadedLLM:
        """vLLM's in-process engine (no engine-core process) for ``config``; its CUDA work on a
        stream of ``priority`` (``normal`` or ``high``: see :func:`own_cuda_stream`)."""

        def make() -> Any:
            from vllm.v1.engine.llm_engine import LLMEngine
            from vllm.v1.executor import Executor

            return LLMEngine(vllm_config=config, executor_class=Executor.get_class(config), log_stats=False,
                             multiprocess_mode=False)

        return cls(make, name="vllm-engine", stream=functools.partial(own_cuda_stream, priority))

    # --- what the engine calls (event-loop thread) --------------------------------------------

    async def generate(self, prompt: Any, params: Any, request_id: str, *,
                       trace: Timeline | None = None) -> AsyncIterator[Any]:
        """The request's outputs as the engine steps; closing or cancelling this iterator
        before the last one aborts the request (its KV cache and batch slot are freed).
        ``trace``: the request's timeline, which the engine thread marks (:data:`TRACE_STAGES`)."""
        request = _Request(request_id, prompt, params, asyncio.get_running_loop(), asyncio.Queue(), trace)
        if not self._submit("add", request):
            raise self._ended_error()
        finished = False
        try:
            while True:
                kind, value = await request.outputs.get()
                if kind == "error":
                    finished = True  # the engine has dropped it already
                    raise value
                if value.finished:
                    finished = True
                yield value
                if finished:
                    return
        finally:
            if not finished:
                self._submit("abort", request_id)

    @property
    def output_processor(self) -> Any:
        """The engine's output processor (vLLM's ``OutputProcessor``), as ``AsyncLLM`` has
        one: the engine thread runs it; from another thread, read its request states and set
        no more than one attribute at a time (:mod:`gateway.engine.vllm.t3.delivery`)."""
        return self._engine.output_processor

    async def check_health(self) -> None:
        if self._closed or not self._thread.is_alive():
            raise self._ended_error()

    def shutdown(self) -> None:
        """Stop the thread after its current step, fail the requests still open, shut the
        engine down (blocks until then, at most :data:`STOP_TIMEOUT_S`)."""
        if self._submit("stop", None):
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("vllm_engine_thread_stop_timeout", timeout_s=STOP_TIMEOUT_S)

    def _submit(self, command: str, value: Any) -> bool:
        """Queue a command for the engine thread; False once it has ended (or is ending)."""
        with self._lock:
            if self._closed:
                return False
            self._commands.put((command, value))
            return True

    def _ended_error(self) -> EngineThreadDied:
        return EngineThreadDied(f"the vLLM engine thread has ended ({self._ended or 'stopped'})")

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self, make_engine: Callable[[], Any]) -> None:
        with self._stream():
            try:
                engine = make_engine()
            except BaseException as exc:  # noqa: BLE001 - the constructor re-raises it
                self._start_error = exc
                self._closed = True
                self._started.set()
                return
            self._engine = engine
            self._started.set()
            try:
                self._serve(engine)
                self._end("shut down")
            except BaseException as exc:  # noqa: BLE001 - every waiting request hears of it
                log.exception("vllm_engine_thread_died")
                self._end(f"died: {type(exc).__name__}: {exc}")
            finally:
                try:
                    engine.engine_core.shutdown()
                except Exception:  # noqa: BLE001 - nothing more to do for an engine going away
                    log.exception("vllm_engine_shutdown_failed")

    def _end(self, why: str) -> None:
        """No more commands from here on; every request still open, or added but not yet
        taken, gets :class:`EngineThreadDied`."""
        with self._lock:
            self._closed = True
            self._ended = why
        error = self._ended_error()
        for request in self._requests.values():
            request.deliver("error", error)
        self._requests.clear()
        self._traced.clear()
        self._traced_new.clear()
        while True:
            try:
                command, value = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                value.deliver("error", error)

    def _serve(self, engine: Any) -> None:
        while True:
            for command, value in self._take_commands(block=not engine.has_unfinished_requests()):
                if command == "stop":
                    return
                if command == "add":
                    self._add(engine, value)
                elif command == "abort" and self._requests.pop(value, None) is not None:
                    self._traced.pop(value, None)
                    engine.abort_request([value])
            if engine.has_unfinished_requests():
                if self.pause is not None:
                    self.pause.wait()
                began, cpu = time.perf_counter(), time.thread_time()
                if self._traced_new:
                    self._mark_first_step(began)
                step: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
                outputs = engine.step()
                ended = time.perf_counter()
                for output in outputs:
                    request = self._requests.get(output.request_id)
                    if request is None:
                        continue  # aborted meanwhile
                    if output.finished:
                        del self._requests[output.request_id]
                    if request.trace is not None and self._traced.pop(output.request_id, None) is not None:
                        request.trace.mark("t3 output step began", at=began)
                        request.trace.mark("t3 output step ended", at=ended)
                    step.setdefault(request.loop, []).append((request, output))
                for loop, delivered in step.items():  # one wake-up of each loop per step, not one per request
                    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is waiting
                        loop.call_soon_threadsafe(_hand_out, delivered)
                clock = self.clock
                clock.cpu_s += time.thread_time() - cpu
                clock.wall_s += time.perf_counter() - began
                clock.steps += 1

    def _mark_first_step(self, began: float) -> None:
        """Mark ``t3 first step began`` on the traced requests added since the last step (and
        not aborted meanwhile)."""
        for request in self._traced_new:
            if request.request_id in self._traced:
                request.trace.mark("t3 first step began", at=began)  # type: ignore[union-attr]
        self._traced_new.clear()

    def _take_commands(self, *, block: bool) -> Iterator[tuple[str, Any]]:
        """The commands waiting now (at least one when ``block``: the engine is idle)."""
        if block:
            yield self._commands.get()
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, engine: Any, request: _Request) -> None:
        if request.trace is not None:
            request.trace.mark("t3 engine took it")
        try:
            engine.add_request(request.request_id, request.prompt, request.params)
        except Exception as exc:  # noqa: BLE001 - the request's own fault (its prompt, its params)
            request.deliver("error", exc)
            return
        self._requests[request.request_id] = request
        if request.trace is not None:
            request.trace.mark("t3 added to vLLM")
            self._traced[request.request_id] = request
            self._traced_new.append(request)


def _hand_out(delivered: list[tuple[_Request, Any]]) -> None:
    """On a request's event loop: one engine step's outputs into their requests' queues."""
    for request, output in delivered:
        request.outputs.put_nowait(("output", output))


STREAM_PRIORITIES = {"normal": 0, "high": -1}
"""CUDA stream priorities by name: PyTorch's pools, 0 the default streams' (lowest), -1 its
high-priority one (lower numbers run first)."""


@contextlib.contextmanager
def own_cuda_stream(priority: str = "normal") -> Iterator[None]:
    """Run the engine thread's CUDA work on a stream of its own (a pool stream: non-blocking
    with respect to the legacy default stream that the rest of this process uses). ``high``:
    the GPU's block scheduler takes this stream's waiting kernels before those of
    lower-priority streams (the vocoder's, on the default stream), so a T3 step interleaves
    with a long vocoder batch instead of queueing behind it; kernels already running are not
    pre-empted."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    with torch.cuda.stream(torch.cuda.Stream(priority=STREAM_PRIORITIES[priority])):
        yield

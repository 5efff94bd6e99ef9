"""vLLM's engine core in a thread (``vllm_engine_core = "thread"``): the ``AsyncLLM`` surface
over an in-process engine, driven here by a stand-in ``LLMEngine`` (tests/llm_engine_double.py).
Every engine call on the engine thread, outputs in order per request, abort on close and on
cancellation, a bad request failing alone, a dying engine failing everyone and the health
check, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from llm_engine_double import LLMEngineDouble

from gateway.engine.vllm.engine_thread import TRACE_STAGES, EngineThreadDied, ThreadedLLM
from gateway.observability.timeline import Timeline
from gateway.settings import SettingsError, load_settings


async def _collect(llm: ThreadedLLM, request_id: str) -> list[int]:
    tokens = []
    async for out in llm.generate({"prompt_embeds": None}, {"max_tokens": 9}, request_id):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


async def _wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture
def double_and_llm():  # type: ignore[no-untyped-def]
    """Starts a ThreadedLLM over a double (tokens 0-9); shuts every one down after the test."""
    llms: list[ThreadedLLM] = []

    def start(**kwargs) -> tuple[LLMEngineDouble, ThreadedLLM]:  # type: ignore[no-untyped-def]
        double = LLMEngineDouble(list(range(10)), **kwargs)
        llms.append(ThreadedLLM(lambda: double, name="test-engine"))
        return double, llms[-1]

    yield start
    for llm in llms:
        llm.shutdown()


async def test_requests_stream_in_order_and_only_the_engine_thread_touches_the_engine(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=3)
    results = await asyncio.gather(*(_collect(llm, f"r{i}") for i in range(4)))
    assert results == [list(range(10))] * 4
    assert len(double.threads) == 1 and threading.get_ident() not in double.threads
    assert sorted(r for r, _, _ in double.added) == ["r0", "r1", "r2", "r3"] and double.aborted == []


async def test_the_engine_thread_clocks_its_steps(double_and_llm) -> None:
    """Each step counted, with its wall time and the engine thread's CPU time in it (the
    double's steps sleep: wall time the thread spent waiting, not computing)."""
    double, llm = double_and_llm(per_step=2, step_s=0.01)
    await _collect(llm, "a")
    clock = llm.clock
    await _wait_for(lambda: clock.steps == double.steps)  # the last step's clock follows its hand-out
    assert clock.steps >= 5
    assert clock.wall_s >= 0.01 * clock.steps
    assert 0.0 < clock.cpu_s < clock.wall_s / 2


async def test_the_engines_output_processor_is_reachable_as_async_llms_is(double_and_llm) -> None:
    """The token grouping (``vllm_stream_interval``) sets per-request intervals in the
    engine's output processor, which ``AsyncLLM`` and ``LLMEngine`` both have."""
    double, llm = double_and_llm()
    assert llm.output_processor is double.output_processor


async def test_a_traced_request_has_the_engine_threads_part_of_its_first_audio_marked(double_and_llm) -> None:
    """A request with a timeline gets the engine thread's marks in order: the command taken,
    vLLM's add_request done, the first step after it, and the step that gave its first tokens
    (the double's third: prefill and async scheduling's lag), each where it happened, and
    none after the first output; an untraced request beside it streams as before."""
    double, llm = double_and_llm(per_step=1, step_s=0.02, first_after=3)
    other = asyncio.create_task(_collect(llm, "untraced"))
    await _wait_for(lambda: double.steps >= 2)
    trace = Timeline()
    tokens = []
    async for out in llm.generate({}, {}, "traced", trace=trace):
        if not tokens:
            trace.mark("t3 tokens: 1")
        tokens.extend(out.outputs[0].token_ids)
    assert tokens == list(range(10)) and await other == list(range(10))
    rows = trace.rows()
    assert [stage for stage, _, _ in rows] == [*TRACE_STAGES, "t3 tokens: 1"]
    at = {stage: ms for stage, ms, _ in rows}
    assert at["t3 output step ended"] - at["t3 output step began"] >= 20  # one step of the double
    assert at["t3 output step began"] - at["t3 first step began"] >= 2 * 20  # two steps without output


async def test_a_traced_request_aborted_before_its_first_output_is_marked_no_further(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=1, step_s=0.01, first_after=1000)  # no request is ever answered
    keep = asyncio.create_task(_collect(llm, "keep"))  # keeps the engine stepping
    trace = Timeline()
    outputs = llm.generate({}, {}, "gone", trace=trace)
    task = asyncio.create_task(outputs.__anext__())
    await _wait_for(lambda: double.steps >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await outputs.aclose()
    await _wait_for(lambda: double.aborted == ["gone"])
    steps = double.steps
    await _wait_for(lambda: double.steps >= steps + 3)
    assert [stage for stage, _ in trace.marks] == ["t3 engine took it", "t3 added to vLLM", "t3 first step began"]
    keep.cancel()
    with pytest.raises(asyncio.CancelledError):
        await keep


async def test_an_idle_engine_thread_waits_instead_of_stepping(double_and_llm) -> None:
    double, llm = double_and_llm()
    await _collect(llm, "a")
    steps = double.steps
    await asyncio.sleep(0.2)
    assert double.steps == steps  # blocked on its queue, not spinning
    assert await _collect(llm, "b") == list(range(10))  # and wakes for the next request


async def test_closing_the_iterator_aborts_the_request_and_others_go_on(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=1, step_s=0.01)
    other = asyncio.create_task(_collect(llm, "other"))
    outputs = llm.generate({}, {}, "closed")
    first = await outputs.__anext__()
    assert first.outputs[0].token_ids == [0]
    await outputs.aclose()
    await _wait_for(lambda: "closed" in double.aborted)
    assert "closed" not in double.live
    assert await other == list(range(10))
    assert double.aborted == ["closed"]


async def test_cancelling_the_consumer_aborts_its_request(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=1, step_s=0.02)
    task = asyncio.create_task(_collect(llm, "cancelled"))
    await _wait_for(lambda: double.steps >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_for(lambda: double.aborted == ["cancelled"])
    await _wait_for(lambda: not double.live)


async def test_a_request_the_engine_refuses_fails_alone(double_and_llm) -> None:
    double, llm = double_and_llm(refuse="bad")
    with pytest.raises(ValueError, match="too long"):
        await _collect(llm, "bad")
    assert double.aborted == []  # never added, nothing to abort
    assert await _collect(llm, "good") == list(range(10))
    await llm.check_health()


async def test_a_dying_engine_fails_open_requests_the_health_check_and_new_requests(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=1, fail_on_step=3)
    with pytest.raises(EngineThreadDied, match="illegal memory access"):
        await _collect(llm, "doomed")
    with pytest.raises(EngineThreadDied):
        await llm.check_health()
    with pytest.raises(EngineThreadDied):
        await _collect(llm, "late")
    assert double.shut_down.wait(5)  # the engine is shut down as the thread ends


def test_an_engine_that_cannot_start_raises_from_the_constructor() -> None:
    def boom() -> LLMEngineDouble:
        raise RuntimeError("CUDA out of memory while capturing graphs")

    with pytest.raises(RuntimeError, match="out of memory"):
        ThreadedLLM(boom)


async def test_shutdown_ends_the_thread_and_shuts_the_engine_down(double_and_llm) -> None:
    double, llm = double_and_llm()
    await _collect(llm, "a")
    llm.shutdown()
    assert double.shut_down.is_set() and not llm._thread.is_alive()
    llm.shutdown()  # twice is harmless
    with pytest.raises(EngineThreadDied, match="shut down"):
        await llm.check_health()
    with pytest.raises(EngineThreadDied, match="shut down"):
        await _collect(llm, "late")  # refused at once, never left waiting


async def test_shutdown_fails_the_requests_still_open_instead_of_leaving_them_waiting(double_and_llm) -> None:
    double, llm = double_and_llm(per_step=1, step_s=0.02)
    task = asyncio.create_task(_collect(llm, "open"))
    await _wait_for(lambda: double.steps >= 2)
    await asyncio.to_thread(llm.shutdown)
    with pytest.raises(EngineThreadDied, match="shut down"):
        await asyncio.wait_for(task, 5)


def test_the_setting_refuses_several_models_in_one_thread() -> None:
    with pytest.raises(SettingsError, match="one model"):
        load_settings(environ={}, overrides={"vllm_engine_core": "thread",
                                             "models": ["chatterbox", "chatterbox-turbo"]})
    assert load_settings(environ={}, overrides={"vllm_engine_core": "thread"}).vllm_engine_core == "thread"


def test_the_stream_priority_needs_the_engine_core_in_a_thread() -> None:
    with pytest.raises(SettingsError, match="vllm_engine_core thread"):
        load_settings(environ={}, overrides={"vllm_engine_stream_priority": "high"})
    settings = load_settings(environ={}, overrides={"vllm_engine_core": "thread",
                                                    "vllm_engine_stream_priority": "high"})
    assert settings.vllm_engine_stream_priority == "high"
    assert load_settings(environ={}).vllm_engine_stream_priority == "normal"


@pytest.mark.parametrize(("name", "value"), [("normal", 0), ("high", -1)])
def test_the_engine_thread_takes_a_stream_of_its_priority(monkeypatch, name: str, value: int) -> None:
    """On a GPU the thread's CUDA work runs on a pool stream of the named priority (the CUDA
    calls stood in for: this machine has no GPU)."""
    import contextlib

    import torch

    from gateway.engine.vllm.engine_thread import own_cuda_stream

    made, entered = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda priority=0: made.append(priority) or f"stream{priority}")

    @contextlib.contextmanager
    def stream(s):  # type: ignore[no-untyped-def]
        entered.append(s)
        yield

    monkeypatch.setattr(torch.cuda, "stream", stream)
    with own_cuda_stream(name):
        assert entered == [f"stream{value}"]
    assert made == [value]


def test_the_vocoder_stream_priority_needs_the_engine_core_in_a_thread_and_t3_not_high() -> None:
    with pytest.raises(SettingsError, match="vllm_engine_core thread"):
        load_settings(environ={}, overrides={"vocoder_stream_priority": "high"})
    with pytest.raises(SettingsError, match="choose which"):
        load_settings(environ={}, overrides={"vllm_engine_core": "thread", "vocoder_stream_priority": "high",
                                             "vllm_engine_stream_priority": "high"})
    settings = load_settings(environ={}, overrides={"vllm_engine_core": "thread", "vocoder_stream_priority": "high"})
    assert settings.vocoder_stream_priority == "high"
    assert load_settings(environ={}).vocoder_stream_priority == "default"


def test_the_vocoder_worker_thread_takes_a_high_priority_stream_of_its_own(monkeypatch) -> None:
    """``vocoder_stream_priority = "high"``: the worker thread's initializer waits for the start's
    work on the default stream, then makes a stream of PyTorch's high priority its current one
    (CUDA stood in for: none here); ``default``, or the CPU, leaves the thread as it is."""
    import torch

    from gateway.engine.vllm import vocoder

    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: ("stream", device, priority))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: calls.append(("set_stream", stream)))
    cuda = torch.device("cuda", 0)
    vocoder.worker_stream(cuda, "high")
    assert calls == [("synchronize", cuda), ("set_stream", ("stream", cuda, -1))]
    calls.clear()
    vocoder.worker_stream(cuda, "default")
    vocoder.worker_stream(torch.device("cpu"), "high")
    assert calls == []


async def test_the_vocoder_worker_thread_is_initialised_with_the_setting(s3gen, monkeypatch) -> None:
    from gateway.engine.vllm import vocoder

    seen: list = []
    monkeypatch.setattr(vocoder, "worker_stream", lambda device, priority, green: seen.append(
        (device.type, priority, threading.current_thread().name)))
    settings = load_settings({}, {"flow_steps": 1, "max_speech_tokens": 64, "vllm_engine_core": "thread",
                                  "vocoder_stream_priority": "high"})
    voc = vocoder.Vocoder(s3gen, settings)
    await voc.start()
    try:
        await asyncio.get_running_loop().run_in_executor(voc._executor, lambda: None)
    finally:
        await voc.close()
    assert len(seen) == 1 and seen[0][:2] == ("cpu", "high") and seen[0][2].startswith("vocoder")


def test_the_vocoder_worker_thread_takes_its_green_contexts_stream(monkeypatch) -> None:
    """``vocoder_sms``: the worker's CUDA work goes to the green context's stream (its kernels
    keep to the context's SMs), after the start's work on the default stream."""
    import torch

    from gateway.engine.vllm import vocoder

    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: calls.append(("set_stream", stream)))
    green = SimpleNamespace(Stream=lambda: "green stream")
    cuda = torch.device("cuda", 0)
    vocoder.worker_stream(cuda, "default", green)
    assert calls == [("synchronize", cuda), ("set_stream", "green stream")]


def test_the_vocoders_green_context_is_made_only_where_the_card_can_have_it(monkeypatch) -> None:
    import torch
    from torch.cuda import green_contexts

    from gateway.engine.vllm import vocoder
    from gateway.errors import EngineUnavailableError

    cuda = torch.device("cuda", 0)
    assert vocoder.green_context(torch.device("cpu"), 96) is None and vocoder.green_context(cuda, 0) is None
    made: list = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(green_contexts, "SUPPORTED", True)
    monkeypatch.setattr(green_contexts.GreenContext, "create", staticmethod(lambda sms, device_id=0: made.append(
        (sms, device_id)) or "context"))
    assert vocoder.green_context(cuda, 112) == "context" and made == [(112, 0)]
    with pytest.raises(EngineUnavailableError, match="leaves fewer than 8 of this GPU's 132 SMs"):
        vocoder.green_context(cuda, 128)
    monkeypatch.setattr(green_contexts, "SUPPORTED", False)
    with pytest.raises(EngineUnavailableError, match="green contexts"):
        vocoder.green_context(cuda, 112)


def test_vocoder_sms_needs_the_engine_core_in_a_thread_and_no_stream_priority() -> None:
    with pytest.raises(SettingsError, match="vocoder_sms"):
        load_settings({}, {"vocoder_sms": 112})
    with pytest.raises(SettingsError, match="vocoder_sms"):
        load_settings({}, {"vocoder_sms": 112, "vllm_engine_core": "thread", "vocoder_stream_priority": "high"})
    assert load_settings({}, {"vocoder_sms": 112, "vllm_engine_core": "thread"}).vocoder_sms == 112
    assert load_settings(environ={}).vocoder_sms == 0

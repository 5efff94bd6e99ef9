"""On the GPU: a graph captured inside :func:`capture_stream` of a green context's stream keeps
to that context's SMs wherever it is replayed (the reason ``vocoder_sms`` captures its graphs
there: on the H100 of 2026-12-05 one captured outside ran on the whole card even replayed on
the green stream). Measured by time: a large product on 16
of an H100's 132 SMs takes ~7x as long as on the whole card."""

from __future__ import annotations

import time

import pytest
import torch

from gateway.engine.vllm.graph_calls import capture_graph, capture_stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMS = 16


def _replay_ms(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, n: int = 10) -> float:
    with torch.cuda.stream(stream):
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def test_a_graph_captured_on_a_green_stream_keeps_to_its_sms() -> None:
    from torch.cuda import green_contexts

    if not green_contexts.SUPPORTED:
        pytest.skip("PyTorch without CUDA green contexts")
    total = torch.cuda.get_device_properties(0).multi_processor_count
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    context = green_contexts.GreenContext.create(SMS, 0)  # held: its streams do not keep it alive
    green = context.Stream()
    outside, _ = capture_graph(torch.matmul, [a, b], None)
    with capture_stream(green):
        inside, _ = capture_graph(torch.matmul, [a, b], None)
    whole = _replay_ms(outside, torch.cuda.current_stream())
    assert _replay_ms(inside, green) > 0.5 * (total / SMS) * whole
    assert _replay_ms(inside, torch.cuda.current_stream()) > 0.5 * (total / SMS) * whole

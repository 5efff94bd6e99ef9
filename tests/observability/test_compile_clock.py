"""What torch.compile did between two points (gateway/observability/compile_clock.py), read
from PyTorch's own counters around real compiles on the CPU."""

from __future__ import annotations

import torch

from gateway.observability.compile_clock import CompileClock


def _block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, (x.shape[-1],)) @ w) + x


def test_each_new_static_shape_is_one_graph_and_a_repeat_is_none() -> None:
    torch._dynamo.reset()
    fn = torch.compile(_block, dynamic=False, fullgraph=True, backend="aot_eager")
    w = torch.randn(16, 16)
    clock = CompileClock()
    fn(torch.randn(2, 8, 16), w)
    first = clock.read()
    assert first.graphs == 1
    assert 0 < first.backend_s < first.compile_s <= first.wall_s

    clock = CompileClock()
    fn(torch.randn(2, 8, 16), w)  # the same shape: its guards pass, nothing compiles
    assert clock.read().graphs == 0 and clock.read().compile_s == 0

    clock = CompileClock()
    for rows in (3, 4):  # static: every new shape is compiled again
        fn(torch.randn(rows, 8, 16), w)
    again = clock.read()
    assert again.graphs == 2 and again.compile_s > 0
    text = again.describe()
    assert text.startswith("torch.compile ") and "(2 graphs; the backend" in text and "Dynamo" in text


def test_nothing_compiled_reads_as_zero() -> None:
    clock = CompileClock()
    _block(torch.randn(2, 4, 8), torch.randn(8, 8))
    read = clock.read()
    assert (read.graphs, read.compile_s, read.backend_s) == (0, 0.0, 0.0) and read.wall_s >= 0

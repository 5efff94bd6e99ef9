"""Where a start's torch.compile time goes: Dynamo's tracing (with its guards), the compiler
backend (inductor: code generation, or loading it from its cache) and how many graphs were
compiled, between two points of this process.

The compiled CFM estimator's CUDA graphs took 181 s to capture with every inductor artifact
already on the disk against 35 s for the plain estimator's (H100, 2026-12-07): this says how
much of that is compiling at all (the rest: the captures' warm-up runs, kernels loaded and
tuned on their first launch). It reads PyTorch's own counters
(``torch._dynamo.utils.compilation_time_metrics``, what ``compile_times()`` prints); a PyTorch
without them reads as zeros."""

from __future__ import annotations

import time
from dataclasses import dataclass

_TRACE = "_compile.compile_inner"  # one entry per frame Dynamo compiled: tracing, guards, backend
_BACKEND = "OutputGraph.call_user_compiler"  # the backend's share of it (inductor)


def _metrics() -> tuple[float, float, int]:
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return 0.0, 0.0, 0
    compiles = metrics.get(_TRACE, [])
    return sum(compiles), sum(metrics.get(_BACKEND, [])), len(compiles)


@dataclass(frozen=True, slots=True)
class CompileTime:
    wall_s: float
    """Seconds between the two points, compiling or not."""
    compile_s: float
    """Of them, inside torch.compile's compilation of a frame (Dynamo and the backend)."""
    backend_s: float
    """Of ``compile_s``, in the compiler backend (inductor's code generation or cache load)."""
    graphs: int
    """Frames compiled (each new shape of a static compile is one per compiled function)."""

    def describe(self) -> str:
        return (f"torch.compile {self.compile_s:.1f} s of {self.wall_s:.1f} ({self.graphs} graphs; "
                f"the backend {self.backend_s:.1f} s, Dynamo {self.compile_s - self.backend_s:.1f} s)")


class CompileClock:
    """``clock = CompileClock()`` ... ``clock.read()``: what torch.compile did in between."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._compile, self._backend, self._graphs = _metrics()

    def read(self) -> CompileTime:
        compile_s, backend_s, graphs = _metrics()
        return CompileTime(wall_s=time.perf_counter() - self._t0, compile_s=compile_s - self._compile,
                           backend_s=backend_s - self._backend, graphs=graphs - self._graphs)

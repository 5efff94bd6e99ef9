"""CPU time by thread of this process, read at a metrics scrape.

Several threads of one process run Python here (the event loop, vLLM's engine core with
``vllm_engine_core = thread``, the vocoder's and the watermark's workers, the PyAV encoders) and
share one GIL. Whether that lock, and not the GPU, is what holds T3 back under load is read
from how many cores each thread keeps busy: threads that together run Python about one core's
worth are waiting for each other. Python threads are grouped by name (a pool's workers, named
``prefix_N``, together); what the process used in any other thread (native ones: PyTorch's,
vLLM's, FFmpeg's; and Python threads that have ended) is ``other``.
"""

from __future__ import annotations

import re
import threading
import time

_WORKER_SUFFIX = re.compile(r"_\d+$")
"""``ThreadPoolExecutor`` names its workers ``{prefix}_{n}``."""

OTHER = "other"


def group_of(name: str) -> str:
    """A thread's group: its name without a pool worker's index (``vocoder_0`` -> ``vocoder``)."""
    return _WORKER_SUFFIX.sub("", name)


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) used so far by the live Python threads of each group, and
    by the rest of the process (``other``; it grows by a group's share when one of its threads
    ends). Empty where the OS has no per-thread CPU clocks."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return {}
    total = time.process_time()
    groups: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:  # it ended between the listing and the read
            continue
        group = group_of(thread.name)
        groups[group] = groups.get(group, 0.0) + seconds
    groups[OTHER] = groups.get(OTHER, 0.0) + max(0.0, total - sum(groups.values()))
    return groups

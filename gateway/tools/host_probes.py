"""What a benchmark reads about the machine it runs on: a process tree's resident memory, the
GPU's used memory and name, the CPU and how fast it runs Python. Each probe returns None where it cannot answer (no GPU, no
``/proc``), never raises, and imports nothing heavy: the benchmark client must not start a
CUDA context of its own just to read memory."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process (``VmRSS``), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not),
    or None where ``/proc`` cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    state = stat.rsplit(")", 1)[-1].split()[:1]  # the name, in parentheses, may hold spaces
    return bool(state) and state[0] not in ("Z", "X")


EXIT_POLL_S = 0.5
"""How often :func:`exited` looks."""


async def exited(pid: int) -> None:
    """Return once process ``pid`` no longer runs (a benchmark's watch on the server it measures:
    a dead server would only give its clients connection errors). Never, where ``/proc`` cannot
    tell."""
    while alive(pid) is not False:
        await asyncio.sleep(EXIT_POLL_S)


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid`` (children, grandchildren, ...)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 4096:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` and all its descendants (vLLM's engine core is a child)."""
    own = rss_bytes(pid)
    if own is None:
        return None
    return own + sum(rss_bytes(child) or 0 for child in descendants(pid))


def _nvml() -> object | None:
    try:
        import pynvml  # shipped with vLLM's dependencies (nvidia-ml-py)

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no NVML: another probe, or no answer
        return None


def gpu_used_bytes(index: int = 0) -> int | None:
    """Memory used on GPU ``index`` by every process (what the device has given out)."""
    nvml = _nvml()
    if nvml is not None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
    out = _smi("memory.used", index)
    return None if out is None else int(float(out)) * 1_048_576


def card() -> str:
    """The GPU's name and memory, or the CPU's when there is no GPU."""
    name, total = _smi("name", 0), _smi("memory.total", 0)
    if name:
        return f"{name} ({total} MiB)" if total else name
    return f"CPU {platform.processor() or platform.machine()} (no GPU)"


def cpu_card() -> str:
    """The CPU this ran on (its model name where ``/proc/cpuinfo`` says), cores and Python."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, Python {platform.python_version()}"


def python_loop_ms(iterations: int = 1_000_000, repeats: int = 5) -> float:
    """Milliseconds one core takes for a fixed pure-Python loop, the best of ``repeats``: how
    fast this host runs interpreter-bound code (vLLM's scheduler, the engine thread's step),
    so that two visits' rows can tell a slower host from a slower change (2026-12-07: an H100
    host at 145 for 1,000,000 while T3's step took 4.0 ms of CPU against 2.3-2.6 the visit
    before on the same code path; 118 on the development machine)."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        total = 0
        for i in range(iterations):
            total += i
        best = min(best, time.perf_counter() - began)
    return round(best * 1000, 1)


def host() -> dict[str, object]:
    """The host's part of a benchmark's JSON: :func:`cpu_card` and :func:`python_loop_ms`."""
    return {"cpu": cpu_card(), "python_loop_ms": python_loop_ms()}


def _smi(field: str, index: int) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / 1_048_576, 1)

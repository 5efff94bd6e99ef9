"""Which code holds this process's CUDA memory: the allocator's live blocks by the Python
line that allocated them, and how that changed between two snapshots.

A load test can tell that the tensors held grow (``chatterbox_cuda_allocated_bytes``, a
megabyte a request on an H100 on 2026-12-06) but not who holds them (that time: Perth's
autograd activations and the vocoder loop's last batch, both named by these snapshots). With
``cuda_memory_snapshots`` set, ``serve`` records every CUDA allocation's Python stack from
before the engines load (PyTorch's ``_record_memory_history``, the live blocks' allocation
stacks only, no event history) and, on ``SIGUSR2``, writes the allocator's snapshot (every
live block with its stack) to that directory as ``cuda-memory-<pid>-<n>.pickle``, in a
worker thread, atomically (a reader never sees half a file). :func:`growth` compares two
snapshots site by site (the innermost frames outside PyTorch): a leak is a site whose blocks
grew with the requests served. The load test takes one before and one after its load
(``python -m gateway.tools.loadtest --cuda-snapshots DIR``). Each file holds a second
snapshot, taken after ``gc.collect()`` (under :data:`AFTER_GC`): a site that grew but whose
growth is gone after the collection is garbage in reference cycles (freed when Python's
collector next runs its oldest generation, which knows nothing of the GPU memory it holds),
one whose growth stays is held by something alive. Recording costs host CPU at every
allocation (a Python stack, ~2 us): a debugging aid, off by default, CUDA only (elsewhere a
warning and nothing recorded).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

_log = logging.getLogger("gateway.observability.cuda_memory")

SNAPSHOT_SIGNAL = signal.SIGUSR2
"""The signal that makes a recording server write a snapshot."""

_SKIPPED_PACKAGES = ("torch/",)
"""Frames that say nothing about who allocated, by their file from its package down
(:func:`_short`): PyTorch's own..."""
_SKIPPED_STDLIB = ("/threading.py", "/concurrent/futures/", "/asyncio/", "/contextlib.py", "/functools.py")
"""... and the standard library's machinery that calls into other code."""

AFTER_GC = "gateway_after_gc_collect"
"""The key of a written snapshot that holds the second one, taken after ``gc.collect()``
(PyTorch's layout, its ``segments`` only)."""

SITE_FRAMES = 2
"""Frames outside those skipped that name a site (the allocating line and its caller)."""


class Site(NamedTuple):
    """What the live blocks of one allocation site hold."""

    bytes: int
    blocks: int


def site_of(frames: list[Mapping[str, Any]] | None) -> str:
    """A block's allocation site: its innermost :data:`SITE_FRAMES` frames outside PyTorch
    and the standard library's calling machinery, as ``file:line name``, innermost first,
    ``<`` between; ``(no stack)`` for blocks allocated before recording started."""
    if not frames:
        return "(no stack)"
    kept = [f for f in frames if not _skipped(str(f.get("filename", "")))]
    chosen = kept[:SITE_FRAMES] or list(frames[:1])
    return " < ".join(f"{_short(str(f.get('filename', '?')))}:{f.get('line', '?')} {f.get('name', '?')}"
                      for f in chosen)


def _skipped(filename: str) -> bool:
    return _short(filename).startswith(_SKIPPED_PACKAGES) or any(part in filename for part in _SKIPPED_STDLIB)


def _short(filename: str) -> str:
    """A frame's file from its package down (``.../site-packages/vllm/x.py`` -> ``vllm/x.py``;
    ``/work/main/gateway/app.py`` -> ``gateway/app.py``)."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    for package in ("/gateway/", "/chatterbox/", "/vllm/"):
        if package in filename:
            return package.strip("/") + "/" + filename.rsplit(package, 1)[1]
    return filename


def live_by_site(snapshot: Mapping[str, Any]) -> dict[str, Site]:
    """The snapshot's allocated blocks (``active_allocated``) summed by :func:`site_of`."""
    sites: dict[str, list[int]] = {}
    for segment in snapshot.get("segments", ()):
        for block in segment.get("blocks", ()):
            if block.get("state") != "active_allocated":
                continue
            totals = sites.setdefault(site_of(block.get("frames")), [0, 0])
            totals[0] += int(block.get("size", 0))
            totals[1] += 1
    return {site: Site(b, n) for site, (b, n) in sites.items()}


def growth(before: Mapping[str, Any], after: Mapping[str, Any], top: int = 15) -> list[dict[str, Any]]:
    """Sites whose live bytes changed from ``before`` to ``after``, largest growth first (at
    most ``top``): each with its bytes and blocks then and now, and, where both files hold
    their :data:`AFTER_GC` snapshots, ``growth_after_gc_mib`` (the same compared after
    ``gc.collect()``: what is left is held by something alive)."""
    a, b = live_by_site(before), live_by_site(after)
    collected = AFTER_GC in before and AFTER_GC in after
    a_gc = live_by_site(before[AFTER_GC]) if collected else {}
    b_gc = live_by_site(after[AFTER_GC]) if collected else {}
    rows = []
    for site in a.keys() | b.keys() | a_gc.keys() | b_gc.keys():
        then, now = a.get(site, Site(0, 0)), b.get(site, Site(0, 0))
        grew_gc = b_gc.get(site, Site(0, 0)).bytes - a_gc.get(site, Site(0, 0)).bytes
        if now.bytes == then.bytes and not grew_gc:
            continue
        row = {"site": site, "growth_mib": round((now.bytes - then.bytes) / 2**20, 2),
               "blocks_before": then.blocks, "blocks_after": now.blocks,
               "mib_before": round(then.bytes / 2**20, 2), "mib_after": round(now.bytes / 2**20, 2)}
        if collected:
            row["growth_after_gc_mib"] = round(grew_gc / 2**20, 2)
        rows.append(row)
    rows.sort(key=lambda r: -r["growth_mib"])
    return rows[:top]


def growth_table(rows: list[dict[str, Any]]) -> str:
    """:func:`growth`'s rows as a Markdown table (with the growth after ``gc.collect()`` where
    the rows have it)."""
    collected = any("growth_after_gc_mib" in r for r in rows)
    extra, rule = (" after gc.collect |", "---:|") if collected else ("", "")
    lines = [f"| growth MiB |{extra} blocks before -> after | MiB after | site (innermost first) |",
             f"|---:|{rule}---:|---:|---|"]
    for r in rows:
        cell = f" {r['growth_after_gc_mib']:+.2f} |" if collected else ""
        lines.append(f"| {r['growth_mib']:+.2f} |{cell} {r['blocks_before']} -> {r['blocks_after']} "
                     f"| {r['mib_after']:.2f} | {r['site']} |")
    return "\n".join(lines)


def load(path: Path) -> dict[str, Any]:
    """A snapshot this module wrote (pickled by PyTorch; read only files of a server you run)."""
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - our own server's file


def snapshot_paths(directory: Path, pid: int) -> list[Path]:
    """The snapshots server ``pid`` has written to ``directory``, oldest first."""
    return sorted(directory.glob(f"cuda-memory-{pid}-*.pickle"))


class Recorder:
    """Records allocation stacks and writes a snapshot on :data:`SNAPSHOT_SIGNAL`.
    ``take``: the snapshot to write (default: the CUDA allocator's, ``torch.cuda.memory._snapshot``)."""

    def __init__(self, directory: Path, take: Callable[[], Any] | None = None) -> None:
        self.directory = directory
        self._take = take
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Start recording (CUDA only) and answer the signal; whether it records."""
        if self._take is None:
            import torch

            if not torch.cuda.is_available():
                _log.warning("cuda_memory_snapshots is set but CUDA is not available: nothing is recorded")
                return False
            # "state": the stacks of live blocks only, no history of events (what a snapshot of
            # who holds memory needs, and the cheaper of the two)
            torch.cuda.memory._record_memory_history(enabled="state", context="alloc", stacks="python")
            self._take = torch.cuda.memory._snapshot
        self.directory.mkdir(parents=True, exist_ok=True)
        signal.signal(SNAPSHOT_SIGNAL, lambda *_: self.write_soon())
        _log.info("recording CUDA allocation stacks; kill -USR2 %d writes a snapshot to %s", os.getpid(), self.directory)
        return True

    def write_soon(self) -> threading.Thread:
        """Write a snapshot in a worker thread (a signal handler must not block the event loop)."""
        thread = threading.Thread(target=self.write, name="cuda-memory-snapshot", daemon=True)
        thread.start()
        return thread

    def write(self) -> Path:
        """One snapshot, written under a temporary name and renamed: the next number's file.
        It holds the allocator's snapshot as taken and, under :data:`AFTER_GC`, the one taken
        after ``gc.collect()``."""
        assert self._take is not None, "start() first"
        with self._lock:
            path = self.directory / f"cuda-memory-{os.getpid()}-{next(self._numbers):03d}.pickle"
            partial = path.with_suffix(".partial")
            taken = dict(self._take())
            gc.collect()
            taken[AFTER_GC] = {"segments": self._take().get("segments", [])}
            with open(partial, "wb") as f:
                pickle.dump(taken, f)
            _log.info("CUDA memory snapshot written to %s", path)  # before it appears: a reader's cue
            partial.replace(path)
        return path

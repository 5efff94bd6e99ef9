"""Device-fault diagnostics: the vocoder's and the watermark's GPU work one at a time.

A CUDA fault (``an illegal memory access was encountered``) is sticky and asynchronous: it is
raised by whichever thread next waits on the device, not by the kernel that caused it, so a
server whose vocoder thread and watermark thread queue work on the same GPU (on two CUDA
streams with ``watermark_stream`` own or high) cannot say which part faulted. With
``gpu_serial_debug`` on, each part (a vocoder batch's flow encoder, CFM, HiFT and copy; a
watermark pass) holds one process-wide lock while it runs and ends with a device
synchronisation, so a fault is raised, and logged, by the part whose kernels caused it; the
vocoder keeps one batch in flight. Slow (the GPU runs one part at a time and waits between
them): for chasing a fault, never for serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

_LOCK = threading.RLock()


class DeviceFault(RuntimeError):
    """A CUDA error raised at the synchronisation that ends ``part``."""

    def __init__(self, part: str, cause: BaseException) -> None:
        super().__init__(f"device fault in {part}: {type(cause).__name__}: {cause}")
        self.part = part


@contextlib.contextmanager
def serial(enabled: bool, part: str) -> Iterator[None]:
    """Run the block alone on the GPU and wait for its kernels (when ``enabled``)."""
    if not enabled:
        yield
        return
    with _LOCK:
        yield
        synchronize(part)


def synchronize(part: str) -> None:
    """Wait for every kernel queued on the device; a CUDA error becomes :class:`DeviceFault`
    naming ``part``, logged once here."""
    import torch

    try:
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the CUDA error, whatever torch wraps it in
        fault = DeviceFault(part, exc)
        log.error("%s", fault)
        raise fault from exc

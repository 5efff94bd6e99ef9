"""Host-to-device copies made by code under test, on a fake CUDA device (no GPU needed).

A copy to a CUDA device from pageable host memory waits for the stream (CUDA synchronises it
first), so a logits processor that makes one each step stalls vLLM's async scheduling. Some
come from PyTorch's Python indexing, not from a visible ``.to()`` (``t[idx] = True`` on a CUDA
tensor copies a CPU scalar: ``gateway/engine/vllm/t3/device_rows.py``), and only show on a
CUDA device. :func:`cuda_transfers` runs code under ``FakeTensorMode`` (tensors on ``"cuda"``
with shapes and no data, so the real indexing paths run) and records every op that brings a
host tensor to a device tensor: a copy (``_to_copy``, ``copy_``) or any other op given both.
``Tensor.pin_memory`` (which needs a driver) is stood in for by a note of the tensor it pinned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Transfer:
    op: str
    pinned: bool
    """The host tensor was pinned: the copy need not wait for the stream (if non-blocking)."""
    non_blocking: bool

    @property
    def waits(self) -> bool:
        """Whether the host would wait for the device's queued work."""
        return not (self.pinned and self.non_blocking)


@dataclass
class Transfers:
    made: list[Transfer] = field(default_factory=list)

    def take(self) -> list[Transfer]:
        """What was recorded since the last call."""
        taken, self.made = self.made, []
        return taken


class _Recorder(TorchDispatchMode):
    def __init__(self, transfers: Transfers, pinned: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.transfers = transfers
        self.pinned = pinned

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if t.device.type == "cpu"]
        if func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device")
            if host and target is not None and torch.device(target).type != "cpu":
                self._note(func, host[0], bool(kwargs.get("non_blocking", False)))
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.device.type != "cpu" and src.device.type == "cpu":
                self._note(func, src, bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False)))
        elif host and len(host) < len(tensors):
            # any other op given a host tensor beside device ones (index_put_ with a CPU
            # value, an index list made a CPU tensor): PyTorch copies it up, pageable
            self.transfers.made.append(Transfer(str(func), pinned=False, non_blocking=False))
        return func(*args, **kwargs)

    def _note(self, func, source: torch.Tensor, non_blocking: bool) -> None:  # noqa: ANN001
        self.transfers.made.append(Transfer(str(func), pinned=self.pinned.get(id(source)) is source, non_blocking=non_blocking))


@contextmanager
def cuda_transfers(monkeypatch) -> Iterator[Transfers]:  # noqa: ANN001 - pytest's fixture
    """Inside: tensors made on ``"cuda"`` are fake ones; yields what was copied up meanwhile."""
    pinned: dict[int, torch.Tensor] = {}  # kept alive: an id is never reused meanwhile

    def pin_memory(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        pinned[id(self)] = self
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    transfers = Transfers()
    with FakeTensorMode(allow_non_fake_inputs=True), _Recorder(transfers, pinned):
        yield transfers

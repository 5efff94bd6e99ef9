"""Per-slot device state of T3's logits processors (``penalty_rows``, ``fused_rows``), changed
without the host ever waiting for the device.

A logits processor runs between vLLM's forward and its sampler, once a step. Under async
scheduling the host is meant to be a step ahead of the device; one host-to-device copy from
pageable memory undoes that, because CUDA runs such a copy only after everything queued on the
stream before it (a stream synchronisation). PyTorch makes such copies where the code does not
show one:

* ``t[rows, cols] = True`` (indexing with tensors, a Python value): on a CUDA tensor PyTorch's
  indexing makes the value a CPU scalar and ``index_put_`` copies it to the device, every call.
  Measured on an H100 (``benchmark --stages t3step``, 2026-12-07): 39 stream syncs of 1.1 ms
  in 40 profiled steps, T3's step at one row 4.41 ms with the fused sampling against 3.47 with
  vLLM's sampler;
* ``t[[a, b]] = ...`` (a Python list as an index) and ``torch.tensor(values, device=...)``: the
  list becomes a pageable host tensor, then a copy.

So ids go up only through :func:`upload_ids` (pinned memory, no wait), a mark is an
``index_put_`` of a value already on the device (:class:`Marker`) or an ``index_fill_``
(:func:`mark_row`), and rows move by plain row copies (:func:`swap_rows`).
``tests/host_transfers.py`` checks each processor's step and bookkeeping for any other
host-to-device copy, on a fake CUDA device.
"""

from __future__ import annotations

from typing import Any

import torch


def upload_ids(values: list[int], device: torch.device, *, pin_memory: bool) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, without waiting for the copy (through
    pinned memory where asked)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    if pin_memory:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class Marker:
    """Sets entries of a boolean device tensor to true from index tensors on the device."""

    def __init__(self, device: torch.device) -> None:
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def mark(self, seen: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """``seen[rows, cols] = True`` (index tensors on ``seen``'s device), no host value to copy."""
        seen.index_put_((rows, cols), self._true)


def mark_row(seen: torch.Tensor, row: int, cols: torch.Tensor) -> None:
    """``seen[row, cols] = True``: the value goes to the kernel as an argument, not a copy."""
    seen[row].index_fill_(0, cols, True)


def swap_rows(tensor: torch.Tensor, a: int, b: int) -> None:
    """Exchange rows ``a`` and ``b`` of a device tensor (device-to-device copies only)."""
    row = tensor[a].clone()
    tensor[a] = tensor[b]
    tensor[b] = row


def swap_slots(tables: tuple[dict[int, Any], ...], a: int, b: int) -> None:
    """Exchange what host tables keyed by batch slot hold for slots ``a`` and ``b`` (either may
    hold nothing)."""
    for table in tables:
        held_a, held_b = table.pop(a, None), table.pop(b, None)
        if held_b is not None:
            table[a] = held_b
        if held_a is not None:
            table[b] = held_a

"""T3's logits processors never make the host wait for the device (``device_rows.py``): on a
fake CUDA device, a decode step in a settled batch copies up nothing that waits (the fused
rows nothing at all), the bookkeeping itself copies nothing up, and what a changing batch
uploads comes from pinned memory without blocking. The first two tests show
that the harness sees the copies PyTorch's indexing makes on its own."""

from __future__ import annotations

import pytest
import torch
from host_transfers import cuda_transfers

from gateway.engine.vllm.t3.device_rows import Marker, mark_row, swap_rows, upload_ids
from gateway.engine.vllm.t3.fused_rows import FusedRows, RowSampling
from gateway.engine.vllm.t3.penalty_rows import PenaltyRows

VOCAB = 32
SERVED = RowSampling(temperature=0.8, min_p=0.05, repetition_penalty=1.2)
TURBO = RowSampling(temperature=0.8, min_p=0.0, repetition_penalty=1.2, top_k=10, top_p=0.95, penalty_last=True)


def test_the_harness_sees_pythons_indexing_copy_a_value_and_an_index_list_up(monkeypatch) -> None:
    with cuda_transfers(monkeypatch) as transfers:
        seen = torch.zeros(4, VOCAB, dtype=torch.bool, device="cuda")
        rows = torch.zeros(2, dtype=torch.int64, device="cuda")
        transfers.take()
        seen[rows, rows] = True  # the value becomes a CPU scalar
        assert [t.waits for t in transfers.take()] == [True]
        seen[[0, 1]] = seen[[1, 0]]  # the lists become CPU tensors
        assert transfers.take() and all(t.waits for t in transfers.made + transfers.take())
        torch.tensor([1, 0], device="cuda")
        assert [t.waits for t in transfers.take()] == [True]


def test_device_rows_copy_nothing_up_but_their_uploads(monkeypatch) -> None:
    with cuda_transfers(monkeypatch) as transfers:
        device = torch.device("cuda")
        seen = torch.zeros(4, VOCAB, dtype=torch.bool, device=device)
        marker = Marker(device)
        rows = torch.zeros(2, dtype=torch.int64, device=device)
        transfers.take()
        marker.mark(seen, rows, rows)
        mark_row(seen, 1, rows)
        swap_rows(seen, 0, 3)
        assert transfers.take() == []
        upload_ids([1, 2], device, pin_memory=True)
        assert [t.waits for t in transfers.take()] == [False]
        upload_ids([1, 2], device, pin_memory=False)
        assert [t.waits for t in transfers.take()] == [True]


class Launches:
    """A build of the fused kernel that records each launch and runs nothing (the fake device
    holds no numbers): what the step copies up besides the launch is the harness's to see."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
        def launch(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
            self.grids.append(grid)
        return launch


class Processor:
    """One processor's rows on the fake device, and how a request joins them."""

    def __init__(self, case: tuple[RowSampling | None, bool]) -> None:
        self.sampling, kernel = case  # sampling None: the resident penalty
        self.launches = Launches()
        if self.sampling is None:
            self.rows = PenaltyRows(8, VOCAB, "cuda", pin_memory=True)
        else:
            self.rows = FusedRows(8, VOCAB, "cuda", pin_memory=True, kernel=self.launches if kernel else False)

    def add(self, slot: int, output: list[int]) -> None:
        if isinstance(self.rows, FusedRows):
            self.rows.add(slot, self.sampling, output)
        else:
            self.rows.add(slot, 1.2, [1, 2, 7], output)


KINDS = pytest.mark.parametrize("sampling", [(SERVED, False), (SERVED, True), (TURBO, False), (TURBO, True),
                                             (None, False)],
                                ids=["fused", "fused-kernel", "fused-turbo", "fused-turbo-kernel", "resident"])


def _settled(sampling, transfers) -> tuple[Processor, list[list[int]], torch.Tensor]:  # noqa: ANN001
    """Three requests added and their first step taken (once at start: the buffers' upload)."""
    processor = Processor(sampling)
    rows = processor.rows
    transfers.take()
    outputs: list[list[int]] = [[], [3], [4, 5]]  # the last two resumed after a preemption
    for slot, output in enumerate(outputs):
        processor.add(slot, output)
    logits = torch.zeros(len(outputs), VOCAB, device="cuda")
    rows.apply(logits)
    made = transfers.take()
    assert made and not [t for t in made if t.waits]
    return processor, outputs, logits


@KINDS
def test_a_decode_step_in_a_settled_batch_never_waits(monkeypatch, sampling) -> None:
    with cuda_transfers(monkeypatch) as transfers:
        processor, outputs, logits = _settled(sampling, transfers)
        rows = processor.rows
        for step in range(3):
            for output in outputs:
                output.append(step + 10)  # every row kept its token
            rows.apply(logits)
            made = transfers.take()
            assert not [t for t in made if t.waits], f"step {step}"
            if isinstance(rows, FusedRows):
                # the draws stay on the device; which rows kept theirs goes up when that changes
                assert len(made) == (1 if step == 0 else 0), f"step {step}"
            else:
                assert len(made) == 2, "the resident penalty uploads the new ids: rows and tokens"
        # with the kernel every step is one launch (Turbo's top-k and top-p in it too)
        assert len(processor.launches.grids) == (4 if sampling[1] else 0)


@KINDS
def test_a_changing_batch_copies_up_only_without_waiting(monkeypatch, sampling) -> None:
    with cuda_transfers(monkeypatch) as transfers:
        processor, outputs, _logits = _settled(sampling, transfers)
        rows = processor.rows
        rows.move(2, 0, swap=True)
        rows.move(1, 2, swap=False)
        rows.remove(2)
        assert transfers.take() == []  # bookkeeping itself: device copies and host rows only
        outputs[0].append(6)
        processor.add(3, [8, 9])  # resumed after preemption: its ids go up at once
        rows.apply(torch.zeros(4, VOCAB, device="cuda"))
        made = transfers.take()
        assert made and not [t for t in made if t.waits]

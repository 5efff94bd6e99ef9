"""``gpu_serial_debug``: the vocoder's and the watermark's device work one part at a time, a
CUDA fault raised by the part that caused it (gateway/engine/vllm/gpu_serial.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gateway.engine.vllm import gpu_serial


def test_off_it_neither_locks_nor_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: pytest.fail("synchronised while off"))
    with gpu_serial.serial(False, "vocoder batch"):
        pass


def test_a_fault_is_raised_and_named_by_the_part_it_ends(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def faulted() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", faulted)
    with pytest.raises(gpu_serial.DeviceFault) as raised, caplog.at_level("ERROR"):
        with gpu_serial.serial(True, "watermark pass"):
            pass
    assert raised.value.part == "watermark pass"
    assert "device fault in watermark pass: RuntimeError: CUDA error: an illegal memory access" in str(raised.value)
    assert "device fault in watermark pass" in caplog.text


def test_parts_of_two_threads_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    inside = 0
    most = 0
    guard = threading.Lock()

    def part(name: str) -> None:
        nonlocal inside, most
        for _ in range(20):
            with gpu_serial.serial(True, name):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.001)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=part, args=(n,)) for n in ("vocoder batch", "watermark pass")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_the_vocoder_keeps_one_batch_in_flight_when_serial() -> None:
    from chatterbox.models.s3gen import S3Gen

    from gateway.engine.vllm.vocoder import Vocoder
    from gateway.settings import load_settings

    s3gen = S3Gen().eval()
    for flag, depth in ((False, 2), (True, 1)):
        settings = load_settings(environ={}, overrides={"gpu_serial_debug": flag, "max_speech_tokens": 50})
        assert Vocoder(s3gen, settings, pipeline_depth=2).pipeline_depth == depth

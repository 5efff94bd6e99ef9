"""The heap trimmer: after a burst of request bodies, freed memory goes back to the OS."""

from __future__ import annotations

import asyncio
import ctypes.util

import pytest

from gateway.server.memory import HeapTrimmer, trim_heap


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to ask")
def test_trim_heap_runs_on_this_c_library() -> None:
    assert trim_heap() in (True, False)  # False only off glibc; never raises


async def test_trims_once_after_a_burst_has_gone() -> None:
    trimmer = HeapTrimmer(threshold_bytes=1000, low_bytes=10, delay_s=0.05, min_interval_s=60)
    trimmer.note_received(600)
    trimmer.note_released(0)
    await asyncio.sleep(0.1)
    assert trimmer.trims == 0  # not enough went through
    trimmer.note_received(600)
    trimmer.note_released(500)  # bodies still held
    await asyncio.sleep(0.1)
    assert trimmer.trims == 0
    trimmer.note_released(5)
    trimmer.note_released(0)  # one trim, however many releases follow
    await asyncio.sleep(0.15)
    assert trimmer.trims == 1
    trimmer.note_received(2000)
    trimmer.note_released(0)
    await asyncio.sleep(0.15)
    assert trimmer.trims == 1  # at most every min_interval_s

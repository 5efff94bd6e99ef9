"""Who holds CUDA memory: snapshots of the allocator's live blocks by allocation site, written
on a signal, compared before and after a load. The allocator itself is CUDA's (a GPU check);
here the snapshots have PyTorch's layout (``torch.cuda.memory._snapshot()``: segments of
blocks, each allocated block with its frames, innermost first), with the paths the GPU
machine has."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.observability import cuda_memory
from gateway.tools import loadtest

TORCH = "/opt/torch/.venv/lib/python3.12/site-packages/torch/cuda/memory.py"
VLLM = "/root/site2/vllm/v1/worker/gpu_model_runner.py"
VOCODER = "/work/main/gateway/engine/vllm/vocoder.py"
BATCH = "/work/main/gateway/engine/vllm/s3gen_batch.py"
THREADING = "/usr/lib/python3.12/threading.py"


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def block(size: int, *frames: dict, state: str = "active_allocated") -> dict:
    return {"size": size, "requested_size": size, "state": state, "frames": list(frames)}


def snapshot(*blocks: dict) -> dict:
    return {"segments": [{"device": 0, "blocks": list(blocks)}], "device_traces": []}


def vllm_block(size: int) -> dict:
    return block(size, frame(TORCH, 10, "empty"), frame(VLLM, 812, "_update_states"),
                 frame(VLLM, 3021, "execute_model"), frame(THREADING, 1010, "run"))


def vocoder_block(size: int) -> dict:
    return block(size, frame(BATCH, 640, "run_flow"), frame(VOCODER, 700, "_launch"))


def test_a_site_is_the_innermost_frames_outside_torch_and_the_calling_machinery() -> None:
    assert cuda_memory.site_of(vllm_block(1)["frames"]) == (
        "vllm/v1/worker/gpu_model_runner.py:812 _update_states < vllm/v1/worker/gpu_model_runner.py:3021 execute_model")
    assert cuda_memory.site_of(vocoder_block(1)["frames"]) == (
        "gateway/engine/vllm/s3gen_batch.py:640 run_flow < gateway/engine/vllm/vocoder.py:700 _launch")
    only_torch = [frame(TORCH, 10, "empty")]
    assert cuda_memory.site_of(only_torch) == "torch/cuda/memory.py:10 empty", "then the innermost frame as it is"
    assert cuda_memory.site_of([]) == cuda_memory.site_of(None) == "(no stack)"


def test_growth_names_the_sites_that_grew_largest_first_with_their_blocks() -> None:
    """A site that leaks a block a request grows with the requests; one freed and allocated
    again at the same size is not growth; freed blocks (inactive) hold nothing."""
    before = snapshot(vllm_block(2**20), vocoder_block(8 * 2**20), block(4 * 2**20),
                      block(2**20, frame(VOCODER, 9, "x"), state="inactive"))
    after = snapshot(*(vllm_block(2**20) for _ in range(5)), vocoder_block(8 * 2**20),
                     vocoder_block(2**19), block(4 * 2**20))
    rows = cuda_memory.growth(before, after)
    assert [(r["site"].split(" < ")[0], r["growth_mib"], r["blocks_before"], r["blocks_after"]) for r in rows] == [
        ("vllm/v1/worker/gpu_model_runner.py:812 _update_states", 4.0, 1, 5),
        ("gateway/engine/vllm/s3gen_batch.py:640 run_flow", 0.5, 1, 2),
    ]
    assert rows[0]["mib_after"] == 5.0
    table = cuda_memory.growth_table(rows)
    assert "| +4.00 | 1 -> 5 | 5.00 | vllm/v1/worker/gpu_model_runner.py:812 _update_states" in table
    assert cuda_memory.growth(after, after) == []
    shrunk = cuda_memory.growth(after, before)
    assert shrunk[-1]["growth_mib"] == -4.0, "a site that shrank comes last"


def test_a_recorder_writes_a_whole_snapshot_file_on_its_signal(tmp_path: Path) -> None:
    taken = snapshot(vllm_block(123))
    recorder = cuda_memory.Recorder(tmp_path / "snaps", take=lambda: taken)
    previous = signal.getsignal(cuda_memory.SNAPSHOT_SIGNAL)
    try:
        assert recorder.start()
        for n in (1, 2):
            os.kill(os.getpid(), cuda_memory.SNAPSHOT_SIGNAL)
            deadline = time.monotonic() + 10
            while len(cuda_memory.snapshot_paths(tmp_path / "snaps", os.getpid())) < n:
                assert time.monotonic() < deadline, "no snapshot written"
                time.sleep(0.05)
    finally:
        signal.signal(cuda_memory.SNAPSHOT_SIGNAL, previous)
    paths = cuda_memory.snapshot_paths(tmp_path / "snaps", os.getpid())
    assert [p.name for p in paths] == [f"cuda-memory-{os.getpid()}-001.pickle", f"cuda-memory-{os.getpid()}-002.pickle"]
    assert cuda_memory.load(paths[0]) == {**taken, cuda_memory.AFTER_GC: {"segments": taken["segments"]}}
    assert not list((tmp_path / "snaps").glob("*.partial"))


class _Holder:
    """An owner of "device blocks" (here: a list the fake allocator reads through weak references)."""

    def __init__(self, size: int, site: str) -> None:
        self.block = block(size, frame(f"/x/gateway/{site}.py", 1, site))
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_a_written_snapshot_tells_cycle_garbage_from_memory_held_alive(tmp_path: Path) -> None:
    """Each file holds a second snapshot taken after ``gc.collect()``: growth held only by
    garbage in reference cycles is gone from it, growth held by live objects stays."""
    import gc
    import weakref

    owners: list[weakref.ref] = []

    def take() -> dict:
        return snapshot(*(o().block for o in owners if o() is not None))

    kept: list[_Holder] = []  # alive: the leak that stays
    gc.disable()  # no collection between the files' two snapshots but the recorder's own
    try:
        recorder = cuda_memory.Recorder(tmp_path, take=take)
        before = cuda_memory.load(recorder.write())
        for _ in range(3):
            kept.append(_Holder(2**20, "held"))
            owners.append(weakref.ref(kept[-1]))
            owners.append(weakref.ref(_Holder(2 * 2**20, "cycle")))  # unreachable at once, freed by gc only
        after = cuda_memory.load(recorder.write())
    finally:
        gc.enable()
    rows = {r["site"].split(" ")[0]: r for r in cuda_memory.growth(before, after)}
    assert rows["gateway/cycle.py:1"]["growth_mib"] == 6.0 and rows["gateway/cycle.py:1"]["growth_after_gc_mib"] == 0.0
    assert rows["gateway/held.py:1"]["growth_mib"] == 3.0 and rows["gateway/held.py:1"]["growth_after_gc_mib"] == 3.0
    table = cuda_memory.growth_table(list(rows.values()))
    assert "| growth MiB | after gc.collect | blocks before -> after |" in table
    assert "| +6.00 | +0.00 | 0 -> 3 | 6.00 | gateway/cycle.py:1 cycle" in table
    assert "after gc.collect" not in cuda_memory.growth_table(cuda_memory.growth(snapshot(), take()))


def test_without_cuda_the_recorder_warns_and_records_nothing(tmp_path: Path, caplog) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    previous = signal.getsignal(cuda_memory.SNAPSHOT_SIGNAL)
    with caplog.at_level(logging.WARNING, logger="gateway.observability.cuda_memory"):
        assert not cuda_memory.Recorder(tmp_path / "snaps").start()
    assert "CUDA is not available" in caplog.text
    assert signal.getsignal(cuda_memory.SNAPSHOT_SIGNAL) is previous, "the signal keeps its meaning"
    assert not (tmp_path / "snaps").exists()


SERVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gateway.observability import cuda_memory
    state = {"n": 0}
    def take():
        state["n"] += 1  # a block that leaks a megabyte a snapshot (two a file: as taken, after gc)
        return {"segments": [{"blocks": [{"size": 2**20, "state": "active_allocated",
                 "frames": [{"filename": "/x/gateway/leak.py", "line": 3, "name": "keep"}]}] * state["n"]}]}
    cuda_memory.Recorder(Path(sys.argv[1]), take=take).start()
    print("ready", flush=True)
    time.sleep(60)
""")


def test_the_load_test_signals_the_server_and_waits_for_each_new_snapshot(tmp_path: Path) -> None:
    """Another process, as a server is: the signal crosses, each call returns the file that
    call asked for (not an older one), and two of them compare."""
    directory = tmp_path / "snaps"
    # ``with``: its pipe closed at the end (an unclosed one is a ResourceWarning in a later test)
    with subprocess.Popen([sys.executable, "-c", SERVER, str(directory)], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            args = SimpleNamespace(cuda_snapshots=directory, server_pid=process.pid)
            first = asyncio.run(loadtest.cuda_snapshot(args))
            second = asyncio.run(loadtest.cuda_snapshot(args))
        finally:
            process.kill()
    assert first != second and first.name.endswith("-001.pickle") and second.name.endswith("-002.pickle")
    rows = cuda_memory.growth(cuda_memory.load(first), cuda_memory.load(second))
    assert [(r["site"], r["growth_mib"], r["blocks_after"]) for r in rows] == [("gateway/leak.py:3 keep", 2.0, 3)]


def test_a_server_that_writes_no_snapshot_is_a_clear_timeout(tmp_path: Path) -> None:
    silent = ("import signal, time; signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", silent], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            args = SimpleNamespace(cuda_snapshots=tmp_path, server_pid=process.pid)
            with pytest.raises(TimeoutError, match="--cuda-memory-snapshots"):
                asyncio.run(loadtest.cuda_snapshot(args, timeout_s=0.5))
        finally:
            process.kill()


def test_the_load_test_refuses_snapshots_without_a_server_to_signal(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        loadtest.main(["--url", "http://127.0.0.1:1", "--cuda-snapshots", "/tmp/x"])
    assert exited.value.code == 2
    assert "--cuda-snapshots needs --server-pid" in capsys.readouterr().err

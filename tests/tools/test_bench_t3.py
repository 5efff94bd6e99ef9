"""The t3step stage's setup, built without vLLM: each family's model directory, prompt and the
sampling the engine sends for the family's default controls (the timing itself needs a GPU);
and its py-spy row, with a stand-in for vLLM's ``LLM``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ops_support import quiet_attempts

from gateway.engine.vllm.t3.fused_rows import FUSED_ARG
from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG
from gateway.engine.vllm.t3.turbo import TURBO_ARCHITECTURE
from gateway.tools import py_spy
from gateway.tools.bench_t3 import output_ids_wait, t3step_setup


def test_turbo_setup_is_gpt2_with_its_served_sampling(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox-turbo", 40, tmp_path)
    config = json.loads((setup.model_dir / "config.json").read_text())
    assert config["architectures"] == [TURBO_ARCHITECTURE] and config["n_layer"] == 24
    embeds = setup.prompt["prompt_embeds"]
    # speaker row + 375 voice prompt rows + 40 text rows + the start-of-speech row, 1024 wide
    assert tuple(embeds.shape) == (1 + 375 + 40 + 1, 1024) and embeds.dtype == torch.bfloat16  # as served
    assert len(setup.prompt["prompt_token_ids"]) == embeds.shape[0]
    # upstream inference_turbo's controls: top-k 1000, top-p 0.95, no min-p, penalty 1.2
    assert setup.served == {"temperature": 0.8, "top_p": 0.95, "top_k": 1000, "min_p": 0.0,
                            "repetition_penalty": 1.2}
    assert setup.unpenalised == {"temperature": 0.8, "top_p": 0.95, "top_k": 1000, "min_p": 0.0}


def test_original_setup_keeps_cfg_and_min_p(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox", 20, tmp_path)
    config = json.loads((setup.model_dir / "config.json").read_text())
    assert config["architectures"] != [TURBO_ARCHITECTURE]
    assert setup.served == {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2}
    assert "prompt_embeds" in setup.prompt


def test_resident_penalty_moves_to_the_processor(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox-turbo", 8, tmp_path, penalty="resident")
    assert setup.served["repetition_penalty"] == 1.0  # vLLM's own path stays off
    assert setup.served["extra_args"] == {EXTRA_ARG: 1.2}
    assert "extra_args" not in setup.unpenalised


@pytest.mark.parametrize(("model", "arg", "unpenalised"), [
    ("chatterbox", [0.8, 0.05, 1.2, 0.0, 1.0, 0.0], {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "min_p": 0.05}),
    # Turbo's filters go to the processor too, with the penalty after them as upstream
    ("chatterbox-turbo", [0.8, 0.0, 1.2, 1000.0, 0.95, 1.0],
     {"temperature": 0.8, "top_p": 0.95, "top_k": 1000, "min_p": 0.0}),
])
def test_fused_sampling_draws_the_served_variant_and_leaves_the_seeded_one_to_vllm(
        tmp_path: Path, model: str, arg: list[float], unpenalised: dict) -> None:
    fused = t3step_setup(model, 8, tmp_path / "f", penalty="fused")
    plain = t3step_setup(model, 8, tmp_path / "s")
    assert fused.served == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                            "extra_args": {FUSED_ARG: arg}}
    # a seeded request is not fused: the same fields as the sampler path, so the same tokens
    assert fused.seeded == plain.seeded == plain.served
    assert fused.unpenalised == plain.unpenalised == unpenalised


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="t3step times"):
        t3step_setup("chatterbox-multilingual", 8, tmp_path)


class _BusyLLM:
    """``LLM.generate``'s surface: each call spins in Python (as vLLM's step loop would) and
    returns ``steps`` tokens a row."""

    def __init__(self, steps: int = 5) -> None:
        self.steps, self.calls, self.rows = steps, 0, []

    def generate(self, prompts, sampling, use_tqdm=False):  # noqa: ANN001, ARG002 - vLLM's signature
        self.calls += 1
        self.rows.append(len(prompts))
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            sum(range(1000))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(self.steps)))]) for _ in prompts]


@pytest.mark.skipif(py_spy.executable() is None, reason="py-spy is a dev dependency")
def test_the_py_spy_row_samples_this_process_while_the_largest_batch_decodes(tmp_path: Path) -> None:
    """``--t3step-py-spy-s``: the engine core runs in this process, so py-spy of it while the
    batch decodes back to back says where a step's Python time goes."""
    from gateway.tools.bench_t3 import _py_spy_row

    for _ in quiet_attempts():  # the row is wall time and py-spy's samples: a stalled host measures again
        llm = _BusyLLM()
        row = _py_spy_row(llm, {"prompt_embeds": None}, object(), 4, 1.5, tmp_path, "chatterbox-turbo")
    assert (row["batch"], row["sampling"]) == (4, "py-spy (served)") and set(llm.rows) == {4}
    assert llm.calls >= 10, "decoding until the sampler is done"
    assert 9.5 <= row["ms_per_step"] <= 15, row["ms_per_step"]  # 50 ms a call of 5 steps, back to back
    summary = row["py_spy"]
    assert "error" not in summary, summary
    main = next(r for r in summary["threads"] if r["thread"].endswith("MainThread"))
    assert main["active_share"] > 0.5
    assert any("generate" in f for f, _ in main["top_self"]), main["top_self"]


@pytest.mark.parametrize("cascade", [False, True])
def test_the_t3step_engine_takes_cascade_attention_only_when_asked(tmp_path: Path, monkeypatch, cascade: bool) -> None:
    """``--t3step-cascade``: vLLM's ``LLM`` is built with ``disable_cascade_attn`` false (as the
    server with ``vllm_cascade_attention``); without it, vLLM's default (disabled)."""
    import sys
    import types

    from gateway.tools import bench_t3

    seen: dict = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: seen.update(kwargs) or "llm"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("gateway.engine.vllm.t3.plugin.register", lambda: None)
    monkeypatch.setattr(bench_t3, "t3step_setup", lambda *a: SimpleNamespace(model_dir=tmp_path))
    llm, _, _ = bench_t3._served_t3(8, 4, 0.3, "sampler", "chatterbox-turbo", cascade)
    assert llm == "llm" and seen["disable_cascade_attn"] is (not cascade) and seen["max_num_seqs"] == 4


def test_the_t3step_rows_say_whether_vllm_waits_for_output_ids() -> None:
    """``output_ids_wait`` reads the flag in the worker vLLM's ``collective_rpc`` hands it (the
    wrapper forwards attributes to the worker), and says why when it cannot."""
    class LLM:
        def __init__(self, flag: bool | None) -> None:
            batch = SimpleNamespace() if flag is None else SimpleNamespace(logitsprocs_need_output_token_ids=flag)
            self.worker = SimpleNamespace(model_runner=SimpleNamespace(input_batch=batch))

        def collective_rpc(self, method):  # noqa: ANN001, ANN202 - vLLM's signature
            return [method(self.worker)]

    assert output_ids_wait(LLM(False)) is False
    assert output_ids_wait(LLM(True)) is True
    assert output_ids_wait(LLM(None)).startswith("unknown: AttributeError")


@pytest.mark.parametrize("busy", [True, False], ids=["host-bound", "waiting"])
def test_the_t3step_rows_split_a_steps_host_time_from_its_wall_time(tmp_path: Path, monkeypatch, busy: bool) -> None:
    """``cpu_ms_per_step``: the thread that steps the engine core (this one) spends it on the
    host; a step that waits for the device adds wall time and none of that."""
    import sys
    import types

    from gateway.tools import bench_t3

    class LLM:
        def generate(self, prompts, sampling, use_tqdm=False):  # noqa: ANN001, ARG002 - vLLM's signature
            end = time.perf_counter() + 0.02
            while busy and time.perf_counter() < end:
                sum(range(1000))
            if not busy:
                time.sleep(0.02)
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(5)))]) for _ in prompts]

        def collective_rpc(self, method):  # noqa: ANN001, ANN202
            raise RuntimeError("no workers here")

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    setup = SimpleNamespace(prompt={}, served={"temperature": 0.8}, seeded={"temperature": 0.8},
                            unpenalised={"temperature": 0.8})
    monkeypatch.setattr(bench_t3, "_served_t3", lambda *a: (LLM(), setup, 1.0))
    for _ in quiet_attempts():  # CPU and wall time: a stalled host measures again
        rows = bench_t3.stage_t3_step(tokens=5, batches=(1, 2))
    assert len(rows) == 8 and all(r["waits_for_output_ids"].startswith("unknown: RuntimeError") for r in rows)
    for row in rows:
        assert 3.5 <= row["ms_per_step"] <= 12, row  # 20 ms a call of 5 steps
        share = row["cpu_ms_per_step"] / row["ms_per_step"]
        assert share > 0.6 if busy else share < 0.3, row

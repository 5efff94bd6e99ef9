"""The host's cost of T3's token hand-off, on any machine: ``python -m gateway.tools.bench_host``.

At hundreds of streams every engine step hands each stream its token, and all of that runs in
Python on the server's event loop: 1000 audio-s/s is 25,000 hand-offs a second. Two paths, N
requests each, every step one token per live request, each request consumed by a task as the
vLLM engine's token task consumes ``generate``:

* ``thread``: the thread engine core (``vllm_engine_core = "thread"``,
  :class:`~gateway.engine.vllm.engine_thread.ThreadedLLM`) with vLLM's engine stood in for by
  :class:`TickEngine`, which costs next to nothing a step;
* ``process``: the default engine core process (vLLM's ``AsyncLLM``), the half of it that runs
  in the server's process, with vLLM's own code (:func:`measure_process`; where vLLM is
  installed).

Printed per path and N: the wall time and this process's CPU time per hand-off, the engine's
steps per second, and the hand-offs per second the host could carry at that cost (``ceiling
audio-s/s`` = that / 25). The engine's own token task (counting, the vocoder stream's push)
comes on top, as does everything else the event loop serves. Compare rows of one run
(machines differ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gateway.engine.factory import vllm_installed
from gateway.engine.vllm.engine_thread import ThreadedLLM
from gateway.tools.host_probes import cpu_card

TOKENS_PER_AUDIO_S = 25


class TickEngine:
    """The part of vLLM's ``LLMEngine`` that ``ThreadedLLM`` drives: each ``step`` hands every
    live request its next token (``RequestOutput``-shaped deltas) until it has ``tokens``."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.live: dict[str, int] = {}
        self.steps = 0
        self.engine_core = SimpleNamespace(shutdown=lambda: None)

    def add_request(self, request_id: str, prompt: Any, params: Any) -> None:
        self.live[request_id] = 0

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.live.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[SimpleNamespace]:
        self.steps += 1
        outputs = []
        for request_id, made in list(self.live.items()):
            made += 1
            finished = made >= self.tokens
            if finished:
                del self.live[request_id]
            else:
                self.live[request_id] = made
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished,
                                           outputs=[SimpleNamespace(token_ids=[made % 6561])]))
        return outputs


async def measure(streams: int, tokens: int) -> dict[str, Any]:
    """One row: ``streams`` requests of ``tokens`` tokens each through one ThreadedLLM."""
    engine = TickEngine(tokens)
    llm = ThreadedLLM(lambda: engine, name="bench-engine")
    try:
        async def consume(i: int) -> int:
            got = 0
            async for out in llm.generate({}, {}, f"r{i}"):
                got += len(out.outputs[0].token_ids)
            return got

        cpu, wall = time.process_time(), time.perf_counter()
        got = await asyncio.gather(*(consume(i) for i in range(streams)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        llm.shutdown()
    return _row("thread hand-off", streams, tokens, engine.steps, sum(got), wall, cpu)


def print_rows(rows: list[dict[str, Any]], keys: list[str]) -> None:
    """A benchmark's rows as a markdown table of ``keys`` (a missing value: empty)."""
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


def device_card(device: str) -> str:
    """The card a benchmark ran on: the GPU's name, or :func:`cpu_card`."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_card()


def write_result(path: Path, tool: str, argv: list[str] | None, device: str, rows: list[dict[str, Any]],
                 **extra: Any) -> None:
    """A benchmark's JSON: ``card``, ``date``, the ``command`` as run, the rows."""
    from datetime import datetime, timezone

    path.write_text(json.dumps({
        "card": device_card(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m {tool} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(), **extra, "rows": rows}, indent=1) + "\n")


async def measure_process(streams: int, tokens: int, chunk: int = 128) -> dict[str, Any]:
    """One row of the engine-core-process path (``vllm_engine_core = "process"``, vLLM's
    ``AsyncLLM``): the part of it that runs on the server's event loop, with vLLM's own code.
    Each step's ``EngineCoreOutputs`` (encoded beforehand, as the engine core sends them) is
    decoded and run through ``OutputProcessor.process_outputs`` in chunks of ``chunk`` (as
    ``AsyncLLM``'s output handler does: ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE``), which puts each
    request's ``RequestOutput`` into its ``RequestOutputCollector``; one task per request takes
    them as ``AsyncLLM.generate`` does. Needs vLLM (the GPU machine's install)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    processor = OutputProcessor(None, log_stats=False)
    collectors = []
    for i in range(streams):
        params = SamplingParams(max_tokens=tokens, output_kind=RequestOutputKind.DELTA, detokenize=False)
        request = EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=[0], mm_features=None, sampling_params=params,
                                    pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
                                    data_parallel_rank=None, external_req_id=f"r{i}")
        collectors.append(RequestOutputCollector(RequestOutputKind.DELTA, f"r{i}"))
        processor.add_request(request, None, None, 0, collectors[-1])
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)
    frames = []
    for step in range(tokens):
        last = FinishReason.LENGTH if step == tokens - 1 else None
        outputs = [EngineCoreOutput(request_id=f"r{i}", new_token_ids=[step % 6561], finish_reason=last)
                   for i in range(streams)]
        frames.append([bytes(b) for b in encoder.encode(EngineCoreOutputs(outputs=outputs, timestamp=time.monotonic()))])
    got = [0]

    async def consume(collector: Any) -> None:
        while True:
            out = collector.get_nowait() or await collector.get()
            got[0] += len(out.outputs[0].token_ids)
            if out.finished:
                return

    async def handle() -> None:
        for frame in frames:
            decoded = decoder.decode(frame)
            for start in range(0, len(decoded.outputs), chunk):
                processor.process_outputs(decoded.outputs[start:start + chunk], decoded.timestamp, None)
                await asyncio.sleep(0)  # between chunks, and the next step's frame comes later

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(handle(), *(consume(c) for c in collectors))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return _row("process hand-off", streams, tokens, tokens, got[0], wall, cpu)


def _row(path: str, streams: int, tokens: int, steps: int, got: int, wall: float, cpu: float) -> dict[str, Any]:
    handoffs = streams * tokens
    if got != handoffs:
        raise RuntimeError(f"{got} tokens arrived of {handoffs}")
    return {"path": path, "streams": streams, "tokens": tokens, "steps": steps,
            "wall_us_per_handoff": round(wall / handoffs * 1e6, 2),
            "cpu_us_per_handoff": round(cpu / handoffs * 1e6, 2),
            "steps_per_s": round(steps / wall, 1),
            "ceiling_audio_s_per_s": round(handoffs / wall / TOKENS_PER_AUDIO_S, 1)}


PATHS = {"thread": lambda n, t: measure(n, t), "process": lambda n, t: measure_process(n, t)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.tools.bench_host", description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default="thread,process",
                        help="thread: the thread engine core's hand-off; process: AsyncLLM's, with vLLM's own code "
                             "(skipped where vLLM is not installed)")
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=250, help="tokens per request (250 = 10 s of audio)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is kept")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for path in args.paths.split(","):
        if path == "process" and not vllm_installed():
            print("process hand-off: skipped, vLLM is not installed here", file=sys.stderr)
            continue
        for n in (int(x) for x in args.streams.split(",")):
            runs = [asyncio.run(PATHS[path](n, args.tokens)) for _ in range(max(1, args.repeats))]
            rows.append(min(runs, key=lambda r: r["wall_us_per_handoff"]))
    if not rows:
        return 2
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": cpu_card(),
                       "date": time.strftime("%Y-%m-%d"),
                       "command": "python -m gateway.tools.bench_host " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

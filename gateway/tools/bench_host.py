"""The host's cost of T3's token hand-off, on any machine: ``python -m gateway.tools.bench_host``.

At hundreds of streams every engine step hands each stream its token, and all of that runs in
Python in the server's process: 1000 audio-s/s is 25,000 hand-offs a second. This measures the
hand-off of the thread engine core (``vllm_engine_core = "thread"``,
:class:`~gateway.engine.vllm.engine_thread.ThreadedLLM`) with vLLM's engine stood in for by
:class:`TickEngine`, which costs next to nothing a step: N requests, each consumed by an
``async for`` over ``generate`` as the vLLM engine's token task does, every step one token per
live request. Printed per N: the wall time and this process's CPU time per hand-off, the
engine's steps per second, and the hand-offs per second the host could carry at that cost
(``ceiling audio-s/s`` = that / 25). A GPU step cannot be faster than the host's share of it;
compare rows of one run (machines differ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gateway.engine.vllm.engine_thread import ThreadedLLM

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
    handoffs = streams * tokens
    if sum(got) != handoffs:
        raise RuntimeError(f"{sum(got)} tokens arrived of {handoffs}")
    return {"path": "thread hand-off", "streams": streams, "tokens": tokens, "steps": engine.steps,
            "wall_us_per_handoff": round(wall / handoffs * 1e6, 2),
            "cpu_us_per_handoff": round(cpu / handoffs * 1e6, 2),
            "steps_per_s": round(engine.steps / wall, 1),
            "ceiling_audio_s_per_s": round(handoffs / wall / TOKENS_PER_AUDIO_S, 1)}


def cpu_card() -> str:
    """The CPU this ran on (its model name where ``/proc/cpuinfo`` says), cores and Python."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.tools.bench_host", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=250, help="tokens per request (250 = 10 s of audio)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is kept")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        runs = [asyncio.run(measure(n, args.tokens)) for _ in range(max(1, args.repeats))]
        rows.append(min(runs, key=lambda r: r["wall_us_per_handoff"]))
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

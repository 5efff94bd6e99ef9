"""A stand-in for vLLM's in-process ``LLMEngine`` (vLLM cannot run here): the surface
:class:`gateway.engine.vllm.engine_thread.ThreadedLLM` drives, with each request's tokens
handed out ``per_step`` a step as ``RequestOutput``-shaped deltas. It records every call with
the thread it came from, so tests can check that only the engine thread touched it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any


class LLMEngineDouble:
    def __init__(self, tokens: list[int], *, per_step: int = 2, step_s: float = 0.0,
                 refuse: str | None = None, fail_on_step: int | None = None, first_after: int = 1) -> None:
        self.tokens, self.per_step, self.step_s = tokens, per_step, step_s
        self.first_after = first_after  # a request's first tokens come out of its n-th step (vLLM: prefill, async scheduling)
        self.stepped: dict[str, int] = {}  # request id -> steps it has been in
        self.refuse = refuse  # a request id whose add_request raises (a bad prompt)
        self.fail_on_step = fail_on_step  # step number (1-based) that raises
        self.live: dict[str, int] = {}  # request id -> tokens handed out
        self.added: list[tuple[str, Any, Any]] = []
        self.aborted: list[str] = []
        self.steps = 0
        self.threads: set[int] = set()
        self.shut_down = threading.Event()
        self.engine_core = SimpleNamespace(shutdown=self._shutdown)
        self.output_processor = SimpleNamespace(external_req_ids={}, request_states={})  # LLMEngine's, as AsyncLLM's

    def _called(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id: str, prompt: Any, params: Any) -> str:
        self._called()
        if request_id == self.refuse:
            raise ValueError(f"prompt of {request_id} is too long")
        self.added.append((request_id, prompt, params))
        self.live[request_id] = 0
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        self._called()
        for request_id in request_ids:
            self.aborted.append(request_id)
            self.live.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        self._called()
        return bool(self.live)

    def step(self) -> list[SimpleNamespace]:
        self._called()
        self.steps += 1
        if self.fail_on_step is not None and self.steps >= self.fail_on_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.step_s:
            time.sleep(self.step_s)
        outputs = []
        for request_id, made in list(self.live.items()):
            self.stepped[request_id] = self.stepped.get(request_id, 0) + 1
            if self.stepped[request_id] < self.first_after:
                continue
            ids = self.tokens[made:made + self.per_step]
            made += len(ids)
            finished = made >= len(self.tokens)
            if finished:
                del self.live[request_id]
            else:
                self.live[request_id] = made
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished,
                                           outputs=[SimpleNamespace(token_ids=ids)]))
        return outputs

    def _shutdown(self) -> None:
        self._called()
        self.shut_down.set()

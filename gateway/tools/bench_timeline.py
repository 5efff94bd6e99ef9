"""The timeline of one request's first audio, as the server recorded it (``--stages timeline``).

Requests are sent one at a time (an idle server: the fixed costs, not queueing) with
``X-Timeline: 1`` and an ``X-Request-Id`` of ours; the server (started with
``request_timeline``) writes each one's stages into its canonical log line, which this reads
back from the server's log. Printed: per stage, the median over the runs of its end (ms since
the request arrived) and of its own share (ms since the stage before), and the client's own
first-byte time beside the server's.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from gateway.observability.timeline import HEADER
from gateway.tools.bench_http import TEXT_10S, request_body
from gateway.tools.timeline_log import read_timelines, summarise, table_text

__all__ = ["print_table", "run_timeline", "summarise"]


def run_timeline(base: str, log: Path, *, runs: int, model: str, voice: str, fmt: str = "pcm",
                 text: str = TEXT_10S, log_wait_s: float = 10.0) -> dict[str, Any]:
    ids, client_ttfb = [], []
    with httpx.Client(base_url=base, timeout=300) as client:
        for k in range(runs + 1):  # the first one warms what a first request pays (voice, encoder)
            request_id = f"timeline-{k}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            first = None
            headers = {HEADER: "1", "x-request-id": request_id}
            with client.stream("POST", "/v1/audio/speech", json=request_body(model, voice, fmt, text),
                               headers=headers) as response:
                response.raise_for_status()
                for part in response.iter_raw():
                    if part and first is None:
                        first = time.perf_counter() - t0
            if k:
                ids.append(request_id)
                client_ttfb.append(first)
    found = read_timelines(log, ids, log_wait_s)
    table = summarise(list(found.values()))
    return {"model": model, "voice": voice, "format": fmt, "runs": len(found),
            "client_ttfb_ms": [round(t * 1000, 1) for t in client_ttfb if t is not None],
            "stages": table, "timelines": found}


def print_table(result: dict[str, Any]) -> None:
    print(table_text(f"first-audio timeline: {result['model']}, {result['format']}, voice {result['voice']}, "
                     f"median of {result['runs']} runs; client first byte {result['client_ttfb_ms']} ms",
                     result["stages"]))

"""The timeline of one request's first audio, as the server recorded it (``--stages timeline``).

Requests are sent one at a time (an idle server: the fixed costs, not queueing) with
``X-Timeline: 1`` and an ``X-Request-Id`` of ours; the server (started with
``request_timeline``) writes each one's stages into its canonical log line, which this reads
back from the server's log. Printed: per stage, the median over the runs of its end (ms since
the request arrived) and of its own share (ms since the stage before), and the client's own
first-byte time beside the server's.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from gateway.observability.timeline import HEADER
from gateway.tools.bench_http import TEXT_10S, request_body


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
    found = _read_timelines(log, ids, log_wait_s)
    table = summarise(list(found.values()))
    return {"model": model, "voice": voice, "format": fmt, "runs": len(found),
            "client_ttfb_ms": [round(t * 1000, 1) for t in client_ttfb if t is not None],
            "stages": table, "timelines": found}


def _read_timelines(log: Path, ids: list[str], wait_s: float) -> dict[str, list[list[Any]]]:
    """The ``timeline`` of each request id's log line (the line is written when the request
    ends; the log may lag by a moment)."""
    wanted = set(ids)
    found: dict[str, list[list[Any]]] = {}
    deadline = time.monotonic() + wait_s
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if '"timeline"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("request_id") in wanted and isinstance(entry.get("timeline"), list):
                found[entry["request_id"]] = entry["timeline"]
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return {rid: found[rid] for rid in ids if rid in found}
        time.sleep(0.2)


def summarise(timelines: list[list[list[Any]]]) -> list[dict[str, Any]]:
    """Per stage (in the order of the first run, then any others), the median over runs of its
    end and of the time since the previous stage, and in how many runs it appeared."""
    order: list[str] = []
    ends: dict[str, list[float]] = {}
    deltas: dict[str, list[float]] = {}
    for timeline in timelines:
        previous = 0.0
        for stage, ms in timeline:
            if stage not in ends:
                order.append(stage)
                ends[stage], deltas[stage] = [], []
            ends[stage].append(float(ms))
            deltas[stage].append(float(ms) - previous)
            previous = float(ms)
    order.sort(key=lambda s: statistics.median(ends[s]))
    return [{"stage": s, "ms": round(statistics.median(ends[s]), 2), "delta_ms": round(statistics.median(deltas[s]), 2),
             "runs": len(ends[s])} for s in order]


def print_table(result: dict[str, Any]) -> None:
    print(f"\nfirst-audio timeline: {result['model']}, {result['format']}, voice {result['voice']}, "
          f"median of {result['runs']} runs; client first byte {result['client_ttfb_ms']} ms")
    print(f"| {'stage':60} | {'ms':>9} | {'+ms':>8} |\n|{'-' * 62}|{'-' * 11}|{'-' * 10}|")
    for row in result["stages"]:
        print(f"| {row['stage']:60} | {row['ms']:9.2f} | {row['delta_ms']:8.2f} |")

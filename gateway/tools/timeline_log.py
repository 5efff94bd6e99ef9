"""First-audio timelines as a server wrote them into its log (``request_timeline``: a request
sent with ``X-Timeline: 1`` gets its stages in its canonical log line), read back by request id
and summarised per stage. Used by the one-at-a-time ``timeline`` stage
(:mod:`gateway.tools.bench_timeline`) and by the http rows under load
(``benchmark --http-timelines``)."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

def read_timelines(log: Path, ids: list[str], wait_s: float) -> dict[str, list[list[Any]]]:
    """The ``timeline`` of each request id's log line (the line is written when the request
    ends; the log may lag by a moment, so it is read on as it grows for up to ``wait_s``)."""
    wanted = set(ids)
    found: dict[str, list[list[Any]]] = {}
    deadline = time.monotonic() + wait_s
    offset, partial = 0, b""
    while True:
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        *lines, partial = (partial + chunk).split(b"\n")
        for raw in lines:
            if b'"timeline"' not in raw:
                continue
            try:
                entry = json.loads(raw.decode(errors="replace"))
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


_TOKENS = re.compile(r"t3 tokens: (\d+)$")


def compact(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``summarise``'s table with T3's per-token stages reduced to the first and the last
    (``t3 tokens: k``: one per token of the first window), each other stage kept."""
    tokens = [r for r in table if _TOKENS.match(r["stage"])]
    if len(tokens) <= 2:
        return table
    keep = {id(min(tokens, key=_token_count)), id(max(tokens, key=_token_count))}
    return [r for r in table if not _TOKENS.match(r["stage"]) or id(r) in keep]


def _token_count(row: dict[str, Any]) -> int:
    return int(_TOKENS.match(row["stage"]).group(1))  # type: ignore[union-attr]


def table_text(title: str, stages: list[dict[str, Any]]) -> str:
    """A summarised table as markdown under ``title``: each stage's median end and its own share."""
    lines = [f"\n{title}", f"| {'stage':60} | {'ms':>9} | {'+ms':>8} | {'runs':>5} |",
             f"|{'-' * 62}|{'-' * 11}|{'-' * 10}|{'-' * 7}|"]
    lines += [f"| {r['stage']:60} | {r['ms']:9.2f} | {r['delta_ms']:8.2f} | {r['runs']:5d} |" for r in stages]
    return "\n".join(lines)

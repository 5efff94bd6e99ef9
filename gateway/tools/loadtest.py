"""Load test: N concurrent streaming clients against a gateway on this machine, for a fixed time.

    python -m gateway.tools.loadtest --url http://127.0.0.1:8000 --concurrency 64 --duration 60 \
        [--server-pid PID] [--api-key KEY] [--format mp3] [--sample-s 5] [--json out.json]

Each client loops: POST /v1/audio/speech (streamed), read the body to its end, check it, repeat,
until the time is up. Reported: requests, errors by kind, deliberate 429s (admission control
working as designed) counted apart from errors, p50/p95/max time to first byte, and the
server's resident memory before the run, at its peak and after it (from /proc/<pid>/status
with --server-pid, else from the server's /metrics ``process_resident_memory_bytes``; with
--server-pid also the whole process tree's, vLLM's engine process included), the GPU's used
memory at the same moments (when there is a GPU) split into the server's process, its
children (vLLM's engine core) and the server's CUDA allocator (tensors held, pool kept), and
what is left on the server afterwards (FFmpeg children, in-flight and queued requests).

During the load the same memory figures are sampled every ``--sample-s`` seconds
(``memory_series``), and ``memory_growth_mib`` gives each one's growth over the load's second
half and over the whole of it: a working set that fills early and stays is flat in the second
half; a leak or a fragmenting pool keeps growing there.

Every pcm or wav body must hold a whole number of speech tokens' audio (960 samples each at
24 kHz), and exactly ``--expect-samples`` samples when given (a server with fixed lengths:
``fixed_speech_tokens``): a stream that ends early without an error is counted as one.

Bounded on purpose: loopback hosts only (this is not a tool for hitting other people's
servers), at most 1024 clients, 3600 s and --max-requests requests. Exit status 0 when there
were no errors other than 429s, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import json
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, cast, get_args
from urllib.parse import urlsplit

import httpx

from gateway.observability import cuda_memory
from gateway.tools import host_probes
from gateway.tools.bench_server import parse_metrics
from gateway.tools.stream_client import stream_client

MAX_CONCURRENCY = 1024
MAX_DURATION_S = 3600.0
DEFAULT_TEXT = "Hello there. This is a short sentence for the load test."
SAMPLES_PER_TOKEN = 960
"""24 kHz audio per speech token (25 tokens a second): every engine's output is a whole number."""


class NotLoopbackError(ValueError):
    pass


def require_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address (after resolving names)."""
    host = urlsplit(url).hostname
    if not host:
        raise NotLoopbackError(f"no host in {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise NotLoopbackError(f"cannot resolve {host!r}: {exc}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise NotLoopbackError(f"{host!r} resolves to {address}, which is not a loopback address")


@dataclass
class Results:
    started: float = 0.0
    finished: float = 0.0
    ok: int = 0
    rejected_429: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttfb_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    audio_bytes: int = 0
    audio_s: list[float] = field(default_factory=list)
    """Seconds of audio in each pcm/wav body."""

    @property
    def requests(self) -> int:
        return self.ok + self.rejected_429 + sum(self.errors.values())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def audio_samples(fmt: str, size: int) -> int | None:
    """Samples in a pcm/wav body of ``size`` bytes (s16 mono; wav's 44-byte header), else None."""
    if fmt == "pcm":
        return size // 2
    if fmt == "wav":
        return max(0, size - 44) // 2
    return None


def _check_body(fmt: str, head: bytes, size: int, expect_samples: int | None = None) -> str | None:
    """A cheap validity check of the streamed audio; the kind of error, or None."""
    if size == 0:
        return "empty_body"
    samples = audio_samples(fmt, size)
    if samples is not None and (samples % SAMPLES_PER_TOKEN or (expect_samples and samples != expect_samples)):
        return "audio_length"
    if fmt == "wav" and not (head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return "bad_wav_header"
    if fmt == "pcm" and size % 2:
        return "odd_pcm_length"
    if fmt == "flac" and head[:4] != b"fLaC":
        return "bad_flac_header"
    if fmt == "opus" and head[:4] != b"OggS":
        return "bad_ogg_header"
    if fmt == "mp3" and not (head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)):
        return "bad_mp3_header"
    return None


async def _one_request(client: httpx.AsyncClient, body: dict[str, object], results: Results,
                       expect_samples: int | None = None) -> float:
    """Do one request; record it; return how long to back off (Retry-After on 429)."""
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            if response.status_code == 429:
                await response.aread()
                results.rejected_429 += 1
                return min(float(response.headers.get("retry-after", "1") or 1), 5.0)
            if response.status_code != 200:
                await response.aread()
                results.errors[f"http_{response.status_code}"] += 1
                return 0.0
            head = b""
            size = 0
            first: float | None = None
            async for chunk in response.aiter_raw():
                if not chunk:
                    continue
                if first is None:
                    first = time.perf_counter() - started
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                size += len(chunk)
    except httpx.TimeoutException:
        results.errors["timeout"] += 1
        return 0.0
    except httpx.RemoteProtocolError:
        results.errors["connection_broken"] += 1
        return 0.0
    except httpx.TransportError as exc:
        results.errors[f"transport_{type(exc).__name__}"] += 1
        return 0.5
    fmt = str(body["response_format"])
    problem = _check_body(fmt, head, size, expect_samples)
    if problem:
        results.errors[problem] += 1
        return 0.0
    results.ok += 1
    results.audio_bytes += size
    samples = audio_samples(fmt, size)
    if samples is not None:
        results.audio_s.append(samples / 24_000)
    results.ttfb_s.append(first if first is not None else time.perf_counter() - started)
    results.total_s.append(time.perf_counter() - started)
    return 0.0


async def _client_loop(
    client: httpx.AsyncClient, body: dict[str, object], results: Results, stop_at: float, budget: list[int],
    expect_samples: int | None = None,
) -> None:
    """One stream: requests one after another on its own client (stream_client.py says why)."""
    async with client:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            pause = await _one_request(client, body, results, expect_samples)
            if pause:
                await asyncio.sleep(pause)


def ffmpeg_children(pid: int) -> int:
    """How many FFmpeg processes the server has right now (leak check after the run)."""
    count = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                program = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            count += b"ffmpeg" in os.path.basename(program)
    return count


def encoder_threads(pid: int) -> int:
    """How many in-process encoder threads the server has right now (leak check after the run;
    they carry the OS thread name ``audio-encoder``)."""
    from gateway.audio.pyav_encoder import THREAD_NAME_PREFIX

    count = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            count += (task / "comm").read_text().strip() == THREAD_NAME_PREFIX
        except OSError:
            continue
    return count


async def rss_from_metrics(client: httpx.AsyncClient) -> int | None:
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


async def server_rss(client: httpx.AsyncClient, pid: int | None) -> int | None:
    return host_probes.rss_bytes(pid) if pid else await rss_from_metrics(client)


def _memory(pid: int | None) -> tuple[int | None, int | None]:
    """(the server's process tree RSS, the GPU's used memory): None where unknown."""
    return (host_probes.tree_rss_bytes(pid) if pid else None), host_probes.gpu_used_bytes()


Quantity = Literal["rss_mib", "tree_rss_mib", "gpu_used_mib", "allocated_mib", "reserved_mib"]
QUANTITIES: tuple[Quantity, ...] = get_args(Quantity)


class MemorySample(TypedDict):
    """The server's memory ``t_s`` seconds into the load, MiB, None where unknown: its RSS,
    its process tree's, the GPU's used memory, and its CUDA allocator's tensors (allocated)
    and pool (reserved)."""

    t_s: float
    rss_mib: float | None
    tree_rss_mib: float | None
    gpu_used_mib: float | None
    allocated_mib: float | None
    reserved_mib: float | None


async def memory_sample(client: httpx.AsyncClient, pid: int | None, since: float) -> MemorySample:
    """One reading, from one /metrics scrape (the RSS too when there is no pid, as
    :func:`server_rss` reads it) and the host's probes."""
    t_s = round(time.monotonic() - since, 1)
    metrics = await _scrape(client)
    tree, gpu = await asyncio.to_thread(_memory, pid)
    rss = host_probes.rss_bytes(pid) if pid else metrics.get("process_resident_memory_bytes")

    def mib(value: float | None) -> float | None:
        return host_probes.mib(None if value is None else int(value))

    return {"t_s": t_s, "rss_mib": mib(rss), "tree_rss_mib": mib(tree), "gpu_used_mib": mib(gpu),
            "allocated_mib": mib(metrics.get("chatterbox_cuda_allocated_bytes")),
            "reserved_mib": mib(metrics.get("chatterbox_cuda_reserved_bytes"))}


async def sample_memory(client: httpx.AsyncClient, pid: int | None, since: float, every_s: float,
                        until: asyncio.Future[Any], series: list[MemorySample]) -> None:
    """Append a sample at ``since`` and every ``every_s`` seconds after it (on that schedule, not
    drifting by the time a sample takes) while ``until`` runs, and one more once it is done."""
    taken = 0
    while True:
        series.append(await memory_sample(client, pid, since))
        if until.done():
            return
        taken += 1
        await asyncio.wait([until], timeout=max(0.0, since + taken * every_s - time.monotonic()))


def memory_growth(series: list[MemorySample], half_s: float) -> dict[str, dict[str, float | None]]:
    """Each quantity's growth, MiB: over the second half (the last sample less the first at or
    after ``half_s``) and over the whole load (last less first). A working set reached early is
    flat in the second half whatever the whole says. None where either end is unknown, or
    where the half has fewer than two samples."""
    later = [s for s in series if s["t_s"] >= half_s]

    def growth(span: list[MemorySample], key: Quantity) -> float | None:
        first, last = (span[0][key], span[-1][key]) if len(span) > 1 else (None, None)
        return None if first is None or last is None else round(last - first, 1)

    return {key: {"second_half": growth(later, key), "whole": growth(series, key)} for key in QUANTITIES}


def memory_table(report: dict[str, object]) -> str:
    """The report's memory series as text columns, its growth in the last two rows ("-": unknown)."""
    series = cast(list[MemorySample], report["memory_series"])
    growth = cast(dict[Quantity, dict[str, float | None]], report["memory_growth_mib"])

    def cell(value: float | None, sign: str = "") -> str:
        return "-" if value is None else f"{value:{sign}.1f}"

    rows = [("t_s", *(key.removesuffix("_mib") for key in QUANTITIES))]
    rows += [(cell(s["t_s"]), *(cell(s[key]) for key in QUANTITIES)) for s in series]
    rows += [(f"{span}:", *(cell(growth[key][span], "+") for key in QUANTITIES)) for span in ("second_half", "whole")]
    return "\n".join(" ".join(text.rjust(12) for text in row) for row in rows)


def _peak(before: float | None, series: list[MemorySample], key: Quantity) -> float | None:
    values = [v for v in (before, *(s[key] for s in series)) if v is not None]
    return max(values) if values else None


def _gpu_split(pid: int | None, metrics: dict[str, float]) -> dict[str, float | None]:
    """Where the GPU memory of the server's process tree sits (MiB): the server process and
    its children (vLLM's engine core) as the driver counts them, and the server's CUDA
    allocator as its /metrics report it (tensors held, pool kept). None where unknown (no GPU,
    nvidia-smi missing, CUDA not in use)."""
    from gateway.engine.vllm.gpu_memory import gpu_memory_by_pid  # nvidia-smi; imports no torch

    by_pid = gpu_memory_by_pid() if pid else {}
    children = [c for c in host_probes.descendants(pid) if c in by_pid] if pid else []
    allocated, reserved = metrics.get("chatterbox_cuda_allocated_bytes"), metrics.get("chatterbox_cuda_reserved_bytes")
    return {
        "server": host_probes.mib(by_pid.get(pid)) if pid in by_pid else None,
        "children": host_probes.mib(sum(by_pid[c] for c in children)) if children else None,
        "server_allocated": host_probes.mib(int(allocated)) if allocated is not None else None,
        "server_reserved": host_probes.mib(int(reserved)) if reserved is not None else None,
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    require_loopback(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    body: dict[str, object] = {
        "model": args.model,
        "voice": args.voice,
        "input": args.text,
        "response_format": args.format,
    }
    # The warm-up, the probes and the scrapes; the load's streams have a client each. Idle
    # connections are dropped well before the server's keep-alive timeout (uvicorn: 5 s), so
    # a request never races the server closing the connection it is about to reuse.
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16, keepalive_expiry=2.0)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        rss_start = await server_rss(client, args.server_pid)
        tree_start, gpu_start = _memory(args.server_pid)
        split_start = await asyncio.to_thread(_gpu_split, args.server_pid, await _scrape(client))
        # Warm-up: first requests fill caches (voice conditionals, allocator pools); the
        # baseline that "after" is compared with is taken once those exist.
        warm = Results()
        await asyncio.gather(*(_one_request(client, body, warm) for _ in range(min(args.concurrency, 8))))
        await asyncio.sleep(args.settle)
        rss_before = await server_rss(client, args.server_pid)
        tree_before, gpu_before = await asyncio.to_thread(_memory, args.server_pid)
        split_before = await asyncio.to_thread(_gpu_split, args.server_pid, await _scrape(client))
        snapshot_before = await cuda_snapshot(args) if args.cuda_snapshots else None

        results = Results(started=time.monotonic())
        stop_at = results.started + args.duration
        budget = [args.max_requests]
        streams = [stream_client(args.url, args.request_timeout, headers) for _ in range(args.concurrency)]
        loops = asyncio.ensure_future(asyncio.gather(*(
            _client_loop(stream, body, results, stop_at, budget, args.expect_samples) for stream in streams)))
        series: list[MemorySample] = []
        sampler = asyncio.create_task(
            sample_memory(client, args.server_pid, results.started, args.sample_s, loops, series))
        # the run ends early should the server exit (--server-pid)
        watcher = asyncio.create_task(host_probes.exited(args.server_pid)) if args.server_pid else None
        await asyncio.wait([loops, *([watcher] if watcher else [])], return_when=asyncio.FIRST_COMPLETED)
        died = round(time.monotonic() - results.started, 1) if watcher is not None and watcher.done() else None
        for task in (loops, watcher):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(loops, *([watcher] if watcher else []), return_exceptions=True)
        results.finished = time.monotonic()
        await sampler  # its last sample: the load's end
        await asyncio.sleep(args.settle)
        rss_after = await server_rss(client, args.server_pid)
        tree_after, gpu_after = await asyncio.to_thread(_memory, args.server_pid)
        metrics_after = await _scrape(client)
        split_after = await asyncio.to_thread(_gpu_split, args.server_pid, metrics_after)
        snapshot_after = await cuda_snapshot(args) if args.cuda_snapshots else None

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    elapsed = results.finished - results.started
    rss_before_mib, tree_before_mib, gpu_before_mib = (host_probes.mib(v) for v in (rss_before, tree_before, gpu_before))
    return {
        "url": args.url,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 1),
        "text_chars": len(args.text),
        "format": args.format,
        "requests": results.requests,
        "ok": results.ok,
        "requests_per_s": round(results.ok / elapsed, 2) if elapsed else None,
        "rejected_429": results.rejected_429,
        "errors": dict(results.errors),
        "error_count": sum(results.errors.values()),
        "warmup_errors": dict(warm.errors),
        "ttfb_ms": {
            "p50": ms(_percentile(results.ttfb_s, 50)),
            "p95": ms(_percentile(results.ttfb_s, 95)),
            "max": ms(max(results.ttfb_s) if results.ttfb_s else None),
        },
        "total_ms": {"p50": ms(_percentile(results.total_s, 50)), "p95": ms(_percentile(results.total_s, 95))},
        "audio_bytes": results.audio_bytes,
        "audio_s_per_request": {"min": min(results.audio_s), "max": max(results.audio_s)} if results.audio_s else None,
        "expect_samples": args.expect_samples,
        "server_died_at_s": died,
        "server_ffmpeg_children_after": ffmpeg_children(args.server_pid) if args.server_pid else None,
        "server_encoder_threads_after": encoder_threads(args.server_pid) if args.server_pid else None,
        "server_in_flight_after": metrics_after.get("chatterbox_in_flight_requests"),
        "server_queued_after": metrics_after.get("chatterbox_queued_requests"),
        "server_rss_mib": {
            "start": host_probes.mib(rss_start),
            "before": rss_before_mib,
            "peak": _peak(rss_before_mib, series, "rss_mib"),
            "after": host_probes.mib(rss_after),
        },
        "server_tree_rss_mib": {
            "start": host_probes.mib(tree_start), "before": tree_before_mib, "peak": _peak(tree_before_mib, series, "tree_rss_mib"),
            "after": host_probes.mib(tree_after),
        },
        "gpu_used_mib": {
            "start": host_probes.mib(gpu_start), "before": gpu_before_mib, "peak": _peak(gpu_before_mib, series, "gpu_used_mib"),
            "after": host_probes.mib(gpu_after),
        },
        # the GPU memory above, split by process and by what the server's allocator holds
        "gpu_split_mib": {"start": split_start, "before": split_before, "after": split_after},
        "memory_series": series,
        "memory_growth_mib": memory_growth(series, args.duration / 2),
        **({"cuda_snapshots": [str(snapshot_before), str(snapshot_after)],
            "cuda_growth_sites": cuda_memory.growth(cuda_memory.load(snapshot_before), cuda_memory.load(snapshot_after))}
           if snapshot_before is not None and snapshot_after is not None else {}),
    }


async def cuda_snapshot(args: argparse.Namespace, timeout_s: float = 120.0) -> Path:
    """Have the server (``--server-pid``, serving with ``cuda_memory_snapshots`` set to
    ``--cuda-snapshots``) write a snapshot of its CUDA allocator; its path once written."""
    directory, pid = args.cuda_snapshots, args.server_pid
    known = set(cuda_memory.snapshot_paths(directory, pid))
    os.kill(pid, cuda_memory.SNAPSHOT_SIGNAL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [p for p in cuda_memory.snapshot_paths(directory, pid) if p not in known]
        if new:
            return new[0]
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no CUDA memory snapshot from server {pid} in {directory} within {timeout_s:g} s "
                       "(is it serving with --cuda-memory-snapshots set to that directory, on CUDA?)")


async def _scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's unlabelled metric values (in-flight and queue gauges after the run)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    return parse_metrics(response.text) if response.status_code == 200 else {}


def _bounded(low: float, high: float, kind: type = float):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of a gateway on this machine (loopback only)")
    p.add_argument("--concurrency", type=_bounded(1, MAX_CONCURRENCY, int), default=64)
    p.add_argument("--duration", type=_bounded(1, MAX_DURATION_S), default=60.0, help="seconds")
    p.add_argument("--max-requests", type=_bounded(1, 10_000_000, int), default=1_000_000)
    p.add_argument("--server-pid", type=int, default=None, help="read the server's RSS from /proc/<pid>/status")
    p.add_argument("--api-key", default="loadtest")
    p.add_argument("--model", default="tts-1")
    p.add_argument("--voice", default="alloy")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--format", default="mp3", choices=["mp3", "opus", "aac", "flac", "wav", "pcm"])
    p.add_argument("--request-timeout", type=_bounded(1, 3600), default=120.0, help="seconds per request")
    p.add_argument("--settle", type=_bounded(0, 120), default=3.0, help="seconds to wait before memory readings")
    p.add_argument("--sample-s", type=_bounded(0.5, 600), default=5.0,
                   help="seconds between memory samples during the load (memory_series)")
    p.add_argument("--expect-samples", type=_bounded(1, 10**9, int), default=None,
                   help="pcm/wav: every body must hold exactly this many samples (a server with fixed lengths)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--cuda-snapshots", type=Path, default=None,
                   help="the server's cuda_memory_snapshots directory (needs --server-pid): snapshots of its CUDA "
                        "allocator before and after the load, and the allocation sites whose memory grew")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cuda_snapshots is not None and args.server_pid is None:
        parser.error("--cuda-snapshots needs --server-pid (the server to signal)")
    try:
        report = asyncio.run(run(args))
    except NotLoopbackError as exc:
        print(f"refusing to run: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    # the series as a table, not a JSON line per number (--json has it in full)
    print(json.dumps({k: v for k, v in report.items() if k != "memory_series"}, indent=2))
    print(f"memory during the load, MiB (memory_series, every {args.sample_s:g} s; growth: memory_growth_mib):")
    print(memory_table(report))
    if "cuda_growth_sites" in report:
        print("CUDA allocation sites whose live memory grew over the load (cuda_growth_sites):")
        print(cuda_memory.growth_table(cast(list[dict[str, Any]], report["cuda_growth_sites"])))
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0 if report["error_count"] == 0 and report["server_died_at_s"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())

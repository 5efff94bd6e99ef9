"""The server the HTTP benchmarks measure: ``python -m gateway serve`` in a subprocess on a free
loopback port, dummy weights, its log in a file (JSON lines: the timeline stage reads them),
stopped on exit. Or an already running server (``url``), measured as it is.

The flags are the issue's serving configuration (``--max-speech-tokens``, ``--max-in-flight``
and ``--vllm-max-num-seqs`` at the peak concurrency), plus ``--fixed-speech-tokens`` so that
dummy T3 makes every utterance exactly as long as asked (each stream's audio length is then
known and checked), and ``--request-timeline`` so a request can ask for its timeline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True, slots=True)
class Server:
    base: str
    pid: int | None
    """The server process (None for a server this tool did not start)."""
    log: Path | None
    start_s: float | None
    """Seconds from the process start to ``/ready``."""


def serve_command(port: int, *, engine: str, models: Sequence[str], tokens: int, peak: int, cache_dir: str,
                  extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--engine", engine, "--load-format", "dummy",
            "--host", "127.0.0.1", "--port", str(port), "--models", ",".join(models),
            "--max-speech-tokens", str(tokens), "--max-in-flight", str(peak), "--max-queued", str(2 * peak),
            "--vllm-max-num-seqs", str(peak), "--fixed-speech-tokens", "--request-timeline",
            # every stream comes from 127.0.0.1, one client: no fair share, or it would get a quarter
            "--max-client-share", "1",
            "--log-format", "json", "--cache-dir", cache_dir, *extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(*, engine: str, models: Sequence[str], tokens: int, peak: int, log: Path,
                   cache_dir: str | None = None, extra: Sequence[str] = (), ready_timeout_s: float = 480.0,
                   url: str | None = None, pid: int | None = None) -> Iterator[Server]:
    """A ready server for the benchmark's stages (started here unless ``url`` is given)."""
    if url is not None:
        yield Server(url.rstrip("/"), pid, None, None)
        return
    if cache_dir is None:  # the dummy checkpoint (GiBs) lives as long as the server
        with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
            with running_server(engine=engine, models=models, tokens=tokens, peak=peak, log=log, cache_dir=scratch,
                                extra=extra, ready_timeout_s=ready_timeout_s) as server:
                yield server
        return
    port = free_port()
    cmd = serve_command(port, engine=engine, models=models, tokens=tokens, peak=peak,
                        cache_dir=cache_dir, extra=extra)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        print("server:", " ".join(cmd), flush=True)
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, process, t0 + ready_timeout_s, log)
            yield Server(base, process.pid, log, round(time.perf_counter() - t0, 1))
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _wait_ready(base: str, process: subprocess.Popen, deadline: float, log: Path) -> None:
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.perf_counter() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"the server did not get ready (exit {process.poll()}); its log ends:\n{tail}")
        time.sleep(0.5)


def scrape(base: str) -> dict[str, float]:
    """The server's unlabelled metric values (``/metrics``); empty when it has none."""
    try:
        return parse_metrics(httpx.get(f"{base}/metrics", timeout=10).text)
    except httpx.HTTPError:
        return {}


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition by name: an unlabelled one as it is, a
    labelled family summed over its label sets (e.g. ``chatterbox_t3_tokens_total`` over every
    model; histogram buckets left out), and each labelled sample also as itself
    (``name{labels}``, as the exposition writes it)."""
    values: dict[str, float] = {}
    summed: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, brace, rest = line.partition("{")
        if brace:
            labels, _, sample = rest.rpartition("}")
            parts = [name, *sample.split()]
        else:
            parts = line.split()
        if len(parts) != 2:
            continue
        try:
            value = float(parts[1])
        except ValueError:
            continue
        if not brace:
            values[parts[0]] = value
        elif not parts[0].endswith("_bucket"):
            summed[parts[0]] = summed.get(parts[0], 0.0) + value
            values[f"{parts[0]}{{{labels}}}"] = value
    return {**summed, **values}

"""The one command: `chatterbox-gateway serve --cluster local` starts Ray on this machine,
deploys two engine replicas, serves the OpenAI API in front of them, and on SIGTERM shuts
down gracefully and takes Ray with it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def test_serve_cluster_local_runs_and_stops_with_ray(tmp_path: Path, valid_audio) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("chatterbox-gateway", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "gateway"]
    flags = ["--cluster", "local", "--engine", "fake", "--cluster-min-replicas", "2", "--cluster-max-replicas", "2"]
    process = subprocess.Popen(
        [*command, "serve", *flags, "--port", str(port), "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    base_url = f"http://127.0.0.1:{port}"
    ray_processes: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"server did not start: {process.stdout.read() if process.stdout else ''}")
        assert httpx.get(f"{base_url}/ready").json()["engine"] == "cluster:fake"
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        valid_audio(client.audio.speech.create(model="tts-1", input="Hello, cluster.", voice="alloy").content, "mp3")
        ray_processes = children_of(process.pid)  # Ray's GCS, raylet, workers, ...
        assert ray_processes
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    events = [json.loads(line).get("event") for line in output.splitlines() if line.startswith("{")]
    assert "cluster_attached" in events and "engine_closed" in events
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ray_processes), "Ray outlived the server"

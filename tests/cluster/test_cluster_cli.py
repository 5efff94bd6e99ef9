"""The one command: `chatterbox-gateway serve --cluster local` starts Ray on this machine,
deploys two engine replicas, serves the OpenAI API in front of them, and on SIGTERM shuts
down gracefully and takes Ray with it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

from harness import cli_serve  # noqa: E402


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
    flags = ["--cluster", "local", "--engine", "fake", "--cluster-min-replicas", "2", "--cluster-max-replicas", "2"]
    flags += ["--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with cli_serve(flags, tmp_path, ready_timeout_s=180, stop_timeout_s=60, env=env) as run:
        assert httpx.get(f"{run.base_url}/ready").json()["engine"] == "cluster:fake"
        client = openai.OpenAI(base_url=f"{run.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        valid_audio(client.audio.speech.create(model="tts-1", input="Hello, cluster.", voice="alloy").content, "mp3")
        ray_processes = children_of(run.process.pid)  # Ray's GCS, raylet, workers, ...
        assert ray_processes
    assert run.process.returncode in (0, -signal.SIGTERM), run.output
    assert "Application shutdown complete" in run.output
    events = [json.loads(line).get("event") for line in run.output.splitlines() if line.startswith("{")]
    assert "cluster_attached" in events and "engine_closed" in events
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ray_processes), "Ray outlived the server"

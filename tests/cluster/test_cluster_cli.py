"""The one command: `chatterbox-gateway serve --cluster local` starts Ray on this machine,
deploys two engine replicas, serves the OpenAI API in front of them, and on SIGTERM shuts
down gracefully and takes Ray with it."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
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


def descendants_of(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening_addresses(pids: set[int]) -> dict[tuple[str, int], int]:
    """(address, port) -> pid of every TCP socket these processes listen on."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in (Path("/proc/net") / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per 32-bit word, host order
            found[(socket.inet_ntop(family, packed), int(hex_port, 16))] = inodes[fields[9]]
    return found


def is_loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


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

        # Ray on loopback only: GCS, raylet, workers, replicas, agents (issue 20: every interface)
        family = descendants_of(run.process.pid) | {run.process.pid}
        listening = listening_addresses(family)
        assert len(listening) >= 4, listening
        exposed = {f"{a}:{port} ({command_line(pid)[:60]})" for (a, port), pid in listening.items() if not is_loopback(a)}
        assert not exposed, exposed

        # every replica dies, and keeps dying as Serve restarts it (a crash loop: a restart takes
        # ~1 s, the server looks every 2 s, so one kill can fall between two looks): /ready says
        # they are down and being restarted; once the killing stops, ready again
        replicas = {pid for pid in family if "ServeReplica" in command_line(pid)}
        assert len(replicas) == 2, {pid: command_line(pid) for pid in family}
        said: list[str] = []
        slowest = 0.0
        killing_until = time.monotonic() + 60
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not said and time.monotonic() < killing_until:
                for pid in {p for p in descendants_of(run.process.pid) if "ServeReplica" in command_line(p)}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            asked = time.monotonic()
            ready = httpx.get(f"{run.base_url}/ready", timeout=60)
            slowest = max(slowest, time.monotonic() - asked)
            if ready.status_code == 503:
                said.append(ready.json()["error"]["message"])
            elif said:
                break  # down, then up again
            time.sleep(0.1)
        assert said, "the server never noticed its replicas were down"
        assert slowest < 30, slowest  # /ready kept answering (~0.1-0.7 s here; a loaded machine is slower)
        assert all("failed to load" not in message for message in said), said
        assert any("stopped working" in m and "replicas down" in m and "restarting" in m for m in said), said
        assert httpx.get(f"{run.base_url}/ready").status_code == 200
        again = client.audio.speech.create(model="tts-1", input="Back again.", voice="alloy")
        valid_audio(again.content, "mp3")
    assert run.process.returncode in (0, -signal.SIGTERM), run.output
    assert "Application shutdown complete" in run.output
    events = [json.loads(line).get("event") for line in run.output.splitlines() if line.startswith("{")]
    assert "cluster_attached" in events and "engine_closed" in events
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ray_processes), "Ray outlived the server"

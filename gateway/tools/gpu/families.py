"""The GPU visit for issue 17 (Turbo and Multilingual on the vLLM engine), in two parts of one
device call each: ``bash gateway/tools/gpu/families.sh part1|part2 [--dry-run]``.

* part 1 (<= 9 min): three steps side by side, each a process under its own timeout:
  ``t3_parity`` (Multilingual's and Turbo's T3 on vLLM vs upstream, fp32 and bf16),
  ``vocoder_parity`` (Turbo's mean-flow S3Gen in the batched vocoder vs upstream, streamed vs
  one-shot, CUDA graphs vs eager), ``e2e`` (the HTTP end-to-end tests of every family on one
  3-family vLLM server, served with part 2's vLLM settings so that its compile cache is
  part 2's).
* part 2 (<= 9.5 min): one ``serve --engine vllm --models chatterbox,chatterbox-turbo,
  chatterbox-multilingual`` (dummy weights; if that start dies, once more: without the
  families whose start failed when the log names them, else with the engines started one
  after another), its start log (each part's time and memory, the KV cache plan)
  and the GPU's memory per process, then, while it is idle, issue 19's voice-agent latency
  (``gateway.tools.agent_bench``: a sentence streamed word by word over the WebSocket against
  the REST route's first audio, ``chatterbox``, pcm and mp3, each answer hung up at its first
  audio), then the HTTP rows through ``gateway.tools.benchmark`` against it: Turbo at 1 and
  256 streams, Multilingual at 1 and 128, a mixed load of 192 (a third each). The server
  gives one client the whole admission budget (``--max-client-share 1``): every stream of a
  benchmark comes from one address, and the default share (a quarter) would refuse most of
  a 256-stream row.

Every step writes under ``$OUT/part<N>/`` (at most 8 files, none deeper): ``summary.json``
(every step: command, exit, seconds, timed out or not, and what was parsed from it), the
steps' JSON results (part 2: ``bench.json``, ``agents.json``), ``logs.tar.xz`` (every log),
``compile-cache.tar.xz`` (vLLM's, inductor's and Triton's compile caches, for a later visit
to carry back; split in 15 MiB parts, or left out above 60 MiB). A step that fails or runs
out of time loses only itself.

``--dry-run`` (CPU, here): the same steps at tiny sizes (the parity tools' ``--dry-run``, the
GPU tests skip themselves, part 2 serves the fake engine), to prove the script before a GPU
visit spends time on it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")
TOKENS = 250
"""Speech tokens per utterance in part 2: 10 s of audio."""
PART_BUDGET_S = {"part1": 530, "part2": 560}
CACHE_PART_BYTES = 15 << 20
CACHE_MAX_BYTES = 60 << 20
AGENT_FORMATS = ("pcm_24000", "mp3_44100_128")
"""Issue 19's voice-agent latency in part 2, one step per output format."""
AGENT_REPEATS = 20
BENCH_ROWS = (  # (step, --models, --http-concurrency)
    ("bench_turbo", "chatterbox-turbo", "1,256"),
    ("bench_multilingual", "chatterbox-multilingual", "1,128"),
    ("bench_mixed", "mixed", "192"),
)
SERVE_SETTINGS = {
    # part 2's server and part 1's e2e server: the same vLLM settings, so one compile cache
    "CHATTERBOX_VLLM_MAX_NUM_SEQS": "256",
    "CHATTERBOX_VLLM_MAX_MODEL_LEN": "2048",
    "CHATTERBOX_VLLM_GPU_MEMORY_UTILIZATION": "0.5",
}


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


class Visit:
    """One part's steps, logs and summary under ``out``."""

    def __init__(self, part: str, out: Path, dry_run: bool) -> None:
        self.part, self.dry_run = part, dry_run
        self.out = out / part
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out.parent / f".{part}-logs"  # tarred into logs.tar.xz at the end
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.summary: dict[str, Any] = {"part": part, "dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "card": gpu_name(), "steps": [], "notes": []}

    def left_s(self) -> float:
        return PART_BUDGET_S[self.part] * (4 if self.dry_run else 1) - (time.monotonic() - self.t0)

    def note(self, text: str) -> None:
        print(f"[{self.part}] {text}", flush=True)
        self.summary["notes"].append(text)

    def run(self, steps: list[Step]) -> None:
        """Run ``steps`` side by side, each until it ends or its timeout (bounded by the part's
        time left; four times longer in a dry run); a step's process group is stopped when its
        time is up."""
        scale = 4 if self.dry_run else 1
        running = []
        for step in steps:
            log = open(self.logs / f"{step.name}.log", "w")
            print(f"[{self.part}] start {step.name}: {' '.join(step.cmd)}", flush=True)
            proc = subprocess.Popen(step.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **step.env})
            limit = min(step.timeout_s * scale, max(self.left_s(), 1.0))
            running.append((step, proc, log, time.monotonic(), limit))
        while running:
            time.sleep(0.5)
            for entry in list(running):
                step, proc, log, started, limit = entry
                timed_out = proc.poll() is None and time.monotonic() - started > limit
                if proc.poll() is None and not timed_out:
                    continue
                if timed_out:
                    stop_group(proc)
                running.remove(entry)
                log.close()
                step.result = {"step": step.name, "cmd": " ".join(step.cmd), "exit": proc.returncode,
                               "timed_out": timed_out, "seconds": round(time.monotonic() - started, 1),
                               "limit_s": round(limit), **step.result}
                self.summary["steps"].append(step.result)
                print(f"[{self.part}] {step.name}: exit {proc.returncode}{' (timed out)' if timed_out else ''} "
                      f"after {step.result['seconds']} s", flush=True)

    def finish(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        with tarfile.open(self.out / "logs.tar.xz", "w:xz") as tar:
            tar.add(self.logs, arcname=f"{self.part}-logs")
        shutil.rmtree(self.logs, ignore_errors=True)
        pack_compile_cache(self)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        print(json.dumps({"part": self.part, "seconds": self.summary["seconds"],
                          "steps": {s["step"]: s["exit"] for s in self.summary["steps"]}}), flush=True)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a step's process group (the step and every process it started): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def gpu_name() -> str | None:
    info = nvidia_smi(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    return info.strip() if info else None


def nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_memory_snapshot() -> dict[str, Any]:
    """The card's used memory and each process's (None fields where nvidia-smi cannot tell)."""
    total = nvidia_smi(["--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"])
    apps = nvidia_smi(["--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"])
    snap: dict[str, Any] = {"used_mib": None, "total_mib": None, "processes": []}
    if total:
        used, whole = (int(x) for x in total.splitlines()[0].split(","))
        snap.update(used_mib=used, total_mib=whole)
    for line in (apps or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            snap["processes"].append({"pid": int(parts[0]), "name": parts[1], "used_mib": int(parts[2])})
    return snap


CACHE_SH = Path(__file__).with_name("cache.sh")
"""``gpu_cache_pack``: the same pack (and its parts) as a call's own ``env.sh`` makes."""


def pack_compile_cache(visit: Visit) -> None:
    where = os.environ.get("CB_COMPILE_CACHE")
    root = Path(where) if where else None
    if root is None or not root.is_dir() or not any(root.iterdir()):
        visit.summary["compile_cache"] = "none"
        return
    dest = visit.out / "compile-cache.tar.xz"
    try:
        subprocess.run(["bash", "-c", f'. "{CACHE_SH}" && gpu_cache_pack "$0" "$1"', str(dest), str(root)],
                       check=True, timeout=120, capture_output=True,
                       env={**os.environ, "XZ_OPT": "-6 -T0", "GPU_CACHE_PART_BYTES": str(CACHE_PART_BYTES)})
    except (OSError, subprocess.SubprocessError) as exc:
        visit.summary["compile_cache"] = f"not packed: {exc!r}"
        return
    parts = sorted(visit.out.glob("compile-cache.tar.xz*"))
    size = sum(p.stat().st_size for p in parts)
    if size > CACHE_MAX_BYTES:
        for part in parts:
            part.unlink()
        visit.summary["compile_cache"] = f"left out: {size >> 20} MiB packed (> {CACHE_MAX_BYTES >> 20})"
    else:
        visit.summary["compile_cache"] = f"{size >> 20} MiB in {len(parts)} file(s) (cat the parts, tar -xJf)"


def python() -> list[str]:
    return [sys.executable]


# --- part 1 -----------------------------------------------------------------------------------


def part1(visit: Visit) -> None:
    out, dry = visit.out, visit.dry_run
    flag = ["--dry-run"] if dry else []
    steps = [
        Step("t3_parity", [*python(), "-m", "gateway.tools.parity_families", "--skip-vocoder",
                           "--tokens", "12" if dry else "150", "--json", str(out / "parity_t3.json"), *flag],
             timeout_s=480),
        Step("vocoder_parity", [*python(), "-m", "gateway.tools.parity_families", "--skip-t3",
                                "--json", str(out / "parity_vocoder.json"), *flag], timeout_s=330),
        Step("e2e", [*python(), "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-q", "-rs",
                     "tests/http/test_engine_e2e_vllm.py", "--junitxml", str(out / "e2e.xml")],
             timeout_s=520, env=SERVE_SETTINGS),
    ]
    if importlib.util.find_spec("av") is None:  # the suite's conftest imports PyAV: pytest would exit 4
        visit.note("e2e: skipped, PyAV is missing: `bash gateway/tools/gpu/install.sh av` first")
        steps = [s for s in steps if s.name != "e2e"]
    visit.run(steps)
    for name, file in (("t3_parity", "parity_t3.json"), ("vocoder_parity", "parity_vocoder.json")):
        step = next(s for s in visit.summary["steps"] if s["step"] == name)
        path = out / file
        if path.exists():
            rows = json.loads(path.read_text())
            step["passed"] = sum(r["passed"] for r in rows)
            step["failed"] = [r["check"] for r in rows if not r["passed"]]
    step = next((s for s in visit.summary["steps"] if s["step"] == "e2e"), None)
    if step is not None:
        step.update(junit_counts(out / "e2e.xml"))
    visit.summary["gpu_memory_after"] = gpu_memory_snapshot()


def junit_counts(path: Path) -> dict[str, Any]:
    """pytest's counts from its JUnit XML (tests, failures, errors, skipped) and failed names."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [case.get("name") for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


# --- part 2 -----------------------------------------------------------------------------------


def part2(visit: Visit) -> None:
    models = FAMILIES
    server = start_server(visit, models, parallel=True)
    if server is None and visit.left_s() > 330 and not visit.dry_run:
        failed = failed_families(visit.summary["steps"][-1].get("start_log", {}))
        if failed and set(failed) < set(models):  # a family's own failure: serve the others
            models = tuple(m for m in models if m not in failed)
            visit.note(f"{', '.join(failed)} failed to start: once more without it")
            server = start_server(visit, models, parallel=True)
        else:
            visit.note("the first start failed: once more with --no-vllm-parallel-start")
            server = start_server(visit, models, parallel=False)
    if server is None:
        return
    proc, base, log = server
    try:
        visit.summary["gpu_memory_at_ready"] = gpu_memory_snapshot()
        visit.summary["start_log"] = start_log(log)
        if "chatterbox" in models:  # first, on the idle server: latency, not load
            for fmt in AGENT_FORMATS:
                if visit.left_s() < 300:
                    visit.note(f"agents_{fmt}: skipped, the load rows need the time left")
                    continue
                visit.run([agent_step(visit, base, fmt)])
            merge_agents(visit)
        for name, model, levels in BENCH_ROWS:
            if model != "mixed" and model not in models:
                visit.note(f"{name}: skipped, {model} is not served")
                continue
            if visit.left_s() < 45:
                visit.note(f"{name}: skipped, no time left")
                continue
            if visit.dry_run:
                levels = ",".join("4" if level != "1" else "1" for level in levels.split(","))
            cmd = [*python(), "-m", "gateway.tools.benchmark", "--stages", "http", "--server-url", base,
                   "--server-pid", str(proc.pid), "--server-models", ",".join(models), "--models", model,
                   "--server-engine", "fake" if visit.dry_run else "vllm",
                   "--http-concurrency", levels, "--http-window-s", "4" if visit.dry_run else "20",
                   "--tokens", str(TOKENS), "--json", str(visit.out / f"{name}.json")]
            visit.run([Step(name, cmd, timeout_s=150)])
            visit.summary[f"gpu_memory_after_{name}"] = gpu_memory_snapshot()
    finally:
        stop_group(proc)
        merge_bench(visit, models)


def agent_step(visit: Visit, base: str, fmt: str) -> Step:
    """Issue 19's benchmark: first audio after a streamed sentence's last word vs the REST
    route's, each answer hung up at its first audio (a sample costs its first audio, not its
    utterance; the slot's return after the hang-up is timed too)."""
    cmd = [*python(), "-m", "gateway.tools.agent_bench", "--base-url", base, "--model", "chatterbox",
           "--output-format", fmt, "--after-first", "close", "--repeats", "3" if visit.dry_run else str(AGENT_REPEATS),
           "--json", str(visit.out / f"agents_{fmt}.json")]
    return Step(f"agents_{fmt}", cmd, timeout_s=90)


def merge_agents(visit: Visit) -> None:
    """The agent steps' documents as one ``agents.json`` (by output format): the files that
    come back from a device call are few."""
    merged = {}
    for fmt in AGENT_FORMATS:
        path = visit.out / f"agents_{fmt}.json"
        if path.exists():
            merged[fmt] = json.loads(path.read_text())
            path.unlink()
    if merged:
        (visit.out / "agents.json").write_text(json.dumps(merged, indent=1) + "\n")


def failed_families(log: dict[str, Any]) -> list[str]:
    """The families whose start failed (the engine's ``engine_start_failed`` lines)."""
    return sorted({f["family"] for f in log.get("failed", []) if f.get("family") in FAMILIES})


def serve_command(port: int, models: tuple[str, ...], parallel: bool, dry_run: bool) -> list[str]:
    from gateway.settings import Settings

    engine = ["--engine", "fake"] if dry_run else ["--engine", "vllm", "--load-format", "dummy"]
    # every utterance exactly TOKENS long (dummy T3 may sample its stop token): issue 18's setting
    fixed = ["--fixed-speech-tokens"] if "fixed_speech_tokens" in Settings.__struct_fields__ else []
    return [*python(), "-m", "gateway", "serve", *engine, "--models", ",".join(models), "--host", "127.0.0.1",
            "--port", str(port), "--max-speech-tokens", str(TOKENS), *fixed,
            "--max-in-flight", "256", "--max-queued", "512", "--max-client-share", "1", "--log-format", "json",
            "--vllm-parallel-start" if parallel else "--no-vllm-parallel-start"]


def start_server(visit: Visit, models: tuple[str, ...], parallel: bool) -> tuple[subprocess.Popen, str, Path] | None:
    """A ready server of ``models`` (its process, base URL, log), or None with the reason noted."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    name = f"server_{len([s for s in visit.summary['steps'] if s['step'].startswith('server')]) + 1}"
    log = visit.logs / f"{name}.log"
    cmd = serve_command(port, models, parallel, visit.dry_run)
    t0 = time.monotonic()
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **SERVE_SETTINGS, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = t0 + min(360.0, max(visit.left_s() - 120, 60.0))
    result = {"step": name, "cmd": " ".join(cmd), "exit": None, "timed_out": False}
    visit.summary["steps"].append(result)
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                result["ready_s"] = round(time.monotonic() - t0, 1)
                visit.note(f"{name}: ready in {result['ready_s']} s")
                return proc, base, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            result["timed_out"] = proc.poll() is None
            stop_group(proc)
            result["exit"] = proc.returncode
            result["seconds"] = round(time.monotonic() - t0, 1)
            result["start_log"] = start_log(log)
            visit.note(f"{name}: not ready after {result['seconds']} s (exit {proc.returncode})")
            return None
        time.sleep(1)


def start_log(log: Path) -> dict[str, Any]:
    """What the server logged of its start: the KV cache plan, each part, the summary."""
    found: dict[str, Any] = {"parts": []}
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "engine_start_part":
            found["parts"].append({k: v for k, v in event.items() if k not in ("event", "timestamp", "level", "logger")})
        elif kind == "engine_start_failed":
            found.setdefault("failed", []).append({k: v for k, v in event.items() if k not in ("event", "level", "logger")})
        elif kind in ("vllm_kv_cache_plan", "engine_start_summary", "engine_ready", "engine_failed"):
            found[kind] = {k: v for k, v in event.items() if k not in ("event", "level", "logger")}
    return found


def merge_bench(visit: Visit, models: tuple[str, ...] = FAMILIES) -> None:
    """The bench steps' documents as one (``card``, ``date``, ``command``, ``rows``): what
    docs/benchmarks/ records."""
    rows, commands, doc = [], [], {}
    for name, _, _ in BENCH_ROWS:
        path = visit.out / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        rows += doc.get("rows", [])
        commands.append(doc.get("command"))
        path.unlink()
    if commands:
        merged = {"card": doc.get("card"), "date": doc.get("date"), "command": commands, "rows": rows,
                  "server": " ".join(serve_command(0, models, True, visit.dry_run)[1:]),
                  "start_log": visit.summary.get("start_log")}
        (visit.out / "bench.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.gpu.families", description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("part1", "part2"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: prove the script here")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    args = ap.parse_args(argv)
    visit = Visit(args.part, args.out, args.dry_run)
    try:
        (part1 if args.part == "part1" else part2)(visit)
    except Exception as exc:  # noqa: BLE001 - whatever happened, the summary and logs come back
        import traceback

        traceback.print_exc()
        visit.note(f"the driver failed: {exc!r}")
    finally:
        visit.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

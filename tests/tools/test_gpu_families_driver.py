"""The GPU visit's driver (gateway/tools/gpu/families.py) on the CPU: steps side by side, each
stopped at its own time-out with everything it started, the summary and logs always written,
the server's start log parsed, the compile cache packed within the files that can come back."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

from gateway.tools.gpu import families as driver


def _visit(tmp_path: Path, part: str = "part1") -> driver.Visit:
    return driver.Visit(part, tmp_path / "out", dry_run=False)


def test_steps_run_side_by_side_and_a_late_one_loses_only_itself(tmp_path: Path) -> None:
    visit = _visit(tmp_path)
    child = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
               f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    visit.run([driver.Step("quick", [sys.executable, "-c", "print('hello')"], timeout_s=30),
               driver.Step("slow", [sys.executable, "-c", sleeper], timeout_s=2),
               driver.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], timeout_s=30)])
    assert time.monotonic() - t0 < 30  # side by side: the slow one's limit, not their sum
    steps = {s["step"]: s for s in visit.summary["steps"]}
    assert steps["quick"]["exit"] == 0 and not steps["quick"]["timed_out"] and steps["quick"]["seconds"] < 10
    assert steps["slow"]["timed_out"] and steps["slow"]["exit"] != 0
    assert steps["fails"]["exit"] == 3
    pid = int(child.read_text())
    with pytest.raises(ProcessLookupError):  # the step's own children were stopped with it
        for _ in range(50):
            import os

            os.kill(pid, 0)
            time.sleep(0.1)
    assert (visit.logs / "quick.log").read_text().strip() == "hello"


def test_finish_writes_the_summary_and_the_logs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CB_COMPILE_CACHE", raising=False)
    visit = _visit(tmp_path)
    visit.run([driver.Step("echo", [sys.executable, "-c", "print('x' * 10)"], timeout_s=30)])
    visit.note("something")
    visit.finish()
    files = sorted(p.name for p in visit.out.iterdir())
    assert files == ["logs.tar.xz", "summary.json"]
    summary = json.loads((visit.out / "summary.json").read_text())
    assert summary["notes"] == ["something"] and summary["compile_cache"] == "none"
    with tarfile.open(visit.out / "logs.tar.xz") as tar:
        assert "part1-logs/echo.log" in tar.getnames()
    assert not visit.logs.exists()


def test_the_compile_cache_comes_back_in_parts_that_fit(tmp_path: Path, monkeypatch) -> None:
    import os

    cache = tmp_path / "cache"
    (cache / "vllm").mkdir(parents=True)
    (cache / "vllm" / "blob").write_bytes(os.urandom(3 << 20))  # incompressible
    monkeypatch.setenv("CB_COMPILE_CACHE", str(cache))
    monkeypatch.setattr(driver, "CACHE_PART_BYTES", 1 << 20)
    visit = _visit(tmp_path)
    visit.finish()
    parts = sorted(p for p in visit.out.iterdir() if p.name.startswith("compile-cache"))
    assert len(parts) == 4 and all(p.stat().st_size <= 1 << 20 for p in parts)
    joined = tmp_path / "joined.tar.xz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert "./vllm/blob" in tar.getnames()
    assert "in 4 file(s)" in json.loads((visit.out / "summary.json").read_text())["compile_cache"]
    monkeypatch.setattr(driver, "CACHE_MAX_BYTES", 1 << 20)
    again = driver.Visit("part2", tmp_path / "out", dry_run=False)
    again.finish()
    assert not any(p.name.startswith("compile-cache") for p in again.out.iterdir())
    assert "left out" in json.loads((again.out / "summary.json").read_text())["compile_cache"]


def test_the_start_log_is_read_from_the_servers_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    lines = [
        "INFO some vLLM line",
        json.dumps({"event": "vllm_kv_cache_plan", "engines": {"chatterbox-turbo": {"kv_cache_gib": 19.4}}}),
        json.dumps({"event": "engine_start_part", "family": "chatterbox-turbo", "part": "t3_engine", "seconds": 41.0,
                    "timestamp": "t", "level": "info"}),
        "{not json",
        json.dumps({"event": "engine_start_summary", "seconds": 180.2, "gpu_used_gib": 80.1}),
        json.dumps({"event": "engine_start_failed", "family": "chatterbox-turbo", "part": "t3_engine",
                    "error": "RuntimeError: boom"}),
        json.dumps({"event": "request", "status": 200}),
    ]
    log.write_text("\n".join(lines) + "\n")
    found = driver.start_log(log)
    assert found["parts"] == [{"family": "chatterbox-turbo", "part": "t3_engine", "seconds": 41.0}]
    assert found["vllm_kv_cache_plan"]["engines"]["chatterbox-turbo"]["kv_cache_gib"] == 19.4
    assert found["engine_start_summary"]["seconds"] == 180.2
    assert found["failed"] == [{"family": "chatterbox-turbo", "part": "t3_engine", "error": "RuntimeError: boom"}]
    assert driver.failed_families(found) == ["chatterbox-turbo"]
    assert driver.start_log(tmp_path / "absent.log") == {"parts": []}
    assert driver.failed_families({"parts": []}) == []


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "e2e.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped/></testcase></testsuite></testsuites>')
    assert driver.junit_counts(xml) == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed_tests": ["b"]}
    assert driver.junit_counts(tmp_path / "none.xml") == {}


def test_bench_documents_merge_into_one(tmp_path: Path) -> None:
    visit = _visit(tmp_path, "part2")
    for i, (name, model, _) in enumerate(driver.BENCH_ROWS[:2]):
        (visit.out / f"{name}.json").write_text(json.dumps(
            {"card": "H200", "date": "d", "command": f"cmd {i}", "rows": [{"model": model, "concurrency": 1}]}))
    visit.summary["start_log"] = {"parts": []}
    driver.merge_bench(visit)
    merged = json.loads((visit.out / "bench.json").read_text())
    assert merged["card"] == "H200" and merged["command"] == ["cmd 0", "cmd 1"]
    assert [r["model"] for r in merged["rows"]] == ["chatterbox-turbo", "chatterbox-multilingual"]
    assert "--models chatterbox,chatterbox-turbo,chatterbox-multilingual" in merged["server"]
    assert sorted(p.name for p in visit.out.iterdir()) == ["bench.json"]


def test_part2_serves_the_other_families_when_one_fails_to_start(tmp_path: Path, monkeypatch) -> None:
    visit = _visit(tmp_path, "part2")
    calls: list[tuple[tuple[str, ...], bool]] = []

    def start(visit, models, parallel):
        calls.append((models, parallel))
        visit.summary["steps"].append({"step": f"server_{len(calls)}", "start_log": {
            "parts": [], "failed": [{"family": "chatterbox-turbo", "part": "t3_engine", "error": "x"}]}})
        return None  # neither start gets ready here: what matters is what the second one asked for

    monkeypatch.setattr(driver, "start_server", start)
    driver.part2(visit)
    assert calls == [(driver.FAMILIES, True), (("chatterbox", "chatterbox-multilingual"), True)]
    assert any("chatterbox-turbo failed to start" in n for n in visit.summary["notes"])


def test_the_benchmark_server_admits_the_largest_row_from_one_client() -> None:
    from gateway.cli import build_parser, settings_from_args
    from gateway.speech.admission import Share

    cmd = driver.serve_command(8000, driver.FAMILIES, True, dry_run=False)
    settings = settings_from_args(build_parser().parse_args(cmd[cmd.index("serve"):]))
    one_client = Share.of(settings.max_client_share, settings.max_in_flight, settings.max_queued)
    largest = max(int(level) for _, _, levels in driver.BENCH_ROWS for level in levels.split(","))
    # every stream of a row comes from 127.0.0.1: all of them synthesise at once, none is refused
    assert one_client.in_flight >= largest and settings.max_in_flight >= largest


def test_part2_measures_the_agents_on_the_idle_server_before_the_load(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    visit = _visit(tmp_path, "part2")
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    ran: list[driver.Step] = []

    def run(steps: list[driver.Step]) -> None:
        for step in steps:
            ran.append(step)
            if step.name.startswith("agents_"):
                Path(step.cmd[step.cmd.index("--json") + 1]).write_text(json.dumps({"step": step.name}))

    monkeypatch.setattr(driver, "start_server", lambda visit, models, parallel: (server, "http://127.0.0.1:9", tmp_path / "log"))
    monkeypatch.setattr(driver, "gpu_memory_snapshot", dict)
    monkeypatch.setattr(visit, "run", run)
    driver.part2(visit)
    assert server.poll() is not None  # stopped after the rows
    assert [s.name for s in ran] == [f"agents_{f}" for f in driver.AGENT_FORMATS] + [n for n, _, _ in driver.BENCH_ROWS]
    agent = ran[0].cmd
    assert agent[agent.index("--after-first") + 1] == "close" and agent[agent.index("--model") + 1] == "chatterbox"
    merged = json.loads((visit.out / "agents.json").read_text())
    assert merged == {f: {"step": f"agents_{f}"} for f in driver.AGENT_FORMATS}
    assert not any(p.name.startswith("agents_") for p in visit.out.iterdir())  # one file comes back, not one per format


def test_part1_without_pyav_says_so_instead_of_running_pytest_into_exit_4(tmp_path: Path, monkeypatch) -> None:
    # 2026-12-04: the e2e step ran before PyAV was installed; the suite's conftest imports it
    visit = _visit(tmp_path)
    ran: list[list[str]] = []
    monkeypatch.setattr(driver.importlib.util, "find_spec", lambda name: None if name == "av" else object())

    def run(steps):
        ran.append([s.name for s in steps])
        visit.summary["steps"] += [{"step": s.name, "exit": 0} for s in steps]

    monkeypatch.setattr(visit, "run", run)
    monkeypatch.setattr(driver, "gpu_memory_snapshot", lambda: {})
    driver.part1(visit)
    assert ran == [["t3_parity", "vocoder_parity"]]
    assert any("PyAV is missing" in n and "install.sh av" in n for n in visit.summary["notes"])

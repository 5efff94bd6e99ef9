"""Where a loaded process's Python time goes, sampled with py-spy during a benchmark row.

The question it answers: when a row's throughput stops short of what T3 and the vocoder do
alone (Turbo at 256 streams: T3 alone ~805 audio-s/s, the server ~194 with the vocoder 42%
busy), is it the server's host side, and which part of it? Two samplers run side by side on
one process for the same seconds (``--nonblocking``: the process is never paused):

* every thread's stacks while it runs (``--threads``): each thread's *active share* (samples
  over the samples the span holds at the rate) and where that time goes;
* only the thread that holds the GIL (``--gil``): the *GIL share*, near 1.0 when Python
  work of all threads together saturates the interpreter, whatever the cores.

``python -m gateway.tools.py_spy PID --seconds 8`` prints the table for any running process;
the benchmark's ``--http-py-spy-s`` samples the server (and its own client process) in the
middle of each HTTP row and stores the summary in the row. py-spy is a PyPI wheel (a static
binary); without it the rows say so and nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

_THREAD = re.compile(r"^thread \((?:0x)?[0-9A-Fa-f]+\)(?:: (?P<name>.*))?$")
_LINE = re.compile(r" \(([^():]+):\d+\)$")


def executable() -> str | None:
    """The py-spy binary on PATH, or next to this interpreter (a venv's bin)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


async def record(pid: int, seconds: float, out: Path, *, rate: int = 100, gil: bool = False,
                 subprocesses: bool = False) -> str | None:
    """Sample ``pid`` for ``seconds`` into ``out`` (py-spy's raw collapsed stacks); None when
    done, else why not (no py-spy, no permission, the process gone)."""
    exe = executable()
    if exe is None:
        return "py-spy is not installed"
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
           "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    cmd += ["--gil"] if gil else []
    cmd += ["--subprocesses"] if subprocesses else []
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        text, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "py-spy did not finish"
    if proc.returncode != 0 or not out.exists():
        return f"py-spy exit {proc.returncode}: {text.decode(errors='replace').strip()[-300:]}"
    return None


_OWN = re.compile(r"(?:^|/)(gateway/[^:]+)$")


def _frame(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``, or ``func (gateway/x/file.py)`` for
    the gateway's own code: one entry per function."""
    match = _LINE.search(frame)
    if match is None:
        return frame
    own = _OWN.search(match.group(1))
    return f"{frame[:match.start()]} ({own.group(1) if own else Path(match.group(1)).name})"


def _is_own(frame: str) -> bool:
    match = _LINE.search(frame)
    return match is not None and _OWN.search(match.group(1)) is not None


_PROCESS = re.compile(r"^process (?P<pid>\d+):")


def _records(text: str) -> list[tuple[list[str], int]]:
    """(frames, samples) per stack. A process frame holds its command line, which may span
    lines: a record ends at the line ending in its sample count."""
    records, pending = [], ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        stack, _, count = pending.rpartition(" ")
        if count.isdigit() and stack:
            records.append((stack.split(";"), int(count)))
            pending = ""
    return records


def parse(text: str, main_pid: int | None = None) -> dict[str, dict[str, Any]]:
    """Raw collapsed stacks -> per thread: samples, self time per function, and per function
    of the gateway's own code the time it was the innermost of ours on the stack (running, or
    in what it called). Threads of a child process (py-spy's ``--subprocesses``) are named
    ``pid N: thread``."""
    threads: dict[str, dict[str, Any]] = defaultdict(lambda: {"samples": 0, "self": Counter(), "gateway": Counter()})
    for frames, n in _records(text):
        pid = None
        while frames and (process := _PROCESS.match(frames[0])):
            pid, frames = int(process.group("pid")), frames[1:]
        name = "?"
        if frames and (match := _THREAD.match(frames[0])):
            name = match.group("name") or "thread"
            frames = frames[1:]
        if pid is not None and main_pid is not None and pid != main_pid:
            name = f"pid {pid}: {name}"
        entry = threads[name]
        entry["samples"] += n
        if frames:
            entry["self"][_frame(frames[-1])] += n
        own = [f for f in frames if _is_own(f)]
        if own:  # the innermost gateway function: ours, or what ours called into
            entry["gateway"][_frame(own[-1])] += n
    return dict(threads)


def _merge_numbered(threads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool threads whose names differ only by a trailing number (``vocoder_0`` / ``_1``,
    ``asyncio_3``) or by thread id: one row each, their samples summed."""
    pooled: dict[str, dict[str, Any]] = {}
    for name, entry in threads.items():
        key = re.sub(r"([_-]?\d+)+$", "", name) or name
        into = pooled.setdefault(key, {"samples": 0, "self": Counter(), "gateway": Counter(), "threads": 0})
        into["samples"] += entry["samples"]
        into["self"].update(entry["self"])
        into["gateway"].update(entry["gateway"])
        into["threads"] += 1
    return pooled


def summarize(active: str, gil: str | None, seconds: float, rate: int, top: int = 6,
              main_pid: int | None = None) -> dict[str, Any]:
    """The two samplers' output as shares of the span: per thread group its active share, GIL
    share and the functions that take most of it (self, and the innermost gateway function)."""
    span = max(seconds * rate, 1.0)
    threads = _merge_numbered(parse(active, main_pid))
    held = _merge_numbered(parse(gil, main_pid)) if gil is not None else {}
    rows = []
    for name, entry in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        rows.append({
            "thread": name, "threads": entry["threads"],
            "active_share": round(entry["samples"] / span, 3),
            "gil_share": round(held[name]["samples"] / span, 3) if name in held else (0.0 if gil is not None else None),
            "top_self": [[f, round(n / span, 3)] for f, n in entry["self"].most_common(top)],
            "top_gateway": [[f, round(n / span, 3)] for f, n in entry["gateway"].most_common(top)],
        })
    return {"seconds": seconds, "rate": rate,
            "gil_share": None if gil is None else round(sum(e["samples"] for e in held.values()) / span, 3),
            "threads": rows}


async def profile(pid: int, seconds: float, directory: Path, label: str, *, rate: int = 100,
                  subprocesses: bool = False) -> dict[str, Any]:
    """Both samplers on ``pid`` at once, their raw files under ``directory`` (``label`` names
    them), and the summary; ``{"error": ...}`` when py-spy could not sample."""
    directory.mkdir(parents=True, exist_ok=True)
    active_path, gil_path = directory / f"pyspy_{label}.txt", directory / f"pyspy_{label}_gil.txt"
    errors = await asyncio.gather(record(pid, seconds, active_path, rate=rate, subprocesses=subprocesses),
                                  record(pid, seconds, gil_path, rate=rate, gil=True, subprocesses=subprocesses))
    if errors[0] is not None:
        return {"error": errors[0]}
    gil = gil_path.read_text() if errors[1] is None else None
    result = summarize(active_path.read_text(), gil, seconds, rate, main_pid=pid)
    if errors[1] is not None:
        result["gil_error"] = errors[1]
    result["files"] = [str(active_path)] + ([str(gil_path)] if gil is not None else [])
    return result


def pack(directory: Path, archive: Path) -> list[str]:
    """Every raw file under ``directory`` into one xz tar at ``archive``, the folder removed;
    the members' names. A run's profiles then come back from the GPU machine as one file
    (its ``$OUT`` returns at most eight: ten profiles had crowded out the run's JSON)."""
    import shutil
    import tarfile

    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    with tarfile.open(archive, "w:xz") as tar:
        for name in names:
            tar.add(directory / name, arcname=name)
    shutil.rmtree(directory)
    return names


def table(summary: dict[str, Any], label: str) -> str:
    """The summary as a markdown table (one row per thread group)."""
    if "error" in summary:
        return f"py-spy ({label}): {summary['error']}"
    lines = [f"py-spy ({label}, {summary['seconds']:.0f} s at {summary['rate']} Hz): GIL held "
             f"{summary['gil_share'] if summary['gil_share'] is not None else '?'} of the time",
             "| thread | n | active | GIL | most self time | most time in gateway code |", "|---|---:|---:|---:|---|---|"]
    for row in summary["threads"][:12]:
        own = ", ".join(f"{f} {s}" for f, s in row["top_self"][:3])
        gw = ", ".join(f"{f} {s}" for f, s in row["top_gateway"][:3])
        lines.append(f"| {row['thread']} | {row['threads']} | {row['active_share']} | {row['gil_share']} | {own} | {gw} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--subprocesses", action="store_true", help="also the process's children (vLLM's engine core)")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for the raw stacks")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    summary = asyncio.run(profile(args.pid, args.seconds, args.out, str(args.pid), rate=args.rate,
                                  subprocesses=args.subprocesses))
    print(table(summary, f"pid {args.pid}"))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    return 1 if "error" in summary else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a voice agent waits for: ``python -m gateway.tools.agent_bench --base-url http://HOST:PORT``.

Against any running server (the fake engine here, the vLLM engine on the GPU), alternately:

- **ws**: a ``stream-input`` WebSocket opened beforehand (agents keep one open), a sentence sent
  word by word as an LLM would (``--word-interval-ms`` apart), ``auto_mode`` on so the sentence
  end is cut at once (``--trigger flush``: the last word carries ``flush`` instead); measured:
  from sending the **last word** to the first audio message.
- **rest**: ``POST /v1/text-to-speech/{voice}/stream`` with the same sentence; measured: from
  sending the request to the first audio byte.

Both ask for the same ``--output-format`` (``pcm_24000`` by default: no codec in the way).
Prints p50/p95 of each and of their difference; the target (issue 19) is ws <= rest + 20 ms
at p50. ``--json FILE`` keeps every sample. One request at a time: this is latency, not load.

``--after-first read`` (default) reads each answer to its end. ``--after-first close`` hangs
up at the first audio, as an agent whose user barges in does (WebSocket closed, REST response
dropped), then waits for the server's ``chatterbox_in_flight_requests`` to be back at 0 before
the next sample and reports how long that took (``slot_back_ms``): the barge-in's cost to the
server, and a sample costs its first audio instead of its whole utterance.

Fair shares (docs/operations.md): everything here comes from one address, one client. One
request at a time is always within a client's share, so the tool is never throttled by it; a
server that refuses it anyway (another tool running from the same host, a tiny
``max_in_flight``) makes it stop with the limit named: start that server with
``--max-client-share 1``, as the GPU command in docs/benchmarks.md does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

SENTENCE = "Sure, I can help you with that right away, just give me one moment to look it up."
TARGET_MS = 20.0


async def ws_first_audio(args: argparse.Namespace) -> float:
    """Seconds from the last word sent to the first audio received (then the rest is read, or
    the socket closed: ``args.after_first``)."""
    url = (
        args.base_url.replace("https://", "wss://").replace("http://", "ws://")
        + f"/v1/text-to-speech/{args.voice}/stream-input?output_format={args.output_format}"
        + f"&auto_mode={'true' if args.trigger == 'auto' else 'false'}"
        + (f"&model_id={args.model}" if args.model else "")
    )
    headers = {"xi-api-key": args.api_key} if args.api_key else {}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        first_audio: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def read() -> None:
            async for raw in ws:
                message = json.loads(raw)
                if "error" in message:
                    raise RuntimeError(f"server error: {message}{_share_hint(message['error'])}")
                if message.get("audio") and not first_audio.done():
                    first_audio.set_result(time.perf_counter())

        reader = asyncio.create_task(read())
        await ws.send(json.dumps({"text": " "}))
        words = args.sentence.split(" ")
        last_sent = 0.0
        for i, word in enumerate(words):
            last = i == len(words) - 1
            message: dict[str, Any] = {"text": word + " "}
            if last and args.trigger == "flush":
                message["flush"] = True
            if i and args.word_interval_ms:
                await asyncio.sleep(args.word_interval_ms / 1000)
            await ws.send(json.dumps(message))
            last_sent = time.perf_counter()
        done, _ = await asyncio.wait({first_audio, reader}, timeout=args.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if first_audio not in done:
            reader.cancel()
            raise RuntimeError("no audio from the WebSocket" if not reader.done() else f"socket ended: {reader.exception()}")
        if args.after_first == "close":  # barge-in: the socket goes, whatever was still to come
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await reader
            return first_audio.result() - last_sent
        await ws.send(json.dumps({"text": ""}))
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
            await asyncio.wait_for(reader, args.timeout_s)  # the rest of the audio, then the close
        return first_audio.result() - last_sent


async def rest_first_audio(client: httpx.AsyncClient, args: argparse.Namespace) -> float:
    body: dict[str, Any] = {"text": args.sentence}
    if args.model:
        body["model_id"] = args.model
    started = time.perf_counter()
    async with client.stream(
        "POST", f"/v1/text-to-speech/{args.voice}/stream", params={"output_format": args.output_format}, json=body
    ) as response:
        if response.status_code != 200:
            body = (await response.aread())[:300]
            code = next((c for c in SHARE_CODES if c.encode() in body), "")
            raise RuntimeError(f"REST answered {response.status_code}: {body!r}{_share_hint(code)}")
        first: float | None = None
        async for data in response.aiter_raw():  # read to the end (or hang up at the first audio)
            if data and first is None:
                first = time.perf_counter() - started
                if args.after_first == "close":
                    break  # leaving the block drops the connection: the server cancels the job
    if first is None:
        raise RuntimeError("REST sent no audio")
    return first


SHARE_CODES = ("client_concurrency_limit", "key_concurrency_limit")
IN_FLIGHT = "chatterbox_in_flight_requests"


async def slot_back(client: httpx.AsyncClient, timeout_s: float) -> float:
    """Seconds until the server has no request in flight (after a hang-up), polled from
    /metrics every 5 ms; RuntimeError if it still has one after ``timeout_s``."""
    started = time.perf_counter()
    while True:
        text = (await client.get("/metrics")).text
        value = next((line.split()[1] for line in text.splitlines() if line.startswith(IN_FLIGHT + " ")), None)
        if value is None:
            raise RuntimeError(f"/metrics has no {IN_FLIGHT}: --after-first close needs this server's metrics")
        if float(value) == 0:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"the server still had {value} request(s) in flight {timeout_s:.0f} s after the hang-up")
        await asyncio.sleep(0.005)


def _share_hint(code: str) -> str:
    if code in SHARE_CODES:
        return " (refused by a fair share: start the server with --max-client-share 1, or run one tool at a time)"
    return ""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"xi-api-key": args.api_key} if args.api_key else {}
    ws_s: list[float] = []
    rest_s: list[float] = []
    back_s: list[float] = []
    closing = args.after_first == "close"
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout_s) as client:

        async def sample(measure: Any, into: list[float]) -> None:
            into.append(await measure)
            if closing:
                back_s.append(await slot_back(client, args.timeout_s))

        await sample(ws_first_audio(args), [])  # warm-up: connections, voice conditionals, encoder set-up
        await sample(rest_first_audio(client, args), [])
        back_s.clear()
        for _ in range(args.repeats):
            await sample(ws_first_audio(args), ws_s)
            await sample(rest_first_audio(client, args), rest_s)
    ws_ms = [s * 1000 for s in ws_s]
    rest_ms = [s * 1000 for s in rest_s]
    delta = [w - r for w, r in zip(ws_ms, rest_ms)]
    summary = {
        "base_url": args.base_url,
        "output_format": args.output_format,
        "trigger": args.trigger,
        "word_interval_ms": args.word_interval_ms,
        "repeats": args.repeats,
        "ws_after_last_word_ms": {"p50": round(statistics.median(ws_ms), 1), "p95": round(_pct(ws_ms, 0.95), 1)},
        "rest_first_audio_ms": {"p50": round(statistics.median(rest_ms), 1), "p95": round(_pct(rest_ms, 0.95), 1)},
        "ws_minus_rest_ms": {"p50": round(statistics.median(delta), 1), "p95": round(_pct(delta, 0.95), 1)},
        "after_first": args.after_first,
    }
    if back_s:
        back_ms = [s * 1000 for s in back_s]
        summary["slot_back_ms"] = {"p50": round(statistics.median(back_ms), 1), "p95": round(_pct(back_ms, 0.95), 1),
                                   "max": round(max(back_ms), 1)}
    summary["target_met"] = summary["ws_minus_rest_ms"]["p50"] <= TARGET_MS
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "ws_ms": ws_ms, "rest_ms": rest_ms}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--voice", default="alloy")
    parser.add_argument("--model", default=None, help="model_id (default: the server's first model)")
    parser.add_argument("--output-format", default="pcm_24000")
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--word-interval-ms", type=float, default=20.0, help="LLM pace: time between words")
    parser.add_argument("--trigger", choices=("auto", "flush"), default="auto")
    parser.add_argument("--after-first", choices=("read", "close"), default="read",
                        help="read each answer to its end, or hang up at the first audio (barge-in)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="also write every sample here")
    args = parser.parse_args(argv)
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

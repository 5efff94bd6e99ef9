"""The benchmark and the load test give each stream a client of its own: a row of N streams
holds N connections, each kept alive across that stream's requests (one shared pool walks
every connection at each request: gateway/tools/stream_client.py). Checked against a small
HTTP/1.1 server on loopback that notes the client port of every request."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.tools import bench_http, loadtest, stream_client
from ops_support import quiet_attempts

PCM = b"\0\0" * 960 * 5  # 5 speech tokens of pcm


class PortCounter:
    """Answers ``POST /v1/audio/speech`` with a short pcm body (kept alive) and anything else
    with an empty 200; counts the speech requests by the client's port."""

    def __init__(self) -> None:
        self.ports: Counter[int] = Counter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                body = PCM if lines[0].startswith("POST /v1/audio/speech") else b""
                if body:
                    self.ports[port] += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: audio/pcm\r\n"
                             + f"content-length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def counter() -> AsyncIterator[tuple[str, PortCounter]]:
    state = PortCounter()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", state


def spy_on_clients(monkeypatch: pytest.MonkeyPatch, module: object) -> list[Counter[str]]:
    """Each client ``module`` makes through ``stream_client``: a count of the requests it sent."""
    made: list[Counter[str]] = []

    def spied(*args: object, **kwargs: object) -> httpx.AsyncClient:
        client = stream_client.stream_client(*args, **kwargs)  # type: ignore[arg-type]
        sent: Counter[str] = Counter()

        async def count(request: httpx.Request) -> None:
            sent[request.url.path] += 1

        client.event_hooks["request"].append(count)
        made.append(sent)
        return client

    monkeypatch.setattr(module, "stream_client", spied)
    return made


async def test_a_benchmark_row_holds_a_kept_alive_connection_per_stream(counter, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, state = counter
    for _ in quiet_attempts():  # two requests a stream in the 1 s window: a stalled host's run, again
        made = spy_on_clients(monkeypatch, bench_http)
        state.ports.clear()
        row = await bench_http.measure_level(base, ["chatterbox"] * 6, window_s=1.0, voice="alloy", fmt="pcm")
    assert row["errors"] == 0 and row["requests_completed"] > 6
    # a client per stream, each sending that stream's requests one after another on one connection
    assert len(made) == 6 and all(sent["/v1/audio/speech"] > 1 for sent in made)
    assert sorted(state.ports.values()) == sorted(sent["/v1/audio/speech"] for sent in made)


async def test_a_load_test_holds_a_kept_alive_connection_per_stream(counter, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, state = counter
    # through the tool's own parser: every option it has gets its default
    args = loadtest.build_parser().parse_args([
        "--url", base, "--api-key", "k", "--text", "Hi.", "--format", "pcm", "--concurrency", "5",
        "--duration", "1", "--max-requests", "10000", "--request-timeout", "30", "--settle", "0"])
    for _ in quiet_attempts():  # as above
        made = spy_on_clients(monkeypatch, loadtest)
        state.ports.clear()
        report = await loadtest.run(args)
    assert report["error_count"] == 0 and report["ok"] > 5
    assert len(made) == 5 and sum(sent["/v1/audio/speech"] for sent in made) == report["ok"]
    # the warm-up's 5 requests (min(concurrency, 8), at once) went through the tool's shared client
    load = Counter({port: n for port, n in state.ports.items() if n > 1})
    assert len(load) == 5 and sum(load.values()) == report["ok"]

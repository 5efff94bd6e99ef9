"""The voice-agent benchmark (gateway/tools/agent_bench.py) against a live server on loopback:
both routes measured, every sample kept, and in ``--after-first close`` mode each answer cut
at its first audio (the engine's job cancelled, as a barge-in does) with the slot's return
timed from the server's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.engine.fake import FakeEngine
from gateway.tools import agent_bench


@pytest.fixture
def live_engine() -> FakeEngine:
    # ~0.4 s an utterance: a hang-up at the first audio leaves most of it ungenerated
    return FakeEngine(piece_delay_s=0.04)


def _bench(base_url: str, out: Path, *more: str) -> tuple[int, dict]:
    code = agent_bench.main(["--base-url", base_url, "--repeats", "3", "--word-interval-ms", "0",
                             "--timeout-s", "20", "--json", str(out), *more])
    return code, json.loads(out.read_text())


def test_reads_every_answer_to_its_end_by_default(live_server, tmp_path: Path) -> None:
    code, report = _bench(live_server.base_url, tmp_path / "read.json")
    assert code in (0, 1)  # 1: the target missed, which this test does not judge
    assert report["after_first"] == "read" and "slot_back_ms" not in report
    assert len(report["ws_ms"]) == len(report["rest_ms"]) == 3
    assert all(ms > 0 for ms in report["ws_ms"] + report["rest_ms"])
    assert report["ws_minus_rest_ms"]["p50"] == pytest.approx(
        sorted(w - r for w, r in zip(report["ws_ms"], report["rest_ms"]))[1], abs=0.1)
    # 2 warm-ups + 3 samples of each route, every one generated to its end
    assert len(live_server.engine.completed) == 8 and not live_server.engine.cancelled


def test_close_hangs_up_at_the_first_audio_and_times_the_slot_back(live_server, tmp_path: Path) -> None:
    code, report = _bench(live_server.base_url, tmp_path / "close.json", "--after-first", "close")
    assert code in (0, 1)
    assert report["after_first"] == "close"
    assert len(report["ws_ms"]) == len(report["rest_ms"]) == 3
    back = report["slot_back_ms"]
    assert 0 <= back["p50"] <= back["p95"] <= back["max"] < 20_000
    engine = live_server.engine
    assert len(engine.jobs) == 8
    assert len(engine.cancelled) == 8 and not engine.completed  # every answer cut, none generated to the end


def test_close_needs_the_servers_in_flight_gauge(tmp_path: Path) -> None:
    import asyncio

    import httpx

    async def probe() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text="# no metrics here\n"))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as client:
            await agent_bench.slot_back(client, 1.0)

    with pytest.raises(RuntimeError, match="chatterbox_in_flight_requests"):
        asyncio.run(probe())

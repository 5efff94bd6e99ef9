"""Fair shares over real HTTP: one client (an address; the tests speak from several loopback
addresses, 127.0.0.2, 127.0.0.3, ...) or one API key cannot hold more than its share of the
admission slots and queue: past it, a 429 whose ``code`` says which limit (the OpenAI SDK
sees a RateLimitError), with Retry-After, a log line and a metric naming the limit, while
other clients are still admitted at once. X-Forwarded-For names the client only behind a
proxy listed in ``trusted_proxies``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import openai
import pytest
from structlog.testing import capture_logs

from gateway.http.caller import client_id
from gateway.settings import Settings
from ops_support import HOLD, GatedEngine, live_server, wait_until

HELD = {"model": "tts-1", "voice": "alloy", "input": f"{HOLD} this one.", "response_format": "wav"}
QUICK = {"model": "tts-1", "voice": "alloy", "input": "A quick one.", "response_format": "wav"}


@asynccontextmanager
async def client_at(base_url: str, address: str, **kw: object) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client whose connections come from ``address`` (a loopback address of its own)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, transport=transport, **kw) as client:  # type: ignore[arg-type]
        yield client


def shares(settings: Settings, **values: object) -> Settings:
    return msgspec.structs.replace(settings, **{"max_client_share": 0.25, **values})


async def test_one_client_holds_at_most_its_share_and_others_pass(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    config = shares(settings, max_in_flight=4, max_queued=4)  # a client: 1 in flight, 1 waiting
    with capture_logs() as logs, live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        async with client_at(live.base_url, "127.0.0.2") as greedy, client_at(live.base_url, "127.0.0.3") as other:
            first = asyncio.create_task(greedy.post("/v1/audio/speech", json=HELD))
            assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 1, 10)
            second = asyncio.create_task(greedy.post("/v1/audio/speech", json=HELD))
            assert await asyncio.to_thread(wait_until, lambda: admission.queued == 1, 10)
            # 3 slots free, yet this client's second request waits: it holds its share
            assert admission.in_flight == 1 and not second.done()
            refused = await greedy.post("/v1/audio/speech", json=HELD)
            error = api_error(refused, 429, code="client_concurrency_limit")
            assert error["type"] == "rate_limit_error" and "max_client_share" in error["message"]
            assert int(refused.headers["retry-after"]) >= 1
            sdk = openai.AsyncOpenAI(
                api_key="k", base_url=f"{live.base_url}/v1", max_retries=0,
                http_client=httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")),
            )
            with pytest.raises(openai.RateLimitError) as raised:
                await sdk.audio.speech.create(model="tts-1", voice="alloy", input="Again.")
            assert raised.value.code == "client_concurrency_limit"
            # another client is admitted at once, ahead of the waiting request
            quick = await other.post("/v1/audio/speech", json=QUICK)
            assert quick.status_code == 200 and quick.content[:4] == b"RIFF"
            assert admission.queued == 1
            metrics = (await other.get("/metrics")).text
            assert 'chatterbox_admission_refusals_total{limit="client"} 2.0' in metrics
            assert 'chatterbox_admission_refusals_total{limit="server"} 0.0' in metrics
            engine.gate.set()
            assert (await first).status_code == 200 and (await second).status_code == 200
            assert admission.in_flight == 0 and admission.held_by("client", "127.0.0.2") == (0, 0)
    lines = [e for e in logs if e["event"] == "request" and e.get("status") == 429]
    assert lines and all(e["limit"] == "client" and e["client"] == "127.0.0.2" for e in lines), lines


async def test_a_full_server_is_still_server_overloaded(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(shares(settings, max_in_flight=1, max_queued=0), engine, guarded=True) as live:
        async with client_at(live.base_url, "127.0.0.2") as one, client_at(live.base_url, "127.0.0.3") as two:
            held = asyncio.create_task(one.post("/v1/audio/speech", json=HELD))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            api_error(await two.post("/v1/audio/speech", json=QUICK), 429, code="server_overloaded")
            engine.gate.set()
            assert (await held).status_code == 200


async def test_an_api_key_holds_at_most_its_share_from_any_address(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    config = msgspec.structs.replace(
        settings, max_in_flight=4, max_queued=0, max_key_share=0.5, api_keys=("sk-tenant-a-1", "sk-tenant-b-2")
    )
    with live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        key_a, key_b = {"Authorization": "Bearer sk-tenant-a-1"}, {"Authorization": "Bearer sk-tenant-b-2"}
        clients = [client_at(live.base_url, f"127.0.0.{10 + i}", headers=key_a) for i in range(3)]
        async with clients[0] as c0, clients[1] as c1, clients[2] as c2:
            held = [asyncio.create_task(c.post("/v1/audio/speech", json=HELD)) for c in (c0, c1)]
            assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 2, 10)
            refused = await c2.post("/v1/audio/speech", json=HELD)  # a third address, the same key
            api_error(refused, 429, code="key_concurrency_limit")
            async with client_at(live.base_url, "127.0.0.20", headers=key_b) as other:
                assert (await other.post("/v1/audio/speech", json=QUICK)).status_code == 200
            engine.gate.set()
            assert [(await h).status_code for h in held] == [200, 200]


async def test_one_key_alone_is_not_limited_by_the_key_share(settings: Settings) -> None:
    config = msgspec.structs.replace(settings, max_in_flight=2, max_queued=0, api_keys=("sk-only-key",))
    engine = GatedEngine(hold_after=0)
    with live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        assert "key" not in admission.shares  # one key has no one to share with
        async with client_at(live.base_url, "127.0.0.2", headers={"Authorization": "Bearer sk-only-key"}) as c:
            held = [asyncio.create_task(c.post("/v1/audio/speech", json=HELD)) for _ in range(2)]
            assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 2, 10)
            engine.gate.set()
            assert [(await h).status_code for h in held] == [200, 200]


@pytest.mark.parametrize("trusted", [False, True])
async def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(settings: Settings, api_error, trusted: bool) -> None:
    engine = GatedEngine(hold_after=0)
    config = shares(settings, max_in_flight=4, max_queued=0, trusted_proxies=("127.0.0.2",) if trusted else ())
    with live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        async with client_at(live.base_url, "127.0.0.2") as proxy, client_at(live.base_url, "127.0.0.1") as direct:
            held = asyncio.create_task(
                proxy.post("/v1/audio/speech", json=HELD, headers={"X-Forwarded-For": "198.51.100.7"})
            )
            assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 1, 10)
            second = await proxy.post(
                "/v1/audio/speech", json=QUICK, headers={"X-Forwarded-For": "198.51.100.8, 127.0.0.2"}
            )
            if trusted:  # two users behind the proxy: two clients
                assert second.status_code == 200
                assert admission.held_by("client", "198.51.100.7") == (1, 0)
            else:  # the header is ignored: the proxy's address is the one client
                api_error(second, 429, code="client_concurrency_limit")
                assert admission.held_by("client", "127.0.0.2") == (1, 0)
            # a client that is not a listed proxy cannot pick its identity with the header
            spoofed = asyncio.create_task(
                direct.post("/v1/audio/speech", json=HELD, headers={"X-Forwarded-For": "203.0.113.1"})
            )
            assert await asyncio.to_thread(wait_until, lambda: admission.held_by("client", "127.0.0.1") == (1, 0), 10)
            engine.gate.set()
            assert (await held).status_code == 200 and (await spoofed).status_code == 200


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (("203.0.113.9", 5000), "203.0.113.9"),
        (("2001:db8:1:2::1", 5000), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff:ffff:ffff:ffff", 1), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 1), "2001:db8:1:3::/64"),
        (("::ffff:198.51.100.4", 1), "198.51.100.4"),
        (("fe80::1%eth0", 1), "fe80::/64"),
        (None, "unknown"),
        (("/run/gateway.sock", None), "/run/gateway.sock"),
    ],
)
def test_who_counts_as_one_client(peer: object, client: str) -> None:
    assert client_id(peer) == client

"""The single-process server's OpenAI-contract tests, unchanged, against cluster mode: the
same test functions from tests/http/test_speech_inprocess.py (SDK over ASGI) and
tests/http/test_live_server.py (SDK and raw HTTP on a loopback server), with the ``gateway``
and ``live_server`` fixtures replaced by the app on a RemoteEngine in front of two
fake-engine replicas. What those tests read of the engine (jobs, completed, cancelled) comes
from the replicas' records."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import openai
import pytest

pytest.importorskip("ray.serve")

from cluster_harness import ClusterEngineView, cluster_settings, deploy_fake_tier, local_ray  # noqa: E402
from harness import InProcess, in_process, serve_on_loopback  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.cluster.remote_engine import RemoteEngine  # noqa: E402
from gateway.settings import Settings  # noqa: E402

HTTP_TESTS = Path(__file__).resolve().parent.parent / "http"


def _load(filename: str) -> ModuleType:
    path = HTTP_TESTS / filename
    spec = importlib.util.spec_from_file_location(f"cluster_conformance_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


for _source, _prefix in (("test_speech_inprocess.py", "inprocess"), ("test_live_server.py", "live")):
    _module = _load(_source)
    for _name in dir(_module):
        if _name.startswith("test_"):
            globals()[f"test_{_prefix}_{_name[len('test_'):]}"] = getattr(_module, _name)


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("conformance")
    settings = cluster_settings(root)
    with local_ray():
        deploy_fake_tier(settings, root / "gate")  # no gate file: nothing is held
        yield settings


@pytest.fixture
async def gateway(tier: Settings) -> AsyncIterator[InProcess]:
    async with in_process(tier, RemoteEngine(tier)) as ctx:
        yield dataclasses.replace(ctx, engine=ClusterEngineView(tier))


@dataclass
class ClusterLiveServer:
    base_url: str
    engine: ClusterEngineView

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(api_key="test", base_url=f"{self.base_url}/v1", max_retries=0)


@pytest.fixture(scope="module")
def live_server(tier: Settings) -> Iterator[ClusterLiveServer]:
    with serve_on_loopback(create_app(tier, engine=RemoteEngine(tier)), timeout_s=60) as base_url:
        yield ClusterLiveServer(base_url=base_url, engine=ClusterEngineView(tier))

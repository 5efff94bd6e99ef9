"""Serve's handle router thread ends with the Ray session that started it (it would keep
calling into Ray after ``ray.shutdown()``: gateway/cluster/handle_router.py), and the next
session in the same process routes on a loop of its own."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from cluster_harness import cluster_settings, deploy_fake_tier, local_ray  # noqa: E402

from gateway.cluster.handle_router import stop_handle_router  # noqa: E402
from gateway.cluster.remote_engine import RemoteEngine  # noqa: E402


def _router_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_run_router_event_loop" in t.name and t.is_alive()]


def test_the_router_loop_ends_with_its_ray_session_and_the_next_gets_its_own(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path, cluster_min_replicas=1, cluster_max_replicas=1)
    assert not stop_handle_router()  # none yet: nothing to stop
    for _ in range(2):
        with local_ray():
            deploy_fake_tier(settings, tmp_path / "gate")
            engine = RemoteEngine(settings)
            asyncio.run(engine.start())  # a describe() call through a handle
            assert engine.name == "cluster:fake" and len(_router_threads()) == 1
        assert not _router_threads()

"""Ray Serve deployment options for the engine replicas, derived from the settings.

Routing is Serve's default: each request goes to the less loaded of two randomly chosen
replicas (power of two choices on queue length). A replica takes at most
``max_ongoing_requests`` requests at once; that bound is sized from what one engine batches
(the vLLM engine runs up to ``vllm_max_num_seqs`` sequences per step, the reference engine
runs one job at a time behind its model lock, so a second waits ready to start). Autoscaling
aims at ``target_ongoing_requests`` per replica, a little under that bound, so new replicas
start before every slot is taken.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from gateway.settings import Settings, SettingsError

DEPLOYMENT_NAME = "EngineReplica"
REFERENCE_MAX_ONGOING = 2
"""The reference engine runs one job at a time; one more waits at the replica, ready to go."""
TARGET_FRACTION = 0.8
"""Autoscaling target as a share of max_ongoing_requests."""
HEALTH_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 20.0


def engine_kind(settings: Settings) -> str:
    """The engine each replica runs. ``auto`` means vllm on a GPU cluster: the replicas run
    on other machines, so what this process can import says nothing about them."""
    if settings.engine == "auto":
        return "vllm" if settings.device == "cuda" else "reference"
    return settings.engine


def max_ongoing_requests(settings: Settings) -> int:
    if settings.cluster_max_ongoing_requests:
        return settings.cluster_max_ongoing_requests
    kind = engine_kind(settings)
    if kind == "vllm":
        return settings.vllm_max_num_seqs
    if kind == "reference":
        return REFERENCE_MAX_ONGOING
    return settings.max_in_flight


def replica_gpus(settings: Settings) -> float:
    if settings.cluster_replica_gpus is not None:
        return settings.cluster_replica_gpus
    return 1.0 if engine_kind(settings) == "vllm" or settings.device == "cuda" else 0.0


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment(...).options``."""
    low, high = settings.cluster_min_replicas, settings.cluster_max_replicas
    if low > high:
        raise SettingsError(f"cluster_min_replicas ({low}) is above cluster_max_replicas ({high})")
    ongoing = max_ongoing_requests(settings)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": settings.cluster_max_queued_requests,
        "ray_actor_options": {"num_gpus": replica_gpus(settings), "num_cpus": settings.cluster_replica_cpus},
        "health_check_period_s": settings.cluster_health_period_s,
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
    if low == high:
        if low == 0:
            raise SettingsError("cluster_max_replicas equal to cluster_min_replicas must be at least 1")
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": max(1, math.floor(ongoing * TARGET_FRACTION)),
        }
    return options


def check_cluster_settings(settings: Settings) -> None:
    """Fail before anything starts: Ray Serve missing, or replica bounds that cannot be."""
    if importlib.util.find_spec("ray") is None:
        raise SettingsError(
            "--cluster needs Ray Serve. Install the cluster extra: pip install 'chatterbox-gateway[cluster]'."
        )
    deployment_options(settings)

"""Connect to Ray, deploy the engine application (or attach to a deployed one), and build it
for a Serve config file.

An HTTP process with ``cluster_deploy`` (the default) deploys the application when the
cluster has none of that name, and otherwise attaches to the one running, as it is: Serve
gives every deployment from Python a new version, so deploying again would restart every
replica under the other HTTP processes. To change the engine settings of a running tier,
deploy it again on purpose (``serve deploy deploy/serve-config.yaml``, or ``serve shutdown``
and start). With ``cluster_deploy=False`` a process only attaches and waits for replicas.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.cluster.loopback import LOCAL_ONLY_ENV, is_loopback, keep_ray_on_loopback
from gateway.cluster.options import DEPLOYMENT_NAME, deployment_options
from gateway.cluster.replica import EngineFactory, EngineReplica
from gateway.errors import EngineUnavailableError
from gateway.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

SECRET_FIELDS = frozenset({"api_keys", "api_keys_file", "admin_api_keys"})
"""Never shipped to the replicas (deployment arguments are visible in Ray's dashboard)."""
ATTACH_TIMEOUT_S = 600.0


def replica_settings(settings: Settings) -> dict[str, Any]:
    raw = msgspec.to_builtins(settings)
    raw["cluster"] = None  # a replica runs its engine in process
    return {k: v for k, v in raw.items() if k not in SECRET_FIELDS}


def engine_application(settings: Settings, engine_factory: EngineFactory | None = None) -> Application:
    from ray import serve

    deployment = serve.deployment(EngineReplica).options(**deployment_options(settings))
    return deployment.bind(replica_settings(settings), engine_factory)


def app_builder(args: dict[str, Any]) -> Application:
    """``import_path: gateway.cluster.deploy:app_builder`` in a Serve config: ``args`` are
    settings by field name (as in CHATTERBOX_* without the prefix); the CHATTERBOX_*
    environment of the Serve controller fills the rest."""
    return engine_application(load_settings(overrides={k.lower(): v for k, v in args.items()}))


def connect(settings: Settings) -> bool:
    """Join (or, for ``local``, start) the Ray cluster; True when this call started Ray and
    so owns it. A process already connected (a test, a Ray job) is left as it is."""
    # The server owns SIGTERM (graceful drain, then close). Ray's C++ failure-signal handler
    # would catch it too and then abort the process when Ray shuts down (exit -6, no close).
    # Read when Ray is imported and by each Ray process at start (with "local", the instance
    # started here inherits it).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    local = settings.cluster == "local"
    if local and settings.cluster_loopback_only:
        keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=None if local else settings.cluster, namespace="chatterbox", log_to_driver=False)
    if local:
        node = ray.util.get_node_ip_address()
        structlog.get_logger("gateway.cluster").info("ray_started", node_address=node, loopback_only=is_loopback(node))
        if settings.cluster_loopback_only and not is_loopback(node):
            ray.shutdown()
            raise SettingsError(
                f"cluster_loopback_only: the local Ray instance started on {node}, not on loopback "
                f"({LOCAL_ONLY_ENV} was changed after Ray read it?); set cluster_loopback_only=false to allow it"
            )
    return True


def deploy(settings: Settings, engine_factory: EngineFactory | None = None) -> DeploymentHandle:
    """Deploy the engine application unless one of its name exists, and wait until it runs;
    blocking."""
    from ray import serve

    if application_exists(settings):
        return attach(settings)
    serve.start(proxy_location="Disabled")  # the HTTP tier is ours; Serve's proxy is not used
    serve.run(engine_application(settings, engine_factory), name=settings.cluster_app_name, route_prefix=None)
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.cluster_app_name)


def application_exists(settings: Settings) -> bool:
    from ray import serve

    return settings.cluster_app_name in serve.status().applications


def attach(settings: Settings, timeout_s: float = ATTACH_TIMEOUT_S) -> DeploymentHandle:
    """A handle to an application deployed elsewhere, once it has a running replica; blocking."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while running_replicas(settings) == 0:
        if time.monotonic() > deadline:
            raise EngineUnavailableError(
                f"no replica of the Serve application '{settings.cluster_app_name}' is running "
                f"after {timeout_s:g} s; deploy it (deploy/serve-config.yaml) or start with --cluster-deploy"
            )
        time.sleep(1.0)
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.cluster_app_name)


def running_replicas(settings: Settings) -> int:
    """Engine replicas in state RUNNING (0 when the application does not exist); blocking."""
    return replica_states(settings).get("RUNNING", 0)


def replica_states(settings: Settings) -> dict[str, int]:
    """How many engine replicas are in each of Serve's states (RUNNING, STARTING, RECOVERING,
    STOPPING, ...); empty when the application does not exist. Blocking."""
    from ray import serve

    app = serve.status().applications.get(settings.cluster_app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    states = app.deployments[DEPLOYMENT_NAME].replica_states.items()
    return {getattr(state, "value", str(state)): int(count) for state, count in states if count}

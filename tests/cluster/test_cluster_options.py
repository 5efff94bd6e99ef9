"""Cluster settings without a Ray instance: deployment options from the engine's bounds, what
the replicas are sent, the CLI flags, and how Ray's failures become the gateway's errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gateway.cli import EXIT_USAGE, build_parser, main, settings_from_args
from gateway.cluster.deploy import replica_settings
from gateway.cluster.options import DEPLOYMENT_NAME, REFERENCE_MAX_ONGOING, deployment_options
from gateway.engine.factory import build_engine
from gateway.errors import EngineError, InvalidRequestError, OverloadedError
from gateway.settings import Settings, SettingsError


def test_fixed_replica_count_without_autoscaling() -> None:
    options = deployment_options(Settings(engine="fake", cluster_min_replicas=3, cluster_max_replicas=3))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 1.0}


def test_autoscaling_between_min_and_max_on_ongoing_requests() -> None:
    settings = Settings(engine="vllm", cluster_min_replicas=1, cluster_max_replicas=8, vllm_max_num_seqs=64)
    options = deployment_options(settings)
    assert "num_replicas" not in options
    assert options["max_ongoing_requests"] == 64  # a replica takes what its engine batches
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 51,
    }
    assert options["ray_actor_options"]["num_gpus"] == 1.0  # one GPU per vLLM replica


@pytest.mark.parametrize(
    ("settings", "ongoing", "gpus"),
    [
        (Settings(engine="reference", device="cpu"), REFERENCE_MAX_ONGOING, 0.0),
        (Settings(engine="reference", device="cuda"), REFERENCE_MAX_ONGOING, 1.0),
        (Settings(engine="auto", device="cuda", vllm_max_num_seqs=96), 96, 1.0),
        (Settings(engine="fake", max_in_flight=7), 7, 0.0),
        (Settings(engine="vllm", cluster_max_ongoing_requests=20, cluster_replica_gpus=0.5), 20, 0.5),
    ],
)
def test_bounds_follow_the_engine(settings: Settings, ongoing: int, gpus: float) -> None:
    options = deployment_options(settings)
    assert options["max_ongoing_requests"] == ongoing
    assert options["ray_actor_options"]["num_gpus"] == gpus


@pytest.mark.parametrize(("low", "high"), [(3, 2), (0, 0)])
def test_impossible_replica_bounds_are_a_settings_error(low: int, high: int) -> None:
    with pytest.raises(SettingsError, match="cluster_m"):
        deployment_options(Settings(engine="fake", cluster_min_replicas=low, cluster_max_replicas=high))


def test_scale_to_zero_is_allowed_with_autoscaling() -> None:
    options = deployment_options(Settings(engine="fake", cluster_min_replicas=0, cluster_max_replicas=2))
    assert options["autoscaling_config"]["min_replicas"] == 0
    assert options["autoscaling_config"]["initial_replicas"] == 1


def test_replicas_get_no_api_keys_and_run_their_engine_in_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    keys.write_text("secret-2\n")
    sent = replica_settings(
        Settings(api_keys=("secret-1",), api_keys_file=str(keys), admin_api_keys=("secret-3",), cluster="auto", engine="fake")
    )
    assert "api_keys" not in sent and "api_keys_file" not in sent and "admin_api_keys" not in sent
    assert sent["cluster"] is None and sent["engine"] == "fake"
    assert "secret" not in repr(sent)


def test_cluster_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--cluster", "auto", "--cluster-max-replicas", "4", "--no-cluster-deploy", "--cluster-replica-gpus", "1"]
    )
    settings = settings_from_args(args)
    assert (settings.cluster, settings.cluster_max_replicas, settings.cluster_deploy) == ("auto", 4, False)
    assert settings.cluster_replica_gpus == 1.0


def test_bad_cluster_values_are_settings_errors() -> None:
    args = build_parser().parse_args(["serve", "--cluster-max-queued-requests", "0"])
    with pytest.raises(SettingsError, match="cluster_max_queued_requests"):
        settings_from_args(args)


def test_cluster_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    from gateway.cluster.remote_engine import build_remote_engine

    with pytest.raises(SettingsError, match=r"chatterbox-gateway\[cluster\]"):
        build_remote_engine(Settings(cluster="auto"))
    # the command says so before it starts anything
    assert main(["serve", "--cluster", "auto", "--engine", "fake"]) == EXIT_USAGE
    assert "chatterbox-gateway[cluster]" in capsys.readouterr().err


def test_impossible_replica_bounds_stop_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--cluster", "auto", "--cluster-min-replicas", "3", "--cluster-max-replicas", "2"]) == EXIT_USAGE
    assert "cluster_min_replicas" in capsys.readouterr().err


def test_ray_failures_become_gateway_errors() -> None:
    pytest.importorskip("ray.serve")
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    from gateway.cluster.remote_engine import ReplicaLostError, gateway_error

    overloaded = gateway_error(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    assert isinstance(overloaded, OverloadedError) and overloaded.headers["Retry-After"] == "1"
    bad = InvalidRequestError("too long", param="input")
    assert gateway_error(RayTaskError("synthesize", "traceback", bad)) is bad
    other = gateway_error(RayTaskError("synthesize", "traceback", ValueError("boom")))
    assert isinstance(other, EngineError) and "ValueError: boom" in other.message
    assert isinstance(gateway_error(ActorDiedError()), ReplicaLostError)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_serve_config_builds_the_engine_application() -> None:
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gateway.cluster.deploy import app_builder

    config = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    app = schema.applications[0]
    assert app.import_path == "gateway.cluster.deploy:app_builder"
    application = app_builder(app.args)
    deployment = application._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.max_ongoing_requests == app.args["vllm_max_num_seqs"]
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert application._bound_deployment.init_args[0]["cache_dir"] == "/data/cache"


def test_the_rayservice_deploys_the_same_serve_config() -> None:
    import yaml

    documents = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in documents if d["kind"] == "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "chatterbox-gateway serve --cluster auto --no-cluster-deploy" in head["args"][0]


def test_the_local_factory_refuses_cluster_settings() -> None:
    """The in-process factory (what each replica runs) never silently builds a local engine
    for cluster settings."""
    with pytest.raises(SettingsError, match="build_remote_engine"):
        build_engine(Settings(cluster="auto", engine="fake"))


def test_ready_says_the_replicas_are_down_and_restarting() -> None:
    from gateway.cluster.remote_engine import replicas_down

    said = replicas_down("chatterbox-engine", {"STARTING": 1, "RECOVERING": 1})
    assert "replicas down" in said and "restarting" in said and "1 recovering, 1 starting" in said
    assert "deploy it again" in replicas_down("chatterbox-engine", {})

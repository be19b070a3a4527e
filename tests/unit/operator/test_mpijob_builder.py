"""The TrainingJob → MPIJob builder: names, GPUs, the launcher command line and the trainer's config."""

from __future__ import annotations

import json
from typing import Any

from fieldkube.operator import names
from fieldkube.operator.mpijob_builder import build_mpijob, trainer_config
from fieldkube.operator.spec import parse_spec


def _build(overrides: dict[str, Any] | None = None, uri: str | None = "http://mlflow:5000") -> dict[str, Any]:
    spec = parse_spec(
        {
            "dataset": {"pvc": "imgs", "path": "prepared/canola"},
            "workers": 2,
            "gpusPerWorker": 4,
            **(overrides or {}),
        }
    )
    return build_mpijob("flowers", "team-a", "uid-1", spec, uri)


def _containers(mpijob: dict[str, Any], role: str) -> dict[str, Any]:
    return mpijob["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]["containers"][0]


def _set_flags(command: list[str]) -> dict[str, Any]:
    flags = {}
    for i, arg in enumerate(command):
        if arg == "--set":
            section, _, value = command[i + 1].partition("=")
            flags[section] = json.loads(value)
    return flags


def test_the_builder_is_deterministic_and_names_follow_the_trainingjob() -> None:
    first, second = _build(), _build()
    assert first == second
    assert first["metadata"]["name"] == "flowers" and first["metadata"]["namespace"] == "team-a"
    assert first["metadata"]["labels"][names.JOB_LABEL] == "flowers"
    assert first["apiVersion"] == "kubeflow.org/v2beta1" and first["kind"] == "MPIJob"


def test_workers_request_gpus_and_the_launcher_none() -> None:
    mpijob = _build()
    worker = _containers(mpijob, "Worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    assert mpijob["spec"]["slotsPerWorker"] == 4
    launcher = _containers(mpijob, "Launcher")
    assert "nvidia.com/gpu" not in json.dumps(launcher["resources"])
    assert mpijob["spec"]["runLauncherAsWorker"] is False


def test_cpu_only_workers_get_one_slot_and_no_gpu_request() -> None:
    mpijob = _build({"gpusPerWorker": 0})
    assert mpijob["spec"]["slotsPerWorker"] == 1
    assert "nvidia.com/gpu" not in json.dumps(_containers(mpijob, "Worker")["resources"])
    command = _containers(mpijob, "Launcher")["command"]
    assert command[command.index("-np") + 1] == "2"


def test_horovod_launcher_runs_mpirun_with_one_rank_per_slot() -> None:
    command = _containers(_build(), "Launcher")["command"]
    assert command[0] == "mpirun"
    assert command[command.index("-np") + 1] == "8"
    assert "fieldkube-train" in command and "torchrun" not in command
    exported = [command[i + 1] for i, a in enumerate(command) if a == "-x"]
    assert {
        "MLFLOW_TRACKING_URI",
        "FIELDKUBE_JOB_NAMESPACE",
        "FIELDKUBE_JOB_NAME",
        "FIELDKUBE_JOB_UID",
    } <= set(exported)


def test_ddp_launcher_runs_one_torchrun_per_worker_rendezvousing_at_worker_0() -> None:
    command = _containers(_build({"training": {"runtime": {"backend": "ddp"}}}), "Launcher")["command"]
    assert command[command.index("-np") + 1] == "2"
    assert "torchrun" in command and "--nproc-per-node=4" in command and "--nnodes=2" in command
    assert "--rdzv-endpoint=flowers-worker-0.flowers.team-a.svc:29400" in command


def test_trainer_config_maps_spec_sections_and_is_valid_for_the_trainer() -> None:
    from fieldkube.trainer.config import load_config

    mpijob = _build(
        {
            "model": {"name": "segmenter-unet", "params": {"base_channels": 16}},
            "training": {"train": {"epochs": 3, "lr": 0.001}},
            "checkpoint": {"pvc": "ckpt", "path": "runs/flowers", "everySteps": 50},
            "mlflow": {"experiment": "exp", "registeredModel": "buildings", "alias": "champion"},
        }
    )
    command = _containers(mpijob, "Launcher")["command"]
    train_args = command[command.index("fieldkube-train") + 1 :]
    overrides = [train_args[i + 1] for i, a in enumerate(train_args) if a == "--set"]
    config = load_config(None, overrides)  # the trainer's own parser and validator
    assert config.model.name == "segmenter-unet" and config.model.params == {"base_channels": 16}
    assert config.data.path == "/data/prepared/canola"
    assert config.train.epochs == 3 and config.train.lr == 0.001 and config.train.batch_size == 8
    assert config.checkpoint.dir == "/checkpoints/runs/flowers" and config.checkpoint.every_steps == 50
    assert config.tracking.uri == "http://mlflow:5000" and config.tracking.experiment == "exp"
    assert (config.tracking.registered_name, config.tracking.alias) == ("buildings", "champion")
    assert config.metrics.port == names.METRICS_PORT and config.tracking.run_name == "flowers"


def test_every_example_builds_a_config_the_trainer_accepts() -> None:
    from pathlib import Path

    import yaml

    from fieldkube.trainer.config import validate_config

    root = Path(__file__).resolve().parents[3] / "manifests/examples"
    for path in sorted(root.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        validate_config(trainer_config(doc["metadata"]["name"], parse_spec(doc["spec"]), "http://m:5000"))


def test_pods_carry_job_identity_metrics_port_and_scrape_annotations() -> None:
    mpijob = _build()
    template = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
    assert env["FIELDKUBE_JOB_NAME"] == "flowers" and env["FIELDKUBE_JOB_UID"] == "uid-1"
    assert env["FIELDKUBE_JOB_NAMESPACE"] == "team-a" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    ports = [p["containerPort"] for p in template["spec"]["containers"][0]["ports"]]
    assert ports == [9400, 9401, 9402, 9403]
    assert template["metadata"]["labels"][names.JOB_LABEL] == "flowers"


def test_run_policy_suspend_scheduling_and_queue_are_mapped() -> None:
    mpijob = _build(
        {
            "runPolicy": {
                "cleanPodPolicy": "All",
                "backoffLimit": 3,
                "activeDeadlineSeconds": 600,
                "ttlSecondsAfterFinished": 60,
                "suspend": True,
            },
            "scheduling": {
                "priorityClassName": "high",
                "nodeSelector": {"gpu": "a100"},
                "queueName": "team-a",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "podMetadata": {"worker": {"annotations": {"x/y": "z"}}},
        }
    )
    policy = mpijob["spec"]["runPolicy"]
    assert policy == {
        "cleanPodPolicy": "All",
        "backoffLimit": 3,
        "suspend": True,
        "activeDeadlineSeconds": 600,
        "schedulingPolicy": {"priorityClass": "high"},
    }
    assert "ttlSecondsAfterFinished" not in policy  # the operator enforces TTL on the TrainingJob itself
    assert mpijob["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-a"
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]
    assert worker["spec"]["nodeSelector"] == {"gpu": "a100"} and "nodeSelector" not in launcher["spec"]
    assert worker["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker["spec"]["priorityClassName"] == launcher["spec"]["priorityClassName"] == "high"
    assert (
        worker["metadata"]["annotations"]["x/y"] == "z" and "x/y" not in launcher["metadata"]["annotations"]
    )


def test_clean_pod_policy_is_always_explicit() -> None:
    assert _build()["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    assert _build()["spec"]["launcherCreationPolicy"] == "WaitForWorkersReady"

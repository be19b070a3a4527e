"""The TrainingJob → MPIJob builder: names, GPUs, the launcher command line and the trainer's config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fieldkube.contract import names as contract
from fieldkube.operator import names, trainer_pod
from fieldkube.operator.mpijob_builder import MlflowCredentials, backend_of, build_mpijob, trainer_config
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


def _pod(mpijob: dict[str, Any], role: str) -> dict[str, Any]:
    return mpijob["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def _config_document(mpijob: dict[str, Any]) -> str:
    """The trainer's configuration as the launcher carries it: one JSON document in its environment."""
    env = {e["name"]: e.get("value") for e in _containers(mpijob, "Launcher")["env"]}
    document: str = env[contract.CONFIG_ENV]
    return document


def _config_of(mpijob: dict[str, Any]) -> dict[str, Any]:
    flags: dict[str, Any] = json.loads(_config_document(mpijob))
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
    command = _containers(_build({"training": {"runtime": {"backend": "horovod"}}}), "Launcher")["command"]
    assert command[0] == "mpirun"
    assert command[command.index("-np") + 1] == "8"
    assert "fieldkube-train" in command and "torchrun" not in command


def _exported(command: list[str]) -> list[str]:
    return [command[i + 1] for i, a in enumerate(command) if a == "-x"]


def test_mpirun_forwards_the_image_path_and_every_variable_the_launcher_sets() -> None:
    """ssh sessions on workers have sshd's environment: the venv's PATH must come from the launcher."""
    launcher = _containers(_build(), "Launcher")
    exported = _exported(launcher["command"])
    assert exported[:2] == ["PATH", "LD_LIBRARY_PATH"]
    assert exported[2:] == [e["name"] for e in launcher["env"]]  # exactly what is set, nothing unset
    assert {"PYTHONUNBUFFERED", "MPLCONFIGDIR", "XDG_CACHE_HOME", "MLFLOW_TRACKING_URI"} <= set(exported)
    assert "PATH" not in {e["name"] for e in launcher["env"]}  # the image's PATH is not overridden
    no_uri = _containers(_build(uri=None), "Launcher")
    assert "MLFLOW_TRACKING_URI" not in _exported(no_uri["command"])


def test_caches_under_home_go_to_tmp_because_the_root_filesystem_is_read_only() -> None:
    env = {e["name"]: e["value"] for e in _containers(_build(), "Worker")["env"]}
    for name in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TRITON_HOME"):
        assert env[name].startswith("/tmp"), name
    assert env["PYTHONUNBUFFERED"] == "1"


def test_mpirun_runs_unprivileged_and_sshes_to_port_2222_without_host_key_prompts() -> None:
    command = _containers(_build(), "Launcher")["command"]
    assert "--allow-run-as-root" not in command
    index = command.index("plm_rsh_args")
    assert command[index - 1] == "--mca"
    assert command[index + 1] == (
        "-p 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o ConnectionAttempts=10 -o LogLevel=ERROR"
    )
    # Every mpirun option precedes the program.
    assert index < command.index("-np") < command.index("fieldkube-train")


def test_ddp_launcher_runs_one_torchrun_per_worker_rendezvousing_at_worker_0() -> None:
    command = _containers(_build({"training": {"runtime": {"backend": "ddp"}}}), "Launcher")["command"]
    assert command[command.index("-np") + 1] == "2"
    assert "torchrun" in command and "--nproc-per-node=4" in command and "--nnodes=2" in command
    assert "--rdzv-endpoint=flowers-worker-0.flowers.team-a.svc:29400" in command
    assert command.index("-x") < command.index("torchrun")  # the remote torchrun is found via PATH


@pytest.mark.parametrize(
    ("gpus", "requested", "expected"),
    [
        (4, "auto", "ddp"),
        (1, "auto", "ddp"),
        (0, "auto", "horovod"),
        (4, "horovod", "horovod"),
        (0, "ddp", "ddp"),
    ],
)
def test_auto_backend_is_ddp_on_gpus_and_horovod_on_cpu(gpus: int, requested: str, expected: str) -> None:
    overrides = {"gpusPerWorker": gpus, "training": {"runtime": {"backend": requested}}}
    mpijob = _build(overrides)
    assert backend_of(parse_spec({"dataset": {"path": "d"}, **overrides})) == expected
    command = _containers(mpijob, "Launcher")["command"]
    assert ("torchrun" in command) == (expected == "ddp")
    # The resolved name is what the trainer gets, so the MPIJob alone says which backend runs.
    assert _config_of(mpijob)["runtime"]["backend"] == expected


def test_auto_is_the_default_backend_and_a_gpu_job_gets_ddp() -> None:
    mpijob = _build()
    command = _containers(mpijob, "Launcher")["command"]
    assert "torchrun" in command and _config_of(mpijob)["runtime"]["backend"] == "ddp"


def test_trainer_config_maps_spec_sections_and_is_valid_for_the_trainer() -> None:
    from fieldkube.contract.config import load_config_document

    mpijob = _build(
        {
            "model": {"name": "segmenter-unet", "params": {"base_channels": 16}},
            "training": {"train": {"epochs": 3, "lr": 0.001}},
            "checkpoint": {"pvc": "ckpt", "path": "runs/flowers", "everySteps": 50},
            "mlflow": {"experiment": "exp", "registeredModel": "buildings", "alias": "champion"},
        }
    )
    command = _containers(mpijob, "Launcher")["command"]
    assert command[command.index("fieldkube-train") :] == [
        "fieldkube-train",
        "--config-env",
        contract.CONFIG_ENV,
    ]
    # the trainer's own parser and validator; mpirun forwards the variable to every rank
    assert command[command.index(contract.CONFIG_ENV) - 1] == "-x"
    config = load_config_document(_config_document(mpijob), "test")
    assert config.model.name == "segmenter-unet" and config.model.params == {"base_channels": 16}
    assert config.data.path == "/data/prepared/canola"
    assert config.train.epochs == 3 and config.train.lr == 0.001 and config.train.batch_size == 8
    assert config.checkpoint.dir == "/checkpoints/runs/flowers" and config.checkpoint.every_steps == 50
    assert config.tracking.uri == "http://mlflow:5000" and config.tracking.experiment == "exp"
    assert (config.tracking.registered_name, config.tracking.alias) == ("buildings", "champion")
    assert config.metrics.port == contract.METRICS_PORT and config.tracking.run_name == "flowers"


def test_every_example_builds_a_config_the_trainer_accepts() -> None:
    from pathlib import Path

    import yaml

    from fieldkube.contract.config import validate_config

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


def test_workers_run_their_own_non_root_sshd_with_fresh_host_keys() -> None:
    worker = _containers(_build(), "Worker")
    shell, flag, script = worker["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    key = "/run/fieldkube-sshd/ssh_host_ed25519_key"
    steps = script.split("; ")
    assert steps[:3] == [
        "set -eu",
        f"rm -f {key} {key}.pub",  # a restarted container keeps the emptyDir and its old key
        f"ssh-keygen -q -t ed25519 -N '' -C '' -f {key}",
    ]
    sshd = steps[3].split()
    assert sshd[:9] == ["exec", "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", "2222", "-h"]
    assert sshd[9] == key
    options = dict(sshd[i + 1].split("=", 1) for i, a in enumerate(sshd) if a == "-o")
    assert options == {
        "PidFile": "/run/fieldkube-sshd/sshd.pid",
        "UsePAM": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PermitRootLogin": "no",
        "AuthorizedKeysFile": "/home/fieldkube/.ssh/authorized_keys",
        "StrictModes": "no",
        "AllowTcpForwarding": "no",
        "AllowAgentForwarding": "no",
        "X11Forwarding": "no",
    }
    # Where sshd writes (keys, pid) is a mounted emptyDir, and the keys it trusts are where the
    # mpi-operator mounts them.
    assert _mounts(worker)["/run/fieldkube-sshd"] == "sshd"
    mpijob = _build()
    assert mpijob["spec"]["sshAuthMountPath"] == "/home/fieldkube/.ssh"
    assert options["AuthorizedKeysFile"].startswith(mpijob["spec"]["sshAuthMountPath"] + "/")


def test_worker_ssh_port_matches_the_launchers_ssh_client() -> None:
    mpijob = _build()
    launcher = _containers(mpijob, "Launcher")["command"]
    rsh_args = launcher[launcher.index("plm_rsh_args") + 1].split()
    worker_script = _containers(mpijob, "Worker")["command"][2]
    assert (
        rsh_args[:2] == ["-p", str(trainer_pod.SSH_PORT)] and f"-p {trainer_pod.SSH_PORT} " in worker_script
    )


@pytest.mark.parametrize("role", ["Launcher", "Worker"])
def test_pods_run_as_uid_1000_without_privileges_on_a_read_only_root(role: str) -> None:
    pod = _pod(_build(), role)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    assert pod["automountServiceAccountToken"] is False
    # Every mount is a declared volume, and /tmp is writable on both roles.
    declared = {v["name"] for v in pod["volumes"]}
    assert set(_mounts(pod["containers"][0]).values()) <= declared
    assert _mounts(pod["containers"][0])["/tmp"] == "tmp"


def test_every_writable_worker_path_is_an_empty_dir_or_a_volume() -> None:
    pod = _pod(_build({"checkpoint": {"pvc": "ckpt", "path": "runs"}}), "Worker")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _mounts(pod["containers"][0])
    for path in ("/tmp", "/run/fieldkube-sshd", "/dev/shm", names.OUTPUT_DIR):
        assert "emptyDir" in volumes[mounts[path]], path
    assert "persistentVolumeClaim" in volumes[mounts[names.CHECKPOINT_MOUNT]]
    assert volumes[mounts[names.DATASET_MOUNT]]["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize(
    ("memory", "shm"),
    [("16Gi", "8Gi"), ("2Gi", "1Gi"), ("1Gi", "512Mi"), ("3G", "1500M"), ("1.5Gi", "768Mi")],
)
def test_dev_shm_is_memory_backed_and_half_the_memory_by_default(memory: str, shm: str) -> None:
    pod = _pod(_build({"resources": {"memory": memory}}), "Worker")
    volume = next(v for v in pod["volumes"] if v["name"] == _mounts(pod["containers"][0])["/dev/shm"])
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}


def test_shared_memory_given_in_the_spec_is_used_as_is() -> None:
    pod = _pod(_build({"resources": {"memory": "16Gi", "sharedMemory": "2Gi"}}), "Worker")
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["sizeLimit"] == "2Gi"
    launcher = _pod(_build(), "Launcher")
    assert "/dev/shm" not in _mounts(launcher["containers"][0])  # no ranks run on the launcher


def test_workers_restart_on_failure_and_the_launcher_never() -> None:
    replicas = _build()["spec"]["mpiReplicaSpecs"]
    assert replicas["Worker"]["restartPolicy"] == "OnFailure"
    assert replicas["Launcher"]["restartPolicy"] == "Never"
    # The mpi-operator sets the pod's policy from the replica's; a pod-level one would only warn.
    assert "restartPolicy" not in _pod(_build(), "Worker") and "restartPolicy" not in _pod(
        _build(), "Launcher"
    )


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_the_trainers_auto_agrees_with_the_launcher_the_operator_picks(gpus: int) -> None:
    """The trainer's `auto` follows its launcher; the operator picks the launcher from `auto`."""
    from fieldkube.trainer.backends import resolve_backend_name
    from fieldkube.trainer.launch_env import LaunchEnv

    command = _containers(_build({"gpusPerWorker": gpus}), "Launcher")["command"]
    launcher = "torchrun" if "torchrun" in command else "openmpi"
    chosen = backend_of(parse_spec({"dataset": {"path": "d"}, "gpusPerWorker": gpus}))
    assert resolve_backend_name("auto", LaunchEnv(launcher, 0, 0, 2)) == chosen


def test_a_cpu_jobs_launcher_follows_its_workers_node_selector_and_a_gpu_jobs_does_not() -> None:
    selector = {"fieldkube.io/node": "real"}
    for gpus, launcher_selected in ((0, True), (1, False)):
        mpijob = _build({"gpusPerWorker": gpus, "scheduling": {"nodeSelector": selector}})
        specs = {role: r["template"]["spec"] for role, r in mpijob["spec"]["mpiReplicaSpecs"].items()}
        assert specs["Worker"]["nodeSelector"] == selector
        assert (specs["Launcher"].get("nodeSelector") == selector) is launcher_selected, gpus


def test_mlflow_credentials_reach_both_roles_by_envfrom_and_every_rank_through_mpirun() -> None:
    spec = parse_spec({"dataset": {"pvc": "imgs", "path": "p"}, "workers": 2, "gpusPerWorker": 0})
    credentials = MlflowCredentials("mlflow-client", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    mpijob = build_mpijob("flowers", "team-a", "uid-1", spec, "http://mlflow:5000", credentials)
    for role in ("Launcher", "Worker"):
        assert _containers(mpijob, role)["envFrom"] == [{"secretRef": {"name": "mlflow-client"}}]
    command = _containers(mpijob, "Launcher")["command"]
    forwarded = [command[i + 1] for i, arg in enumerate(command) if arg == "-x"]
    assert forwarded[-2:] == ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]


def test_without_credentials_no_pod_reads_a_secret() -> None:
    mpijob = _build()
    for role in ("Launcher", "Worker"):
        assert "envFrom" not in _containers(mpijob, role)
    assert "MLFLOW_TRACKING_PASSWORD" not in _containers(mpijob, "Launcher")["command"]


def _trainer_config_of(mpijob: dict[str, Any]) -> Any:
    from fieldkube.contract.config import load_config_document

    return load_config_document(_config_document(mpijob), "test")


def test_fine_tuning_fields_reach_the_trainers_model_section() -> None:
    mpijob = _build(
        {
            "model": {
                "name": "counter-fcrn",
                "initFrom": "models:/fieldkube-counter@champion",
                "freeze": ["encoder", "middle"],
                "freezeEpochs": 3,
            }
        }
    )
    assert _config_of(mpijob)["model"] == {
        "name": "counter-fcrn",
        "params": {},
        "init_from": "models:/fieldkube-counter@champion",
        "freeze": ["encoder", "middle"],
        "freeze_epochs": 3,
    }
    config = _trainer_config_of(mpijob)  # the trainer's own parser and validator
    assert config.model.init_from == "models:/fieldkube-counter@champion"
    assert (config.model.freeze, config.model.freeze_epochs) == (["encoder", "middle"], 3)


def test_without_fine_tuning_fields_the_model_section_is_name_and_params_only() -> None:
    flags = _config_of(_build({"model": {"params": {"base_channels": 8}}}))
    assert flags["model"] == {"name": "counter-mcnn", "params": {"base_channels": 8}}
    assert "density_scale" in flags["data"]


def test_init_from_with_the_default_name_leaves_architecture_and_density_scale_to_the_source() -> None:
    mpijob = _build({"model": {"initFrom": "runs:/0a1b/model"}})
    flags = _config_of(mpijob)
    assert flags["model"] == {"init_from": "runs:/0a1b/model"}
    assert "density_scale" not in flags["data"]
    config = _trainer_config_of(mpijob)
    assert "name" not in config.model.model_fields_set and "density_scale" not in config.data.model_fields_set
    set_scale = _build(
        {"model": {"initFrom": "runs:/0a1b/model"}, "training": {"data": {"density_scale": 50}}}
    )
    assert _config_of(set_scale)["data"]["density_scale"] == 50

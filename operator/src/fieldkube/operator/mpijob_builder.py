"""Pure builder: a TrainingJob (metadata + typed spec) → the Kubeflow MPIJob that runs it. No API calls.

The launcher runs `mpirun` (Horovod: one rank per slot; DDP: one torchrun per worker) with the trainer's
whole configuration passed as `--set section=<json>` flags, so the command line alone reproduces the run.
The launcher requests no GPU; each worker requests `gpusPerWorker` GPUs and gets as many MPI slots.
"""

from __future__ import annotations

import json
from typing import Any

from fieldkube.operator import names
from fieldkube.operator.spec import TrainingJobSpec, effective_training

JOB_ENV_NAMES = ("FIELDKUBE_JOB_NAMESPACE", "FIELDKUBE_JOB_NAME", "FIELDKUBE_JOB_UID", "MLFLOW_TRACKING_URI")
LAUNCHER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}}


def trainer_config(name: str, spec: TrainingJobSpec, tracking_uri: str | None) -> dict[str, Any]:
    """The full fieldkube-train configuration: spec.training plus the sections the spec owns."""
    config = effective_training(spec)
    data = dict(config.get("data", {}))
    data["path"] = (
        f"{names.DATASET_MOUNT}/{spec.dataset.path.lstrip('/')}" if spec.dataset.pvc else spec.dataset.path
    )
    config["data"] = data
    config["model"] = {"name": spec.model.name, "params": dict(spec.model.params)}
    checkpoint_dir = None
    if spec.checkpoint.path:
        checkpoint_dir = (
            f"{names.CHECKPOINT_MOUNT}/{spec.checkpoint.path.lstrip('/')}"
            if spec.checkpoint.pvc
            else spec.checkpoint.path
        )
    config["checkpoint"] = {
        "dir": checkpoint_dir,
        "every_epochs": spec.checkpoint.everyEpochs,
        "every_steps": spec.checkpoint.everySteps,
        "keep": spec.checkpoint.keep,
        "resume": spec.checkpoint.resume,
    }
    config["tracking"] = {
        "uri": spec.mlflow.trackingUri or tracking_uri,
        "experiment": spec.mlflow.experiment,
        "run_name": name,
        "register_model": spec.mlflow.registerModel,
        "registered_name": spec.mlflow.registeredModel,
        "alias": spec.mlflow.alias,
    }
    config["metrics"] = {"port": names.METRICS_PORT}
    config["output_dir"] = f"{checkpoint_dir}/output" if checkpoint_dir else names.OUTPUT_DIR
    return config


def trainer_args(config: dict[str, Any]) -> list[str]:
    """`fieldkube-train` argv: one `--set section=<json>` per section, in a stable order."""
    args = ["fieldkube-train"]
    for section in sorted(config):
        args += ["--set", f"{section}={json.dumps(config[section], sort_keys=True, separators=(',', ':'))}"]
    return args


def backend_of(config: dict[str, Any]) -> str:
    backend = str(config.get("runtime", {}).get("backend", "auto"))
    return "horovod" if backend == "auto" else backend


def launcher_command(
    name: str, namespace: str, uid: str, spec: TrainingJobSpec, tracking_uri: str | None
) -> list[str]:
    """The launcher's argv: mpirun over the hostfile the mpi-operator writes, running the trainer."""
    config = trainer_config(name, spec, tracking_uri)
    mpirun = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "--tag-output"]
    for env_name in JOB_ENV_NAMES:
        mpirun += ["-x", env_name]
    train = trainer_args(config)
    if backend_of(config) == "ddp":
        endpoint = f"{names.worker_host(names.mpijob_name(name), namespace, 0)}:{names.RDZV_PORT}"
        torchrun = [
            "torchrun",
            f"--nnodes={spec.workers}",
            f"--nproc-per-node={spec.slots_per_worker}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={uid}",
            "--no-python",
        ]
        return [*mpirun, "-np", str(spec.workers), "--map-by", "ppr:1:node", *torchrun, *train]
    return [*mpirun, "-np", str(spec.world_size), "--map-by", "slot", *train]


def _env(name: str, namespace: str, uid: str, tracking_uri: str | None) -> list[dict[str, Any]]:
    env = [
        {"name": "FIELDKUBE_JOB_NAMESPACE", "value": namespace},
        {"name": "FIELDKUBE_JOB_NAME", "value": name},
        {"name": "FIELDKUBE_JOB_UID", "value": uid},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking_uri})
    return env


def _volumes(spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "output", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "output", "mountPath": names.OUTPUT_DIR}]
    if spec.dataset.pvc:
        volumes.append(
            {"name": "dataset", "persistentVolumeClaim": {"claimName": spec.dataset.pvc, "readOnly": True}}
        )
        mounts.append({"name": "dataset", "mountPath": names.DATASET_MOUNT, "readOnly": True})
    if spec.checkpoint.pvc:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint.pvc}})
        mounts.append({"name": "checkpoints", "mountPath": names.CHECKPOINT_MOUNT})
    return volumes, mounts


def _pod_labels(name: str, extra: dict[str, str], queue: str | None) -> dict[str, str]:
    labels = {**extra, names.JOB_LABEL: name, names.MANAGED_BY_LABEL: names.MANAGED_BY}
    if queue:
        labels[names.KUEUE_QUEUE_LABEL] = queue
    return labels


def _scheduling(spec: TrainingJobSpec, *, worker: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    if spec.scheduling.priorityClassName:
        pod["priorityClassName"] = spec.scheduling.priorityClassName
    if spec.scheduling.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.scheduling.tolerations]
    if worker and spec.scheduling.nodeSelector:
        pod["nodeSelector"] = dict(spec.scheduling.nodeSelector)
    return pod


def _worker_template(
    name: str, namespace: str, uid: str, spec: TrainingJobSpec, tracking_uri: str | None
) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    limits: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.gpusPerWorker:
        limits["nvidia.com/gpu"] = spec.gpusPerWorker
    annotations = {
        **spec.podMetadata.worker.annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(names.METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    ports = [
        {"name": f"metrics-{i}", "containerPort": names.METRICS_PORT + i, "protocol": "TCP"}
        for i in range(spec.slots_per_worker)
    ]
    return {
        "metadata": {
            "labels": _pod_labels(name, spec.podMetadata.worker.labels, spec.scheduling.queueName),
            "annotations": annotations,
        },
        "spec": {
            **_scheduling(spec, worker=True),
            "containers": [
                {
                    "name": names.TRAINER_CONTAINER,
                    "image": spec.image,
                    "imagePullPolicy": spec.imagePullPolicy,
                    "env": _env(name, namespace, uid, tracking_uri),
                    "ports": ports,
                    "resources": {"requests": dict(limits), "limits": limits},
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def _launcher_template(
    name: str, namespace: str, uid: str, spec: TrainingJobSpec, tracking_uri: str | None
) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": _pod_labels(name, spec.podMetadata.launcher.labels, spec.scheduling.queueName),
            "annotations": dict(spec.podMetadata.launcher.annotations),
        },
        "spec": {
            **_scheduling(spec, worker=False),
            "containers": [
                {
                    "name": names.TRAINER_CONTAINER,
                    "image": spec.image,
                    "imagePullPolicy": spec.imagePullPolicy,
                    "command": launcher_command(name, namespace, uid, spec, tracking_uri),
                    "env": _env(name, namespace, uid, tracking_uri),
                    "resources": LAUNCHER_RESOURCES,
                }
            ],
        },
    }


def build_mpijob(
    name: str, namespace: str, uid: str, spec: TrainingJobSpec, tracking_uri: str | None = None
) -> dict[str, Any]:
    """The MPIJob for a TrainingJob; deterministic (the owner reference is added by kopf.adopt)."""
    uri = spec.mlflow.trackingUri or tracking_uri
    labels = {names.JOB_LABEL: name, names.MANAGED_BY_LABEL: names.MANAGED_BY}
    if spec.scheduling.queueName:
        labels[names.KUEUE_QUEUE_LABEL] = spec.scheduling.queueName
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": spec.runPolicy.cleanPodPolicy,
        "backoffLimit": spec.runPolicy.backoffLimit,
        "suspend": spec.runPolicy.suspend,
    }
    if spec.runPolicy.activeDeadlineSeconds is not None:
        run_policy["activeDeadlineSeconds"] = spec.runPolicy.activeDeadlineSeconds
    if spec.scheduling.priorityClassName:
        run_policy["schedulingPolicy"] = {"priorityClass": spec.scheduling.priorityClassName}
    return {
        "apiVersion": names.MPIJOB_API_VERSION,
        "kind": "MPIJob",
        "metadata": {"name": names.mpijob_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "slotsPerWorker": spec.slots_per_worker,
            "runLauncherAsWorker": False,
            "launcherCreationPolicy": "WaitForWorkersReady",
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": "/root/.ssh",
            "runPolicy": run_policy,
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": _launcher_template(name, namespace, uid, spec, uri),
                },
                "Worker": {
                    "replicas": spec.workers,
                    "restartPolicy": "Never",
                    "template": _worker_template(name, namespace, uid, spec, uri),
                },
            },
        },
    }

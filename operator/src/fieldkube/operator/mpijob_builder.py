"""Pure builder: a TrainingJob (metadata + typed spec) → the Kubeflow MPIJob that runs it. No API calls.

The launcher runs `mpirun` (Horovod: one rank per slot; DDP: one torchrun per worker) of
`fieldkube-train --config-env FIELDKUBE_TRAINING_CONFIG`: the trainer's whole configuration is one JSON
document in that variable of the launcher (mpirun forwards it to every rank), parsed by the trainer's own
configuration model, so a number stays a number and the MPIJob alone reproduces the run.
The launcher requests no GPU; each worker requests `gpusPerWorker` GPUs and gets as many MPI slots.
Both roles run as the image's non-root user on a read-only root; workers run their own sshd
(`trainer_pod.py` holds that contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fieldkube.contract import names as contract
from fieldkube.operator import names, trainer_pod
from fieldkube.operator.spec import DEFAULT_MODEL, TrainingJobSpec, effective_training
from fieldkube.operator.training_schema import training_schema

LAUNCHER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}}


@dataclass(frozen=True)
class MlflowCredentials:
    """A Secret (in the TrainingJob's namespace) whose keys are the MLflow client's credentials.

    Both roles get it whole through `envFrom`. Ranks on workers are started over ssh, whose environment is
    sshd's, not the container's: the launcher's mpirun forwards the variables named in `env_names` (e.g.
    MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID) to them. Names are declared, not
    read from the Secret, because the operator may not read Secrets.
    """

    secret: str
    env_names: tuple[str, ...] = ()


def trainer_config(name: str, spec: TrainingJobSpec, tracking_uri: str | None) -> dict[str, Any]:
    """The full fieldkube-train configuration: spec.training plus the sections the spec owns."""
    config = effective_training(spec)
    config["runtime"] = {**config.get("runtime", {}), "backend": backend_of(spec)}
    data = dict(config.get("data", {}))
    data["path"] = (
        f"{names.DATASET_MOUNT}/{spec.dataset.path.lstrip('/')}" if spec.dataset.pvc else spec.dataset.path
    )
    if spec.model.initFrom is not None and data.get("density_scale") == _schema_default(
        "data", "density_scale"
    ):
        # left at its default, the source counter's density scale is used (its outputs are in its units)
        data.pop("density_scale")
    config["data"] = data
    config["model"] = model_section(spec)
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
    config["metrics"] = {"port": contract.METRICS_PORT}
    config["output_dir"] = f"{checkpoint_dir}/output" if checkpoint_dir else names.OUTPUT_DIR
    return config


def _schema_default(section: str, key: str) -> Any:
    return training_schema()["properties"][section]["properties"][key].get("default")


def model_section(spec: TrainingJobSpec) -> dict[str, Any]:
    """The trainer's `model` section: name and params, and the fine-tuning fields only when set.

    With `initFrom` the trainer takes the architecture from the source model, and checks it against a
    name/params that were set. The API server fills in the default name, so a job that keeps the default
    name and no params sends neither: the source's architecture is used. Any other name or params are
    sent, and a source of another architecture stops the run with a line naming both.
    """
    model = spec.model
    section: dict[str, Any] = {}
    if model.initFrom is None or model.name != DEFAULT_MODEL or model.params:
        section.update(name=model.name, params=dict(model.params))
    if model.initFrom is not None:
        section["init_from"] = model.initFrom
    if model.freeze:
        section["freeze"] = list(model.freeze)
    if model.freezeEpochs is not None:
        section["freeze_epochs"] = model.freezeEpochs
    return section


def trainer_args() -> list[str]:
    """`fieldkube-train` argv: the configuration is the launcher's CONFIG_ENV variable (`config_env`)."""
    return ["fieldkube-train", "--config-env", contract.CONFIG_ENV]


def config_env(config: dict[str, Any]) -> dict[str, str]:
    """The configuration as one JSON document in an environment variable, keys in a stable order."""
    return {"name": contract.CONFIG_ENV, "value": json.dumps(config, sort_keys=True, separators=(",", ":"))}


def backend_of(spec: TrainingJobSpec) -> str:
    """The trainer's backend, `auto` resolved: DDP on GPU workers, Horovod on CPU-only ones.

    The trainer image's Horovod is built where there is no CUDA toolkit, so it has no NCCL and would move
    every GPU allreduce through host memory; DDP uses NCCL. On CPU, Horovod (MPI/Gloo) is the launch path
    the project tests most. The resolved name is written into the configuration's `runtime.backend`, and
    the launcher follows it (torchrun for ddp, mpirun ranks for horovod), which is also what the trainer's own
    `auto` would pick under that launcher (`fieldkube.trainer.backends.resolve_backend_name`).
    """
    requested = str(effective_training(spec).get("runtime", {}).get("backend", "auto"))
    if requested != "auto":
        return requested
    return "ddp" if spec.gpusPerWorker > 0 else "horovod"


def _mpirun(env_names: list[str]) -> list[str]:
    """mpirun and its flags: ssh to the workers' sshd port, and the environment the ranks must inherit.

    No `--allow-run-as-root`: the launcher runs as the image's uid 1000. A command-line MCA value wins
    over the mpi-operator's OMPI_MCA_plm_rsh_args env, and mpirun hands it on to the orteds it starts, so
    an orted that starts further orteds (tree spawn, past 64 workers) uses the same port and options.
    """
    mpirun = ["mpirun", "--bind-to", "none", "--tag-output"]
    mpirun += ["--mca", "plm_rsh_args", trainer_pod.ssh_client_args()]
    for env_name in [*trainer_pod.IMAGE_ENV_FORWARDED, *env_names]:
        mpirun += ["-x", env_name]
    return mpirun


def launcher_command(
    name: str,
    namespace: str,
    uid: str,
    spec: TrainingJobSpec,
    tracking_uri: str | None,
    credentials: MlflowCredentials | None = None,
) -> list[str]:
    """The launcher's argv: mpirun over the hostfile the mpi-operator writes, running the trainer."""
    forwarded = [e["name"] for e in _env(name, namespace, uid, tracking_uri)]
    forwarded += [contract.CONFIG_ENV, *(credentials.env_names if credentials else ())]
    mpirun = _mpirun(forwarded)
    train = trainer_args()
    if backend_of(spec) == "ddp":
        endpoint = f"{names.worker_host(names.mpijob_name(name), namespace, 0)}:{contract.RDZV_PORT}"
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
    """The containers' env; the launcher's mpirun forwards every one of these names to the ranks."""
    env = [
        {"name": contract.JOB_NAMESPACE_ENV, "value": namespace},
        {"name": contract.JOB_NAME_ENV, "value": name},
        {"name": contract.JOB_UID_ENV, "value": uid},
        *trainer_pod.runtime_env(),
    ]
    if tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking_uri})
    return env


def _env_from(credentials: MlflowCredentials | None) -> dict[str, Any]:
    """The container's `envFrom` (as a dict to merge into it), empty without credentials."""
    if credentials is None:
        return {}
    return {"envFrom": [{"secretRef": {"name": credentials.secret}}]}


def _worker_volumes(spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes, mounts = trainer_pod.scratch_volumes(worker=True, shm_size=spec.resources.shared_memory)
    volumes.append({"name": "output", "emptyDir": {}})
    mounts.append({"name": "output", "mountPath": names.OUTPUT_DIR})
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
    """Priority, tolerations and node selection of one role's pods.

    The node selector always applies to workers. A CPU job's launcher follows its workers into the same
    node pool (it needs nothing else); a GPU job's launcher does not, because it requests no GPU and
    must not need the GPU nodes' taints tolerated to be scheduled.
    """
    pod: dict[str, Any] = {}
    if spec.scheduling.priorityClassName:
        pod["priorityClassName"] = spec.scheduling.priorityClassName
    if spec.scheduling.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.scheduling.tolerations]
    if (worker or not spec.gpusPerWorker) and spec.scheduling.nodeSelector:
        pod["nodeSelector"] = dict(spec.scheduling.nodeSelector)
    return pod


def _pod_spec(spec: TrainingJobSpec, *, worker: bool) -> dict[str, Any]:
    """What both roles' pod specs share: scheduling, the non-root security context, no API token."""
    return {
        **_scheduling(spec, worker=worker),
        "securityContext": trainer_pod.pod_security_context(),
        # Trainer pods never call the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def _worker_template(
    name: str,
    namespace: str,
    uid: str,
    spec: TrainingJobSpec,
    tracking_uri: str | None,
    credentials: MlflowCredentials | None,
) -> dict[str, Any]:
    volumes, mounts = _worker_volumes(spec)
    limits: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.gpusPerWorker:
        limits["nvidia.com/gpu"] = spec.gpusPerWorker
    annotations = {
        **spec.podMetadata.worker.annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(contract.METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    ports = [
        {"name": f"metrics-{i}", "containerPort": contract.METRICS_PORT + i, "protocol": "TCP"}
        for i in range(spec.slots_per_worker)
    ]
    return {
        "metadata": {
            "labels": _pod_labels(name, spec.podMetadata.worker.labels, spec.scheduling.queueName),
            "annotations": annotations,
        },
        "spec": {
            **_pod_spec(spec, worker=True),
            "containers": [
                {
                    "name": names.TRAINER_CONTAINER,
                    "image": spec.image,
                    "imagePullPolicy": spec.imagePullPolicy,
                    "command": trainer_pod.worker_command(),
                    "env": _env(name, namespace, uid, tracking_uri),
                    **_env_from(credentials),
                    "ports": ports,
                    "resources": {"requests": dict(limits), "limits": limits},
                    "securityContext": trainer_pod.container_security_context(),
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def _launcher_template(
    name: str,
    namespace: str,
    uid: str,
    spec: TrainingJobSpec,
    tracking_uri: str | None,
    credentials: MlflowCredentials | None,
) -> dict[str, Any]:
    volumes, mounts = trainer_pod.scratch_volumes(worker=False, shm_size=None)
    return {
        "metadata": {
            "labels": _pod_labels(name, spec.podMetadata.launcher.labels, spec.scheduling.queueName),
            "annotations": dict(spec.podMetadata.launcher.annotations),
        },
        "spec": {
            **_pod_spec(spec, worker=False),
            "containers": [
                {
                    "name": names.TRAINER_CONTAINER,
                    "image": spec.image,
                    "imagePullPolicy": spec.imagePullPolicy,
                    "command": launcher_command(name, namespace, uid, spec, tracking_uri, credentials),
                    "env": [
                        *_env(name, namespace, uid, tracking_uri),
                        config_env(trainer_config(name, spec, tracking_uri)),
                    ],
                    **_env_from(credentials),
                    "resources": LAUNCHER_RESOURCES,
                    "securityContext": trainer_pod.container_security_context(),
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def build_mpijob(
    name: str,
    namespace: str,
    uid: str,
    spec: TrainingJobSpec,
    tracking_uri: str | None = None,
    credentials: MlflowCredentials | None = None,
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
            "sshAuthMountPath": trainer_pod.SSH_AUTH_MOUNT_PATH,
            "runPolicy": run_policy,
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    # The launcher is a batch Job: runPolicy.backoffLimit decides its retries, each a new
                    # pod, and a failed one stays readable for the diagnosis.
                    "restartPolicy": "Never",
                    "template": _launcher_template(name, namespace, uid, spec, uri, credentials),
                },
                "Worker": {
                    "replicas": spec.workers,
                    # The mpi-operator recreates only missing worker pods, never failed ones: a worker
                    # that stopped under Never would stay down, and every retried launcher would ssh to
                    # it in vain. OnFailure restarts its sshd in place (the diagnosis reads the exit from
                    # the container's lastState).
                    "restartPolicy": "OnFailure",
                    "template": _worker_template(name, namespace, uid, spec, uri, credentials),
                },
            },
        },
    }

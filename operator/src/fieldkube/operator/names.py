"""Deterministic names and labels shared by the builder, the status function and the handlers."""

from __future__ import annotations

MPIJOB_API_VERSION = "kubeflow.org/v2beta1"
MPIJOB_GROUP = "kubeflow.org"
MPIJOB_VERSION = "v2beta1"
MPIJOB_PLURAL = "mpijobs"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "fieldkube-operator"
JOB_LABEL = "fieldkube.io/training-job"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Set by the mpi-operator on every pod it creates.
MPI_JOB_NAME_LABEL = "training.kubeflow.org/job-name"
MPI_ROLE_LABEL = "training.kubeflow.org/job-role"

OUTPUT_DIR = "/fieldkube/output"
DATASET_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
TRAINER_CONTAINER = "trainer"


def mpijob_name(trainingjob_name: str) -> str:
    """One MPIJob per TrainingJob, named like it: a restarted operator finds it instead of duplicating."""
    return trainingjob_name


def launcher_pod_prefix(mpijob: str) -> str:
    return f"{mpijob}-launcher"


def worker_pod_name(mpijob: str, index: int) -> str:
    return f"{mpijob}-worker-{index}"


def worker_host(mpijob: str, namespace: str, index: int) -> str:
    """The DNS name the mpi-operator's headless Service gives a worker (as in /etc/mpi/hostfile)."""
    return f"{worker_pod_name(mpijob, index)}.{mpijob}.{namespace}.svc"

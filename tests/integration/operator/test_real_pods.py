"""TrainingJobs in real pods on the local cluster's real node: the failure path.

Nothing is simulated: the operator (its own ServiceAccount) makes the MPIJob, the real mpi-operator makes
the launcher Job and the worker pods, and the real kubelet runs them with containerd from the project's
trainer image. A dataset path that does not exist must end the job Failed with the launcher pod, its exit
code and the trainer's own error in the status.

The happy path (the shipped CPU example trains over ssh across two worker pods, survives a killed worker by
resuming from its checkpoint, registers its model, and every rank is scraped) runs once, through the
installed chart, in tests/integration/platform/test_helm_install.py: each training on this 2-core node costs
minutes, so it is not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldkube.localcluster.services import TRAINER_UID, host_path_claim

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "manifests/examples/counter-cpu.yaml"
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def example(mlflow_uri: str, **changes: Any) -> dict[str, Any]:
    """The shipped CPU example, pointed at the test's MLflow server, with ``changes`` merged into spec."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["mlflow"]["trackingUri"] = mlflow_uri
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


def volumes(cluster: Any, namespace: str, dataset_root: Path, tmp_path: Path) -> Path:
    """The example's two claims: the prepared dataset (read-only) and checkpoints (trainer-writable)."""
    host_path_claim(cluster, namespace, "field-images", dataset_root)
    checkpoints = tmp_path / "checkpoints"
    host_path_claim(cluster, namespace, "field-checkpoints", checkpoints, writable_by=TRAINER_UID)
    return checkpoints


def test_missing_dataset_ends_failed_with_pod_exit_code_and_the_trainers_error(
    local_cluster: Any,
    real_node: Any,
    node_mlflow: str,
    field_dataset_root: Path,
    cluster_namespace: str,
    job_watcher: Any,
    tmp_path: Path,
) -> None:
    volumes(local_cluster, cluster_namespace, field_dataset_root, tmp_path)
    doc = example(
        node_mlflow,
        dataset={"pvc": "field-images", "path": "prepared/does-not-exist"},
        runPolicy={"backoffLimit": 0},
        diagnostics={"logTail": True},  # the trainer's error is in the launcher's log
    )
    name = doc["metadata"]["name"]
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(doc))
    status = job_watcher.wait(
        cluster_namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 600
    )
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    diagnosis = status["diagnosis"]
    assert diagnosis["role"] == "launcher" and diagnosis["pod"].startswith(f"{name}-launcher")
    assert diagnosis["exitCode"] not in (None, 0)
    text = " ".join([status.get("message", ""), diagnosis.get("message", ""), *diagnosis.get("logTail", [])])
    assert "/data/prepared/does-not-exist" in text, json.dumps(status, indent=1)

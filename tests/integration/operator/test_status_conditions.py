"""The status conditions the operator writes on the real control plane follow the Kubernetes API conventions:
one per type, each with the generation it describes and a CamelCase reason (also when False), and
`Scheduled=True` only once the scheduler has put the pods on nodes (kwok plays the GPU nodes' kubelets).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from fieldkube.operator.status_model import REASON_PATTERN

pytestmark = pytest.mark.cluster
SIM = "fieldkube.io/simulate-"


def trainingjob(name: str, **spec: Any) -> dict[str, Any]:
    body = {"dataset": {"path": "prepared/x"}, "workers": 2, "gpusPerWorker": 1, **spec}
    return {
        "apiVersion": "fieldkube.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def assert_conventions(status: dict[str, Any], generation: int) -> None:
    listed = status.get("conditions") or []
    assert len({c["type"] for c in listed}) == len(listed), listed
    for condition in listed:
        assert re.fullmatch(REASON_PATTERN, condition["reason"]), condition
        assert condition["observedGeneration"] == generation and condition["lastTransitionTime"], condition


def test_a_running_job_is_scheduled_only_once_its_pods_are_on_nodes(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    doc = trainingjob("placed", podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "600"}}})
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(doc))
    history: list[dict[str, Any]] = []

    def running(status: dict[str, Any]) -> bool:
        history.append(status)
        return status.get("phase") == "Running"

    final = job_watcher.wait(cluster_namespace, "placed", running, 60)
    written = [s for s in history if s.get("conditions")]
    assert written, history
    for status in written:
        assert_conventions(status, 1)
        if conditions(status)["Scheduled"]["status"] == "True":
            assert conditions(status)["Created"]["status"] == "True", status
    pods = local_cluster.get_json(
        "pods", "-l", "fieldkube.io/training-job=placed", namespace=cluster_namespace
    )
    assert all(p["spec"].get("nodeName") for p in pods["items"]), pods
    scheduled = conditions(final)["Scheduled"]
    assert (scheduled["status"], scheduled["reason"]) == ("True", "PodsScheduled"), final
    assert scheduled["message"] == "2/2 worker pods on nodes"
    failed = conditions(final)["Failed"]
    assert (failed["status"], failed["reason"]) == ("False", "Running"), final


def test_an_unschedulable_job_says_why_in_its_scheduled_condition(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    doc = trainingjob("greedy", workers=1, gpusPerWorker=16, pendingTimeoutSeconds=0)
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(doc))
    status = job_watcher.wait(
        cluster_namespace,
        "greedy",
        lambda s: conditions(s).get("Scheduled", {}).get("reason") == "Unschedulable",
        30,
    )
    assert_conventions(status, 1)
    scheduled = conditions(status)["Scheduled"]
    assert scheduled["status"] == "False" and "Insufficient nvidia.com/gpu" in scheduled["message"], status
    assert "greedy-worker-0" in scheduled["message"]
    assert conditions(status)["Failed"]["reason"] == "Pending"

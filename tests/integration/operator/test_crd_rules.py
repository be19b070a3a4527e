"""The TrainingJob CRD's rules as the real API server enforces them at `kubectl apply`: names the
mpi-operator would refuse, fields fixed at creation, a global batch that does not split over the
processes, quantities, the fine-tuning fields, and the status conventions (conditions keyed by type,
never an empty reason). No operator runs here: every job is suspended and nothing acts on it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster


def trainingjob(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "dataset": {"path": "prepared/x"},
        "workers": 1,
        "gpusPerWorker": 1,
        "pendingTimeoutSeconds": 0,
        "runPolicy": {"suspend": True},
        **spec,
    }
    return {
        "apiVersion": "fieldkube.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def apply(cluster: Any, namespace: str, doc: dict[str, Any], check: bool = False) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def stored(cluster: Any, namespace: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "trainingjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def assert_refused(result: Any, *expected: str) -> None:
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["1job", "a.b"])
def test_a_name_that_is_not_a_dns_1035_label_is_refused(
    local_cluster: Any, cluster_namespace: str, name: str
) -> None:
    result = apply(local_cluster, cluster_namespace, trainingjob(name))
    assert_refused(result, "metadata.name must be a DNS-1035 label")
    assert stored(local_cluster, cluster_namespace, name) is None
    apply(local_cluster, cluster_namespace, trainingjob("job-1a"), check=True)  # the rule admits good names


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"image": "fieldkube/trainer:0.2.0"}, "spec.image"),
        ({"imagePullPolicy": "Always"}, "spec.imagePullPolicy"),
        ({"resources": {"cpu": "8"}}, "spec.resources"),
        ({"mlflow": {"experiment": "other"}}, "spec.mlflow"),
        ({"checkpoint": {"keep": 5}}, "spec.checkpoint"),
        ({"scheduling": {"nodeSelector": {"pool": "a100"}}}, "spec.scheduling"),
        ({"podMetadata": {"worker": {"labels": {"team": "b"}}}}, "spec.podMetadata"),
        ({"training": {"train": {"epochs": 2}}}, "spec.training"),
        ({"workers": 2}, "spec.workers"),
        ({"model": {"freeze": ["columns"]}}, "spec.model"),
        ({"runPolicy": {"suspend": True, "backoffLimit": 3}}, "spec.runPolicy.backoffLimit"),
        ({"runPolicy": {"suspend": True, "cleanPodPolicy": "All"}}, "spec.runPolicy.cleanPodPolicy"),
        (
            {"runPolicy": {"suspend": True, "activeDeadlineSeconds": 60}},
            "spec.runPolicy.activeDeadlineSeconds",
        ),
    ],
)
def test_a_field_the_operator_reads_only_at_creation_cannot_be_edited(
    local_cluster: Any, cluster_namespace: str, edit: dict[str, Any], field: str
) -> None:
    doc = trainingjob("fixed")
    apply(local_cluster, cluster_namespace, doc, check=True)
    before = stored(local_cluster, cluster_namespace, "fixed")
    doc["spec"].update(edit)
    result = apply(local_cluster, cluster_namespace, doc)
    assert_refused(result, f"{field} is immutable once the job exists")
    after = stored(local_cluster, cluster_namespace, "fixed")
    assert after is not None and before is not None and after["spec"] == before["spec"]


def test_suspend_ttl_pending_timeout_and_log_tails_stay_editable(
    local_cluster: Any, cluster_namespace: str
) -> None:
    doc = trainingjob("editable", runPolicy={"suspend": True, "activeDeadlineSeconds": 600})
    apply(local_cluster, cluster_namespace, doc, check=True)
    doc["spec"]["runPolicy"] = {"suspend": False, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 30}
    doc["spec"]["pendingTimeoutSeconds"] = 120
    doc["spec"]["diagnostics"] = {"logTail": True, "logTailLines": 50}
    apply(local_cluster, cluster_namespace, doc, check=True)
    spec = (stored(local_cluster, cluster_namespace, "editable") or {})["spec"]
    assert spec["runPolicy"]["suspend"] is False and spec["runPolicy"]["ttlSecondsAfterFinished"] == 30
    assert spec["pendingTimeoutSeconds"] == 120 and spec["diagnostics"] == {
        "logTail": True,
        "logTailLines": 50,
    }
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True, "ttlSecondsAfterFinished": None}}})
    local_cluster.kubectl("patch", "tj", "editable", "-n", cluster_namespace, "--type=merge", "-p", patch)
    spec = (stored(local_cluster, cluster_namespace, "editable") or {})["spec"]
    assert spec["runPolicy"] == {
        "suspend": True,
        "activeDeadlineSeconds": 600,
        "backoffLimit": 0,
        "cleanPodPolicy": "Running",
    }


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(
    local_cluster: Any, cluster_namespace: str
) -> None:
    field = "spec.training.train.batch_size: Invalid value"
    expected = "(batch_mode: global) must be divisible by the number of training processes"
    six = {"workers": 3, "gpusPerWorker": 2}
    bad = trainingjob("uneven", **six, training={"train": {"batch_size": 16, "batch_mode": "global"}})
    assert_refused(apply(local_cluster, cluster_namespace, bad), field, expected)
    four_cpus = {"workers": 4, "gpusPerWorker": 0}
    cpu = trainingjob(
        "uneven-cpu", **four_cpus, training={"train": {"batch_size": 6, "batch_mode": "global"}}
    )
    assert_refused(apply(local_cluster, cluster_namespace, cpu), field, expected)
    accepted = [
        trainingjob("even", **six, training={"train": {"batch_size": 18, "batch_mode": "global"}}),
        trainingjob("even-cpu", **four_cpus, training={"train": {"batch_size": 8, "batch_mode": "global"}}),
        trainingjob("per-worker", **six, training={"train": {"batch_size": 16}}),
    ]
    for doc in accepted:
        apply(local_cluster, cluster_namespace, doc, check=True)


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"memory": "1..5Gi"}, "spec.resources.memory"),
        ({"memory": "lots"}, "spec.resources.memory"),
        ({"cpu": "0"}, "spec.resources.cpu"),
        ({"cpu": "-1"}, "spec.resources.cpu"),
        ({"sharedMemory": "4Qi"}, "spec.resources.sharedMemory"),
    ],
)
def test_a_bad_quantity_is_refused_naming_the_field(
    local_cluster: Any, cluster_namespace: str, resources: dict[str, str], field: str
) -> None:
    result = apply(local_cluster, cluster_namespace, trainingjob("greedy", resources=resources))
    assert_refused(result, f"{field} must be a positive Kubernetes quantity")


def test_quantities_the_api_server_parses_are_accepted(local_cluster: Any, cluster_namespace: str) -> None:
    resources = {"cpu": "500m", "memory": "1.5Gi", "sharedMemory": "200M"}
    apply(local_cluster, cluster_namespace, trainingjob("modest", resources=resources), check=True)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"initFrom": "models:/fieldkube-counter"}, "spec.model.initFrom must be models:/NAME@alias"),
        ({"initFrom": "runs:/abc"}, "spec.model.initFrom must be runs:/RUN_ID/PATH"),
        ({"freezeEpochs": 2}, "spec.model.freezeEpochs needs spec.model.freeze"),
        ({"freeze": ["encoder.conv"]}, "spec.model.freeze"),
    ],
)
def test_bad_fine_tuning_fields_are_refused(
    local_cluster: Any, cluster_namespace: str, model: dict[str, Any], expected: str
) -> None:
    assert_refused(apply(local_cluster, cluster_namespace, trainingjob("tuned", model=model)), expected)


def test_a_fine_tuning_job_is_stored_as_written(local_cluster: Any, cluster_namespace: str) -> None:
    model = {"initFrom": "models:/fieldkube-counter@champion", "freeze": ["columns"], "freezeEpochs": 2}
    apply(local_cluster, cluster_namespace, trainingjob("tuned", model=model), check=True)
    spec = (stored(local_cluster, cluster_namespace, "tuned") or {})["spec"]
    assert spec["model"] == {**model, "name": "counter-mcnn"}


def _patch_status(cluster: Any, namespace: str, conditions: list[dict[str, Any]]) -> Any:
    patch = json.dumps({"status": {"phase": "Pending", "conditions": conditions}})
    return cluster.kubectl(
        "patch",
        "tj",
        "watched",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
        check=False,
    )


def test_status_conditions_are_a_map_by_type_with_non_empty_reasons(
    local_cluster: Any, cluster_namespace: str
) -> None:
    apply(local_cluster, cluster_namespace, trainingjob("watched"), check=True)
    good = {
        "type": "Failed",
        "status": "False",
        "reason": "Pending",
        "observedGeneration": 1,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    assert _patch_status(local_cluster, cluster_namespace, [good]).returncode == 0
    duplicated = _patch_status(local_cluster, cluster_namespace, [good, {**good, "reason": "Running"}])
    assert_refused(duplicated, "status.conditions[1]", "Duplicate value")
    empty = _patch_status(local_cluster, cluster_namespace, [{**good, "reason": ""}])
    assert_refused(empty, "status.conditions[0].reason")
    status = (stored(local_cluster, cluster_namespace, "watched") or {})["status"]
    assert status["conditions"] == [{**good, "message": ""}]

"""`pod_events.start_problem` reads the events the real mpi-operator and Job controller write when admission
refuses a job's pods: a ResourceQuota refuses a worker, then the launcher, and each refusal is the
reason until the pod exists. The MPIJob is the builder's, applied directly (no operator runs here).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fieldkube.operator.mpijob_builder import build_mpijob
from fieldkube.operator.names import MPI_ROLE_LABEL
from fieldkube.operator.pod_events import start_problem
from fieldkube.operator.spec import parse_spec

pytestmark = pytest.mark.cluster


def quota(cluster: Any, namespace: str, pods: int) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "pods", "namespace": namespace},
        "spec": {"hard": {"pods": str(pods)}},
    }
    cluster.apply(doc)


def problem(cluster: Any, namespace: str) -> tuple[str, str, str] | None:
    pods = cluster.get_json("pods", namespace=namespace)["items"]
    events = cluster.get_json("events", namespace=namespace)["items"]
    return start_problem(pods, events, MPI_ROLE_LABEL)


def test_quota_refusals_of_a_worker_then_the_launcher_are_read_from_the_real_events(
    local_cluster: Any, cluster_namespace: str
) -> None:
    quota(local_cluster, cluster_namespace, 1)
    spec = parse_spec(
        {
            "dataset": {"path": "prepared/x"},
            "workers": 2,
            "gpusPerWorker": 1,
            "podMetadata": {"launcher": {"annotations": {"fieldkube.io/simulate-run-seconds": "600"}}},
        }
    )
    mpijob = build_mpijob("capped", cluster_namespace, "uid-capped", spec)
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(mpijob))

    worker = local_cluster.wait_for(
        "the worker refusal read from the MPIJob's events",
        lambda: problem(local_cluster, cluster_namespace),
        60,
    )
    assert (worker[0], worker[2]) == ("QuotaExceeded", "capped-worker-1"), worker
    assert "worker pod created failed" in worker[1] and "exceeded quota: pods" in worker[1], worker

    quota(local_cluster, cluster_namespace, 2)  # both workers fit; the launcher does not

    def launcher_refused() -> tuple[str, str, str] | None:
        found = problem(local_cluster, cluster_namespace)
        return found if found is not None and found[2].startswith("capped-launcher") else None

    launcher = local_cluster.wait_for(
        "the launcher refusal read from the launcher Job's events", launcher_refused, 90
    )
    assert launcher[0] == "QuotaExceeded" and "Error creating" in launcher[1], launcher

    quota(local_cluster, cluster_namespace, 3)
    local_cluster.wait_for(
        "no start problem once every pod exists",
        lambda: problem(local_cluster, cluster_namespace) is None,
        90,
    )

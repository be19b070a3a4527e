"""The local control plane is real: RBAC-enforcing API server, real scheduler, real mpi-operator.

Every test runs against the session's ``local_cluster`` (tests/integration/conftest.py); only the
kubelet's part is simulated, by kwok (hack/cluster/kwok-stages.yaml).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

IMAGE = "registry.invalid/fieldkube/never-pulled:0"


def pod_manifest(
    name: str,
    namespace: str,
    gpus: int = 0,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE, "resources": resources}],
        },
    }


def get_pod(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cluster.get_json("pod", name, namespace=namespace)
    return pod


def wait_for_phase(
    cluster: Any, namespace: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        pod = get_pod(cluster, namespace, name)
        return pod if pod.get("status", {}).get("phase") == phase else None

    result: dict[str, Any] = cluster.wait_for(f"pod {namespace}/{name} to be {phase}", probe, timeout)
    return result


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


def test_server_is_the_pinned_kubernetes_release(local_cluster: Any) -> None:
    version = json.loads(local_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == local_cluster.versions.kubernetes
    assert version["clientVersion"]["gitVersion"] == local_cluster.versions.kubernetes
    assert local_cluster.server.startswith("https://127.0.0.1:")


def test_nodes_are_fake_gpu_nodes_ready_for_scheduling(local_cluster: Any) -> None:
    nodes = local_cluster.get_json("nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == sorted(local_cluster.node_names)
    for node in nodes:
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(local_cluster.gpus_per_node)
        assert condition(node, "Ready")["status"] == "True"
        assert not node["spec"].get("taints")


def test_unprivileged_service_account_token_is_forbidden_until_granted(
    local_cluster: Any, cluster_namespace: str
) -> None:
    kubeconfig = local_cluster.service_account_kubeconfig(cluster_namespace, "nobody")
    denied = local_cluster.kubectl("get", "pods", "-n", cluster_namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{cluster_namespace}:nobody" in denied.stderr

    raw = local_cluster.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{cluster_namespace}/pods", kubeconfig=kubeconfig, check=False
    )
    assert "(Forbidden)" in raw.stderr or "403" in raw.stderr

    local_cluster.kubectl(
        "create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", cluster_namespace
    )
    local_cluster.kubectl(
        "create",
        "rolebinding",
        "nobody-reads-pods",
        "--role=pod-reader",
        f"--serviceaccount={cluster_namespace}:nobody",
        "-n",
        cluster_namespace,
    )
    local_cluster.wait_for(
        "the RoleBinding to take effect",
        lambda: (
            local_cluster.kubectl(
                "get", "pods", "-n", cluster_namespace, kubeconfig=kubeconfig, check=False
            ).returncode
            == 0
        ),
        timeout=15,
    )
    still_denied = local_cluster.kubectl("get", "pods", "-A", kubeconfig=kubeconfig, check=False)
    assert still_denied.returncode != 0 and "Forbidden" in still_denied.stderr


def test_gpu_pod_is_scheduled_on_a_fake_gpu_node_and_runs_to_success(
    local_cluster: Any, cluster_namespace: str
) -> None:
    annotations = {"fieldkube.io/simulate-run-seconds": "3"}
    local_cluster.apply(pod_manifest("gpu-pod", cluster_namespace, gpus=2, annotations=annotations))

    running = wait_for_phase(local_cluster, cluster_namespace, "gpu-pod", "Running", timeout=30)
    assert running["spec"]["nodeName"] in local_cluster.node_names
    assert condition(running, "PodScheduled")["status"] == "True"
    assert condition(running, "Ready")["status"] == "True"
    assert running["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]

    done = wait_for_phase(local_cluster, cluster_namespace, "gpu-pod", "Succeeded", timeout=30)
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"

    events = local_cluster.get_json("events", namespace=cluster_namespace)["items"]
    scheduled = [e for e in events if e["reason"] == "Scheduled" and e["involvedObject"]["name"] == "gpu-pod"]
    assert scheduled, "the scheduler recorded no Scheduled event"
    assert (scheduled[0].get("reportingComponent") or scheduled[0]["source"].get("component")) == (
        "default-scheduler"
    )


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending_unschedulable(
    local_cluster: Any, cluster_namespace: str
) -> None:
    too_many = local_cluster.gpus_per_node + 1
    local_cluster.apply(pod_manifest("greedy", cluster_namespace, gpus=too_many))

    def unschedulable() -> dict[str, Any] | None:
        cond = condition(get_pod(local_cluster, cluster_namespace, "greedy"), "PodScheduled")
        return cond if cond.get("reason") == "Unschedulable" else None

    cond = local_cluster.wait_for("the scheduler to mark the pod Unschedulable", unschedulable, timeout=30)
    assert cond["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert f"0/{local_cluster.nodes} nodes are available" in cond["message"]
    time.sleep(3)
    pod = get_pod(local_cluster, cluster_namespace, "greedy")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_simulated_oom_kill_ends_the_pod_failed_with_exit_code_137(
    local_cluster: Any, cluster_namespace: str
) -> None:
    annotations = {
        "fieldkube.io/simulate-exit-code": "137",
        "fieldkube.io/simulate-reason": "OOMKilled",
        "fieldkube.io/simulate-run-seconds": "1",
    }
    local_cluster.apply(pod_manifest("oom", cluster_namespace, gpus=1, annotations=annotations))
    failed = wait_for_phase(local_cluster, cluster_namespace, "oom", "Failed", timeout=30)
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137
    assert terminated["reason"] == "OOMKilled"


def test_pod_keeps_running_until_a_failure_is_injected_into_it(
    local_cluster: Any, cluster_namespace: str
) -> None:
    local_cluster.apply(pod_manifest("server", cluster_namespace, gpus=1))
    wait_for_phase(local_cluster, cluster_namespace, "server", "Running", timeout=30)
    time.sleep(5)
    assert get_pod(local_cluster, cluster_namespace, "server")["status"]["phase"] == "Running"

    local_cluster.kubectl(
        "annotate",
        "pod",
        "server",
        "-n",
        cluster_namespace,
        "fieldkube.io/simulate-exit-code=3",
        "fieldkube.io/simulate-run-seconds=0",
    )
    failed = wait_for_phase(local_cluster, cluster_namespace, "server", "Failed", timeout=30)
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"


def mpijob_manifest(name: str, namespace: str, workers: int, gpus_per_worker: int) -> dict[str, Any]:
    def template(container: str, command: list[str], gpus: int) -> dict[str, Any]:
        resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
        return {
            "spec": {
                "containers": [
                    {"name": container, "image": IMAGE, "command": command, "resources": resources}
                ]
            }
        }

    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "slotsPerWorker": gpus_per_worker,
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"cleanPodPolicy": "None"},
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "template": template(
                        "launcher", ["mpirun", "-np", str(workers * gpus_per_worker), "true"], 0
                    ),
                },
                "Worker": {"replicas": workers, "template": template("worker", [], gpus_per_worker)},
            },
        },
    }


def test_mpijob_is_run_by_the_real_mpi_operator_to_success(
    local_cluster: Any, cluster_namespace: str
) -> None:
    workers, gpus = 2, 4
    local_cluster.apply(mpijob_manifest("pi", cluster_namespace, workers, gpus))

    def succeeded() -> dict[str, Any] | None:
        job = local_cluster.get_json("mpijob", "pi", namespace=cluster_namespace)
        return job if condition(job, "Succeeded").get("status") == "True" else None

    job = local_cluster.wait_for("MPIJob pi to succeed", succeeded, timeout=90)
    assert condition(job, "Created")["status"] == "True"
    assert condition(job, "Failed").get("status") != "True"

    launcher = local_cluster.get_json("job", "pi-launcher", namespace=cluster_namespace)
    assert launcher["metadata"]["ownerReferences"][0]["kind"] == "MPIJob"
    assert launcher["status"].get("succeeded") == 1
    launcher_container = launcher["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in launcher_container.get("resources", {}).get("limits", {})

    pods = local_cluster.get_json(
        "pods", "-l", "training.kubeflow.org/job-role=worker", namespace=cluster_namespace
    )["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"pi-worker-{i}" for i in range(workers)]
    for pod in pods:
        assert pod["spec"]["nodeName"] in local_cluster.node_names
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == str(gpus)
        assert pod["status"]["phase"] == "Running"

    hostfile = local_cluster.get_json("configmap", "pi-config", namespace=cluster_namespace)["data"][
        "hostfile"
    ]
    for i in range(workers):
        assert f"pi-worker-{i}" in hostfile

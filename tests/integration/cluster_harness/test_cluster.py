"""The local control plane is real: RBAC-enforcing API server, real scheduler, real mpi-operator.

The first test drives `make cluster` / `make cluster-down` (a cluster of its own, with the real
fieldkube operator); the others run against the session's ``local_cluster``
(tests/integration/conftest.py). Only the kubelet's part is simulated, by kwok
(fieldkube/localcluster/kwok-stages.yaml).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fieldkube.localcluster import node as real_node
from fieldkube.localcluster.node import NODE_IP

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[3]
IMAGE = "registry.invalid/fieldkube/never-pulled:0"
LOOPBACK = {"127.0.0.1", "::1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def make(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
    )


@pytest.mark.real_node  # `make cluster` starts the real node
def test_make_cluster_runs_the_operator_as_its_service_account_and_cluster_down_stops_all(
    tmp_path: Path,
) -> None:
    """Runs before the session cluster starts (first in the file), so only one cluster runs at a time."""
    state = tmp_path / "cluster"
    health = free_port()
    operator = (
        f"{Path(sys.executable).parent / 'fieldkube-operator'} run --standalone --bind-address 127.0.0.1"
        f" --metrics-port {free_port()} --health-port {health}"
    )
    up = make("cluster", f"CLUSTER_DIR={state}", "NODES=2", f"OPERATOR_CMD={operator}")
    processes: dict[str, Any] = {}
    try:
        assert up.returncode == 0, f"make cluster failed:\n{up.stdout}\n{up.stderr}"
        assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
        processes = json.loads((state / "processes.json").read_text())
        assert set(processes) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "mpi-operator",
            "containerd",
            "kubelet",
            "kube-proxy",
            "coredns",
            "api-forward",
            "fieldkube-operator",
        }

        kubectl = str(processes["kube-apiserver"]["argv"][0]).replace("kube-apiserver", "kubectl")
        nodes = subprocess.run(
            [kubectl, f"--kubeconfig={state / 'kubeconfig'}", "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        assert nodes == ["node/fieldkube-node", "node/gpu-node-0", "node/gpu-node-1"]

        # The operator runs with its ServiceAccount's bound token, not the admin certificate.
        environ = Path(f"/proc/{processes['fieldkube-operator']['pid']}/environ").read_bytes().split(b"\0")
        kubeconfig = next(e for e in environ if e.startswith(b"KUBECONFIG=")).decode().split("=", 1)[1]
        whoami = subprocess.run(
            [
                kubectl,
                f"--kubeconfig={kubeconfig}",
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert whoami == "system:serviceaccount:fieldkube-system:fieldkube-operator"

        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, (state / "logs" / "fieldkube-operator.log").read_text()
                time.sleep(0.5)

        status = make("cluster-status", f"CLUSTER_DIR={state}")
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        down = make("cluster-down", f"CLUSTER_DIR={state}")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    still_running = [name for name, proc in processes.items() if pid_alive(proc["pid"])]
    assert not still_running
    assert make("cluster-status", f"CLUSTER_DIR={state}").returncode != 0
    assert (state / "logs" / "kube-apiserver.log").exists(), "the logs are kept after cluster-down"


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
    # The real node (started by the real-node tests when they share this session's cluster) is not a fake one.
    nodes = [
        n
        for n in local_cluster.get_json("nodes")["items"]
        if n["metadata"].get("labels", {}).get(real_node.NODE_LABEL) != real_node.NODE_LABEL_VALUE
    ]
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
    all_nodes = len(local_cluster.get_json("nodes")["items"])  # the real node too, where it runs
    assert f"0/{all_nodes} nodes are available" in cond["message"]
    time.sleep(3)
    pod = get_pod(local_cluster, cluster_namespace, "greedy")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


@pytest.mark.parametrize(("exit_code", "reason"), [(137, "OOMKilled"), (137, "Evicted")])
def test_simulated_kill_ends_the_pod_failed_with_its_exit_code_and_reason(
    local_cluster: Any, cluster_namespace: str, exit_code: int, reason: str
) -> None:
    annotations = {
        "fieldkube.io/simulate-exit-code": str(exit_code),
        "fieldkube.io/simulate-reason": reason,
        "fieldkube.io/simulate-run-seconds": "1",
    }
    local_cluster.apply(pod_manifest("killed", cluster_namespace, gpus=1, annotations=annotations))
    failed = wait_for_phase(local_cluster, cluster_namespace, "killed", "Failed", timeout=30)
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == exit_code
    assert terminated["reason"] == reason
    if reason == "Evicted":  # as the kubelet's eviction manager reports it, on the pod itself
        assert failed["status"]["reason"] == "Evicted"
        assert "low on resource" in failed["status"]["message"]
    else:
        assert "reason" not in failed["status"]


def test_pod_keeps_running_until_a_failure_is_injected_into_it(
    local_cluster: Any, cluster_namespace: str
) -> None:
    local_cluster.apply(pod_manifest("server", cluster_namespace, gpus=1))
    wait_for_phase(local_cluster, cluster_namespace, "server", "Running", timeout=30)
    time.sleep(3)  # longer than the default run time (2 s) of a pod meant to terminate
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


def test_every_process_of_the_cluster_listens_on_loopback_only(local_cluster: Any) -> None:
    sockets = local_cluster.listening_sockets()
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "mpi-operator"):
        assert sockets.get(component), f"{component} listens on nothing"
    assert (
        "127.0.0.1",
        int(local_cluster.server.rsplit(":", 1)[1]),
    ) in sockets["kube-apiserver"]
    # The real node, when the session runs one, serves its kubelet and DNS on its own bridge address.
    allowed = LOOPBACK | {NODE_IP}
    exposed = {name: [a for a in addrs if a[0] not in allowed] for name, addrs in sockets.items()}
    assert not any(exposed.values()), exposed


def test_processes_started_for_a_session_die_with_it(tmp_path: Path) -> None:
    """A session killed hard (SIGKILL) must not leave a control plane behind: PR_SET_PDEATHSIG."""
    script = (
        "import sys; from fieldkube.localcluster import harness; "
        "c = harness.LocalCluster(sys.argv[1], die_with_parent=True); "
        "print(c.spawn('sleeper', ['sleep', '600']), flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert pid_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while pid_alive(child):
        assert time.monotonic() < deadline, f"pid {child} outlived the process that started it"
        time.sleep(0.1)


def test_failing_launcher_fails_the_mpijob(local_cluster: Any, cluster_namespace: str) -> None:
    job = mpijob_manifest("broken", cluster_namespace, workers=1, gpus_per_worker=1)
    job["spec"]["runPolicy"]["backoffLimit"] = 0
    job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["metadata"] = {
        "annotations": {"fieldkube.io/simulate-exit-code": "2", "fieldkube.io/simulate-run-seconds": "1"}
    }
    local_cluster.apply(job)

    def failed() -> dict[str, Any] | None:
        obj = local_cluster.get_json("mpijob", "broken", namespace=cluster_namespace)
        return obj if condition(obj, "Failed").get("status") == "True" else None

    obj = local_cluster.wait_for("MPIJob broken to fail", failed, timeout=60)
    assert condition(obj, "Succeeded").get("status") != "True"
    pods = local_cluster.get_json(
        "pods", "-l", "training.kubeflow.org/job-role=launcher", namespace=cluster_namespace
    )["items"]
    assert pods
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    assert terminated["reason"] == "Error"


def harness_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fieldkube.localcluster", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--nodes", "0"], {}, "nodes must be >= 1 (got 0)"),
        (["--gpus-per-node", "-1"], {}, "gpus_per_node must be >= 0 (got -1)"),
        ([], {"FIELDKUBE_CACHE": "/nonexistent/fieldkube"}, "build them with `make dev`"),
    ],
)
def test_bad_cluster_parameters_are_refused_with_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    state = tmp_path / "cluster"
    result = harness_cli("up", "--state-dir", str(state), *args, env=env)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("local-cluster: error:")
    assert "Traceback" not in result.stderr
    assert not state.exists(), "nothing is written for a refused start"


def test_a_directory_that_holds_no_cluster_is_never_wiped(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = harness_cli("up", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert "is not empty and holds no cluster: refusing to wipe it" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
